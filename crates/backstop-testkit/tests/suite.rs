//! The test kit's own integration tests in one test binary; each file is a
//! module here, its tests named `file::test`. `broker_guard.rs` stops the
//! broker and has a binary of its own (see `[[test]]` in Cargo.toml).

mod browser;
mod effects;
