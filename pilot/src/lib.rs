//! Pilot: turns the config Galley serves into proxy configuration.
//!
//! Today Pilot is an MCP sink of every collection it needs and reports
//! ready once all of them have synced; the service model and the xDS v3
//! server are still to come (issue 4).

pub mod xds;

use clap::Args;
use component::{Admin, CancellationToken};
use mcp_proto::{kinds, mcp};

/// The collections Pilot builds its model from.
pub const COLLECTIONS: &[&str] = &[
    kinds::VIRTUAL_SERVICES,
    kinds::DESTINATION_RULES,
    kinds::GATEWAYS,
    kinds::SERVICE_ENTRIES,
    kinds::SIDECARS,
    kinds::ENVOY_FILTERS,
    kinds::POLICIES,
    kinds::MESH_POLICIES,
    kinds::SERVICE_ROLES,
    kinds::SERVICE_ROLE_BINDINGS,
    kinds::RBAC_CONFIGS,
    kinds::CLUSTER_RBAC_CONFIGS,
    kinds::MESH_CONFIG,
];

#[derive(Debug, Clone, Args)]
pub struct PilotArgs {
    /// Galley's MCP address.
    #[arg(long, env = "PILOT_MCP_SERVER", default_value = "127.0.0.1:9901")]
    pub mcp_server: String,
}

/// Runs Pilot until `shutdown`.
pub async fn run(args: PilotArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    let _model_input = mcp::follow(
        "pilot",
        COLLECTIONS,
        &args.mcp_server,
        &admin,
        shutdown.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--mcp-server: {e}"))?;
    shutdown.cancelled().await;
    Ok(())
}
