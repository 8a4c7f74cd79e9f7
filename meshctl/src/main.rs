//! `meshctl`: the mesh's command line.

mod bench;
mod binaries;
mod kube_inject;
mod mcp;
mod proxy_status;
mod up;
mod validate;

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
    /// What Pilot sent each proxy, and whether the proxy took it.
    ProxyStatus(proxy_status::ProxyStatusArgs),
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
    /// Print the version.
    Version,
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
        Command::Validate(args) => validate::run(args),
        Command::KubeInject(args) => kube_inject::run(args),
        Command::ProxyStatus(args) => proxy_status::run(args).await,
        Command::Mcp(McpCommand::Watch(args)) => mcp::watch::run(args, shutdown).await,
        Command::Mcp(McpCommand::Serve(args)) => mcp::serve::run(args, shutdown).await,
        Command::Mcp(McpCommand::Conformance(args)) => mcp::conformance::run(args).await,
        Command::Bench(BenchCommand::Mcp(args)) => bench::mcp::run(args).await,
        Command::Bench(BenchCommand::Galley(args)) => bench::galley::run(args).await,
        Command::Bench(BenchCommand::Pilot(args)) => bench::pilot::run(args).await,
        Command::Bench(BenchCommand::Citadel(args)) => bench::citadel::run(args).await,
        Command::Bench(BenchCommand::Mixer(args)) => bench::mixer::run(args).await,
        Command::Bench(BenchCommand::Proxy(args)) => bench::proxy::run(args).await,
        Command::Version => {
            println!("meshctl {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
