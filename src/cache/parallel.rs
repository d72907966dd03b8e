//! Requests to remotes, several at once: a remote round trip costs
//! milliseconds, so asking one at a time would make `plan` and transfers
//! wait on latency rather than bandwidth.

use anyhow::Result;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Requests in flight at once.
pub const WORKERS: usize = 8;

/// `each` over `items` on up to [`WORKERS`] threads, results in the order
/// of `items`; the first error stops the rest and is returned.
pub fn map<T: Sync, R: Send>(items: &[T], each: impl Fn(&T) -> Result<R> + Sync) -> Result<Vec<R>> {
    if items.len() <= 1 {
        return items.iter().map(each).collect();
    }
    let next = AtomicUsize::new(0);
    let failed: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let done: Mutex<Vec<(usize, R)>> = Mutex::new(Vec::with_capacity(items.len()));
    std::thread::scope(|s| {
        for _ in 0..WORKERS.min(items.len()) {
            s.spawn(|| {
                while failed.lock().expect("not poisoned").is_none() {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    match each(item) {
                        Ok(r) => done.lock().expect("not poisoned").push((i, r)),
                        Err(e) => {
                            failed.lock().expect("not poisoned").get_or_insert(e);
                        }
                    }
                }
            });
        }
    });
    if let Some(e) = failed.into_inner().expect("not poisoned") {
        return Err(e);
    }
    let mut done = done.into_inner().expect("not poisoned");
    done.sort_by_key(|(i, _)| *i);
    Ok(done.into_iter().map(|(_, r)| r).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_order_and_stops_at_an_error() {
        let items: Vec<u32> = (0..100).collect();
        assert_eq!(map(&items, |i| Ok(i * 2)).unwrap(), items.iter().map(|i| i * 2).collect::<Vec<_>>());
        let err = map(&items, |&i| if i == 37 { anyhow::bail!("item {i}") } else { Ok(i) }).unwrap_err();
        assert_eq!(err.to_string(), "item 37");
    }
}
