//! The files prefgen's model loaders read: named once here, for the loaders
//! that open them, for the hub downloads that fetch them, and for a model's
//! identity in the action keys (so a snapshot that also holds `original/`, a
//! README or other weight formats keys the same as one that does not).

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "config.json";
pub const TOKENIZER: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// Newer snapshots keep the chat template in its own file.
pub const CHAT_TEMPLATE: &str = "chat_template.jinja";
/// Where generation stops (`eos_token_id`), when the snapshot has one.
pub const GENERATION_CONFIG: &str = "generation_config.json";
/// Sharded weights: the shards it lists.
pub const WEIGHTS_INDEX: &str = "model.safetensors.index.json";
/// Unsharded weights.
pub const WEIGHTS: &str = "model.safetensors";

/// The files a folder must have, and those read when present.
const REQUIRED: [&str; 3] = [CONFIG, TOKENIZER, TOKENIZER_CONFIG];
const OPTIONAL: [&str; 2] = [CHAT_TEMPLATE, GENERATION_CONFIG];

/// Of a hub repository's files, those worth downloading for a loader: the
/// metadata above and the top-level `*.safetensors` (not `original/`).
pub fn to_download(listing: &[String]) -> Vec<String> {
    listing
        .iter()
        .filter(|f| {
            REQUIRED.contains(&f.as_str())
                || OPTIONAL.contains(&f.as_str())
                || f.as_str() == WEIGHTS_INDEX
                || (!f.contains('/') && f.ends_with(".safetensors"))
        })
        .cloned()
        .collect()
}

/// The weight files of a model folder: the shards its index lists, or
/// `model.safetensors`.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(WEIGHTS_INDEX);
    let paths: Vec<PathBuf> = if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("{}: not JSON", index.display()))?;
        let mut names: Vec<String> = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?
            .values()
            .filter_map(|f| f.as_str().map(str::to_string))
            .collect();
        names.sort();
        names.dedup();
        names.into_iter().map(|n| dir.join(n)).collect()
    } else {
        vec![dir.join(WEIGHTS)]
    };
    for p in &paths {
        if !p.is_file() {
            bail!("{}: missing weights file {}", dir.display(), p.display());
        }
    }
    Ok(paths)
}

/// Every file a loader reads from `path` (a `.gguf` file, or a model
/// folder), with the name it is known by in a model's identity: the path
/// relative to the folder, or `model.gguf` for a GGUF file (its file name
/// does not change what it holds).
pub fn read_by_loader(path: &Path) -> Result<Vec<(String, PathBuf)>> {
    if !path.is_dir() {
        if !path.is_file() {
            bail!("{} does not exist", path.display());
        }
        return Ok(vec![("model.gguf".into(), path.to_path_buf())]);
    }
    let mut out = Vec::new();
    for name in REQUIRED {
        let p = path.join(name);
        if !p.is_file() {
            bail!("{}: no {name} (a model folder holds what a hub snapshot holds)", path.display());
        }
        out.push((name.to_string(), p));
    }
    for name in OPTIONAL {
        let p = path.join(name);
        if p.is_file() {
            out.push((name.to_string(), p));
        }
    }
    if path.join(WEIGHTS_INDEX).is_file() {
        out.push((WEIGHTS_INDEX.to_string(), path.join(WEIGHTS_INDEX)));
    }
    for p in weight_files(path)? {
        let name = p.strip_prefix(path).unwrap_or(&p).to_string_lossy().replace('\\', "/");
        out.push((name, p));
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downloads_what_the_loader_reads_and_nothing_else() {
        let listing: Vec<String> = [
            "README.md",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "original/consolidated.00.pth",
            "original/model.safetensors",
            "pytorch_model.bin",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            to_download(&listing),
            [
                "config.json",
                "generation_config.json",
                "model-00001-of-00002.safetensors",
                "model-00002-of-00002.safetensors",
                "model.safetensors.index.json",
                "tokenizer.json",
                "tokenizer_config.json"
            ]
        );
    }
}
