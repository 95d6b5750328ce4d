//! Who may use the console: the login check, in-memory sessions with an
//! expiry, the CSRF token of each session, and `Authorization` headers for
//! API clients.
//!
//! - A session id and its CSRF token are 32 random bytes each from the OS.
//! - Secrets are compared without an early exit.
//! - Neither the token, the password nor a session id is ever logged: the
//!   log says who logged in and from where, never with what.

use backstop::config::ConsoleSettings;
use base64::Engine;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The cookie that holds the session id.
pub(crate) const SESSION_COOKIE: &str = "backstop_session";
/// The cookie of the login form's own CSRF token (before any session).
pub(crate) const LOGIN_COOKIE: &str = "backstop_login";
/// The most sessions kept at once; the oldest goes first beyond it.
const MAX_SESSIONS: usize = 10_000;
/// The longest name an operator may log in with.
const MAX_NAME: usize = 64;
/// How long an address waits for its next login after a failed one.
const FAILED_LOGIN_DELAY: Duration = Duration::from_secs(1);
/// The longest wait queued for one address; beyond it, refused (429).
const MAX_LOGIN_WAIT: Duration = Duration::from_secs(10);
/// The most addresses with a failed login remembered at once.
const MAX_FAILED_ADDRESSES: usize = 10_000;

/// 32 random bytes from the OS, as 64 hex characters.
pub(crate) fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes)
        .map_err(|e| anyhow::anyhow!("the OS random generator failed: {e}"))?;
    Ok(hex::encode(bytes))
}

/// Equal without an early exit (the publish endpoint's comparison).
pub(crate) use crate::run::publish::same_secret;

/// A logged-in operator.
#[derive(Clone, Debug)]
pub(crate) struct Session {
    /// The name given at login: the actor is `console:<name>`.
    pub(crate) name: String,
    /// The token every POST of this session must carry.
    pub(crate) csrf: String,
    expires: Instant,
}

/// Who is making a request, once authenticated.
#[derive(Clone, Debug)]
pub(crate) struct Operator {
    /// The name; the audit actor is `console:<name>`.
    pub(crate) name: String,
    /// What its POSTs must carry.
    pub(crate) csrf: Csrf,
}

/// The CSRF rule of a request's credentials.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Csrf {
    /// A browser session: every POST carries this token.
    Session(String),
    /// A bearer token, which a browser never sends on its own: no CSRF
    /// token is needed.
    Bearer,
    /// Basic credentials, which a browser may replay on its own: reading
    /// only; changes need a session or a bearer token.
    ReadOnly,
}

impl Operator {
    /// The actor of the audit entries this operator causes.
    pub(crate) fn actor(&self) -> String {
        format!("console:{}", self.name)
    }
}

/// The login rules and the sessions.
pub(crate) struct Auth {
    token: Option<backstop::config::Secret>,
    user: Option<String>,
    password: Option<backstop::config::Secret>,
    ttl: Duration,
    sessions: Mutex<HashMap<String, Session>>,
    /// Per address with a recent failed login: when its next try may run.
    failed: Mutex<HashMap<IpAddr, Instant>>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("token", &self.token)
            .field("user", &self.user)
            .field("password", &self.password)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// The rules of `settings`.
    pub(crate) fn new(settings: &ConsoleSettings) -> Self {
        Auth {
            token: settings.token.clone(),
            user: settings.user.clone(),
            password: settings.password.clone(),
            ttl: settings.session_ttl(),
            sessions: Mutex::new(HashMap::new()),
            failed: Mutex::new(HashMap::new()),
        }
    }

    /// When a login from `ip` may be checked: `Some(wait)` (zero without
    /// a recent failure; otherwise a slot a second after the previous try,
    /// reserved now so that parallel tries queue), or `None` when the
    /// queue of that address is already too long.
    pub(crate) fn login_slot(&self, ip: IpAddr) -> Option<Duration> {
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        let Some(next) = failed.get_mut(&ip) else {
            return Some(Duration::ZERO);
        };
        let slot = (*next).max(now);
        if slot - now > MAX_LOGIN_WAIT {
            return None;
        }
        *next = slot + FAILED_LOGIN_DELAY;
        Some(slot - now)
    }

