//! Consumes a queue until Ctrl-C, printing each message.
//!
//! ```text
//! BACKSTOP_AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f \
//!     cargo run --profile testing -p backstop --example consume -- orders
//! ```
//!
//! Cut the broker's connections meanwhile (`rabbitmqctl close_all_connections
//! test`, or `stop_app` / `start_app`): the consumer reconnects by itself.

use backstop::connection::{ConnectionConfig, ConnectionSupervisor};
use backstop::consumer::{Consumer, ConsumerConfig};
use backstop::handler::{Delivery, HandlerError, handler_fn};
use backstop::topology::{Queue, Topology};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "backstop=info".into()),
        )
        .init();
    let url = std::env::var("BACKSTOP_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    let queue = std::env::args().nth(1).unwrap_or_else(|| "orders".into());

    let supervisor = ConnectionSupervisor::start(
        ConnectionConfig::new(url).connection_name("backstop-example"),
    )?;
    let config = ConsumerConfig::new(&queue)
        .topology(Topology::new().queue(Queue::classic(&queue)))
        .prefetch(50)
        .concurrency(4);
    let handler = handler_fn(|delivery: Delivery| async move {
        let text = std::str::from_utf8(delivery.body())
            .map_err(|e| HandlerError::permanent(format!("payload is not UTF-8: {e}")))?;
        println!("{}: {text}", delivery.message_id().unwrap_or("-"));
        Ok::<(), HandlerError>(())
    });
    let report = Consumer::new(supervisor.clone(), config, handler)
        .run_until(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    println!("handled {} messages", report.handled);
    supervisor.close().await;
    Ok(())
}
