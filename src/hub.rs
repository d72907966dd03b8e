//! Hugging Face hub repositories, read through the hub's own cache layout
//! (`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`),
//! so a snapshot the Python tools downloaded is reused, never fetched twice.
//! `HF_HUB_OFFLINE=1` forbids the network; `HF_TOKEN` and `HF_ENDPOINT` are honoured.

use anyhow::{Context, Result, anyhow, bail};
use hf_hub::{Repo, RepoType, api::sync::ApiBuilder};
use std::path::{Path, PathBuf};

/// A repository's files at one resolved commit.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub id: String,
    /// The full commit sha the revision resolved to.
    pub commit: String,
    /// The snapshot folder (`.../snapshots/<commit>`) once files are local.
    pub dir: PathBuf,
}

/// The hub cache folder, as `huggingface_hub` computes it.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return p.into();
    }
    let home = std::env::var_os("HF_HOME").map(PathBuf::from).unwrap_or_else(|| {
        let user_home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
        user_home.join(".cache").join("huggingface")
    });
    home.join("hub")
}

fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE")
        .is_ok_and(|v| matches!(v.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

fn kind_name(kind: RepoType) -> &'static str {
    match kind {
        RepoType::Dataset => "dataset",
        RepoType::Model => "model",
        RepoType::Space => "space",
    }
}

/// `org/name@commit` for a path inside a hub cache snapshot
/// (`.../models--org--name/snapshots/<commit>[/file]`); None for other paths.
pub fn describe(path: &Path) -> Option<String> {
    let parts: Vec<&str> = path.iter().filter_map(|c| c.to_str()).collect();
    let at = parts.iter().position(|c| *c == "snapshots")?;
    let repo = parts.get(at.checked_sub(1)?)?;
    let commit = parts.get(at + 1)?;
    let (_, name) = repo.split_once("--")?;
    Some(format!("{}@{commit}", name.replacen("--", "/", 1)))
}

/// Resolves `id@revision` and makes `wanted(files)` available locally: from the
/// cache when the snapshot holds them, otherwise downloaded into the cache.
pub fn snapshot(
    kind: RepoType,
    id: &str,
    revision: &str,
    wanted: impl Fn(&[String]) -> Result<Vec<String>>,
) -> Result<(Snapshot, Vec<PathBuf>)> {
    let repo = Repo::with_revision(id.to_string(), kind, revision.to_string());
    let repo_dir = cache_dir().join(repo.folder_name());
    let cached_commit = if is_commit_sha(revision) {
        Some(revision.to_string())
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok().map(|s| s.trim().to_string())
    };
    if let Some(commit) = &cached_commit {
        let dir = repo_dir.join("snapshots").join(commit);
        if dir.is_dir() {
            let files = list_files(&dir)?;
            let picked = wanted(&files)?;
            if picked.iter().all(|f| dir.join(f).is_file()) {
                let paths = picked.iter().map(|f| dir.join(f)).collect();
                return Ok((Snapshot { id: id.into(), commit: commit.clone(), dir }, paths));
            }
        }
    }
    let what = format!("{} {id} at revision {revision}", kind_name(kind));
    if offline() {
        bail!(
            "{what} is not in the Hugging Face cache at {} and HF_HUB_OFFLINE is set; \
             download it first (`huggingface-cli download --repo-type {} {id} --revision {revision}`)",
            cache_dir().display(),
            kind_name(kind)
        );
    }
    let mut builder = ApiBuilder::from_cache(hf_hub::Cache::new(cache_dir())).with_progress(false);
    if let Ok(endpoint) = std::env::var("HF_ENDPOINT") {
        builder = builder.with_endpoint(endpoint);
    }
    if let Ok(token) = std::env::var("HF_TOKEN") {
        builder = builder.with_token(Some(token));
    }
    let api = builder.build().with_context(|| format!("cannot reach the hub for {what}"))?;
    let remote = api.repo(repo);
    let info = remote.info().map_err(|e| anyhow!("cannot resolve {what} on the hub: {e}"))?;
    let mut files: Vec<String> = info.siblings.into_iter().map(|s| s.rfilename).collect();
    files.sort();
    let picked = wanted(&files)?;
    let mut paths = Vec::new();
    for f in &picked {
        paths.push(remote.get(f).map_err(|e| anyhow!("cannot download {f} of {what}: {e}"))?);
    }
    let dir = repo_dir.join("snapshots").join(&info.sha);
    Ok((Snapshot { id: id.into(), commit: info.sha, dir }, paths))
}

/// Every file under `dir`, as sorted relative paths with `/` separators.
/// Symbolic links are followed (a snapshot's entries link into `blobs/`),
/// each real folder once: a link back to a folder on its own path is a loop,
/// and an error naming it.
pub fn list_files(dir: &Path) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt;
    let id = |p: &Path| -> Result<(u64, u64)> {
        let m = std::fs::metadata(p).with_context(|| format!("cannot read {}", p.display()))?;
        Ok((m.dev(), m.ino()))
    };
    let mut out = Vec::new();
    let mut seen = std::collections::HashSet::from([id(dir)?]);
    // Each folder with the folders on its path (its ancestors), for loops.
    let mut stack = vec![(dir.to_path_buf(), vec![id(dir)?])];
    while let Some((d, path)) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("cannot list {}", d.display()))? {
            let p = entry?.path();
            if p.is_dir() {
                let folder = id(&p)?;
                if path.contains(&folder) {
                    bail!("{}: a symbolic link loop (it leads back to a folder above it)", p.display());
                }
                if seen.insert(folder) {
                    stack.push((p, [path.as_slice(), &[folder]].concat()));
                }
            } else if let Ok(rel) = p.strip_prefix(dir) {
                out.push(rel.to_string_lossy().replace('\\', "/"));
            }
        }
    }
    out.sort();
    Ok(out)
}
