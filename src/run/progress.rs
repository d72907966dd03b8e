//! Progress of a node's shards: a bar with units done (prompts, or
//! responses scored), tokens/s and ETA on a terminal; otherwise a log line
//! per shard.

use std::cell::Cell;
use std::time::Instant;

pub struct Progress {
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    tokens: Cell<usize>,
    done: Cell<usize>,
    /// Units built by this process (not found cached), for the rate.
    built: Cell<usize>,
    total: usize,
}

impl Progress {
    pub fn new(label: &str, total: usize, unit: &str) -> Progress {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let template = format!("{{prefix}} [{{bar:30}}] {{pos}}/{{len}} {unit}, {{msg}}, ETA {{eta}}");
            let style = indicatif::ProgressStyle::with_template(&template)
                .expect("the template is valid")
                .progress_chars("=> ");
            indicatif::ProgressBar::new(total as u64).with_style(style).with_prefix(label.to_string())
        });
        Progress { bar, started: Instant::now(), tokens: 0.into(), done: 0.into(), built: 0.into(), total }
    }

    /// One unit finished with `tokens` tokens.
    pub fn unit_done(&self, tokens: usize) {
        self.tokens.set(self.tokens.get() + tokens);
        self.built.set(self.built.get() + 1);
        self.cached(1);
        if let Some(bar) = &self.bar {
            bar.set_message(format!("{:.1} tokens/s", self.tokens.get() as f64 / self.started.elapsed().as_secs_f64()));
        }
    }

    /// Units found in the cache.
    pub fn cached(&self, units: usize) {
        self.done.set(self.done.get() + units);
        if let Some(bar) = &self.bar {
            bar.set_position(self.done.get() as u64);
        }
    }

    /// `D/T units, ETA Ns`: the node's units done (here or elsewhere) and
    /// how long the rest takes at this process's rate.
    pub fn status(&self, unit: &str) -> String {
        let (done, built) = (self.done.get(), self.built.get());
        let eta = match built {
            0 => "unknown".to_string(),
            _ => {
                let per_unit = self.started.elapsed().as_secs_f64() / built as f64;
                format!("{:.0}s", per_unit * self.total.saturating_sub(done) as f64)
            }
        };
        format!("{done}/{} {unit}, ETA {eta}", self.total)
    }

    pub fn log(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
