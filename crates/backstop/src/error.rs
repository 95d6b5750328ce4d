//! Typed errors of the library, each classified so that callers decide by
//! method (`is_config`, `is_access_refused`) rather than by matching strings.

use std::fmt;

/// The result type used throughout the library.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the library can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A broker address could not be parsed. The address is shown redacted.
    #[error("invalid AMQP URI {uri}: {reason}")]
    InvalidUri {
        /// The address with its password replaced by `***`.
        uri: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A configuration value is out of range or missing.
    #[error("invalid configuration: {key}: {reason}")]
    Config {
        /// The name of the setting.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The broker refused the credentials or the virtual host (`ACCESS_REFUSED`).
    #[error("ACCESS_REFUSED by {uri}: {reason}")]
    AccessRefused {
        /// The address, redacted.
        uri: String,
        /// The broker's reply text.
        reason: String,
    },
    /// TLS failed in a way retrying cannot fix: an unknown CA, a name
    /// mismatch, an expired certificate, a missing client certificate.
    #[error("TLS to {uri} failed: {reason}")]
    Tls {
        /// The address, redacted.
        uri: String,
        /// What went wrong and what to change.
        reason: String,
    },
    /// The supervisor gave up: the configured maximum of attempts was reached.
    #[error("gave up connecting after {attempts} attempts; last error: {last_error}")]
    GaveUp {
        /// How many connection attempts were made.
        attempts: u32,
        /// The last error seen.
        last_error: String,
    },
    /// The configuration file is unreadable or invalid.
    #[error("{path}: {message}")]
    ConfigFile {
        /// The file.
        path: String,
        /// What is wrong, with the line and key where known.
        message: String,
    },
    /// A declaration was refused, typically `PRECONDITION_FAILED` because the
    /// broker already has the entity with other arguments.
    #[error("declaring {what} {name:?} failed: {reason}")]
    Declare {
        /// `exchange`, `queue` or `binding of queue`.
        what: &'static str,
        /// The entity's name.
        name: String,
        /// The broker's reply.
        reason: String,
    },
    /// A background task of the library died (a bug: please report it).
    #[error("internal task failed: {0}")]
    TaskFailed(String),
    /// The supervisor or consumer was closed.
    #[error("closed")]
    Closed,
    /// An AMQP operation failed.
    #[error("AMQP error during {context}: {source}")]
    Amqp {
        /// What the library was doing.
        context: &'static str,
        /// The client library's error.
        #[source]
        source: lapin::Error,
    },
}

impl Error {
    /// Wraps a lapin error with what the library was doing at the time.
    pub(crate) fn amqp(context: &'static str) -> impl FnOnce(lapin::Error) -> Error {
        move |source| Error::Amqp { context, source }
    }

    /// True for errors that retrying will not fix: bad URI, bad configuration,
    /// refused credentials. The CLI maps these to exit code 2.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            Error::InvalidUri { .. }
                | Error::Config { .. }
                | Error::ConfigFile { .. }
                | Error::AccessRefused { .. }
                | Error::Tls { .. }
        )
    }

    /// True when the broker refused the credentials or the virtual host.
    pub fn is_access_refused(&self) -> bool {
        matches!(self, Error::AccessRefused { .. })
    }
}

/// A broker address with its password hidden, for logs and error messages.
///
/// Every URI the library prints goes through this type, so credentials never
/// reach a log line.
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUri(String);

impl RedactedUri {
    /// Redacts `uri`: `amqp://user:secret@host/vh` becomes `amqp://user:***@host/vh`.
    ///
    /// Works on unparsable input too, since those are exactly the ones that end
    /// up in error messages.
    pub fn new(uri: &str) -> Self {
        let Some(scheme_end) = uri.find("://") else {
            return RedactedUri(uri.to_owned());
        };
        let rest = &uri[scheme_end + 3..];
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let authority = &rest[..authority_end];
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                let user = userinfo.split(':').next().unwrap_or_default();
                let shown = if userinfo.contains(':') {
                    format!("{user}:***")
                } else {
                    user.to_owned()
                };
                RedactedUri(format!(
                    "{}{}@{}",
                    &uri[..scheme_end + 3],
                    shown,
                    &rest[at + 1..]
                ))
            }
            None => RedactedUri(uri.to_owned()),
        }
    }
}

impl fmt::Display for RedactedUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for RedactedUri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::RedactedUri;

    #[test]
    fn password_is_hidden() {
        let r = RedactedUri::new("amqp://guest:s3cret@127.0.0.1:5672/%2f?heartbeat=5");
        assert_eq!(
            r.to_string(),
            "amqp://guest:***@127.0.0.1:5672/%2f?heartbeat=5"
        );
        assert!(!format!("{r:?}").contains("s3cret"));
    }

    #[test]
    fn password_with_at_sign_is_hidden() {
        let r = RedactedUri::new("amqps://u:p@ss@host/vh");
        assert_eq!(r.to_string(), "amqps://u:***@host/vh");
    }

    #[test]
    fn uri_without_credentials_is_unchanged() {
        assert_eq!(
            RedactedUri::new("amqp://127.0.0.1:5672").to_string(),
            "amqp://127.0.0.1:5672"
        );
        assert_eq!(RedactedUri::new("not a uri").to_string(), "not a uri");
    }
}
