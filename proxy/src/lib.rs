//! The sidecar proxy: xDS client, listeners, routing, load balancing,
//! mTLS and the Mixer client. Not built yet (issue 7): the binary serves
//! only its admin port.

use clap::Args;
use component::{Admin, CancellationToken};

#[derive(Debug, Clone, Args)]
pub struct NoArgs {}

/// Serves nothing but the admin port until `shutdown`.
pub async fn run(_: NoArgs, _: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::warn!("this build carries no traffic yet (issue 7); only the admin port runs");
    shutdown.cancelled().await;
    Ok(())
}
