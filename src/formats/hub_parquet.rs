//! Parquet in the hub's layout: `data/{split}-00000-of-0000N.parquet`.

use crate::formats::features;
use crate::formats::simpo::BinarizedRow;
use anyhow::Result;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;

/// File `i` of `n` of a split, as the hub names it.
pub fn shard_name(prefix: &str, split: &str, i: usize, n: usize, ext: &str) -> String {
    format!("{prefix}{split}-{i:05}-of-{n:05}.{ext}")
}

/// The split's rows as parquet files of at most `rows_per_file` rows each.
pub fn write_split(split: &str, rows: &[BinarizedRow], rows_per_file: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let chunks: Vec<&[BinarizedRow]> = if rows.is_empty() { vec![rows] } else { rows.chunks(rows_per_file).collect() };
    let n = chunks.len();
    let mut out = Vec::with_capacity(n);
    for (i, chunk) in chunks.into_iter().enumerate() {
        // Snappy as pyarrow's default; row groups small enough for the hub's viewer.
        let props = WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .set_max_row_group_size(features::BATCH_ROWS)
            .set_key_value_metadata(Some(vec![KeyValue::new("huggingface".into(), features::huggingface_metadata())]))
            .build();
        let mut bytes = Vec::new();
        let mut writer = ArrowWriter::try_new(&mut bytes, features::schema(), Some(props))?;
        for batch in chunk.chunks(features::BATCH_ROWS) {
            writer.write(&features::record_batch(batch))?;
        }
        writer.close()?;
        out.push((shard_name("data/", split, i, n, "parquet"), bytes));
    }
    Ok(out)
}
