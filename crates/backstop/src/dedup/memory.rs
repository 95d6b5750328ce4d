//! The in-process seen store: a bounded map with expiry. It protects one
//! process only, and forgets everything on restart.

use super::{Claim, DedupError, SeenStore};
use crate::retry::now_ms;
use futures_util::future::BoxFuture;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use tracing::warn;

pub(super) const DEFAULT_CAPACITY: usize = 1_000_000;

#[derive(Debug)]
struct Entry {
    /// `None` once done.
    holder: Option<String>,
    expires_at: u64,
    /// Which push into `order` is current; older ones are stale.
    stamp: u64,
}

#[derive(Debug, Default)]
struct Inner {
    entries: HashMap<(String, String), Entry>,
    /// Keys in the order they were last written, for eviction.
    order: VecDeque<((String, String), u64)>,
    next_stamp: u64,
    evicted: u64,
}

/// Keys in memory, at most `capacity` of them: when full, the oldest entries
/// are evicted first (and a warning says that deduplication is now only as
/// good as the window the capacity covers).
#[derive(Debug)]
pub struct MemorySeenStore {
    capacity: usize,
    inner: Mutex<Inner>,
}

impl MemorySeenStore {
    /// A store for at most `capacity` keys (at least 1).
    pub fn new(capacity: usize) -> Self {
        MemorySeenStore {
            capacity: capacity.max(1),
            inner: Mutex::new(Inner::default()),
        }
    }

    /// How many keys are held now.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves consistent data behind: every
        // update below is a single map operation.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(
        &self,
        inner: &mut Inner,
        id: (String, String),
        holder: Option<String>,
        expires_at: u64,
    ) {
        inner.next_stamp += 1;
        let stamp = inner.next_stamp;
        inner.order.push_back((id.clone(), stamp));
        inner.entries.insert(
            id,
            Entry {
                holder,
                expires_at,
                stamp,
            },
        );
        while inner.entries.len() > self.capacity {
            let Some((old, stamp)) = inner.order.pop_front() else {
                break;
            };
            if inner.entries.get(&old).is_some_and(|e| e.stamp == stamp) {
                inner.entries.remove(&old);
                inner.evicted += 1;
                if inner.evicted == 1 || inner.evicted.is_power_of_two() {
                    warn!(
                        capacity = self.capacity,
                        evicted = inner.evicted,
                        "the in-memory dedup store is full: evicting the oldest keys"
                    );
                }
            }
        }
        // Stale order entries are dropped as they reach the front.
        while inner
            .order
            .front()
            .is_some_and(|(id, stamp)| inner.entries.get(id).is_none_or(|e| e.stamp != *stamp))
        {
            inner.order.pop_front();
        }
    }
}

impl SeenStore for MemorySeenStore {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        lease_until: u64,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        Box::pin(async move {
            let now = now_ms();
            let mut inner = self.lock();
            let id = (scope.to_owned(), key.to_owned());
            if let Some(entry) = inner.entries.get(&id)
                && entry.expires_at >= now
            {
                match entry.holder.as_deref() {
                    None => return Ok(Claim::Done),
                    // The holder's own claim again: extend its lease.
                    Some(holder) if holder == token => {}
                    Some(_) => return Ok(Claim::InProgress),
                }
            }
            self.write(&mut inner, id, Some(token.to_owned()), lease_until);
            Ok(Claim::Claimed)
        })
    }

    fn complete<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        expires_at: u64,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(async move {
            let mut inner = self.lock();
            let id = (scope.to_owned(), key.to_owned());
            let ours = match inner.entries.get(&id) {
                None => true,
                Some(entry) => entry.holder.as_deref() == Some(token),
            };
            if ours {
                self.write(&mut inner, id, None, expires_at);
            }
            Ok(())
        })
    }

    fn release<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), DedupError>> {
        Box::pin(async move {
            let mut inner = self.lock();
            let id = (scope.to_owned(), key.to_owned());
            if inner
                .entries
                .get(&id)
                .is_some_and(|e| e.holder.as_deref() == Some(token))
            {
                inner.entries.remove(&id);
            }
            Ok(())
        })
    }

    fn purge_expired(&self, now: u64) -> BoxFuture<'_, Result<u64, DedupError>> {
        Box::pin(async move {
            let mut inner = self.lock();
            let before = inner.entries.len();
            inner.entries.retain(|_, e| e.expires_at >= now);
            let Inner { entries, order, .. } = &mut *inner;
            order.retain(|(id, stamp)| entries.get(id).is_some_and(|e| e.stamp == *stamp));
            Ok((before - inner.entries.len()) as u64)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_oldest_keys_are_evicted_when_full() {
        let store = MemorySeenStore::new(3);
        let far = now_ms() + 60_000;
        for key in ["a", "b", "c", "d"] {
            assert_eq!(store.claim("q", key, key, far).await, Ok(Claim::Claimed));
            store.complete("q", key, key, far).await.expect("complete");
        }
        assert_eq!(store.len(), 3);
        // "a" was evicted, so it can be claimed again; "d" is remembered.
        assert_eq!(store.claim("q", "a", "t", far).await, Ok(Claim::Claimed));
        assert_eq!(store.claim("q", "d", "t", far).await, Ok(Claim::Done));
        assert_eq!(store.len(), 3);
    }
}
