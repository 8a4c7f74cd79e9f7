//! Mixer: policy checks (`--role policy`) and telemetry (`--role
//! telemetry`), one binary for both deployments.
//!
//! Today Mixer is an MCP sink of its config collections and reports ready
//! once they have synced; Check, Report, expressions and adapters are still
//! to come (issue 6).

pub mod attributes;
pub mod check;
pub mod config;
pub mod expr;

use clap::{Args, ValueEnum};
use component::{Admin, CancellationToken};
use mcp_proto::{kinds, mcp};

/// The collections Mixer's config comes from.
pub const COLLECTIONS: &[&str] = &[
    kinds::RULES,
    kinds::HANDLERS,
    kinds::INSTANCES,
    kinds::ATTRIBUTE_MANIFESTS,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    /// `istio-policy`: answers Check.
    Policy,
    /// `istio-telemetry`: takes Reports.
    Telemetry,
}

#[derive(Debug, Clone, Args)]
pub struct MixerArgs {
    #[arg(long, value_enum)]
    pub role: Role,
    /// Galley's MCP address.
    #[arg(long, env = "MIXER_MCP_SERVER", default_value = "127.0.0.1:9901")]
    pub mcp_server: String,
}

/// Runs Mixer in its role until `shutdown`.
pub async fn run(args: MixerArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    let id = match args.role {
        Role::Policy => "mixer-policy",
        Role::Telemetry => "mixer-telemetry",
    };
    let _config_input = mcp::follow(id, COLLECTIONS, &args.mcp_server, &admin, shutdown.clone())
        .map_err(|e| anyhow::anyhow!("--mcp-server: {e}"))?;
    shutdown.cancelled().await;
    Ok(())
}
