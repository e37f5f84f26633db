//! Runnable examples of im-infra; see the `examples/` folder:
//!
//! - `cargo run --example quickstart`: every capability on the in-process
//!   backend, printing what it does.
#![deny(missing_docs)]
