//! Galley: reads config, validates it, and serves it over MCP to Pilot,
//! Mixer and any other sink.
//!
//! Today it serves a directory of Kubernetes-style YAML ([`dir`]) as an MCP
//! `ResourceSource`; the Kubernetes source, service discovery, mesh config
//! and the validating webhook are still to come (issue 3).

pub mod dir;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use clap::Args;
use component::{Admin, CancellationToken};
use mcp_proto::{
    kinds,
    mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store},
};
use tokio::net::TcpListener;

pub use dir::DirSource;

#[derive(Debug, Clone, Args)]
pub struct GalleyArgs {
    /// Directory of config YAML to serve (watched).
    #[arg(long, env = "GALLEY_CONFIG_DIR")]
    pub config_dir: PathBuf,
    /// Address of the MCP `ResourceSource` gRPC server.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::GALLEY_MCP)))]
    pub mcp_addr: SocketAddr,
}

/// A store for every collection this project knows.
pub fn new_store() -> Arc<Store> {
    Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)))
}

/// Runs Galley until `shutdown`.
pub async fn run(
    args: GalleyArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mcp = TcpListener::bind(args.mcp_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --mcp-addr {}: {e}", args.mcp_addr))?;
    let store = new_store();
    let metrics = McpMetrics::source(&mut admin.registry());
    let loaded = admin.readiness().condition("config-loaded");
    let (_, follow) = DirSource::new(&args.config_dir).start(store.clone(), shutdown.clone())?;
    loaded.set(true);

    let service =
        SourceServer::new(store, IncrementalPolicy::All, metrics, shutdown.clone()).into_service();
    tracing::info!(addr = %mcp.local_addr()?, dir = %args.config_dir.display(), "galley serving MCP");
    let server = mcp_proto::mcp::grpc_server()
        .add_service(service)
        .serve_with_incoming_shutdown(
            mcp_proto::mcp::incoming(mcp),
            shutdown.clone().cancelled_owned(),
        );
    let follow = tokio::spawn(follow);
    server.await?;
    follow.await?;
    Ok(())
}
