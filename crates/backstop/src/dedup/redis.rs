//! The Redis seen store: `SET key NX PX` claims, with Redis expiring keys
//! itself. One multiplexed connection pipelines every consumer's requests and
//! reconnects on its own.

use super::{Claim, DedupError, SeenStore};
use crate::error::RedactedUri;
use crate::retry::now_ms;
use futures_util::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

/// The value of a done key; a claim's value is `c:<token>`.
const DONE: &str = "d";

/// Marks a key done when it is still ours (or gone: our lease ran out and
/// nobody claimed it since).
const COMPLETE: &str = r"
local v = redis.call('GET', KEYS[1])
if v == ARGV[1] or v == false then
  redis.call('SET', KEYS[1], 'd', 'PX', ARGV[2])
  return 1
end
return 0";

/// Extends a claim's lease when the claim still holds the key; returns 1
/// then, else 0.
const EXTEND: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0";

/// Deletes a key only when our claim still holds it.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0";

/// Keys in Redis under `backstop:seen:<scope>:<key>` (see `redis_key`). Several instances can
/// share it. Durability is Redis's own (AOF or RDB, as configured there).
#[derive(Clone)]
pub struct RedisSeenStore {
    connection: ConnectionManager,
    shown: String,
}

impl std::fmt::Debug for RedisSeenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSeenStore")
            .field("url", &self.shown)
            .finish_non_exhaustive()
    }
}

fn unavailable(e: redis::RedisError) -> DedupError {
    DedupError::Unavailable(e.to_string())
}

/// The Redis key of `key` in `scope`. A scope that is not empty and has no
/// `:` keeps the original form `backstop:seen:<scope>:<key>`, so keys
/// written before this rule still count. Any other scope is length-prefixed,
/// `backstop:seen::<len>:<scope>:<key>`: with `:` in a queue name the old
/// form was ambiguous (`a:b` + `c` and `a` + `b:c`). The two forms never meet,
/// since the original form never has an empty scope.
fn redis_key(scope: &str, key: &str) -> String {
    if scope.is_empty() || scope.contains(':') {
        format!("backstop:seen::{}:{scope}:{key}", scope.len())
    } else {
        format!("backstop:seen:{scope}:{key}")
    }
}

fn ttl_ms(until: u64) -> u64 {
    until.saturating_sub(now_ms()).max(1)
}

impl RedisSeenStore {
    /// Connects to `redis://[user:password@]host:port[/db]`.
    pub async fn connect(url: &str) -> Result<Self, DedupError> {
        let shown = RedactedUri::new(url).to_string();
        let client = redis::Client::open(url).map_err(|e| DedupError::InvalidUrl {
            url: shown.clone(),
            reason: e.to_string(),
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2);
        let connection = ConnectionManager::new_with_config(client, config)
            .await
            .map_err(|e| DedupError::Unavailable(format!("connecting to {shown}: {e}")))?;
        Ok(RedisSeenStore { connection, shown })
    }
}

impl SeenStore for RedisSeenStore {
    fn claim<'a>(
        &'a self,
        scope: &'a str,
        key: &'a str,
        token: &'a str,
        lease_until: u64,
    ) -> BoxFuture<'a, Result<Claim, DedupError>> {
        Box::pin(async move {
            let mut connection = self.connection.clone();
            let name = redis_key(scope, key);
            let holder = format!("c:{token}");
            // A key can expire between the SET and the GET; then try again.
            for _ in 0..3 {
                let set: Option<String> = redis::cmd("SET")
                    .arg(&name)
                    .arg(&holder)
                    .arg("NX")
                    .arg("PX")
                    .arg(ttl_ms(lease_until))
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
                if set.is_some() {
                    return Ok(Claim::Claimed);
                }
                let current: Option<String> = redis::cmd("GET")
                    .arg(&name)
                    .query_async(&mut connection)
                    .await
                    .map_err(unavailable)?;
                match current.as_deref() {
                    Some(DONE) => return Ok(Claim::Done),
                    Some(value) if value == holder => {
                        // Our own claim again: extend its lease, unless it
                        // changed hands in between.
                        let extended: i64 = redis::cmd("EVAL")
                            .arg(EXTEND)
                            .arg(1)
                            .arg(&name)
                            .arg(&holder)
                            .arg(ttl_ms(lease_until))
                            .query_async(&mut connection)
                            .await
                            .map_err(unavailable)?;
                        if extended == 1 {
                            return Ok(Claim::Claimed);
                        }
                    }
                    Some(_) => return Ok(Claim::InProgress),
                    None => {}
                }
            }
            Ok(Claim::InProgress)
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
            let mut connection = self.connection.clone();
            let _: i64 = redis::cmd("EVAL")
                .arg(COMPLETE)
                .arg(1)
                .arg(redis_key(scope, key))
                .arg(format!("c:{token}"))
                .arg(ttl_ms(expires_at))
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
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
            let mut connection = self.connection.clone();
            let _: i64 = redis::cmd("EVAL")
                .arg(RELEASE)
                .arg(1)
                .arg(redis_key(scope, key))
                .arg(format!("c:{token}"))
                .query_async(&mut connection)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    /// Redis expires keys itself: nothing to purge.
    fn purge_expired(&self, _now: u64) -> BoxFuture<'_, Result<u64, DedupError>> {
        Box::pin(async { Ok(0) })
    }
}

#[cfg(test)]
mod tests {
    use super::redis_key;

    #[test]
    fn scopes_with_colons_cannot_collide() {
        assert_ne!(redis_key("a:b", "c"), redis_key("a", "b:c"));
        assert_eq!(redis_key("orders", "42"), "backstop:seen:orders:42");
        assert_eq!(redis_key("a:b", "c"), "backstop:seen::3:a:b:c");
        assert_ne!(redis_key("", "x"), redis_key("x", ""));
    }
}
