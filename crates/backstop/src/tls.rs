//! TLS for `amqps://` addresses, on rustls with the ring provider.
//!
//! Backstop builds its own rustls client configuration and hands lapin the
//! finished TLS stream (`lapin::Connection::connector`), because lapin's own
//! TLS set-up offers neither a server name other than the URI's host nor a
//! way to turn verification off.

use crate::error::{Error, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// TLS settings for `amqps://` addresses.
///
/// By default the broker's certificate is verified against the system's roots
/// plus [`ca_file`](Self::ca_file), for the host named in the URI (or
/// [`server_name`](Self::server_name)). A client certificate is presented for
/// mutual TLS when [`client_cert_files`](Self::client_cert_files) is set.
/// Verification is only turned off by
/// [`insecure_skip_verify`](Self::insecure_skip_verify), which logs a warning
/// at every connect.
#[derive(Clone, Default)]
pub struct TlsConfig {
    ca: Vec<CertificateDer<'static>>,
    identity: Option<Identity>,
    server_name: Option<String>,
    insecure_skip_verify: bool,
    keys: Keys,
}

/// The configuration keys a [`TlsConfig`]'s errors name: `broker.tls.*`,
/// or `handler.http.tls.*` for an HTTPS endpoint.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Keys {
    pub(crate) section: &'static str,
    pub(crate) ca: &'static str,
    pub(crate) cert: &'static str,
    pub(crate) key: &'static str,
    pub(crate) server_name: &'static str,
}

impl Keys {
    /// `[broker] tls.*`.
    pub(crate) const BROKER: Keys = Keys {
        section: "broker.tls",
        ca: "broker.tls.ca",
        cert: "broker.tls.cert",
        key: "broker.tls.key",
        server_name: "broker.tls.server_name",
    };
    /// A consumer's `handler.http.tls.*`.
    pub(crate) const ENDPOINT: Keys = Keys {
        section: "handler.http.tls",
        ca: "handler.http.tls.ca",
        cert: "handler.http.tls.cert",
        key: "handler.http.tls.key",
        server_name: "handler.http.tls.server_name",
    };
}

impl Default for Keys {
    fn default() -> Self {
        Keys::BROKER
    }
}

struct Identity {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("ca_certificates", &self.ca.len())
            .field("client_certificate", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .field("insecure_skip_verify", &self.insecure_skip_verify)
            .finish()
    }
}

fn read_file(key: &'static str, path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::Config {
        key,
        reason: format!("cannot read {}: {e}", path.display()),
    })
}

fn certificates(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let pem = read_file(key, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config {
            key,
            reason: format!("{} holds a malformed PEM certificate: {e}", path.display()),
        })?;
    if certs.is_empty() {
        return Err(Error::Config {
            key,
            reason: format!("{} holds no PEM certificate", path.display()),
        });
    }
    Ok(certs)
}

impl TlsConfig {
    /// No CA of its own and no client certificate: the system's roots.
    pub fn new() -> Self {
        Self::default()
    }

    /// Trusts the CA certificates in the PEM file at `path` (`broker.tls.ca`),
    /// besides the system's roots.
    pub fn ca_file(mut self, path: &Path) -> Result<Self> {
        self.ca.extend(certificates(self.keys.ca, path)?);
        Ok(self)
    }

    /// Presents the certificate chain (PEM) and its private key (PEM: PKCS#8,
    /// PKCS#1 or SEC1) for mutual TLS (`broker.tls.cert`, `broker.tls.key`).
    pub fn client_cert_files(mut self, cert: &Path, key: &Path) -> Result<Self> {
        let chain = certificates(self.keys.cert, cert)?;
        let pem = read_file(self.keys.key, key)?;
        let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| Error::Config {
            key: self.keys.key,
            reason: format!("{} holds no usable PEM private key: {e}", key.display()),
        })?;
        self.identity = Some(Identity { chain, key });
        Ok(self)
    }

    /// Verifies the broker's certificate for `name` instead of the URI's host
    /// (`broker.tls.server_name`); also the name sent in SNI. For a broker
    /// reached through an address its certificate does not list, such as a
    /// tunnel or a load balancer's IP.
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Accepts any certificate the broker presents
    /// (`broker.tls.insecure_skip_verify`): the connection is encrypted but
    /// the broker is not authenticated, so anyone on the path can pose as it.
    /// For test set-ups only; a warning is logged at every connect.
    pub fn insecure_skip_verify(mut self, insecure: bool) -> Self {
        self.insecure_skip_verify = insecure;
        self
    }

    /// True when a client certificate is configured.
    pub fn has_client_cert(&self) -> bool {
        self.identity.is_some()
    }

    /// True when verification is turned off.
    pub fn is_insecure(&self) -> bool {
        self.insecure_skip_verify
    }

    /// Names `keys` in its errors (`handler.http.tls.*` for an endpoint).
    pub(crate) fn keys(mut self, keys: Keys) -> Self {
        self.keys = keys;
        self
    }

    /// The name the broker's certificate is checked against for `host`.
    pub(crate) fn name_for<'a>(&'a self, host: &'a str) -> &'a str {
        self.server_name.as_deref().unwrap_or(host)
    }

    /// The rustls client configuration, built once per supervisor.
    pub(crate) fn client_config(&self) -> Result<Arc<ClientConfig>> {
        if let Some(name) = &self.server_name
            && ServerName::try_from(name.as_str()).is_err()
        {
            return Err(Error::Config {
                key: self.keys.server_name,
                reason: format!("{name:?} is neither a DNS name nor an IP address"),
            });
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config {
                key: self.keys.section,
                reason: format!("no usable TLS protocol version: {e}"),
            })?;
        let builder = if self.insecure_skip_verify {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        } else {
            let mut roots = RootCertStore::empty();
            // Unreadable system certificates are skipped, as every rustls
            // client does; `broker.tls.ca` is what the tests and most private
            // brokers rely on.
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            for ca in &self.ca {
                roots.add(ca.clone()).map_err(|e| Error::Config {
                    key: self.keys.ca,
                    reason: format!("a CA certificate is not usable as a trust anchor: {e}"),
                })?;
            }
            builder.with_root_certificates(roots)
        };
        let config = match &self.identity {
            Some(identity) => builder
                .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())
                .map_err(|e| Error::Config {
                    key: self.keys.key,
                    reason: format!("the key does not go with {}: {e}", self.keys.cert),
                })?,
            None => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }
}

