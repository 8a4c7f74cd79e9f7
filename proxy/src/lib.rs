//! The sidecar proxy. Its config comes only from Pilot over ADS
//! ([`xds`]), compiled into an immutable [`config::Snapshot`] per change;
//! [`listeners`] binds what the config lists and serves each connection by
//! its filter chain: HTTP ([`http`]: routes, faults, CORS, retries,
//! timeouts, mirrors) or TCP ([`tcp`]), to endpoints picked by
//! [`upstream`]'s balancers. The [`agent`] keeps the workload certificate
//! from Citadel, which [`tls`] uses for mutual TLS between proxies. Not
//! built yet (issue 7 continues): RBAC (config with it is NACKed), the
//! Mixer check and report, original-destination routing, delta xDS, and
//! the Envoy-style admin endpoints and stats.

pub mod agent;
pub mod config;
pub mod http;
pub mod listeners;
pub mod node;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod xds;

use std::sync::Arc;

use clap::Args;
use component::{Admin, CancellationToken};
use serde_json::json;
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Pilot's xDS address.
    #[arg(long, env = "PILOT_ADDRESS", default_value = "127.0.0.1:15010")]
    pub pilot: String,
    #[command(flatten)]
    pub node: node::NodeArgs,
    #[command(flatten)]
    pub agent: agent::AgentArgs,
}

/// Runs the proxy until `shutdown`.
pub async fn run(args: ProxyArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = args.node.node();
    tracing::info!(node = %node.id, pilot = %args.pilot, "proxy starting");
    let (config_tx, config) = watch::channel(Arc::new(config::Snapshot::default()));
    let state = Arc::new(xds::XdsState::default());
    let client = xds::XdsClient::new(node, args.pilot.clone(), state.clone(), config_tx);
    let (agent, credentials) = agent::Agent::new(
        args.agent,
        &args.node.namespace,
        &args.node.service_account,
        admin.readiness().condition("certificate"),
    );
    tokio::spawn(agent.run(shutdown.clone()));
    let tls = Arc::new(tls::TlsContext::new(credentials));
    let upstreams = Arc::new(upstream::Upstreams::new(tls.clone()));
    debug_pages(&admin, &state, &upstreams);
    let shared = listeners::Shared {
        config,
        upstreams,
        tls,
    };
    let serving = admin.readiness().condition("xds-synced");
    tokio::spawn(listeners::follow(shared, serving, shutdown.clone()));
    client.run(shutdown).await;
    Ok(())
}

fn debug_pages(admin: &Admin, state: &Arc<xds::XdsState>, upstreams: &Arc<upstream::Upstreams>) {
    let state = state.clone();
    admin.debug_page("config_dump", move || {
        let status = state
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let raw = state.raw.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({"xds": status, "resources": raw})
    });
    let upstreams = upstreams.clone();
    admin.debug_page("clusters", move || {
        let now = std::time::Instant::now();
        let clusters: Vec<_> = upstreams
            .all()
            .iter()
            .map(|c| {
                let endpoints: Vec<_> = c
                    .endpoints()
                    .iter()
                    .map(|e| {
                        json!({
                            "address": e.addr.to_string(),
                            "weight": e.weight,
                            "active": e.active.load(std::sync::atomic::Ordering::Relaxed),
                            "ejected": e.ejected(now),
                        })
                    })
                    .collect();
                json!({"name": c.config.name, "endpoints": endpoints})
            })
            .collect();
        json!(clusters)
    });
}
