//! Reading one column of a user's table: `.parquet`, `.jsonl` or `.json`.

use crate::formats::simpo::Message;
use anyhow::{Context, Result, anyhow, bail};
use arrow_array::{Array, StructArray, cast::AsArray};
use arrow_schema::DataType;
use parquet::arrow::{ProjectionMask, arrow_reader::ParquetRecordBatchReaderBuilder};
use std::path::Path;

/// One row's value in the prompt column.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    Text(String),
    Messages(Vec<Message>),
    /// Null, or a JSON value of another type (described).
    Unusable(String),
}

/// The file kinds prefgen reads prompts from.
pub fn is_table_file(path: &Path) -> bool {
    matches!(path.extension().and_then(|e| e.to_str()), Some("parquet" | "jsonl" | "json"))
}

/// Every row's value in `column`, in file order.
pub fn read_column(path: &Path, column: &str) -> Result<Vec<Cell>> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("parquet") => read_parquet(path, column),
        Some("jsonl") => read_json_lines(path, column),
        Some("json") => read_json(path, column),
        _ => bail!("{}: not a .parquet, .jsonl or .json file", path.display()),
    }
}

fn read_parquet(path: &Path, column: &str) -> Result<Vec<Cell>> {
    let shown = path.display();
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {shown}"))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{shown}: not a readable parquet file"))?;
    let schema = builder.schema().clone();
    let idx = schema.index_of(column).map_err(|_| {
        let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
        anyhow!("{shown}: no column {column:?} (columns: {})", names.join(", "))
    })?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [idx]);
    let reader = builder.with_projection(mask).build()?;
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.with_context(|| format!("{shown}: cannot read"))?;
        let col = batch.column(0);
        let cells = arrow_cells(col.as_ref()).ok_or_else(|| {
            anyhow!("{shown}: column {column:?} has type {}, not a string or a message list", col.data_type())
        })?;
        out.extend(cells);
    }
    Ok(out)
}

/// Strings of a string array, whatever its offset width.
fn arrow_strings(arr: &dyn Array) -> Option<Vec<Option<String>>> {
    let collect = |it: &mut dyn Iterator<Item = Option<&str>>| it.map(|s| s.map(str::to_string)).collect();
    match arr.data_type() {
        DataType::Utf8 => Some(collect(&mut arr.as_string::<i32>().iter())),
        DataType::LargeUtf8 => Some(collect(&mut arr.as_string::<i64>().iter())),
        DataType::Utf8View => Some(collect(&mut arr.as_string_view().iter())),
        _ => None,
    }
}

fn arrow_messages(arr: &StructArray) -> Option<Vec<Message>> {
    let roles = arrow_strings(arr.column_by_name("role")?.as_ref())?;
    let contents = arrow_strings(arr.column_by_name("content")?.as_ref())?;
    Some(
        roles
            .into_iter()
            .zip(contents)
            .map(|(r, c)| Message { role: r.unwrap_or_default(), content: c.unwrap_or_default() })
            .collect(),
    )
}

fn arrow_cells(arr: &dyn Array) -> Option<Vec<Cell>> {
    if let Some(strings) = arrow_strings(arr) {
        return Some(strings.into_iter().map(|s| s.map_or(Cell::Unusable("null".into()), Cell::Text)).collect());
    }
    let lists: Vec<Option<std::sync::Arc<dyn Array>>> = match arr.data_type() {
        DataType::List(_) => arr.as_list::<i32>().iter().collect(),
        DataType::LargeList(_) => arr.as_list::<i64>().iter().collect(),
        _ => return None,
    };
    lists
        .into_iter()
        .map(|item| match item {
            None => Some(Cell::Unusable("null".into())),
            Some(values) => Some(Cell::Messages(arrow_messages(values.as_struct_opt()?)?)),
        })
        .collect()
}

fn json_cell(value: Option<&serde_json::Value>) -> Option<Cell> {
    use serde_json::Value;
    Some(match value? {
        Value::String(s) => Cell::Text(s.clone()),
        Value::Array(items) => {
            match items.iter().map(|m| serde_json::from_value::<Message>(m.clone()).ok()).collect::<Option<Vec<_>>>() {
                Some(msgs) => Cell::Messages(msgs),
                None => Cell::Unusable("a list that is not of {role, content} messages".into()),
            }
        }
        Value::Null => Cell::Unusable("null".into()),
        other => Cell::Unusable(format!("a JSON {}", json_kind(other))),
    })
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Bool(_) => "boolean",
        serde_json::Value::Number(_) => "number",
        serde_json::Value::Object(_) => "object",
        _ => "value",
    }
}

fn cells_of_rows(path: &Path, column: &str, rows: Vec<(usize, serde_json::Value)>, unit: &str) -> Result<Vec<Cell>> {
    rows.into_iter()
        .map(|(n, row)| {
            json_cell(row.get(column)).ok_or_else(|| anyhow!("{}: {unit} {n} has no column {column:?}", path.display()))
        })
        .collect()
}

fn read_json_lines(path: &Path, column: &str) -> Result<Vec<Cell>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut rows = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let row =
            serde_json::from_str(line).with_context(|| format!("{}: line {} is not JSON", path.display(), i + 1))?;
        rows.push((i + 1, row));
    }
    cells_of_rows(path, column, rows, "line")
}

fn read_json(path: &Path, column: &str) -> Result<Vec<Cell>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    match serde_json::from_slice::<serde_json::Value>(&bytes) {
        Ok(serde_json::Value::Array(rows)) => {
            cells_of_rows(path, column, rows.into_iter().enumerate().collect(), "row")
        }
        Ok(_) => bail!("{}: expected a JSON list of rows", path.display()),
        // `datasets` reads JSON lines from `.json` files too.
        Err(_) => read_json_lines(path, column),
    }
}
