//! The library's integration tests in one test binary (a binary per file
//! was a link and a copy of every generic dependency each). Each file is a
//! module here, its tests named `file::test` (`retry::…`); they run in
//! parallel beside each other's, so none of them stops, restarts or closes
//! anything broker-wide. The tests that do have binaries of their own:
//! see `[[test]]` in Cargo.toml.

mod common;

mod bad_input;
mod cluster;
mod connection;
mod consumer;
mod dedup;
mod outbox;
mod publish;
mod publisher;
mod retry;
mod stalls;
mod store;
mod store_consumer;
mod store_groups;
mod tls;
