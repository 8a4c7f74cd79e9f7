//! Pilot: turns the config Galley serves into proxy configuration.
//!
//! Pilot follows Galley over MCP (every collection it needs; ready once all
//! have synced), builds the service model ([`model`]) and serves ADS
//! ([`xds`]), state of the world and delta, plaintext and mTLS: clusters,
//! endpoints, listeners and routes for sidecars, gateways and
//! proxyless gRPC clients.

mod debug;
mod describe;
mod jwks;
pub mod model;
pub mod proxy;
pub mod xds;

use clap::Args;
use component::{
    Admin, CancellationToken,
    limits::{Limits, ServerLimits},
    tls::{TlsFiles, TlsListener},
};
use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use mesh_api::kinds;
use model::Model;
use tokio::sync::watch;
use xds::{ads::AdsServer, generate::ModelGenerator};

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

/// What Pilot asks for when a source does not serve a collection: the raw
/// Kubernetes objects that the synthetic service entries are made from,
/// which Istio 1.1's Galley serves instead.
pub const FALLBACKS: &[(&str, &[&str])] = &[(
    kinds::SYNTHETIC_SERVICE_ENTRIES,
    &[
        kinds::K8S_SERVICES,
        kinds::K8S_ENDPOINTS,
        kinds::K8S_PODS,
        kinds::K8S_NODES,
    ],
)];

#[derive(Debug, Clone, Args)]
pub struct PilotArgs {
    /// Galley's MCP address.
    #[arg(long, env = "PILOT_MCP_SERVER", default_value = "127.0.0.1:9901")]
    pub mcp_server: String,
    /// Address of the plaintext xDS (ADS) gRPC server.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::PILOT_XDS)))]
    pub xds_addr: SocketAddr,
    /// Address of the mTLS xDS (ADS) gRPC server, served when
    /// `--tls-cert`, `--tls-key` and `--tls-root` are given.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::PILOT_XDS_MTLS)))]
    pub xds_tls_addr: SocketAddr,
    /// Pilot's certificate chain (PEM), as Citadel issued it.
    #[arg(long, requires_all = ["tls_key", "tls_root"])]
    pub tls_cert: Option<PathBuf>,
    /// Pilot's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_root"])]
    pub tls_key: Option<PathBuf>,
    /// The mesh root (PEM): proxies on the mTLS port must present a
    /// certificate that chains to it.
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    pub tls_root: Option<PathBuf>,
    /// Quiet time after a config change before proxies are pushed, so that
    /// a burst of changes makes one push (waits at most ten times this).
    #[arg(long, value_parser = humantime::parse_duration, default_value = "100ms")]
    pub debounce: Duration,
    /// Istio MeshConfig YAML, read at start, for when the MCP source serves
    /// no mesh config (Istio 1.1's Galley serves none); Istio 1.1's
    /// defaults otherwise. A mesh config the source serves wins.
    #[arg(long, env = "PILOT_MESH_CONFIG")]
    pub mesh_config: Option<PathBuf>,
    /// Bounds of both ADS ports (`pilot_xds_limit_reached_total`).
    #[command(flatten)]
    pub server_limits: ServerLimits,
}

