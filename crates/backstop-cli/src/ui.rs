//! Shared pieces of the commands: the broker address and progress bars.

use crate::UsageError;
use backstop::config::Config;
use backstop::connection::ConnectionSupervisor;
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
    /// The broker's AMQP URI (when -c names none).
    #[arg(
        long,
        value_name = "URI",
        env = "BACKSTOP_AMQP_URL",
        hide_env_values = true
    )]
    uri: Option<String>,
}

impl BrokerArgs {
    /// The configuration the command connects with: `-c FILE` (or the
    /// defaults), its broker URI taken from the file's `[broker]`, `--uri`,
    /// `BACKSTOP_AMQP_URL` or the default, in that order, and checked before
    /// anything connects.
    pub(crate) fn config(&self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => Config::load(path)?,
            None => Config::default(),
        };
        let uri = config
            .broker
            .uri
            .take()
            .or_else(|| self.uri.clone())
            .unwrap_or_else(|| DEFAULT_URI.to_owned());
        backstop::connection::parse_uri(&uri).map_err(|e| UsageError(e.to_string()))?;
        config.broker.uri = Some(uri);
        Ok(config)
    }

    /// A supervisor for the command's own direct connection, built from the
    /// whole `[broker]` section (TLS, addresses, heartbeat ...) by
    /// [`Config::connection_config`], like every other command's (the
    /// benchmarks': a build with the fault tools).
    #[cfg(feature = "fault-tools")]
    pub(crate) fn direct_supervisor(&self, name: &str) -> anyhow::Result<ConnectionSupervisor> {
        Ok(direct_supervisor(&self.config()?, name)?)
    }
}

/// The broker's `host:port` as a loopback socket address, for the fault proxy.
#[cfg(feature = "fault-tools")]
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
                backstop::RedactedUri::new(uri)
            ))
        })?;
    if !addr.ip().is_loopback() {
        return Err(UsageError(format!(
            "the demo only injects faults on loopback; {} is not a loopback broker",
            backstop::RedactedUri::new(uri)
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

/// A supervisor for a command's own direct connection, from `config`'s
/// `[broker]` and `[reconnect]`, as [`direct_connection`] describes it.
pub(crate) fn direct_supervisor(
    config: &Config,
    name: &str,
) -> backstop::Result<ConnectionSupervisor> {
    ConnectionSupervisor::start(direct_connection(config, name)?)
}

/// A command's own direct connection, from `config`'s `[broker]` and
/// `[reconnect]`. Unless `[reconnect] max_attempts` says otherwise it gives
/// up after a few attempts, so that a missing broker is reported rather
/// than waited for.
pub(crate) fn direct_connection(
    config: &Config,
    name: &str,
) -> backstop::Result<backstop::connection::ConnectionConfig> {
    let mut config = config.clone();
    config.reconnect.max_attempts = config.reconnect.max_attempts.or(Some(5));
    config.connection_config(name)
}
