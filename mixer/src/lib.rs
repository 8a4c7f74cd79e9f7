//! Mixer: policy checks (`--role policy`) and telemetry (`--role
//! telemetry`), one binary for both deployments. Config (rules, handlers,
//! instances, attribute manifests) comes from Galley over MCP and is
//! compiled on each change; `istio.mixer.v1.Mixer` is served on 9091. Check
//! runs the denier, list checker and memquota adapters; Report runs the
//! prometheus adapter (exported on 42422 by the telemetry role) and the
//! stdio access log.

pub mod check;
pub mod config;
pub mod expr;
pub mod quota;
pub mod service;
pub mod shed;
pub mod telemetry;

use std::{net::SocketAddr, sync::Arc};

use clap::{Args, ValueEnum};
use component::{
    Admin, CancellationToken,
    limits::{GRPC_MESSAGE_BYTES, Limits, ServerLimits},
};
use mesh_api::kinds;
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;

/// The collections Mixer's config comes from.
pub const COLLECTIONS: &[&str] = &[
    kinds::RULES,
    kinds::HANDLERS,
    kinds::INSTANCES,
    kinds::ATTRIBUTE_MANIFESTS,
];

/// What Mixer follows: [`COLLECTIONS`], and the legacy per-adapter and
/// per-template kinds of the adapters and templates it runs.
pub fn collections() -> Vec<&'static str> {
    let legacy = kinds::KINDS
        .iter()
        .filter(|k| {
            k.body == kinds::BodyType::LegacyStruct && mesh_api::policy::runs_legacy(k.kind)
        })
        .map(|k| k.collection);
    COLLECTIONS.iter().copied().chain(legacy).collect()
}

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
    /// Address of the Mixer gRPC API (Check and Report).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::MIXER_GRPC)))]
    pub grpc_addr: SocketAddr,
    /// Address of the Prometheus exporter (`/metrics`), telemetry role only.
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::MIXER_PROMETHEUS)))]
    pub prometheus_addr: SocketAddr,
    #[command(flatten)]
    pub limits: shed::Limits,
    /// Bounds of the gRPC API (`mixer_grpc_limit_reached_total`).
    #[command(flatten)]
    pub server_limits: ServerLimits,
}

/// Runs Mixer in its role until `shutdown`.
pub async fn run(args: MixerArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    component::trace::init("mixer")?;
    let listener = component::cli::bind("grpc-addr", args.grpc_addr).await?;
    run_on(listener, args, admin, shutdown).await
}

/// [`run`] on a listener already bound (`--grpc-addr` is not used).
pub async fn run_on(
    listener: tokio::net::TcpListener,
    args: MixerArgs,
    admin: Admin,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let id = match args.role {
        Role::Policy => "mixer-policy",
        Role::Telemetry => "mixer-telemetry",
    };
    let sink = mcp::follow(
        id,
        &collections(),
        &[],
        &args.mcp_server,
        &admin,
        shutdown.clone(),
    )
    .map_err(|e| anyhow::anyhow!("--mcp-server: {e}"))?;
    // Recompiled on every snapshot; the sink keeps the last good state
    // while Galley is away, and so does the config.
    let (config_tx, config) = watch::channel(Arc::new(Config::default()));
    let mut snapshots = sink.subscribe();
    // Ready once the config compiled from a synced snapshot is in force;
    // until then no request is answered (an allow from an empty config
    // would be cached by clients as if policy said so).
    let compiled = admin.readiness().condition("config-compiled");
    let (compiled_tx, mut first_config) = watch::channel(false);
    tokio::spawn(async move {
        loop {
            let snapshot = snapshots.borrow_and_update().clone();
            // Rules compiled before the attribute manifests arrive would
            // be refused for attributes of no known type.
            if snapshot.synced() {
                let previous = config_tx.borrow().clone();
                config_tx.send_replace(Arc::new(Config::from_snapshot(&snapshot, &previous)));
                compiled.set(true);
                compiled_tx.send_replace(true);
            }
            if snapshots.changed().await.is_err() {
                return;
            }
        }
    });
    let page = config.clone();
    admin.debug_page("config", move || {
        let config = page.borrow().clone();
        json!({
            "rules": config.rules.iter().map(|r| &r.name).collect::<Vec<_>>(),
            "attributes": config.types.len(),
            "problems": config.problems,
        })
    });
    let outputs = Arc::new(telemetry::Outputs::default());
    let service = service::MixerService::new(config, outputs.clone(), &mut admin.registry());
    let shedder = shed::Shedder::new(args.limits, &mut admin.registry());
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = first_config.wait_for(|c| *c) => {}
    }
    tracing::info!(addr = %listener.local_addr()?, role = id, "mixer serving Check and Report");
    let limits = Limits::new(&args.server_limits, "grpc", &mut admin.registry());
    let server = service
        .into_server()
        .max_decoding_message_size(limits.max_message_bytes(GRPC_MESSAGE_BYTES));
    let grpc = limits
        .grpc(mcp::grpc_server())
        .add_service(shedder.wrap(server))
        .serve_with_incoming_shutdown(
            limits.incoming(listener),
            shutdown.clone().cancelled_owned(),
        );
    let metrics = async {
        if args.role != Role::Telemetry {
            return anyhow::Ok(());
        }
        let listener = component::cli::bind("prometheus-addr", args.prometheus_addr).await?;
        tracing::info!(addr = %listener.local_addr()?, "mixer exporting metrics");
        let router = axum::Router::new().route(
            "/metrics",
            axum::routing::get(move || async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    outputs.metrics.render(),
                )
            }),
        );
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .await?;
        Ok(())
    };
    tokio::try_join!(async { grpc.await.map_err(anyhow::Error::from) }, metrics)?;
    Ok(())
}
