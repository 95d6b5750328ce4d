//! The `backstop` command: a thin layer over the library that parses
//! arguments, runs one command and maps failures to exit codes
//! (0 ok, 1 runtime failure, 2 bad usage or configuration).

// The demo, benchmark and fault tools: only with the `fault-tools` feature
// (the test kit), which scripts/test and scripts/demo turn on.
#[cfg(feature = "fault-tools")]
mod bench;
#[cfg(feature = "fault-tools")]
mod chaos;
mod console;
#[cfg(feature = "fault-tools")]
mod demo;
mod dlq;
mod failed;
mod publish;
mod run;
#[cfg(feature = "fault-tools")]
mod servers;
#[cfg(feature = "fault-tools")]
mod sidecar;
mod topology;
#[cfg(feature = "fault-tools")]
mod torture;
mod ui;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// RabbitMQ consumers and publishers that never lose a message: the sidecar
/// (`backstop run`), operator tools for dead-letter queues, the compensation
/// store and the review console, and (in a build with the `fault-tools`
/// feature) the demo, benchmarks and fault tests.
#[derive(Debug, Parser)]
#[command(name = "backstop", version, after_help = ENVIRONMENT)]
struct Cli {
    /// Log filter, for example `info` or `backstop=debug`. `RUST_LOG` wins when set.
    #[arg(long, global = true, default_value = "warn,lapin=off")]
    log: String,
    /// Log lines as `text` or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// The environment the commands read, shown at the end of `--help`.
pub(crate) const ENVIRONMENT: &str = "\
Environment:
  BACKSTOP_AMQP_URL          the broker of the dlq, publish, demo and bench commands (after -c and --uri)
  BACKSTOP_BROKER_URI        replaces the configuration file's [broker] uri
  BACKSTOP_STORE_URL         replaces the configuration file's [store] url
  BACKSTOP_PUBLISH_TOKEN     replaces [publish] token
  BACKSTOP_CONSOLE_TOKEN     replaces [console] token
  BACKSTOP_CONSOLE_PASSWORD  replaces [console] password
  BACKSTOP_POSTGRES_URL, BACKSTOP_REDIS_URL  the servers of bench, torture and chaos
  RUST_LOG                   the log filter, instead of --log
  NO_COLOR                   no colours in logs (there are none when stderr is not a terminal)";

/// Colours in text logs: only on a terminal, and never with `NO_COLOR`
/// set (to anything but the empty string, as no-color.org says).
fn log_colours() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The sidecar: consume every [[consumer]] of the config file and deliver
    /// each message to its HTTP endpoint, with metrics and health endpoints.
    Run(run::RunArgs),
    /// Publish one --body, or each line of a file or stdin, to an exchange
    /// and routing key, with confirms; ends with a summary line.
    Publish(publish::PublishArgs),
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Declare the exchanges, queues and bindings of a config file's
    /// consumers without consuming (for deploy pipelines).
    #[command(subcommand)]
    Topology(topology::TopologyCommand),
    /// Publish, then consume through a proxy that keeps cutting and
    /// blackholing the connection; prints a ledger that must show lost=0.
    #[cfg(feature = "fault-tools")]
    Demo(demo::DemoArgs),
    /// Benchmarks.
    #[cfg(feature = "fault-tools")]
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Dead-letter queue tools: list, replay, purge.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// The review console: a web UI over the compensation store and the
    /// dead-letter queues (failure groups, row detail, edits, replays).
    Console(console::ConsoleArgs),
    /// Manual review of the compensation store: list, show, retry, resolve, discard, purge.
    #[command(subcommand)]
    Failed(failed::FailedCommand),
    /// The randomized ledger test: the real sidecar under a seeded mix of
    /// endpoint answers, message shapes and faults, with every message and
    /// business id checked at the end of each round. Prints the seed.
    #[cfg(feature = "fault-tools")]
    Torture(torture::TortureArgs),
    /// The fault matrix on the three-node cluster of scripts/cluster.sh:
    /// three sidecars sharing a PostgreSQL store and a dedup store, orders
    /// published with confirms throughout, a ledger (lost must be 0, every
    /// duplicate effect explained), a JSON report and an SVG picture.
    #[cfg(feature = "fault-tools")]
    Chaos(chaos::ChaosArgs),
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file and print it normalized, passwords redacted.
    Check(run::CheckArgs),
}

#[cfg(feature = "fault-tools")]
#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Consume throughput against the broker's auto-ack ceiling, in one run.
    Consume(bench::ConsumeArgs),
    /// Compensation store re-drive throughput, on SQLite and PostgreSQL.
    Store(bench::StoreArgs),
    /// Publish throughput with confirms: the Publisher against a bare lapin
    /// ceiling and the naive one-at-a-time loop, its spool, the sidecar.
    Publish(bench::PublishArgs),
    /// A failure group retried by an operator and re-driven by the scanner
    /// (SQLite), from the click to the last row replayed.
    GroupRetry(bench::GroupRetryArgs),
    /// The sidecar end to end: `backstop run` against an in-process HTTP
    /// endpoint, per concurrency, dedup and store, against the bare loop.
    Run(bench::RunBenchArgs),
    /// Forced closes and a blackhole while consuming: the time until
    /// deliveries are handled again on a new channel.
    Reconnect(bench::ReconnectArgs),
}

/// Runs one `backstop bench` command.
#[cfg(feature = "fault-tools")]
async fn bench(command: BenchCommand) -> anyhow::Result<ExitCode> {
    match command {
        BenchCommand::Consume(args) => bench::consume(args).await,
        BenchCommand::Store(args) => bench::store(args).await,
        BenchCommand::Publish(args) => bench::publish(args).await,
        BenchCommand::GroupRetry(args) => bench::group_retry(args).await,
        BenchCommand::Run(args) => bench::run_bench(args).await,
        BenchCommand::Reconnect(args) => bench::reconnect(args).await,
    }
}

/// An error the CLI reports with exit code 2: bad usage or configuration.
#[derive(Debug)]
pub(crate) struct UsageError(pub(crate) String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&cli.log));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(log_colours())
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Config(ConfigCommand::Check(args)) => run::check(args),
            Command::Topology(command) => topology::run(command).await,
            Command::Publish(args) => publish::run(args).await,
            Command::Dlq(command) => dlq::run(command).await,
            Command::Failed(command) => failed::run(command).await,
            Command::Console(args) => console::run(args).await,
            #[cfg(feature = "fault-tools")]
            Command::Demo(args) => demo::run(args).await,
            #[cfg(feature = "fault-tools")]
            Command::Bench(command) => bench(command).await,
            #[cfg(feature = "fault-tools")]
            Command::Torture(args) => torture::run(args).await,
            #[cfg(feature = "fault-tools")]
            Command::Chaos(args) => chaos::run(args).await,
        }
    });
    // Tasks a command abandoned (a bounded shutdown gave up on them) must not
    // hold the process: dropping the runtime would wait for blocking work.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            let usage = err.downcast_ref::<UsageError>().is_some()
                || err
                    .downcast_ref::<backstop::Error>()
                    .is_some_and(backstop::Error::is_config)
                // A row that does not exist or an action its status forbids.
                || err
                    .downcast_ref::<backstop::store::StoreError>()
                    .is_some_and(|e| !e.is_transient());
            ExitCode::from(if usage { 2 } else { 1 })
        }
    }
}
