//! Galley: reads config, validates it, and serves it over MCP to Pilot,
//! Mixer and any other sink.
//!
//! It reads a directory of Kubernetes-style YAML ([`dir`]) or a cluster
//! ([`kube_source`], with its Services as synthetic service entries,
//! [`service_discovery`]), validates every object ([`validation`]; the same
//! checks answer the validating [`webhook`]), and serves it with the mesh
//! config ([`mesh_config`]) as an MCP `ResourceSource`; it can dial sinks as
//! well.

pub mod config_set;
pub mod dir;
mod kube_core;
pub mod kube_source;
pub mod mesh_config;
pub mod relay;
pub mod service_discovery;
mod status;
pub mod validation;
pub mod webhook;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

use clap::Args;
use component::{
    Admin, CancellationToken,
    limits::{Limits, ServerLimits},
};
use mcp::memory::ListenAddr;
use mcp::{self, IncrementalPolicy, McpMetrics, SourceServer, Store};
use mesh_api::{kinds, object::YamlLimits};

pub use dir::DirSource;

#[derive(Debug, Clone, Args)]
pub struct GalleyArgs {
    /// Directory of config YAML to serve (watched).
    #[arg(
        long,
        env = "GALLEY_CONFIG_DIR",
        required_unless_present = "kube",
        conflicts_with = "kube"
    )]
    pub config_dir: Option<PathBuf>,
    /// Read config and services from Kubernetes instead (in-cluster
    /// config, or `--kubeconfig`).
    #[arg(long)]
    pub kube: bool,
    /// Kubeconfig file for `--kube` (default: in-cluster, then ~/.kube/config).
    #[arg(long, requires = "kube")]
    pub kubeconfig: Option<PathBuf>,
    /// DNS domain of the cluster, for service hosts and SPIFFE identities.
    #[arg(long, default_value = "cluster.local")]
    pub domain: String,
    /// Address of the MCP `ResourceSource` gRPC server: `host:port`, or
    /// `mem://NAME` for sinks in the same process (the monolith).
    #[arg(long, default_value_t = ListenAddr::Tcp(SocketAddr::from(([0, 0, 0, 0], component::ports::GALLEY_MCP))))]
    pub mcp_addr: ListenAddr,
    /// Istio MeshConfig YAML (watched); Istio 1.1's defaults when absent.
    #[arg(long, env = "GALLEY_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// An MCP `ResourceSink` to dial and serve as well (repeatable).
    #[arg(long = "sink-address")]
    pub sink_addresses: Vec<String>,
    /// Most YAML documents one config file may hold; a file with more is
    /// refused whole (`galley_config_files_over_limit`).
    #[arg(long, default_value_t = YamlLimits::default().documents)]
    pub max_file_documents: usize,
    /// Largest config file read, in bytes; a larger one is refused unread.
    #[arg(long, default_value_t = YamlLimits::default().bytes)]
    pub max_file_bytes: usize,
    /// Deepest nesting of mappings and sequences in a config file.
    #[arg(long, default_value_t = YamlLimits::default().depth)]
    pub max_yaml_depth: usize,
    /// Relay: follow the primary Galley whose `ResourceSource` is at this
    /// address, and serve its config merged with this cluster's own (see
    /// `/debug/relay` for the rules).
    #[arg(long, conflicts_with = "follow_listen")]
    pub follow: Option<String>,
    /// Relay: serve `ResourceSink` at this address for a primary that
    /// dials out (its `--sink-address`), and serve its config merged with
    /// this cluster's own.
    #[arg(long)]
    pub follow_listen: Option<SocketAddr>,
    /// Address of the validating admission webhook (HTTPS), served when a
    /// certificate and key are given.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::GALLEY_WEBHOOK)))]
    pub webhook_addr: SocketAddr,
    /// PEM certificate chain of the webhook (watched; reloaded on change).
    #[arg(long, requires = "webhook_key")]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of the webhook (watched; reloaded on change).
    #[arg(long, requires = "webhook_cert")]
    pub webhook_key: Option<PathBuf>,
    #[command(flatten)]
    pub webhook_ca: mesh_kube::webhook_ca::WebhookCaArgs,
    #[command(flatten)]
    pub server_limits: ServerLimits,
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
    component::trace::init("galley")?;
    let limits = Limits::new(&args.server_limits, "mcp", &mut admin.registry());
    let mcp = args
        .mcp_addr
        .bind(&limits)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind --mcp-addr {}: {e}", args.mcp_addr))?;
    let sinks = args
        .sink_addresses
        .iter()
        .map(|a| mcp::parse_endpoint(a).map_err(|e| anyhow::anyhow!("--sink-address: {e}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let served = new_store();
    let primary = match (&args.follow, args.follow_listen) {
        (Some(address), _) => Some(relay::Primary::Dial(address.clone())),
        (None, Some(address)) => Some(relay::Primary::Listen(address.to_string())),
        (None, None) => None,
    };
    // A relay's own sources feed a store of their own, merged into the
    // served one; otherwise they feed the served store directly.
    let store = match primary {
        Some(_) => new_store(),
        None => served.clone(),
    };
    let metrics = McpMetrics::source(&mut admin.registry());
    let loaded = admin.readiness().condition("config-loaded");
    let status = status::ConfigStatus::register(&admin, served.clone());
    let relay_status = status.clone();
    let mesh_status = status.clone();
    let follow_config = match &args.config_dir {
        Some(dir) => {
            let limits = YamlLimits {
                documents: args.max_file_documents,
                bytes: args.max_file_bytes,
                depth: args.max_yaml_depth,
            };
            let (_, follow) = DirSource::new(dir).limits(limits).start(
                store.clone(),
                shutdown.clone(),
                move |r| status.record(r),
            )?;
            tokio::spawn(follow)
        }
        None => {
            let client = mesh_kube::client(args.kubeconfig.as_deref()).await?;
            let (synced_tx, synced) = tokio::sync::oneshot::channel();
            let follow = kube_source::start(
                client,
                store.clone(),
                args.domain.clone(),
                shutdown.clone(),
                move |r| status.record(r),
                move || {
                    let _ = synced_tx.send(());
                },
            );
            let follow = tokio::spawn(follow);
            // Serve only a synced store: an empty one would tell every sink
            // that all config is gone.
            tracing::info!("waiting for the Kubernetes watches to list");
            tokio::select! {
                _ = synced => {}
                _ = shutdown.cancelled() => return Ok(()),
            }
            follow
        }
    };
    let follow_mesh = mesh_config::start(
        args.mesh_config.clone(),
        store.clone(),
        mesh_status,
        shutdown.clone(),
    )?;
    if let Some(primary) = primary {
        let relay = relay::Relay::new(
            &primary,
            store.clone(),
            served.clone(),
            &admin,
            relay_status,
        );
        let sink = relay.sink.clone();
        match primary {
            relay::Primary::Dial(address) => {
                let endpoint =
                    mcp::parse_endpoint(&address).map_err(|e| anyhow::anyhow!("--follow: {e}"))?;
                tracing::info!(primary = %address, "galley relaying the primary's MCP source");
                tokio::spawn(mcp::run_sink_client(sink, endpoint, shutdown.clone()));
            }
            relay::Primary::Listen(address) => {
                let listener = tokio::net::TcpListener::bind(&address)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot bind --follow-listen {address}: {e}"))?;
                tracing::info!(%address, "galley relaying a primary that dials its MCP sink");
                let service = mcp::SinkServer::new(sink, shutdown.clone())
                    .into_service()
                    .max_decoding_message_size(limits.max_message_bytes(mcp::MAX_MESSAGE_BYTES));
                let stop = shutdown.clone();
                tokio::spawn(
                    limits
                        .grpc(mcp::grpc_server())
                        .add_service(service)
                        .serve_with_incoming_shutdown(
                            limits.incoming(listener),
                            stop.cancelled_owned(),
                        ),
                );
            }
        }
        let (ready_tx, mut ready) = tokio::sync::watch::channel(false);
        tokio::spawn(relay.run(ready_tx, shutdown.clone()));
        // Serve only the primary's state: an empty one would tell every
        // sink that the mesh's config is gone.
        tracing::info!("waiting for the primary's first full state");
        tokio::select! {
            result = ready.wait_for(|r| *r) => {
                // The relay stops only on shutdown, which may win this race.
                if result.is_err() {
                    anyhow::ensure!(shutdown.is_cancelled(), "the relay stopped before the primary's first full state");
                    return Ok(());
                }
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
    loaded.set(true);

    for sink in sinks {
        tracing::info!(sink = %sink.uri(), "galley dialing MCP sink");
        let dial = mcp::run_source_client(
            served.clone(),
            IncrementalPolicy::All,
            metrics.clone(),
            sink,
            shutdown.clone(),
        );
        tokio::spawn(dial);
    }
    let service = SourceServer::new(served, IncrementalPolicy::All, metrics, shutdown.clone())
        .into_service()
        .max_decoding_message_size(limits.max_message_bytes(mcp::MAX_MESSAGE_BYTES));
    tracing::info!(addr = %args.mcp_addr, source = ?args.config_dir.as_deref().unwrap_or("kubernetes".as_ref()), "galley serving MCP");
    let server = limits
        .grpc(mcp::grpc_server())
        .add_service(service)
        .serve_with_incoming_shutdown(mcp, shutdown.clone().cancelled_owned());
    anyhow::ensure!(
        args.webhook_ca.webhook_config_name.is_none() || args.webhook_cert.is_some(),
        "--webhook-config-name needs the webhook served: --webhook-cert and --webhook-key"
    );
    if let (Some(cert), Some(key)) = (args.webhook_cert.clone(), args.webhook_key.clone()) {
        let webhook = webhook::bind(args.webhook_addr, cert, key, shutdown.clone()).await?;
        let kind = mesh_kube::webhook_ca::WebhookKind::Validating;
        if let Some(target) = args.webhook_ca.target(kind) {
            let client = mesh_kube::client(args.kubeconfig.as_deref()).await?;
            tokio::spawn(target.keep(client, shutdown.clone()));
        }
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = webhook.await {
                tracing::error!("validating webhook stopped: {e}");
                stop.cancel();
            }
        });
    }
    let follow_mesh = tokio::spawn(follow_mesh);
    server.await?;
    follow_config.await?;
    follow_mesh.await?;
    Ok(())
}
