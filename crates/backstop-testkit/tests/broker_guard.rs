//! [`BrokerStopped`] starts the broker again when a test fails while it is
//! down. A test binary of its own: it stops the broker, which no other test
//! may see.

use backstop_testkit::{BrokerStopped, connect, rabbitmqctl};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_test_failing_with_the_broker_down_starts_it_again() {
    let failed = tokio::task::spawn_blocking(|| {
        let _down = BrokerStopped::stop().expect("stop_app");
        let running = rabbitmqctl(&["-q", "eval", "rabbit:is_running()."]).expect("eval");
        assert_eq!(running.trim(), "false", "stop_app stopped the broker");
        panic!("a test failing while the broker is down");
    })
    .await;
    assert!(failed.is_err_and(|e| e.is_panic()));
    let running = rabbitmqctl(&["-q", "eval", "rabbit:is_running()."]).expect("eval");
    assert_eq!(running.trim(), "true", "the guard started the broker again");
    let connection = connect().await;
    assert!(connection.status().connected());
}
