//! One builder per action key across processes: an advisory lock on
//! `locks/<key>.lock`. `cache gc` may remove a lock file nobody holds, so a
//! lock counts only once it is held on the file its path still names (the
//! check Nix's path locks make), and otherwise is taken again.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// An exclusive claim on building one key; released on drop.
pub struct BuildLock {
    _file: File,
}

/// Whether `file` is (still) the file at `path`.
fn names(path: &Path, file: &File) -> io::Result<bool> {
    let held = file.metadata()?;
    match std::fs::metadata(path) {
        Ok(now) => Ok(now.dev() == held.dev() && now.ino() == held.ino()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

fn open(path: &Path) -> io::Result<File> {
    File::options().create(true).truncate(false).write(true).open(path)
}

/// Takes the lock at `path`, calling `waiting()` once if another process holds it.
pub fn acquire(path: &Path, waiting: impl Fn()) -> io::Result<BuildLock> {
    let mut told = false;
    loop {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                if !std::mem::replace(&mut told, true) {
                    waiting();
                }
                file.lock()?;
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
        if names(path, &file)? {
            return Ok(BuildLock { _file: file });
        }
    }
}

/// Takes the lock at `path` if nobody holds it.
pub fn try_acquire(path: &Path) -> io::Result<Option<BuildLock>> {
    loop {
        let file = open(path)?;
        match file.try_lock() {
            Ok(()) if names(path, &file)? => return Ok(Some(BuildLock { _file: file })),
            Ok(()) => continue,
            Err(std::fs::TryLockError::WouldBlock) => return Ok(None),
            Err(std::fs::TryLockError::Error(e)) => return Err(e),
        }
    }
}

/// Whether nobody holds the lock file at `path`.
pub fn is_free(path: &Path) -> io::Result<bool> {
    match File::options().write(true).open(path)?.try_lock() {
        Ok(()) => Ok(true),
        Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}

/// Removes the lock file at `path` if nobody holds it; true when removed.
pub fn remove_if_free(path: &Path) -> io::Result<bool> {
    let file = match File::options().write(true).open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    match file.try_lock() {
        Ok(()) if names(path, &file)? => {
            // Still held by us: a process that opened it meanwhile will find
            // the path gone once it gets the lock, and take a new one.
            std::fs::remove_file(path)?;
            Ok(true)
        }
        Ok(()) | Err(std::fs::TryLockError::WouldBlock) => Ok(false),
        Err(std::fs::TryLockError::Error(e)) => Err(e),
    }
}
