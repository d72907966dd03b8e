//! Paths a recipe reads from (prompt sources, imports, models): a regular
//! file or a folder. Anything else is named for what it is, before it is
//! read: a FIFO would block a read forever and `/dev/zero` never ends.

use anyhow::{Result, bail};
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::Path;

/// What an input path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Folder,
}

/// What `path` is (following symlinks), or an error naming it and saying
/// why it cannot be read: missing, a symlink loop, a permission, or not a
/// file or a folder.
pub fn kind(path: &Path) -> Result<Kind> {
    let shown = path.display();
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!("{shown} does not exist"),
        Err(e) => bail!("cannot read {shown}: {e}"),
    };
    let t = meta.file_type();
    let other = if t.is_file() {
        return Ok(Kind::File);
    } else if t.is_dir() {
        return Ok(Kind::Folder);
    } else if t.is_fifo() {
        "a named pipe (FIFO)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "neither a file nor a folder"
    };
    bail!("{shown} is {other}, not a file or a folder")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_what_a_path_is() {
        let dir = tempfile::tempdir().unwrap();
        let loop_ = dir.path().join("loop");
        std::os::unix::fs::symlink(&loop_, &loop_).unwrap();
        let e = kind(&loop_).unwrap_err().to_string();
        assert!(e.contains("cannot read") && e.contains("symbolic links"), "{e}");
        assert_eq!(kind(dir.path()).unwrap(), Kind::Folder);
        let e = kind(Path::new("/dev/zero")).unwrap_err().to_string();
        assert!(e.contains("is a device"), "{e}");
        let e = kind(&dir.path().join("none")).unwrap_err().to_string();
        assert!(e.ends_with("does not exist"), "{e}");
    }
}
