//! Plumbing every mesh component shares, so that each component crate holds
//! only its own logic: default ports, command-line flags, logging, the admin
//! HTTP server with readiness and metrics, signal handling and backoff.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod logging;
pub mod ports;
pub mod readiness;
pub mod shutdown;

pub use admin::Admin;
pub use backoff::Backoff;
pub use readiness::Readiness;
pub use tokio_util::sync::CancellationToken;
