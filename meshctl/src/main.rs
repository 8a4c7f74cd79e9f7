//! `meshctl`: the mesh's command line.

mod admin;
mod authn;
mod bench;
mod binaries;
mod ca;
mod dashboard;
mod describe;
mod kube_inject;
mod mcp;
mod proxy_config;
mod proxy_status;
mod table;
mod up;
mod validate;
mod version;

use clap::{Parser, Subcommand};
use component::logging::{self, LogFormat};

#[derive(Parser)]
#[command(version, about = "Run, inspect and test the mesh")]
struct Cli {
    /// Log filter for meshctl's own logs (stderr), in `RUST_LOG` syntax.
    #[arg(long, global = true, default_value = "warn")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the mesh's components on this machine and run until Ctrl-C.
    Up(up::UpArgs),
    /// What a running `meshctl up` runs, where, and whether it is ready.
    Status(StatusArgs),
    /// Replace one component's process in a running `meshctl up` (with
    /// another build, say), and wait until it is ready again.
    Restart(RestartArgs),
    /// A live page of the running mesh: its service graph, golden signals,
    /// proxies' sync, config problems, certificates and health.
    Dashboard(dashboard::DashboardArgs),
    /// What Pilot sent each proxy, and whether the proxy took it.
    ProxyStatus(proxy_status::ProxyStatusArgs),
    /// What one proxy holds: clusters, listeners, routes, endpoints, its
    /// certificate.
    #[command(subcommand, alias = "pc")]
    ProxyConfig(proxy_config::ProxyConfig),
    /// Server and client mTLS of each service, and their conflicts.
    #[command(subcommand)]
    Authn(authn::Authn),
    /// What applies to a service or a pod, and why.
    #[command(subcommand)]
    Describe(describe::Describe),
    /// Check config files as Galley would, offline.
    Validate(validate::ValidateArgs),
    /// Add the sidecar to the pods and workloads in a file, as the injector would.
    KubeInject(kube_inject::KubeInjectArgs),
    /// Tools for MCP implementations.
    #[command(subcommand)]
    Mcp(McpCommand),
    /// Benchmarks; figures are printed as JSON.
    #[command(subcommand)]
    Bench(BenchCommand),
    /// Certificate authorities for Citadel.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Print the version; with `--remote`, every running component's too.
    Version(version::VersionArgs),
}

#[derive(clap::Args)]
struct StatusArgs {
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
}

#[derive(clap::Args)]
struct RestartArgs {
    /// The component (in the monolith topology, any of them restarts the
    /// monolith).
    component: String,
    /// The binary to run instead of the current one.
    #[arg(long)]
    binary: Option<std::path::PathBuf>,
    /// The mesh's control address; the latest `meshctl up`'s when absent.
    #[arg(long)]
    control: Option<std::net::SocketAddr>,
}

#[derive(Subcommand)]
enum McpCommand {
    /// Print what a sink receives from a source.
    Watch(mcp::watch::WatchArgs),
    /// Serve a directory of config YAML as an MCP source.
    Serve(mcp::serve::ServeArgs),
    /// Check a source or a sink against the MCP rules.
    Conformance(mcp::conformance::ConformanceArgs),
}

