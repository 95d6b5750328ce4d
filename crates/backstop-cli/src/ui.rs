//! Shared pieces of the commands: the broker address and progress bars.

use crate::UsageError;
use backstop::RedactedUri;
use backstop::config::Config;
use backstop::connection::{Backoff, ConnectionConfig, ConnectionSupervisor, TlsConfig};
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;

/// The default broker: the local one the README's commands start.
pub(crate) use backstop::connection::DEFAULT_URI;

/// Where a command's broker is.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct BrokerArgs {
    /// A configuration file; its [broker] section names the broker.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: Option<PathBuf>,
    /// The broker's AMQP URI.
    #[arg(long, value_name = "URI")]
    uri: Option<String>,
}

impl BrokerArgs {
    /// The broker from `-c FILE` (its `[broker]` section), `--uri`,
    /// `BACKSTOP_AMQP_URL` or the default, in that order, checked before
    /// anything connects.
    pub(crate) fn resolve(&self) -> anyhow::Result<String> {
        let from_file = match &self.config {
            Some(path) => Config::load(path)?.broker.uri,
            None => None,
        };
        let uri = from_file
            .or_else(|| self.uri.clone())
            .or_else(|| std::env::var("BACKSTOP_AMQP_URL").ok())
            .unwrap_or_else(|| DEFAULT_URI.to_owned());
        backstop::connection::parse_uri(&uri).map_err(|e| UsageError(e.to_string()))?;
        Ok(uri)
    }
}

impl BrokerArgs {
    /// The TLS settings of `-c FILE`'s `[broker.tls]`, or none.
    pub(crate) fn tls(&self) -> anyhow::Result<TlsConfig> {
        match &self.config {
            Some(path) => Ok(Config::load(path)?.broker.tls.load()?),
            None => Ok(TlsConfig::new()),
        }
    }
}

/// The broker's `host:port` as a loopback socket address, for the fault proxy.
pub(crate) fn loopback_addr(uri: &str) -> anyhow::Result<std::net::SocketAddr> {
    let parsed = backstop::connection::parse_uri(uri)?;
    let host = match parsed.authority.host.as_str() {
        "localhost" => "127.0.0.1",
        other => other,
    };
    let addr: std::net::SocketAddr = format!("{host}:{}", parsed.authority.port)
        .parse()
        .map_err(|_| {
            UsageError(format!(
                "the demo injects faults through a loopback proxy, so the broker must be \
                 on a loopback IP address; {} is not",
                RedactedUri::new(uri)
            ))
        })?;
    if !addr.ip().is_loopback() {
        return Err(UsageError(format!(
            "the demo only injects faults on loopback; {} is not a loopback broker",
            RedactedUri::new(uri)
        ))
        .into());
    }
    Ok(addr)
}

/// A progress bar on a terminal; hidden when stderr is not one.
pub(crate) fn progress(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec} {msg}")
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_prefix(what.to_owned());
    bar
}

/// A supervisor for a command's own direct connection. It gives up after a
/// few attempts, so a missing broker is reported rather than waited for.
pub(crate) fn direct_supervisor(
    uri: &str,
    tls: TlsConfig,
    name: &str,
) -> backstop::Result<ConnectionSupervisor> {
    ConnectionSupervisor::start(
        ConnectionConfig::new(uri)
            .connection_name(name)
            .tls(tls)
            .backoff(Backoff {
                max_attempts: Some(5),
                ..Backoff::default()
            }),
    )
}
