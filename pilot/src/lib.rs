//! Pilot: turns the config Galley serves into proxy configuration.
//!
//! Pilot follows Galley over MCP (every collection it needs; ready once all
//! have synced), builds the service model ([`model`]) and serves ADS
//! ([`xds`]): clusters and endpoints so far; listeners, routes, secrets,
//! delta ADS and the rest of the generators are still to come (issue 4).

pub mod model;
pub mod proxy;
pub mod xds;

use clap::Args;
use component::{Admin, CancellationToken};
use std::{net::SocketAddr, sync::Arc, time::Duration};

use mcp_proto::{kinds, mcp};
use model::Model;
use tokio::sync::watch;
use xds::{
    ads::{AdsServer, SyncStatus},
    generate::ModelGenerator,
};

/// The collections Pilot builds its model from.
pub const COLLECTIONS: &[&str] = &[
    kinds::VIRTUAL_SERVICES,
    kinds::DESTINATION_RULES,
    kinds::GATEWAYS,
    kinds::SERVICE_ENTRIES,
    kinds::SYNTHETIC_SERVICE_ENTRIES,
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
    /// Address of the plaintext xDS (ADS) gRPC server.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::PILOT_XDS)))]
    pub xds_addr: SocketAddr,
    /// Quiet time after a config change before proxies are pushed, so that
    /// a burst of changes makes one push (waits at most ten times this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub debounce: Duration,
}

/// Runs Pilot until `shutdown`: follows Galley, keeps the model, serves ADS.
pub async fn run(args: PilotArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    let xds = tokio::net::TcpListener::bind(args.xds_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --xds-addr {}: {e}", args.xds_addr))?;
    let sink = mcp::follow(
        "pilot",
        COLLECTIONS,
        &args.mcp_server,
        &admin,
        shutdown.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--mcp-server: {e}"))?;

    // Rebuild the model once changes settle; the last good one stays while
    // Galley is away, since the sink keeps its state.
    let (model_tx, model_rx) = watch::channel(Arc::new(Model::default()));
    let mut snapshots = sink.subscribe();
    let debounce = args.debounce;
    tokio::spawn(async move {
        loop {
            let model = Model::from_snapshot(&snapshots.borrow_and_update());
            model_tx.send_if_modified(|current| {
                let changed = **current != model;
                if changed {
                    *current = Arc::new(model);
                }
                changed
            });
            if snapshots.changed().await.is_err() {
                return;
            }
            let deadline = tokio::time::Instant::now() + debounce * 10;
            loop {
                tokio::select! {
                    changed = snapshots.changed() => if changed.is_err() { return },
                    _ = tokio::time::sleep(debounce) => break,
                    _ = tokio::time::sleep_until(deadline) => break,
                }
            }
        }
    });

    let ads = AdsServer::new(ModelGenerator::new(model_rx), shutdown.clone());
    let status = ads.status();
    admin.debug_page("syncz", move || syncz(&status));
    tracing::info!(addr = %xds.local_addr()?, "pilot serving ADS");
    mcp::grpc_server()
        .add_service(ads.into_service())
        .serve_with_incoming_shutdown(mcp::incoming(xds), shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// `/debug/syncz`: per connected proxy, per type, what was sent and answered.
fn syncz(status: &SyncStatus) -> serde_json::Value {
    let proxies: Vec<serde_json::Value> = status
        .proxies()
        .iter()
        .map(|p| {
            let types: serde_json::Map<String, serde_json::Value> = p
                .types
                .iter()
                .map(|(t, s)| {
                    let status = serde_json::json!({
                        "sent_version": s.sent_version,
                        "sent_nonce": s.sent_nonce,
                        "acked_version": s.acked_version,
                        "last_nack": s.last_nack,
                    });
                    (t.clone(), status)
                })
                .collect();
            let since = p
                .connected_since
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs());
            serde_json::json!({
                "node": p.node_id,
                "protocol": p.protocol,
                "connected_since_unix": since,
                "types": types,
            })
        })
        .collect();
    serde_json::Value::Array(proxies)
}
