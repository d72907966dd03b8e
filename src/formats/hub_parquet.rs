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

/// Whether `path` is a name [`shard_name`] gives for some file `i` of `n`.
pub fn is_shard_name(prefix: &str, split: &str, ext: &str, path: &str) -> bool {
    let Some(numbers) = path.strip_prefix(prefix).and_then(|p| p.strip_prefix(split)) else { return false };
    let Some((i, n)) = numbers
        .strip_prefix('-')
        .and_then(|p| p.strip_suffix(ext))
        .and_then(|p| p.strip_suffix('.'))
        .and_then(|p| p.split_once("-of-"))
    else {
        return false;
    };
    match (i.parse::<usize>(), n.parse::<usize>()) {
        (Ok(i), Ok(n)) => i < n && shard_name(prefix, split, i, n, ext) == path,
        _ => false,
    }
}

/// The split's rows as parquet files of at most `rows_per_file` rows each.
/// An empty split has none: `load_dataset` refuses a split of no rows
/// ("corresponds to no data"), so it is left out of the hub layout (the
/// card says so, and `hf/` holds it).
pub fn write_split(split: &str, rows: &[BinarizedRow], rows_per_file: usize) -> Result<Vec<(String, Vec<u8>)>> {
    let chunks: Vec<&[BinarizedRow]> = rows.chunks(rows_per_file).collect();
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
        out.push((shard_name(DIR, split, i, n, EXT), bytes));
    }
    Ok(out)
}

const DIR: &str = "data/";
const EXT: &str = "parquet";

/// Whether `path` is one of the files [`write_split`] names for `split`.
pub fn writes(split: &str, path: &str) -> bool {
    is_shard_name(DIR, split, EXT, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_are_recognised_exactly() {
        assert!(writes("train", "data/train-00000-of-00001.parquet"));
        assert!(writes("train", "data/train-00002-of-00010.parquet"));
        for path in [
            "data/train-00001-of-00001.parquet",
            "data/train-0-of-1.parquet",
            "data/test-00000-of-00001.parquet",
            "data/train-00000-of-00001.parquet/../../x",
            "../data/train-00000-of-00001.parquet",
            "/data/train-00000-of-00001.parquet",
            "data/train-+0000-of-00001.parquet",
        ] {
            assert!(!writes("train", path), "{path}");
        }
    }
}
