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
    /// The broker refused the credentials (`ACCESS_REFUSED`). A refused
    /// virtual host (`NOT_ALLOWED`) is retried instead: limits lift and
    /// virtual hosts get created.
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
    /// A declaration was refused because the broker has the entity in
    /// another shape: an exchange of another type, a queue with other
    /// arguments (`PRECONDITION_FAILED - inequivalent arg`). The reason names
    /// the argument, both values and what to do; retrying cannot fix it.
    #[error("declaring {what} {name:?} failed: {reason}")]
    TopologyConflict {
        /// `exchange`, `queue` or `binding of queue`.
        what: &'static str,
        /// The entity's name.
        name: String,
        /// The conflict in words, then the broker's reply.
        reason: String,
    },
    /// A background task of the library died (a bug: please report it).
    #[error("internal task failed: {0}")]
    TaskFailed(String),
    /// The supervisor or consumer was closed.
    #[error("closed")]
    Closed,
    /// The publisher's spool could not be opened (another process holds
    /// it, the file is not a spool, the disk failed).
    #[error("the publish spool: {0}")]
    Spool(String),
    /// An AMQP operation failed.
    #[error("AMQP error during {context}: {source}")]
    Amqp {
        /// What the library was doing.
        context: &'static str,
        /// The client library's error.
        #[source]
        source: lapin::Error,
    },
    /// An AMQP operation got no answer within its bound (a silent peer, or a
    /// connection the broker stopped reading during a resource alarm).
    #[error("no answer to {context} within {after:?}")]
    Timeout {
        /// What the library was doing.
        context: &'static str,
        /// How long it waited.
        after: std::time::Duration,
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

    /// True when a declaration conflicts with what the broker has (see
    /// [`Error::TopologyConflict`]).
    pub fn is_topology_conflict(&self) -> bool {
        matches!(self, Error::TopologyConflict { .. })
    }

    /// True when the broker refused the credentials.
    pub fn is_access_refused(&self) -> bool {
        matches!(self, Error::AccessRefused { .. })
    }
}

/// A URI with its secrets hidden, for logs and error messages: the password
/// of its userinfo, and the values of query parameters that name a secret
/// (`password`, `token`, `secret`, `key`, `api_key`, `access_token`, `auth`
/// and a few more, in any case).
///
/// Every URI the library prints goes through this type, so credentials never
/// reach a log line. It works for any scheme with an authority (`amqp`,
/// `amqps`, `http`, `https`, `postgres`, `redis`, `sqlite` ...).
///
/// ```
/// use backstop::RedactedUri;
/// let shown = RedactedUri::new("amqp://svc:pa/ss@rabbit:5672/%2f?token=abc&heartbeat=5");
/// assert_eq!(shown.to_string(), "amqp://svc:***@rabbit:5672/%2f?token=***&heartbeat=5");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct RedactedUri(String);

/// Query parameters whose values [`RedactedUri`] hides, compared without
/// regard to case.
const SECRET_QUERY_KEYS: &[&str] = &[
    "password",
    "passwd",
    "token",
    "secret",
    "key",
    "api_key",
    "apikey",
    "access_token",
    "refresh_token",
    "client_secret",
    "auth",
];

/// What replaces a secret.
const HIDDEN: &str = "***";

impl RedactedUri {
    /// Redacts `uri`: `amqp://user:secret@host/vh?token=t` becomes
    /// `amqp://user:***@host/vh?token=***`.
    ///
    /// The URI is read with the `url` crate's parser. A password may hold
    /// `/`, `@`, `:` or `?` unencoded, which moves the parser's idea of where
    /// the host starts; the userinfo is therefore taken to end at the last
    /// `@` before the query, and is percent-encoded before parsing. A path
    /// that holds an `@` after a `:` is read that way too: hiding too much of
    /// a rare path beats showing a password. Input the parser still cannot
    /// read (it ends up in error messages precisely because it is broken)
    /// keeps only its scheme, its user and what follows the last `@`.
    pub fn new(uri: &str) -> Self {
        RedactedUri(redact(uri))
    }
}