/// The verifier behind `insecure_skip_verify`: any certificate, any name.
/// Handshake signatures are still checked, so the session keys belong to
/// whoever holds the presented certificate's key.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A clear reason for a TLS failure in `text` (rustls's error, as lapin
/// reports it), if it is one. Alerts the broker sent are about the client's
/// certificate; the rest are about the broker's.
pub(crate) fn failure(text: &str) -> Option<String> {
    let alert = text.contains("received fatal alert");
    let reason = if alert && text.contains("CertificateExpired") {
        "the broker rejected the client certificate: it has expired (broker.tls.cert)"
    } else if (alert && text.contains("CertificateRequired"))
        || text.contains("certificate required")
    {
        "the broker requires a client certificate (mutual TLS): set broker.tls.cert and \
         broker.tls.key"
    } else if alert
        && (text.contains("BadCertificate")
            || text.contains("UnknownCA")
            || text.contains("CertificateUnknown"))
    {
        "the broker rejected the client certificate: it is not signed by a CA the broker trusts"
    } else if text.contains("UnknownIssuer") {
        "the broker's certificate is not signed by a trusted CA (UnknownIssuer): \
         set broker.tls.ca to the CA that signed it"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "the broker's certificate does not name the host in the URI (NotValidForName): \
         connect with a name the certificate lists, or set broker.tls.server_name"
    } else if text.contains("Expired") || text.contains("certificate expired") {
        "the broker's certificate has expired (Expired): it must be renewed on the broker"
    } else if text.contains("invalid peer certificate") {
        "the broker's certificate is invalid"
    } else {
        return None;
    };
    Some(format!("TLS: {reason} ({})", text.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_has_its_own_reason() {
        let cases = [
            (
                "IO error: invalid peer certificate: UnknownIssuer",
                "not signed by a trusted CA",
            ),
            (
                "IO error: invalid peer certificate: NotValidForName",
                "does not name the host",
            ),
            (
                "IO error: certificate expired: verification time 1, but certificate is not valid after 0",
                "broker's certificate has expired",
            ),
            (
                "IO error: received fatal alert: CertificateExpired",
                "rejected the client certificate: it has expired",
            ),
            (
                "IO error: received fatal alert: CertificateRequired",
                "requires a client certificate",
            ),
            (
                "IO error: received fatal alert: UnknownCA",
                "not signed by a CA the broker trusts",
            ),
        ];
        for (text, expected) in cases {
            let reason = failure(text).unwrap_or_default();
            assert!(reason.contains(expected), "{text} -> {reason}");
        }
        assert_eq!(failure("IO error: Connection refused (os error 111)"), None);
    }

    #[test]
    fn a_bad_server_name_is_a_config_error() {
        let err = TlsConfig::new()
            .server_name("not a name")
            .client_config()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("broker.tls.server_name"), "{err}");
    }

    #[test]
    fn a_file_without_a_certificate_is_named() {
        let path = std::env::temp_dir().join(format!("backstop-not-pem-{}", std::process::id()));
        std::fs::write(&path, "hello").unwrap_or_default();
        let err = TlsConfig::new()
            .ca_file(&path)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        let _ = std::fs::remove_file(&path);
        assert!(err.contains("broker.tls.ca"), "{err}");
        assert!(err.contains("no PEM certificate"), "{err}");
    }
}