    /// Records a failed login from `ip`: its next try waits.
    pub(crate) fn login_failed(&self, ip: IpAddr) {
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        if failed.len() >= MAX_FAILED_ADDRESSES && !failed.contains_key(&ip) {
            failed.retain(|_, next| *next > now);
            if failed.len() >= MAX_FAILED_ADDRESSES {
                // Full of live entries: the one due soonest goes.
                if let Some(first) = failed.iter().min_by_key(|(_, n)| **n).map(|(k, _)| *k) {
                    failed.remove(&first);
                }
            }
        }
        let next = failed.entry(ip).or_insert(now);
        *next = (*next).max(now + FAILED_LOGIN_DELAY);
    }

    /// A login from `ip` succeeded: its next try does not wait.
    pub(crate) fn login_succeeded(&self, ip: IpAddr) {
        self.failed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&ip);
    }

    /// True when a secret is needed to log in (a token or a password is
    /// set); otherwise (loopback only) a name is enough.
    pub(crate) fn needs_secret(&self) -> bool {
        self.token.is_some() || self.password.is_some()
    }

    /// How long a login lasts.
    pub(crate) fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Checks a login: `name` with the token, or the configured user with
    /// its password. Returns the name to log in as, or why not (without
    /// telling which part was wrong).
    pub(crate) fn check_login(&self, name: &str, secret: &str) -> Result<String, &'static str> {
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_NAME
            || name.chars().any(|c| c.is_control() || c == ':')
        {
            return Err("give a name of 1 to 64 characters, without ':' or control characters");
        }
        if !self.needs_secret() {
            return Ok(name.to_owned());
        }
        let by_token = self
            .token
            .as_ref()
            .is_some_and(|t| same_secret(secret.as_bytes(), t.expose().as_bytes()));
        let by_password = match (&self.user, &self.password) {
            (Some(user), Some(password)) => {
                // Both compared every time: the time taken does not tell
                // whether the name was right.
                let user_ok = same_secret(name.as_bytes(), user.as_bytes());
                let password_ok = same_secret(secret.as_bytes(), password.expose().as_bytes());
                user_ok & password_ok
            }
            _ => false,
        };
        if by_token || by_password {
            Ok(name.to_owned())
        } else {
            Err("wrong name or secret")
        }
    }

    /// Opens a session for `name`: (session id, its CSRF token).
    pub(crate) fn open_session(&self, name: String) -> anyhow::Result<(String, String)> {
        let id = random_token()?;
        let csrf = random_token()?;
        let now = Instant::now();
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        sessions.retain(|_, s| s.expires > now);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions
                .iter()
                .min_by_key(|(_, s)| s.expires)
                .map(|(k, _)| k.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(
            id.clone(),
            Session {
                name,
                csrf: csrf.clone(),
                expires: now + self.ttl,
            },
        );
        Ok((id, csrf))
    }

    /// The live session of `id`, if any.
    pub(crate) fn session(&self, id: &str) -> Option<Session> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        match sessions.get(id) {
            Some(s) if s.expires > Instant::now() => Some(s.clone()),
            Some(_) => {
                sessions.remove(id);
                None
            }
            None => None,
        }
    }

    /// Ends the session `id`.
    pub(crate) fn close_session(&self, id: &str) {
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// The operator of an `Authorization` header: `Bearer TOKEN` (as
    /// `api`) or `Basic` with a name and the token, or the user and its
    /// password. `Err` when it is wrong.
    pub(crate) fn operator_of_header(&self, value: &[u8]) -> Result<Operator, ()> {
        let (scheme, rest) = value.split_at_checked(6).ok_or(())?;
        if scheme.eq_ignore_ascii_case(b"bearer") && rest.first() == Some(&b' ') {
            let given = &rest[1..];
            return match &self.token {
                Some(token) if same_secret(given, token.expose().as_bytes()) => Ok(Operator {
                    name: "api".to_owned(),
                    csrf: Csrf::Bearer,
                }),
                _ => Err(()),
            };
        }
        let (scheme, rest) = value.split_at_checked(6).ok_or(())?;
        if scheme.eq_ignore_ascii_case(b"basic ") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest.trim_ascii())
                .map_err(|_| ())?;
            let text = String::from_utf8(decoded).map_err(|_| ())?;
            let (name, secret) = text.split_once(':').ok_or(())?;
            if !self.needs_secret() {
                return Err(());
            }
            let name = self.check_login(name, secret).map_err(|_| ())?;
            // Basic credentials can be replayed by a browser on its own:
            // such a client reads, and changes state only with a session.
            return Ok(Operator {
                name,
                csrf: Csrf::ReadOnly,
            });
        }
        Err(())
    }
}

