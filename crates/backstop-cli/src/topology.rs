//! `backstop topology apply -c FILE`: declares what `backstop run` declares
//! on every connect (each consumer's exchanges, queue with its arguments,
//! bindings, retry tiers and `<queue>.dlq`) without consuming, for deploy
//! pipelines, and prints each declaration. Exit 0 when everything is
//! declared, 1 when the broker refuses something (a conflict is explained:
//! the argument and both values), 2 for a bad configuration.

use crate::UsageError;
use backstop::config::Config;
use std::path::PathBuf;
use std::process::ExitCode;

/// `backstop topology` subcommands.
#[derive(Debug, clap::Subcommand)]
pub(crate) enum TopologyCommand {
    /// Declare every [[consumer]]'s exchanges, queues and bindings, as
    /// `backstop run` does on each connect, without consuming; print them.
    Apply(ApplyArgs),
}

/// Options of `backstop topology apply`.
#[derive(Debug, clap::Args)]
pub(crate) struct ApplyArgs {
    /// The configuration file.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    config: PathBuf,
}

/// Runs a `backstop topology` command.
pub(crate) async fn run(command: TopologyCommand) -> anyhow::Result<ExitCode> {
    let TopologyCommand::Apply(args) = command;
    let config = Config::load(&args.config)?;
    if config.consumers.is_empty() {
        return Err(UsageError(format!(
            "{}: no [[consumer]] block: nothing to declare",
            args.config.display()
        ))
        .into());
    }
    let mut topologies = Vec::new();
    for settings in &config.consumers {
        let consumer = crate::run::declaring(settings)?;
        topologies.push((settings.queue.clone(), consumer.declared_topology()));
    }
    let supervisor = crate::ui::direct_supervisor(&config, "backstop-topology-apply")?;
    let result = async {
        let live = supervisor.connection().await?;
        for (queue, topology) in &topologies {
            // A refused declaration closes its channel: one per consumer.
            let channel = live.create_channel().await?;
            topology
                .apply_reporting(&channel, |line| println!("declared {line}"))
                .await
                .map_err(|e| anyhow::Error::from(e).context(format!("consumer {queue:?}")))?;
            let _ = channel.close(200, "declared".into()).await;
        }
        anyhow::Ok(())
    }
    .await;
    supervisor.close().await;
    result?;
    println!(
        "backstop topology apply: declared the topology of {} consumer(s)",
        topologies.len()
    );
    Ok(ExitCode::SUCCESS)
}