#[derive(Subcommand)]
enum CaCommand {
    /// An intermediate CA under a root several clusters share, in
    /// Citadel's plugged-in layout.
    Intermediate(ca::IntermediateArgs),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// One source, many sinks: full sync, then incremental vs full-state updates.
    Mcp(bench::mcp::McpBenchArgs),
    /// Galley on a large config directory: start to ready, memory, edit to sinks.
    Galley(bench::galley::GalleyBenchArgs),
    /// Pilot with many services and simulated ADS proxies.
    Pilot(bench::pilot::PilotBenchArgs),
    /// CSRs signed per second by Citadel over gRPC, against openssl.
    Citadel(bench::citadel::CitadelBenchArgs),
    /// Mixer Checks (fixed rate and flat out) and Reports, against no rules.
    Mixer(bench::mixer::MixerBenchArgs),
    /// Latency and throughput added by one and two proxies, against nginx.
    Proxy(bench::proxy::ProxyBenchArgs),
    /// The split topology against the monolith: start, memory, config
    /// delivery, and a component's death under traffic.
    Topology(bench::topology::TopologyBenchArgs),
    /// A config edit reaching the proxies of a cluster that follows the
    /// primary, against the same edit within the primary.
    Clusters(bench::clusters::ClustersBenchArgs),
    /// Bookinfo at a fixed rate while every control-plane process is
    /// killed, config edited, Citadel's CA rotated and a proxy restarted.
    Chaos(bench::chaos::ChaosBenchArgs),
    /// What tracing the control plane costs: a config edit to the last
    /// ACK, and CPU, with spans exported over OTLP against without.
    Traces(bench::traces::TracesBenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    logging::init(LogFormat::Text, &cli.log_level);
    // One TLS implementation for the process (reqwest takes the default).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let shutdown = component::shutdown::on_signal();
    match cli.command {
        Command::Up(args) => up::run(args, shutdown).await,
        Command::Status(args) => status(args).await,
        Command::Restart(args) => restart(args).await,
        Command::Validate(args) => validate::run(args),
        Command::KubeInject(args) => kube_inject::run(args),
        Command::ProxyStatus(args) => proxy_status::run(args).await,
        Command::ProxyConfig(command) => proxy_config::run(command).await,
        Command::Dashboard(args) => dashboard::run(args, shutdown).await,
        Command::Authn(command) => authn::run(command).await,
        Command::Describe(command) => describe::run(command).await,
        Command::Mcp(McpCommand::Watch(args)) => mcp::watch::run(args, shutdown).await,
        Command::Mcp(McpCommand::Serve(args)) => mcp::serve::run(args, shutdown).await,
        Command::Mcp(McpCommand::Conformance(args)) => mcp::conformance::run(args).await,
        Command::Ca(CaCommand::Intermediate(args)) => ca::run(args),
        Command::Bench(BenchCommand::Mcp(args)) => bench::mcp::run(args).await,
        Command::Bench(BenchCommand::Galley(args)) => bench::galley::run(args).await,
        Command::Bench(BenchCommand::Pilot(args)) => bench::pilot::run(args).await,
        Command::Bench(BenchCommand::Citadel(args)) => bench::citadel::run(args).await,
        Command::Bench(BenchCommand::Mixer(args)) => bench::mixer::run(args).await,
        Command::Bench(BenchCommand::Proxy(args)) => bench::proxy::run(args).await,
        Command::Bench(BenchCommand::Topology(args)) => bench::topology::run(args).await,
        Command::Bench(BenchCommand::Chaos(args)) => bench::chaos::run(args).await,
        Command::Bench(BenchCommand::Traces(args)) => bench::traces::run(args).await,
        Command::Bench(BenchCommand::Clusters(args)) => bench::clusters::run(args).await,
        Command::Version(args) => version::run(args).await,
    }
}

async fn status(args: StatusArgs) -> anyhow::Result<()> {
    let addr = up::control::address(args.control)?;
    let rows = up::control::rows(&control_client()?, addr).await?;
    up::control::print(&rows);
    Ok(())
}

async fn restart(args: RestartArgs) -> anyhow::Result<()> {
    let addr = up::control::address(args.control)?;
    let mut url = reqwest::Url::parse(&format!("http://{addr}/restart/"))?.join(&args.component)?;
    if let Some(binary) = &args.binary {
        let binary = std::fs::canonicalize(binary)
            .map_err(|e| anyhow::anyhow!("--binary {}: {e}", binary.display()))?;
        url.query_pairs_mut()
            .append_pair("binary", &binary.display().to_string());
    }
    let response = control_client()?
        .post(url)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("the mesh at {addr} does not answer: {e}"))?;
    if !response.status().is_success() {
        anyhow::bail!("{}", response.text().await?.trim());
    }
    let rows: Vec<up::control::Row> = serde_json::from_str(&response.text().await?)?;
    up::control::print(&rows);
    Ok(())
}

/// A client for the control port: no proxy, and time for a restart.
fn control_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(90))
        .build()?)
}
