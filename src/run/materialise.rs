//! Placing the selected nodes' outputs under `export.dir`, from the cache.
//!
//! Each file appears atomically (a hard link to the read-only object, or a
//! copy). `.prefgen/manifest.json` records what prefgen wrote, with each
//! file's inode, size, mtime and ctime: a rerun leaves a file whose stat is
//! unchanged alone and re-hashes one whose stat moved (any write moves the
//! ctime, even one that restores the mtime), so a file changed in place is
//! never taken for the export. While files are being replaced,
//! `PREFGEN_INCOMPLETE` in `export.dir` says the folder is a mix of two
//! builds; only a finished materialisation removes it.
//!
//! Nothing read from a cache entry or the manifest chooses where a file is
//! written or removed: output paths are the stages' own names
//! (`stages::writes`), and every path is checked to lie inside `export.dir`
//! (`within`) where it is written or removed.

use super::Pass;
use crate::cache::tier::{FILE_MODE, write_atomic_in};
use crate::cache::{ActionEntry, Cache};
use crate::digest::Digest;
use crate::plan::Graph;
use crate::recipe;
use crate::stages::{self, Stage};
use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

/// What prefgen last wrote under `export.dir`.
#[derive(Default, Serialize, Deserialize)]
struct Manifest {
    files: BTreeMap<String, Written>,
}

#[derive(Clone, PartialEq, Serialize, Deserialize)]
struct Written {
    digest: Digest,
    stat: FileStat,
    /// A hard link to the cache object (else a copy).
    linked: bool,
}

/// What a stat says of a file: enough to notice any change to it.
#[derive(Clone, Copy, PartialEq, Serialize, Deserialize)]
struct FileStat {
    size: u64,
    ino: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

fn stat(path: &Path) -> Option<FileStat> {
    let m = std::fs::symlink_metadata(path).ok().filter(|m| m.is_file())?;
    let ns = |s: i64, n: i64| s.saturating_mul(1_000_000_000).saturating_add(n);
    Some(FileStat {
        size: m.len(),
        ino: m.ino(),
        mtime_ns: ns(m.mtime(), m.mtime_nsec()),
        ctime_ns: ns(m.ctime(), m.ctime_nsec()),
    })
}

const MANIFEST: &str = ".prefgen/manifest.json";
const TMP: &str = ".prefgen/tmp";
const LOCK: &str = ".prefgen/lock";
/// Present while the folder is being updated.
pub const INCOMPLETE: &str = "PREFGEN_INCOMPLETE";

/// `rel` as a path under `dir`, if it can name a file that prefgen writes
/// there: relative, every component a plain name, outside its own
/// `.prefgen/` and not its marker, and no folder on the way a symbolic link
/// (which would lead outside `dir`). None for anything else: `..`, `/abs`.
fn within(dir: &Path, rel: &str) -> Option<PathBuf> {
    let path = Path::new(rel);
    let first = path.components().next()?;
    if !path.components().all(|c| matches!(c, Component::Normal(_)))
        || first.as_os_str() == ".prefgen"
        || path == Path::new(INCOMPLETE)
    {
        return None;
    }
    let mut at = dir.to_path_buf();
    for part in path.parent().into_iter().flat_map(Path::components) {
        at.push(part);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return None,
            Ok(_) => {}
            Err(_) => break, // created below as a plain folder
        }
    }
    Some(dir.join(path))
}

/// One file to place.
struct Place {
    rel: String,
    digest: Digest,
    node: String,
}

/// Refuses an `export.dir` inside the cache, where `cache gc` would take
/// the exports for its own files.
pub fn check_dir(dir: &Path, cache: &Cache) -> Result<()> {
    let (dir_abs, cache_abs) = (recipe::resolve(dir)?, recipe::resolve(cache.root())?);
    if dir_abs.starts_with(&cache_abs) {
        bail!(
            "{} {}: is inside the cache at {} (cache gc would remove the exports); choose a folder outside it",
            recipe::export::dir,
            dir.display(),
            cache.root().display()
        );
    }
    Ok(())
}

