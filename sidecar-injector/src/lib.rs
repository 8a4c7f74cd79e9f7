//! The sidecar injector: the mutating admission webhook and the injection
//! template, shared with `meshctl kube-inject`. Not built yet (issue 8):
//! the binary serves only its admin port.

use clap::Args;
use component::{Admin, CancellationToken};

#[derive(Debug, Clone, Args)]
pub struct NoArgs {}

/// Serves nothing but the admin port until `shutdown`.
pub async fn run(_: NoArgs, _: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    tracing::warn!("this build injects no sidecars yet (issue 8); only the admin port runs");
    shutdown.cancelled().await;
    Ok(())
}
