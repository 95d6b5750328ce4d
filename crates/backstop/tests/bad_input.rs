//! Bad addresses and credentials fail clearly and at once.

use crate::common;
use backstop::Error;
use backstop::connection::{ConnectionConfig, ConnectionState, ConnectionSupervisor};
use backstop_testkit::{broker_addr, url_via};
use std::time::Duration;

#[tokio::test]
async fn an_invalid_uri_is_named_before_anything_runs() {
    common::init_tracing();
    let err = ConnectionSupervisor::start(ConnectionConfig::new("amqp://guest:pw@127.0.0.1:56x2/"))
        .expect_err("must fail");
    assert!(matches!(err, Error::InvalidUri { .. }), "{err}");
    assert!(err.is_config());
    assert!(err.to_string().contains("127.0.0.1:56x2"), "{err}");
    assert!(!err.to_string().contains("pw"), "{err}");
}

#[tokio::test]
async fn wrong_credentials_are_access_refused() {
    common::init_tracing();
    let url = url_via("amqp://guest:wrong-password@x/%2f", broker_addr());
    let supervisor = ConnectionSupervisor::start(ConnectionConfig::new(&url)).expect("valid");
    let err = tokio::time::timeout(Duration::from_secs(30), supervisor.connection())
        .await
        .expect("refused quickly, not retried forever")
        .expect_err("must fail");
    assert!(err.is_access_refused(), "{err}");
    assert!(err.to_string().contains("ACCESS_REFUSED"), "{err}");
    assert!(!err.to_string().contains("wrong-password"), "{err}");
    assert!(matches!(
        &*supervisor.state().borrow(),
        ConnectionState::Closed { .. }
    ));
}
