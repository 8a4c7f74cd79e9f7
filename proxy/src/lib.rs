//! The sidecar proxy. Its config comes only from Pilot over ADS
//! ([`xds`]), compiled into an immutable [`config::Snapshot`] per change;
//! [`listeners`] binds what the config lists and serves each connection by
//! its filter chain: HTTP ([`http`]: routes, faults, CORS, retries,
//! timeouts, mirrors) or TCP ([`tcp`]), to endpoints picked by
//! [`upstream`]'s balancers. The [`agent`] keeps the workload certificate
//! from Citadel, which [`tls`] uses for mutual TLS between proxies;
//! inbound HTTP is checked and reported by [`mixer`], and RBAC enforced.
//! [`admin`] serves the Envoy-style endpoints, [`init`] the iptables
//! setup, and [`trace`] carries trace context and exports spans over
//! OTLP when configured.

pub mod admin;
pub mod agent;
pub mod config;
pub mod detect;
pub mod http;
pub mod inbound;
pub mod init;
pub mod listeners;
pub mod mixer;
pub mod node;
pub mod outbound;
pub mod secrets;
pub mod stats;
pub mod tcp;
pub mod tls;
pub mod trace;
pub mod upstream;
pub mod workers;
pub mod xds;

use std::{net::SocketAddr, sync::Arc};

use clap::Args;
use component::{Admin, CancellationToken};
use tokio::sync::watch;

#[derive(Debug, Clone, Args)]
pub struct ProxyArgs {
    /// Pilot's xDS address.
    #[arg(long, env = "PILOT_ADDRESS", default_value = "127.0.0.1:15010")]
    pub pilot: String,
    /// ADS flavour: delta when Pilot offers it (auto), or one of them.
    #[arg(long, value_enum, default_value_t = xds::XdsMode::Auto)]
    pub xds_mode: xds::XdsMode,
    #[command(flatten)]
    pub node: node::NodeArgs,
    #[command(flatten)]
    pub agent: agent::AgentArgs,
    #[command(flatten)]
    pub mixer: mixer::MixerArgs,
    /// Where Prometheus scrapes the proxy (`/stats/prometheus`).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::PROXY_STATS)))]
    pub stats_addr: SocketAddr,
    /// Percentage of new traces sampled (with `OTEL_EXPORTER_OTLP_ENDPOINT`).
    #[arg(long, default_value_t = 1.0)]
    pub trace_sampling: f64,
    /// Log every HTTP request (target `access`, at info).
    #[arg(long)]
    pub access_log: bool,
    /// Worker threads carrying traffic; 0 for one per core.
    #[arg(long, env = "PROXY_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    /// Where Kubernetes probes readiness (`/healthz/ready`).
    #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], component::ports::PROXY_HEALTH)))]
    pub health_addr: SocketAddr,
    #[command(flatten)]
    pub timeouts: listeners::Timeouts,
    #[command(flatten)]
    pub http_limits: http::HttpLimits,
    #[command(flatten)]
    pub secrets: secrets::SecretsArgs,
}

/// Runs the proxy until `shutdown`.
pub async fn run(args: ProxyArgs, admin: Admin, shutdown: CancellationToken) -> anyhow::Result<()> {
    let node = args.node.node();
    tracing::info!(node = %node.id, pilot = %args.pilot, "proxy starting");
    let (config_tx, config) = watch::channel(Arc::new(config::Snapshot::default()));
    let state = Arc::new(xds::XdsState::default());
    let traces = Arc::new(trace::Tracing::from_env(
        &format!("{}.{}", args.node.pod, args.node.namespace),
        args.trace_sampling,
    )?);
    let client = xds::XdsClient::new(
        node,
        args.pilot.clone(),
        args.xds_mode,
        state.clone(),
        config_tx,
    )
    .traced(traces.clone());
    let (agent, credentials) = agent::Agent::new(
        args.agent.clone(),
        &args.node.namespace,
        &args.node.service_account,
        admin.readiness().condition("certificate"),
        &mut admin.registry(),
    );
    // Registered before the first await, so `/ready` never answers
    // before it knows every condition.
    let serving = admin.readiness().condition("xds-synced");
    tokio::spawn(agent.run(shutdown.clone()));
    let secrets = Arc::new(secrets::Secrets::new(args.secrets.credentials_dir.clone()));
    if args.secrets.credentials_from_secrets {
        let client = mesh_kube::client(args.secrets.kubeconfig.as_deref()).await?;
        let namespace = args.node.namespace.clone();
        tokio::spawn(secrets.clone().watch(client, namespace, shutdown.clone()));
    }
    let tls = Arc::new(tls::TlsContext::new(credentials.clone(), secrets.clone()));
    let stats = stats::Stats::new(&mut admin.registry());
    let concurrency = match args.concurrency {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let workers = workers::Workers::start(concurrency, &shutdown)?;
    let upstreams = Arc::new(upstream::Upstreams::new(tls.clone(), stats, concurrency));
    admin.add_routes(admin::routes(admin::Views {
        node: args.node.id(),
        admin: admin.clone(),
        xds: state.clone(),
        config: config.clone(),
        upstreams: upstreams.clone(),
        credentials: credentials.clone(),
        secrets,
        shutdown: shutdown.clone(),
    }));
    admin::serve_ports(&admin, args.stats_addr, args.health_addr, &shutdown).await?;
    let workload = mixer::Workload {
        name: args.node.pod.clone(),
        namespace: args.node.namespace.clone(),
        labels: args.node.labels.0.clone(),
        principal: format!(
            "{}/ns/{}/sa/{}",
            args.agent.trust_domain, args.node.namespace, args.node.service_account
        ),
    };
    let mixer = Arc::new(mixer::MixerFilter::new(&args.mixer, workload)?);
    tokio::spawn(mixer.clone().flush_reports(shutdown.clone()));
    let shared = listeners::Shared {
        config,
        upstreams,
        tls,
        mixer,
        access_log: args.access_log,
        tracing: traces.clone(),
        timeouts: args.timeouts,
        http_limits: args.http_limits,
    };
    tokio::spawn(listeners::follow(
        shared,
        workers,
        serving,
        shutdown.clone(),
    ));
    client.run(shutdown).await;
    traces.flush();
    Ok(())
}