fn redact(text: &str) -> String {
    let Some(scheme_end) = text.find("://") else {
        return text.to_owned();
    };
    let authority_start = scheme_end + 3;
    let userinfo = userinfo_of(text, authority_start);
    // Only a userinfo, or a query, can hold a secret (a token may be the
    // whole userinfo: `https://TOKEN@host`).
    if userinfo.is_none() && !text.contains('?') {
        return text.to_owned();
    }
    let prepared = match userinfo {
        Some(userinfo) => format!(
            "{}{}{}",
            &text[..authority_start],
            encode_userinfo(userinfo),
            &text[authority_start + userinfo.len()..]
        ),
        None => text.to_owned(),
    };
    let Ok(mut url) = url::Url::parse(&prepared) else {
        return redact_unparsable(text, authority_start);
    };
    let mut changed = false;
    if url.password().is_some() {
        changed |= url.set_password(Some(HIDDEN)).is_ok();
    } else if !url.username().is_empty() && matches!(url.scheme(), "http" | "https") {
        // On an HTTP endpoint a user without a password (or with an empty
        // one) is a bearer token as often as a name: hide it. Brokers and
        // databases keep their user names visible.
        changed |= url.set_username(HIDDEN).is_ok();
        let _ = url.set_password(None);
    }
    if let Some(query) = url.query().and_then(redact_query) {
        url.set_query(Some(&query));
        changed = true;
    }
    if changed { url.into() } else { text.to_owned() }
}

/// The userinfo of `text` (without its `@`): everything from the
/// authority's start to the last `@` that is not in a query value. A
/// password may hold `?` or `#` unencoded, so an `@` after the first `?`
/// still ends the userinfo unless a `=` comes between them
/// (`?notify=ops@example.com` is a query, `u:p?ss@host` a password).
fn userinfo_of(text: &str, authority_start: usize) -> Option<&str> {
    let rest = &text[authority_start..];
    let cutoff = rest
        .find('?')
        .and_then(|q| rest[q..].find('=').map(|e| q + e))
        .unwrap_or(rest.len());
    let at = rest[..cutoff].rfind('@')?;
    Some(&rest[..at])
}

/// `userinfo` with every character the parser would read as a delimiter
/// percent-encoded, except the first `:` (between user and password).
fn encode_userinfo(userinfo: &str) -> String {
    let (user, password) = match userinfo.split_once(':') {
        Some((user, password)) => (user, Some(password)),
        None => (userinfo, None),
    };
    let encode = |part: &str| -> String {
        part.chars()
            .map(|c| match c {
                '/' => "%2F".to_owned(),
                '@' => "%40".to_owned(),
                ':' => "%3A".to_owned(),
                '?' => "%3F".to_owned(),
                '#' => "%23".to_owned(),
                '\\' => "%5C".to_owned(),
                c => c.to_string(),
            })
            .collect()
    };
    match password {
        Some(password) => format!("{}:{}", encode(user), encode(password)),
        None => encode(user),
    }
}

/// `query` with the value of every secret parameter hidden, or `None` when
/// it holds none. Other parameters stay byte for byte.
fn redact_query(query: &str) -> Option<String> {
    let mut changed = false;
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| {
            let raw_key = pair.split_once('=').map_or(pair, |(k, _)| k);
            let key: String = url::form_urlencoded::parse(raw_key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            if pair.contains('=') && is_secret_key(&key) {
                changed = true;
                format!("{raw_key}={HIDDEN}")
            } else {
                pair.to_owned()
            }
        })
        .collect();
    changed.then(|| pairs.join("&"))
}

/// Parts of a query parameter's name that mark it as a secret, lower case:
/// `X-Amz-Signature`, `sig`, `private_token`, `x-api-key`, `sslpassword`...
const SECRET_QUERY_PARTS: &[&str] = &[
    "pass",
    "pwd",
    "token",
    "secret",
    "key",
    "sig",
    "credential",
    "auth",
    "session",
];

/// Parameters that look like secrets by name but are settings.
const NOT_SECRET_QUERY_KEYS: &[&str] = &["auth_mechanism"];

fn is_secret_key(key: &str) -> bool {
    let lower = key.to_ascii_lowercase();
    if NOT_SECRET_QUERY_KEYS.contains(&lower.as_str()) {
        return false;
    }
    // `code` carries Azure Functions' keys.
    lower == "code"
        || SECRET_QUERY_KEYS
            .iter()
            .any(|secret| lower.eq_ignore_ascii_case(secret))
        || SECRET_QUERY_PARTS.iter().any(|part| lower.contains(part))
}

