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

    #[test]
    fn an_empty_file_is_the_defaults() {
        let config = Config::parse("", "empty.toml").expect("valid");
        assert!(config.broker.uri.is_none());
    }
}