/// Runs Pilot until `shutdown`: follows Galley, keeps the model, serves ADS.
pub async fn run(args: PilotArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    component::trace::init("pilot")?;
    let xds = component::cli::bind("xds-addr", args.xds_addr).await?;
    let mtls = match (&args.tls_cert, &args.tls_key, &args.tls_root) {
        (Some(cert), Some(key), Some(root)) => {
            let files = TlsFiles::mutual_grpc(cert.clone(), key.clone(), root.clone());
            let tcp = component::cli::bind("xds-tls-addr", args.xds_tls_addr).await?;
            Some((tcp, files))
        }
        _ => None,
    };
    let sink = mcp::follow(
        "pilot",
        COLLECTIONS,
        FALLBACKS,
        &args.mcp_server,
        &admin,
        shutdown.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--mcp-server: {e}"))?;

    let fallback_mesh = match &args.mesh_config {
        Some(path) => {
            let loaded =
                mesh_api::mesh::load(path).map_err(|e| anyhow::anyhow!("--mesh-config: {e}"))?;
            for w in &loaded.warnings {
                tracing::warn!(mesh_config = %path.display(), "{w}");
            }
            loaded.config
        }
        None => mesh_api::mesh::defaults(),
    };

    // Update the model once changes settle; the last good one stays while
    // Galley is away, since the sink keeps its state.
    let generator = ModelGenerator::new(Arc::new(Model::new(fallback_mesh.clone())));
    let mut snapshots = sink.subscribe();
    let debounce = args.debounce;
    // Ready once the model reflects a synced snapshot, not merely once the
    // snapshot is synced: proxies that connect then get the whole config.
    let model_built = admin.readiness().condition("model-built");
    let (built_tx, mut built) = watch::channel(false);
    let (jwks_uris, wanted) = watch::channel(Default::default());
    let (keys_tx, mut keys) = watch::channel(Arc::default());
    tokio::spawn(jwks::keep(wanted, keys_tx, shutdown.clone()));
    let publisher = generator.clone();
    tokio::spawn(async move {
        let mut last = Arc::new(mcp::SinkSnapshot::default());
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            // A rebuild for a traced MCP update is a span of its trace,
            // and the model is published in it (see `publish`).
            let traced = snapshot
                .trace
                .as_ref()
                .filter(|t| last.trace.as_ref() != Some(*t));
            let rebuild = match traced {
                Some(update) => component::trace::span(
                    "pilot",
                    "pilot model rebuild",
                    Some(update),
                    None,
                    vec![],
                ),
                None => opentelemetry::Context::new(),
            };
            {
                let _in_rebuild = rebuild.clone().attach();
                let mut model = (*publisher.model()).clone();
                let mut change = model.update(&last, &snapshot, &fallback_mesh);
                jwks_uris.send_if_modified(|current| {
                    let uris = jwks::uris(&model.config);
                    let changed = *current != uris;
                    *current = uris;
                    changed
                });
                let jwks = keys.borrow_and_update().clone();
                if model.jwks != *jwks {
                    model.jwks = (*jwks).clone();
                    change.jwks = true;
                }
                if !change.is_empty() {
                    publisher.publish(Arc::new(model), &change);
                }
            }
            component::trace::end(&rebuild, None);
            last = snapshot;
            if last.synced() {
                model_built.set(true);
                built_tx.send_replace(true);
            }
            tokio::select! {
                changed = snapshots.changed() => if changed.is_err() { return },
                // New keys: the model again, for the same config.
                changed = keys.changed() => if changed.is_err() { return } else { continue },
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

    let limits = Limits::new(&args.server_limits, "xds", &mut admin.registry());
    let ads = AdsServer::new(generator.clone(), shutdown.clone(), limits.clone());
    let status = ads.status();
    let proxies = status.clone();
    admin.debug_page("syncz", move || debug::syncz(&proxies));
    let model = generator.clone();
    admin.debug_page("configz", move || debug::configz(&model.model()));
    let model = generator.clone();
    admin.debug_query_page("authenticationz", move |q| {
        Ok(describe::authenticationz(&model.model(), q))
    });
    let (model, proxies) = (generator.clone(), status.clone());
    admin.debug_query_page("describe", move |q| {
        describe::describe(&model.model(), &proxies, q)
    });
    admin.debug_page("endpointz", move || debug::endpointz(&generator.model()));
    // No proxy is answered before the first whole model: an empty config
    // pushed by a Pilot that has not heard from Galley yet would take every
    // route away. Connections wait in the listen queue meanwhile.
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = built.wait_for(|b| *b) => {}
    }
    tracing::info!(addr = %xds.local_addr()?, "pilot serving ADS");
    let plaintext = ads.clone().serve_connections(limits.incoming(xds));
    let plaintext = async {
        plaintext.await;
        anyhow::Ok(())
    };
    let mutual = async {
        let Some((tcp, files)) = mtls else {
            return Ok(());
        };
        tracing::info!(addr = %tcp.local_addr()?, "pilot serving ADS over mTLS");
        let listener = TlsListener::new(tcp, files, shutdown.clone())?.with_limits(limits);
        ads.serve_connections(listener.into_incoming()).await;
        anyhow::Ok(())
    };
    tokio::try_join!(plaintext, mutual)?;
    Ok(())
}
