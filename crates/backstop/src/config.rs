//! The TOML file the `backstop` command reads (`-c backstop.toml`).
//!
//! Every section denies unknown keys, so a typo is an error naming the key
//! and its line rather than a setting silently ignored.
//!
//! ```
//! let config = backstop::config::Config::parse(
//!     "[broker]\nuri = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\nheartbeat = \"5s\"\n",
//!     "backstop.toml",
//! ).expect("valid");
//! assert_eq!(config.broker.heartbeat, Some(std::time::Duration::from_secs(5)));
//! ```

use crate::dedup::{DedupConfig, DedupError, DedupKey, MissingKey};
use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// The whole file.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Config {
    /// `[broker]`: where and how to connect.
    #[serde(default)]
    pub broker: BrokerConfig,
    /// `[store]`: the compensation store.
    #[serde(default)]
    pub store: StoreConfig,
}

/// `[store]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct StoreConfig {
    /// `sqlite://backstop.db` or `postgres://user:password@host/db`.
    pub url: Option<String>,
    /// Finished rows (resolved, discarded, replayed) older than this are
    /// purged by `backstop failed purge` when it is given no `--older-than`.
    #[serde(default, with = "humantime_serde_opt")]
    pub retention: Option<Duration>,
}

/// `dedup.*` of a consumer: deduplication by business key.
///
/// ```
/// # #[derive(serde::Deserialize)] struct C { dedup: backstop::config::DedupSettings }
/// let c: C = toml::from_str(r#"
///     dedup.key = "json:/order_id"
///     dedup.ttl = "7d"
/// "#).expect("valid");
/// assert_eq!(c.dedup.key.to_string(), "json:/order_id");
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct DedupSettings {
    /// `message-id`, `header:NAME` or `json:/pointer`.
    #[serde(deserialize_with = "from_str")]
    pub key: DedupKey,
    /// How long a handled key is remembered (default 7 days).
    #[serde(default, with = "humantime_serde_opt")]
    pub ttl: Option<Duration>,
    /// How long a claim holds a key while its handler runs (default 5 minutes).
    #[serde(default, with = "humantime_serde_opt")]
    pub lease: Option<Duration>,
    /// Where keys are kept: `memory`, `sqlite://...`, `postgres://...` or
    /// `redis://...`. Defaults to the compensation store's URL, or memory
    /// when there is none.
    pub store: Option<String>,
    /// `process` (default) or `reject`: what to do with a message that has
    /// no key.
    #[serde(default, deserialize_with = "from_str_opt")]
    pub missing_key: Option<MissingKey>,
}

impl DedupSettings {
    /// The store URL these settings use, given the compensation store's.
    pub fn store_url<'a>(&'a self, compensation_store: Option<&'a str>) -> &'a str {
        self.store
            .as_deref()
            .or(compensation_store)
            .unwrap_or("memory")
    }

    /// Connects to the store and builds the consumer's dedup configuration.
    pub async fn build(
        &self,
        compensation_store: Option<&str>,
    ) -> std::result::Result<DedupConfig, DedupError> {
        let store = crate::dedup::connect(self.store_url(compensation_store)).await?;
        let mut config = DedupConfig::new(self.key.clone(), store)
            .missing_key(self.missing_key.unwrap_or_default());
        if let Some(ttl) = self.ttl {
            config = config.ttl(ttl);
        }
        if let Some(lease) = self.lease {
            config = config.lease(lease);
        }
        Ok(config)
    }
}

fn from_str<'de, D, T>(deserializer: D) -> std::result::Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    let text = String::deserialize(deserializer)?;
    text.parse().map_err(serde::de::Error::custom)
}

fn from_str_opt<'de, D, T>(deserializer: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr<Err = String>,
{
    from_str(deserializer).map(Some)
}

/// `[broker]`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct BrokerConfig {
    /// The broker's AMQP URI.
    pub uri: Option<String>,
    /// More addresses for failover, tried after `uri` in turn.
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The heartbeat, for example `"10s"`.
    #[serde(default, with = "humantime_serde_opt")]
    pub heartbeat: Option<Duration>,
    /// The connection name shown by the broker.
    pub connection_name: Option<String>,
}

impl Config {
    /// Reads and parses `path`.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::ConfigFile {
            path: path.display().to_string(),
            message: format!("cannot read it: {e}"),
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses `text`; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self> {
        let config: Config = toml::from_str(text).map_err(|e| Error::ConfigFile {
            path: origin.to_owned(),
            message: describe_toml_error(text, &e),
        })?;
        if let Some(uri) = &config.broker.uri {
            crate::connection::parse_uri(uri).map_err(|e| Error::ConfigFile {
                path: origin.to_owned(),
                message: format!("broker.uri: {e}"),
            })?;
        }
        for (i, uri) in config.broker.addresses.iter().enumerate() {
            crate::connection::parse_uri(uri).map_err(|e| Error::ConfigFile {
                path: origin.to_owned(),
                message: format!("broker.addresses[{i}]: {e}"),
            })?;
        }
        Ok(config)
    }
}

/// `line N: message`, from the error's byte span.
fn describe_toml_error(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().to_owned();
    match err.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
            format!("line {line}: {message}")
        }
        None => message,
    }
}

/// Durations written as `"10s"`, `"1m30s"`, `"250ms"`.
mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer, de::Error};
    use std::time::Duration;

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<Duration>, D::Error> {
        let text: Option<String> = Option::deserialize(deserializer)?;
        text.map(|t| {
            humantime::parse_duration(&t)
                .map_err(|e| D::Error::custom(format!("{t:?} is not a duration like \"10s\": {e}")))
        })
        .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(text: &str) -> String {
        Config::parse(text, "test.toml")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn an_unknown_key_is_named_with_its_line() {
        let err = error_of("[broker]\nuri = \"amqp://127.0.0.1\"\nurl = \"x\"\n");
        assert!(err.contains("test.toml"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("url"), "{err}");
    }

    #[test]
    fn a_bad_uri_or_duration_is_named() {
        let err = error_of("[broker]\nuri = \"http://x\"\n");
        assert!(err.contains("broker.uri"), "{err}");
        let err = error_of("[broker]\nheartbeat = \"soon\"\n");
        assert!(err.contains("line 2") && err.contains("soon"), "{err}");
    }

    #[derive(Debug, serde::Deserialize)]
    struct WithDedup {
        dedup: DedupSettings,
    }

    #[test]
    fn dedup_settings_parse_and_default_to_the_compensation_store() {
        let c: WithDedup = toml::from_str(
            "dedup.key = \"header:order-id\"\ndedup.ttl = \"1d\"\ndedup.missing_key = \"reject\"\n",
        )
        .expect("valid");
        assert_eq!(c.dedup.key, DedupKey::Header("order-id".into()));
        assert_eq!(c.dedup.ttl, Some(Duration::from_secs(86_400)));
        assert_eq!(c.dedup.missing_key, Some(MissingKey::Reject));
        assert_eq!(c.dedup.store_url(Some("sqlite://b.db")), "sqlite://b.db");
        assert_eq!(c.dedup.store_url(None), "memory");
    }

    #[test]
    fn a_bad_dedup_key_is_named_with_its_line() {
        let text = "\ndedup.key = \"json:order_id\"\n";
        let err = toml::from_str::<WithDedup>(text).expect_err("invalid");
        let message = describe_toml_error(text, &err);
        assert!(message.starts_with("line 2"), "{message}");
        assert!(message.contains("JSON pointer"), "{message}");
    }

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("", "empty.toml").expect("valid");
        assert!(config.broker.uri.is_none());
    }
}
