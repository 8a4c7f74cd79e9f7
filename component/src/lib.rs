//! Plumbing every mesh component shares, so that each component crate holds
//! only its own logic: default ports, command-line flags, logging, the admin
//! HTTP server with readiness and metrics, signal handling and backoff,
//! TLS from files, and SPIFFE identities.

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod limits;
pub mod logging;
mod main_of;
pub mod ports;
pub mod readiness;
pub mod shutdown;
pub mod spiffe;
pub mod tls;
pub mod trace;
pub mod watch;

pub use admin::Admin;
pub use backoff::Backoff;
pub use main_of::{main_of, parse_component, serve_component};
pub use readiness::Readiness;
pub use tokio_util::sync::CancellationToken;

use std::{future::Future, net::SocketAddr};

/// Runs a component's work next to its admin server. A signal, the end of
/// the work, or a failure of either side stops both: a component whose work
/// failed must not linger with a healthy-looking admin port.
pub async fn run_with_admin<F>(
    admin: &Admin,
    admin_addr: SocketAddr,
    shutdown: CancellationToken,
    work: F,
) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    let listener = cli::bind("admin-addr", admin_addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "admin server listening");
    let stop_on_exit = shutdown.clone().drop_guard();
    let served = admin.serve(listener, shutdown.clone());
    let work = async {
        let _stop = stop_on_exit;
        work.await
    };
    let (worked, served) = tokio::join!(work, served);
    worked?;
    served?;
    Ok(())
}
