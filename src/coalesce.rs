//! Coalescing of identical concurrent upstream calls (manifest HEADs and
//! GETs, tag revalidations): the first caller starts a detached task, the
//! others await the same shared result. The task does not belong to any
//! client, so a client that disconnects does not cancel it for the others.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use futures_util::future::{BoxFuture, FutureExt, Shared};

use crate::error::Error;

type SharedResult<V> = Shared<BoxFuture<'static, Result<V, Error>>>;

/// Calls in progress by key, each with an id that tells a call from a
/// later one for the same key.
type Table<K, V> = Arc<Mutex<HashMap<K, (u64, SharedResult<V>)>>>;

/// A table of calls in progress, keyed by what they fetch.
pub struct Coalescer<K, V: Clone> {
    calls: Table<K, V>,
    next_id: AtomicU64,
}

impl<K, V: Clone> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer {
            calls: Arc::new(Mutex::new(HashMap::new())),
            next_id: AtomicU64::new(0),
        }
    }
}

impl<K, V> Coalescer<K, V>
where
    K: Hash + Eq + Clone + Send + 'static,
    V: Clone + Send + Sync + 'static,
{
    /// Run `make()` unless an identical call is in progress; either way,
    /// return its result. The second value says whether this caller joined
    /// another's call.
    pub async fn run<F>(&self, key: K, make: impl FnOnce() -> F) -> (Result<V, Error>, bool)
    where
        F: Future<Output = Result<V, Error>> + Send + 'static,
    {
        let (fut, joined) = {
            let mut calls = self.calls.lock().expect("coalescer lock");
            match calls.get(&key) {
                Some((_, f)) => (f.clone(), true),
                None => {
                    let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                    let (table, k, work) = (self.calls.clone(), key.clone(), make());
                    // The call forgets itself when done, even if every
                    // caller went away meanwhile (a client that disconnects
                    // drops its `run`): a finished call must never be joined.
                    // The guard forgets it however the task ends: done,
                    // panicked or cancelled (runtime shutdown), so a key is
                    // never stuck with a dead call.
                    let task = tokio::spawn(async move {
                        let _forget = Forget { table, key: k, id };
                        work.await
                    });
                    let f = async move {
                        task.await
                            .unwrap_or_else(|e| Err(Error::Internal(format!("task failed: {e}"))))
                    }
                    .boxed()
                    .shared();
                    calls.insert(key, (id, f.clone()));
                    (f, false)
                }
            }
        };
        (fut.await, joined)
    }
}

/// Removes call `id` of `key` from the table when dropped.
struct Forget<K: Hash + Eq, V: Clone> {
    table: Table<K, V>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, V: Clone> Drop for Forget<K, V> {
    fn drop(&mut self) {
        // Never panic in drop (it may run during unwinding): a poisoned
        // lock still holds a usable map.
        let mut calls = self
            .table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if calls.get(&self.key).is_some_and(|(i, _)| *i == self.id) {
            calls.remove(&self.key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn one_call_for_many_waiters() {
        let c: Arc<Coalescer<&'static str, u32>> = Arc::default();
        let calls = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let (c, calls) = (c.clone(), calls.clone());
            tasks.push(tokio::spawn(async move {
                c.run("k", || async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Ok(7)
                })
                .await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().0.unwrap(), 7);
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // Finished calls are forgotten: the next one runs again.
        let (v, joined) = c.run("k", || async { Ok(8) }).await;
        assert_eq!((v.unwrap(), joined), (8, false));
    }

    #[tokio::test]
    async fn a_call_that_panics_is_forgotten_and_the_next_one_runs() {
        let c: Arc<Coalescer<&'static str, u32>> = Arc::default();
        let (v, _) = c
            .run("k", || async {
                if true {
                    panic!("injected");
                }
                Ok(1)
            })
            .await;
        assert!(v.is_err(), "the panic is an error for its callers");
        assert!(c.calls.lock().unwrap().is_empty(), "nothing left behind");
        let (v, joined) = c.run("k", || async { Ok(2) }).await;
        assert_eq!((v.unwrap(), joined), (2, false), "a fresh call");
    }

    #[tokio::test]
    async fn a_call_whose_callers_all_went_away_is_forgotten_when_done() {
        let c: Arc<Coalescer<&'static str, u32>> = Arc::default();
        let waiting = c.run("k", || async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Ok(1)
        });
        // The only caller gives up (a client disconnected).
        assert!(tokio::time::timeout(Duration::from_millis(5), waiting)
            .await
            .is_err());
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(c.calls.lock().unwrap().is_empty(), "nothing left behind");
        let (v, joined) = c.run("k", || async { Ok(2) }).await;
        assert_eq!(
            (v.unwrap(), joined),
            (2, false),
            "a fresh call, not the old result"
        );
    }
}
