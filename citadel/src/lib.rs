//! Citadel, the mesh's CA: key and root handling, CSR signing over gRPC,
//! the Kubernetes secret controller and rotation. Not built yet (issue 5):
//! the binary serves only its admin port.

use clap::Args;
use component::{Admin, CancellationToken};

#[derive(Debug, Clone, Args)]
pub struct NoArgs {}

/// Serves nothing but the admin port until `shutdown`.
pub async fn run(_: NoArgs, _: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::warn!("this build signs no certificates yet (issue 5); only the admin port runs");
    shutdown.cancelled().await;
    Ok(())
}