/// Places the selected nodes' outputs. `trusted` objects are those this
/// process stored (wrote, or compared byte for byte) in this run; any other
/// object is verified before it is placed. A file in the way that prefgen
/// did not write is refused unless `overwrite`. Returns how many files were
/// written or removed.
pub fn materialise(
    graph: &Graph,
    cache: &Cache,
    entries: &[Option<ActionEntry>],
    selected: &[bool],
    trusted: &BTreeSet<Digest>,
    overwrite: bool,
) -> Result<Pass<usize>> {
    let dir = PathBuf::from(&graph.recipe.export.dir);
    check_dir(&dir, cache)?;
    let unwritable = |e: &dyn std::fmt::Display| {
        anyhow::anyhow!("{} {}: cannot write there: {e}", recipe::export::dir, dir.display())
    };
    // One process at a time places files here (runs sharing a cache may share an export.dir).
    std::fs::create_dir_all(dir.join(TMP)).map_err(|e| unwritable(&e))?;
    let _lock = crate::cache::lock::acquire(&dir.join(LOCK), || {
        eprintln!("waiting for another prefgen process that is writing {}", dir.display())
    })
    .map_err(|e| unwritable(&e))?;
    let mut old: Manifest =
        std::fs::read(dir.join(MANIFEST)).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    old.files.retain(|rel, _| {
        let inside = within(&dir, rel).is_some();
        if !inside {
            eprintln!("warning: {} names {rel:?}, which is not a file inside {}: ignored", MANIFEST, dir.display());
        }
        inside
    });
    // Output paths are the stages' own: an entry naming another is not one
    // prefgen wrote. Every such entry is forgotten at once, so one more pass rebuilds them all.
    let mut foreign = Vec::new();
    for (idx, node) in graph.nodes.iter().enumerate().filter(|(i, _)| selected[*i]) {
        let Some(entry) = &entries[idx] else { continue };
        if let Some(out) = stages::foreign_output(&node.spec, &graph.recipe, entry) {
            cache.remove_action(&entry.key(), &format!("it names {:?}, a file its stage does not write", out.path))?;
            foreign.push(format!("{}: {:?}", node.label(), out.path));
        }
    }
    if !foreign.is_empty() {
        return Ok(Pass::Damaged(format!(
            "cached entries name files that their stages do not write ({})",
            foreign.join(", ")
        )));
    }
    // First decide everything, so a refusal leaves the folder untouched.
    let mut new = Manifest::default();
    let mut todo = Vec::new();
    for (idx, node) in graph.nodes.iter().enumerate().filter(|(i, _)| selected[*i]) {
        if node.stage() == Stage::Prompts {
            continue; // the prompt list is an internal artifact
        }
        let entry = entries[idx].as_ref().expect("selected nodes are resolved");
        for out in &entry.outputs {
            let rel = node.out_dir.join(&out.path).to_string_lossy().replace('\\', "/");
            let Some(dest) = within(&dir, &rel) else {
                bail!(
                    "{}: a symbolic link in {} {} leads there; prefgen writes only inside export.dir: replace the link with a folder",
                    dir.join(&rel).display(),
                    recipe::export::dir,
                    dir.display()
                );
            };
            let now = stat(&dest);
            let prev = old.files.get(&rel);
            match (prev, now) {
                (_, None) => {}
                // Untouched since prefgen placed it.
                (Some(w), Some(now))
                    if w.digest == out.digest
                        && w.stat == now
                        && (!w.linked || cache.is_link_to(&dest, &out.digest)) =>
                {
                    new.files.insert(rel, w.clone());
                    continue;
                }
                // An older build's file: replaced.
                (Some(w), Some(_)) if w.digest != out.digest => {}
                // Its stat moved, or prefgen did not write it: what does it hold?
                (_, Some(now)) => {
                    let linked = cache.is_link_to(&dest, &out.digest);
                    if Digest::of_file(&dest).ok() == Some(out.digest) {
                        new.files.insert(rel, Written { digest: out.digest, stat: now, linked });
                        continue;
                    }
                    if linked {
                        // The file is the cache object itself, changed in place:
                        // reading it removes it, and the node is rebuilt.
                        cache.get_object(&out.digest)?;
                        return Ok(Pass::Damaged(format!(
                            "{} (a hard link to its cache object) was changed in place",
                            dest.display()
                        )));
                    }
                    if prev.is_none() && !overwrite {
                        bail!(
                            "{}: exists and prefgen did not write it; move it away, or pass --overwrite to replace it",
                            dest.display()
                        );
                    }
                }
            }
            todo.push(Place { rel, digest: out.digest, node: entry.node.clone() });
        }
    }
    let mut gone = Vec::new();
    if selected.iter().all(|s| *s) {
        for (rel, w) in &old.files {
            if new.files.contains_key(rel) || todo.iter().any(|p| &p.rel == rel) {
                continue;
            }
            let Some(path) = within(&dir, rel) else { continue };
            // Remove only what prefgen wrote and nobody changed since: its stat
            // as placed, or else (copied, chmod-ed, rsync-ed) its bytes.
            match stat(&path) {
                Some(now) if now == w.stat || Digest::of_file(&path).ok() == Some(w.digest) => gone.push(rel.clone()),
                Some(_) => eprintln!(
                    "warning: kept {}: prefgen wrote it, but it has changed since; it is no longer part of the export",
                    path.display()
                ),
                None => {}
            }
        }
    } else {
        for (rel, w) in &old.files {
            if !todo.iter().any(|p| &p.rel == rel) {
                new.files.entry(rel.clone()).or_insert_with(|| w.clone());
            }
        }
    }
    let bytes = serde_json::to_vec_pretty(&new)?;
    let marker = dir.join(INCOMPLETE);
    if todo.is_empty() && gone.is_empty() && !marker.exists() {
        if std::fs::read(dir.join(MANIFEST)).ok().as_deref() != Some(bytes.as_slice()) {
            write_atomic_in(&dir.join(TMP), &dir.join(MANIFEST), &bytes, FILE_MODE).map_err(|e| unwritable(&e))?;
        }
        return Ok(Pass::Done(0));
    }
    let note = format!(
        "prefgen is replacing the files of this folder (process {}); until this file is gone they may mix two builds.\n",
        std::process::id()
    );
    write_atomic_in(&dir.join(TMP), &marker, note.as_bytes(), FILE_MODE).map_err(|e| unwritable(&e))?;
    let mut written = 0;
    for p in todo {
        let dest = dir.join(&p.rel);
        std::fs::create_dir_all(dest.parent().expect("files are inside export.dir")).map_err(|e| unwritable(&e))?;
        let placed = cache
            .materialise(&p.digest, &dest, &dir.join(TMP), trusted.contains(&p.digest))
            .map_err(|e| unwritable(&e))?;
        let Some(linked) = placed else {
            return Ok(Pass::Damaged(format!("cache object {} of {} is damaged", p.digest.short(), p.node)));
        };
        let stat = stat(&dest).with_context(|| format!("{} vanished after writing", dest.display()))?;
        new.files.insert(p.rel, Written { digest: p.digest, stat, linked });
        written += 1;
    }
    for rel in gone {
        // Checked again where it is removed: only a file inside export.dir.
        if let Some(path) = within(&dir, &rel) {
            let _ = std::fs::remove_file(path);
            written += 1;
        }
    }
    let bytes = serde_json::to_vec_pretty(&new)?;
    write_atomic_in(&dir.join(TMP), &dir.join(MANIFEST), &bytes, FILE_MODE).map_err(|e| unwritable(&e))?;
    std::fs::remove_file(&marker).map_err(|e| unwritable(&e))?;
    Ok(Pass::Done(written))
}