/// The value of cookie `name` in a `Cookie` header.
pub(crate) fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use backstop::config::Secret;

    fn auth(token: Option<&str>, user: Option<(&str, &str)>) -> Auth {
        let mut settings = ConsoleSettings::default();
        settings.token = token.map(Secret::new);
        settings.user = user.map(|(u, _)| u.to_owned());
        settings.password = user.map(|(_, p)| Secret::new(p));
        Auth::new(&settings)
    }

    #[test]
    fn a_login_needs_the_token_or_the_users_password() {
        let a = auth(Some("tok"), Some(("ops", "pw")));
        assert_eq!(a.check_login("alice", "tok"), Ok("alice".into()));
        assert_eq!(a.check_login("ops", "pw"), Ok("ops".into()));
        assert!(a.check_login("alice", "pw").is_err());
        assert!(a.check_login("ops", "tok2").is_err());
        assert!(a.check_login("", "tok").is_err());
        assert!(a.check_login("a:b", "tok").is_err());
        assert!(a.check_login("a\u{0}b", "tok").is_err());
        let open = auth(None, None);
        assert_eq!(open.check_login("bob", ""), Ok("bob".into()));
    }

    #[test]
    fn authorization_headers() {
        let a = auth(Some("tok"), Some(("ops", "pw")));
        let api = a.operator_of_header(b"Bearer tok").expect("bearer");
        assert_eq!(api.actor(), "console:api");
        assert_eq!(api.csrf, Csrf::Bearer);
        assert!(a.operator_of_header(b"Bearer tok2").is_err());
        assert!(a.operator_of_header(b"Bearer").is_err());
        let basic = base64::engine::general_purpose::STANDARD.encode("ops:pw");
        let op = a
            .operator_of_header(format!("Basic {basic}").as_bytes())
            .expect("basic");
        assert_eq!((op.name.as_str(), op.csrf), ("ops", Csrf::ReadOnly));
        let wrong = base64::engine::general_purpose::STANDARD.encode("ops:nope");
        assert!(
            a.operator_of_header(format!("Basic {wrong}").as_bytes())
                .is_err()
        );
    }

    #[test]
    fn a_failed_login_delays_the_next_from_that_address() {
        let a = auth(Some("tok"), None);
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        let other: IpAddr = "10.0.0.2".parse().expect("ip");
        assert_eq!(a.login_slot(ip), Some(Duration::ZERO));
        a.login_failed(ip);
        let first = a.login_slot(ip).expect("a slot");
        assert!(first > Duration::from_millis(900), "{first:?}");
        let second = a.login_slot(ip).expect("a slot");
        assert!(second > first, "parallel tries queue: {first:?} {second:?}");
        assert_eq!(a.login_slot(other), Some(Duration::ZERO));
        for _ in 0..20 {
            let _ = a.login_slot(ip);
        }
        assert_eq!(a.login_slot(ip), None, "too long a queue is refused");
        a.login_succeeded(ip);
        assert_eq!(a.login_slot(ip), Some(Duration::ZERO));
    }

    #[test]
    fn sessions_expire_and_close() {
        let a = auth(Some("tok"), None);
        let (id, csrf) = a.open_session("alice".into()).expect("random");
        assert_eq!(id.len(), 64);
        let s = a.session(&id).expect("live");
        assert_eq!((s.name.as_str(), s.csrf.as_str()), ("alice", csrf.as_str()));
        a.close_session(&id);
        assert!(a.session(&id).is_none());
        assert_eq!(
            cookie("a=1; backstop_session=xyz", SESSION_COOKIE),
            Some("xyz")
        );
    }
}
