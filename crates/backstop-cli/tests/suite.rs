//! The `backstop` command's integration tests in one test binary (a binary
//! per file was a link and a copy of every generic dependency each). Each
//! file is a module here, its tests named `file::test` (`run::…`); they run
//! in parallel beside each other's, so none of them stops, restarts or
//! closes anything broker-wide. The tests that do, or that are too heavy
//! or too timing-bound to share the machine, have binaries of their own:
//! see `[[test]]` in Cargo.toml.

mod rows;
mod sidecar;

mod cli;
mod console_http;
mod dlq;
mod failed;
mod publish;
mod run;
mod run_breaker;
mod run_health;
mod run_http;
mod run_scanner;
mod topology;
