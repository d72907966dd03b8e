//! Write-behind storing: a second thread writes each built node's objects
//! (fsynced) and then its action entry, still holding the node's build
//! lock, while the build loop computes the next node.

use crate::cache::{ActionEntry, BuildLock, Cache};
use anyhow::Result;
use std::sync::Arc;
use std::sync::mpsc::Receiver;

/// A built node on its way into the cache.
pub struct Store {
    pub entry: ActionEntry,
    /// The bytes of each of `entry.outputs`, in order.
    pub files: Vec<Arc<Vec<u8>>>,
    pub ref_name: String,
    /// Released once the entry is stored, so no other process builds it meanwhile.
    pub lock: BuildLock,
}

/// Stores what arrives on `queue` until it closes.
pub fn store_all(cache: &Cache, queue: Receiver<Store>) -> Result<()> {
    for s in queue {
        for (out, bytes) in s.entry.outputs.iter().zip(&s.files) {
            cache.store_object(&out.digest, bytes)?;
        }
        // The entry only after its objects: an entry never names a missing object.
        cache.put_action(&s.entry)?;
        cache.set_last_build(&s.ref_name, &s.entry.key())?;
        drop(s.lock);
    }
    Ok(())
}
