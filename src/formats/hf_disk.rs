//! A `datasets.load_from_disk` folder: a DatasetDict with one folder per split,
//! each holding Arrow IPC stream files, `dataset_info.json` and `state.json`.

use crate::digest::Digest;
use crate::formats::features;
use crate::formats::hub_parquet::{is_shard_name, shard_name};
use crate::formats::simpo::BinarizedRow;
use anyhow::Result;
use arrow_ipc::writer::StreamWriter;
use serde_json::json;

const DICT: &str = "hf/dataset_dict.json";

/// The files of a DatasetDict and the size of each split's Arrow data.
pub struct Written {
    /// (path under `export.dir`, bytes).
    pub files: Vec<(String, Vec<u8>)>,
    /// Per split, in order: the bytes of its columns' Arrow buffers, the
    /// `num_bytes` that `datasets` records for a split.
    pub num_bytes: Vec<u64>,
}

/// The files of the whole DatasetDict, paths under `hf/`.
pub fn write(splits: &[(&str, &[BinarizedRow])], rows_per_file: usize) -> Result<Written> {
    let names: Vec<&str> = splits.iter().map(|(s, _)| *s).collect();
    let mut out = vec![(DICT.to_string(), serde_json::to_vec(&json!({"splits": names}))?)];
    let mut sizes = Vec::with_capacity(splits.len());
    for (split, rows) in splits {
        let mut num_bytes = 0;
        let chunks: Vec<&[BinarizedRow]> =
            if rows.is_empty() { vec![*rows] } else { rows.chunks(rows_per_file).collect() };
        let n = chunks.len();
        let mut data_files = Vec::new();
        let mut hasher = blake3::Hasher::new();
        for (i, chunk) in chunks.into_iter().enumerate() {
            let mut bytes = Vec::new();
            let mut writer = StreamWriter::try_new(&mut bytes, &features::schema())?;
            for batch in chunk.chunks(features::BATCH_ROWS) {
                let batch = features::record_batch(batch);
                for column in batch.columns() {
                    num_bytes += column.to_data().get_slice_memory_size()? as u64;
                }
                writer.write(&batch)?;
            }
            writer.finish()?;
            drop(writer);
            hasher.update(&bytes);
            let name = shard_name("", "data", i, n, "arrow");
            data_files.push(json!({"filename": name}));
            out.push((format!("hf/{split}/{name}"), bytes));
        }
        let info = json!({
            "citation": "",
            "description": "",
            "features": features::features_json(),
            "homepage": "",
            "license": "",
        });
        let fingerprint = Digest::of(hasher.finalize().as_bytes()).to_hex()[..16].to_string();
        let state = json!({
            "_data_files": data_files,
            "_fingerprint": fingerprint,
            "_format_columns": null,
            "_format_kwargs": {},
            "_format_type": null,
            "_output_all_columns": false,
            "_split": split,
        });
        out.push((format!("hf/{split}/dataset_info.json"), serde_json::to_vec_pretty(&info)?));
        out.push((format!("hf/{split}/state.json"), serde_json::to_vec_pretty(&state)?));
        sizes.push(num_bytes);
    }
    Ok(Written { files: out, num_bytes: sizes })
}

/// Whether `path` is a file [`write`] names for a DatasetDict holding `split`.
pub fn writes(split: &str, path: &str) -> bool {
    path == DICT
        || path.strip_prefix("hf/").and_then(|p| p.strip_prefix(split)).and_then(|p| p.strip_prefix('/')).is_some_and(
            |file| file == "dataset_info.json" || file == "state.json" || is_shard_name("", "data", "arrow", file),
        )
}
