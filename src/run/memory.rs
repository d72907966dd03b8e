//! Rows built in this run, kept in memory while a selected node still has
//! to read them (the storing thread holds their bytes meanwhile).

use crate::plan::Graph;
use crate::stages::Rows;
use std::collections::HashMap;

pub struct Memory {
    rows: HashMap<usize, Rows>,
    /// For each node, how many selected nodes that read it are still to come.
    readers_left: Vec<usize>,
    deps: Vec<Vec<usize>>,
}

impl Memory {
    pub fn new(graph: &Graph, selected: &[bool]) -> Memory {
        let mut readers_left = vec![0; graph.nodes.len()];
        for (_, n) in graph.nodes.iter().enumerate().filter(|(i, _)| selected[*i]) {
            for &d in &n.deps {
                readers_left[d] += 1;
            }
        }
        Memory { rows: HashMap::new(), readers_left, deps: graph.nodes.iter().map(|n| n.deps.clone()).collect() }
    }

    /// The rows of node `idx`, if this run built it and a reader is to come.
    pub fn get(&self, idx: usize) -> Option<&Rows> {
        self.rows.get(&idx)
    }

    /// Keeps the rows node `idx` just produced, if a selected node reads them.
    pub fn keep(&mut self, idx: usize, rows: Option<Rows>, label: &str) {
        if self.readers_left[idx] > 0 {
            let rows = rows.unwrap_or_else(|| panic!("{label} has readers, so its stage must hand over its rows"));
            self.rows.insert(idx, rows);
        }
    }

    /// Node `idx` is resolved: its inputs have one reader fewer.
    pub fn done(&mut self, idx: usize) {
        for &d in &self.deps[idx] {
            self.readers_left[d] -= 1;
            if self.readers_left[d] == 0 {
                self.rows.remove(&d);
            }
        }
    }
}