/// The last resort for text the parser rejects: the scheme, the user (when
/// it is plain) and what follows the last `@`, with no query at all.
fn redact_unparsable(text: &str, authority_start: usize) -> String {
    let scheme = &text[..authority_start];
    let rest = &text[authority_start..];
    let (shown_user, rest) = match rest.rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or_default();
            let user = if user.contains(['/', '?', '#']) {
                ""
            } else {
                user
            };
            (format!("{user}:{HIDDEN}@"), &rest[at + 1..])
        }
        None => (String::new(), rest),
    };
    let rest = match rest.find('?') {
        Some(q) => format!("{}?{HIDDEN}", &rest[..q]),
        None => rest.to_owned(),
    };
    format!("{scheme}{shown_user}{rest}")
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
    fn token_shaped_query_keys_and_bare_user_tokens_are_hidden() {
        for (uri, shown) in [
            (
                "https://x.azurewebsites.net/api/h?code=SECRET1&name=a",
                "https://x.azurewebsites.net/api/h?code=***&name=a",
            ),
            (
                "https://b.s3.amazonaws.com/k?X-Amz-Signature=SECRET2&X-Amz-Credential=SECRET3&x=1",
                "https://b.s3.amazonaws.com/k?X-Amz-Signature=***&X-Amz-Credential=***&x=1",
            ),
            (
                "https://h/p?sig=SECRET4&x-api-key=SECRET5&private_token=SECRET6",
                "https://h/p?sig=***&x-api-key=***&private_token=***",
            ),
            (
                "https://SECRET7@api.example.com/x",
                "https://***@api.example.com/x",
            ),
            (
                "https://SECRET8:@api.example.com/x",
                "https://***@api.example.com/x",
            ),
            (
                "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
                "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
            ),
        ] {
            let got = RedactedUri::new(uri).to_string();
            assert_eq!(got, shown, "{uri}");
            assert!(!got.contains("SECRET"), "{got}");
        }
    }

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

    /// Passwords with every delimiter a parser can trip on, unencoded and
    /// encoded, in every scheme the project prints.
    #[test]
    fn passwords_with_delimiters_are_hidden_in_every_scheme() {
        let schemes = ["amqp", "amqps", "http", "https", "postgres", "redis"];
        let passwords = [
            "s3cret/pw",
            "s3/cr/et",
            "s3cret@pw",
            "s3cret:pw",
            "s3cret%2Fpw",
            "s3cret%40pw",
            "s3cret?pw",
            "s3cret#pw",
            "a/b@c:d%2Fe",
            "1234/5678",
        ];
        for scheme in schemes {
            for password in passwords {
                let uri = format!("{scheme}://svc:{password}@db.internal:7000/path");
                let shown = RedactedUri::new(&uri).to_string();
                assert_eq!(
                    shown,
                    format!("{scheme}://svc:***@db.internal:7000/path"),
                    "{uri}"
                );
                let secret_parts = password.split(['/', '@', ':', '?', '#', '%']);
                for part in secret_parts.filter(|p| p.len() > 2) {
                    assert!(!shown.contains(part), "{uri} -> {shown}");
                }
            }
        }
    }

    #[test]
    fn query_secrets_are_hidden_whatever_their_case() {
        let uri = "https://api.example.com/hook?token=t0k&Password=pw1&SECRET=s3&key=k3y\
                   &api_key=ak&access_token=at&AUTH=au&page=2&auth_mechanism=external";
        let shown = RedactedUri::new(uri).to_string();
        assert_eq!(
            shown,
            "https://api.example.com/hook?token=***&Password=***&SECRET=***&key=***\
             &api_key=***&access_token=***&AUTH=***&page=2&auth_mechanism=external"
        );
        for scheme in ["amqp", "amqps", "http", "https", "postgres", "redis"] {
            let uri = format!("{scheme}://u:p/w@h:1/x?sslmode=require&password=pw%2Fq");
            assert_eq!(
                RedactedUri::new(&uri).to_string(),
                format!("{scheme}://u:***@h:1/x?sslmode=require&password=***"),
                "{uri}"
            );
        }
        // An encoded key is still recognized; a value holding `@` is a query.
        assert_eq!(
            RedactedUri::new("http://h/x?%74oken=abc&notify=ops@example.com").to_string(),
            "http://h/x?%74oken=***&notify=ops@example.com"
        );
    }

    #[test]
    fn the_user_and_the_rest_stay_as_written() {
        for uri in [
            "amqp://guest@127.0.0.1:5672/%2f",
            "http://127.0.0.1:8080/orders?page=2",
            "amqps://127.0.0.1:5671/%2f?auth_mechanism=external",
            "postgres://backstop@127.0.0.1/backstop?sslmode=require",
            "sqlite://backstop.db",
            "redis://127.0.0.1:6379/",
            "memory",
        ] {
            assert_eq!(RedactedUri::new(uri).to_string(), uri);
        }
        assert_eq!(
            RedactedUri::new("redis://:only-pw@127.0.0.1:6379/0").to_string(),
            "redis://:***@127.0.0.1:6379/0"
        );
    }

    #[test]
    fn unparsable_uris_keep_no_secret() {
        for (uri, shown) in [
            ("amqp://u:pw@[bad/x", "amqp://u:***@[bad/x"),
            ("amqp://u:p?s=s@[bad", "amqp://u:***@[bad"),
            ("amqp://[bad?token=abc", "amqp://[bad?***"),
        ] {
            assert_eq!(RedactedUri::new(uri).to_string(), shown, "{uri}");
        }
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
