//! `meshctl bench galley`: the Galley binary on a directory of many
//! resources across kinds. It measures start to ready, peak memory against
//! the size of the YAML, and the time from one file edit until every sink
//! has applied (and so ACKed) it, for sinks taking incremental updates and,
//! as the baseline in the same run, sinks taking the full state.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Args;
use component::{CancellationToken, cli::Cli, flags};
use mcp::{McpMetrics, Payload, Sink, SinkOptions, SinkSnapshot, parse_endpoint, run_sink_client};
use mesh_api::kinds;
use serde_json::json;

use super::{Component, ms, rss_bytes};

#[derive(Debug, Args)]
pub struct GalleyBenchArgs {
    #[arg(long, default_value_t = 10_000)]
    pub resources: usize,
    /// Resources per file.
    #[arg(long, default_value_t = 100)]
    pub per_file: usize,
    /// Sinks of each kind (incremental, and full state as the baseline).
    #[arg(long, default_value_t = 10)]
    pub sinks: usize,
    /// Directory holding the galley binary; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const COLLECTIONS: [&str; 4] = [
    kinds::SERVICE_ENTRIES,
    kinds::VIRTUAL_SERVICES,
    kinds::DESTINATION_RULES,
    kinds::GATEWAYS,
];

/// Resource `i` of the benchmark's config, one of four kinds in turn;
/// `revision` changes its content.
fn document(i: usize, revision: u32) -> String {
    let ns = format!("bench-{}", i % 50);
    let host = format!("svc-{i}.{ns}.svc.cluster.local");
    match i % 4 {
        0 => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints:\n  - {{address: 10.{}.{}.1, ports: {{http: 8080}}, labels: {{app: svc-{i}, version: v{revision}}}}}\n",
            i / 256 % 256,
            i % 256
        ),
        1 => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec:\n  hosts: [{host}]\n  http:\n  - match: [{{headers: {{end-user: {{exact: jason}}}}}}]\n    route: [{{destination: {{host: {host}, subset: v2}}}}]\n  - timeout: {revision}s\n    retries: {{attempts: 3, perTryTimeout: 500ms}}\n    route:\n    - {{destination: {{host: {host}, subset: v1}}, weight: 90}}\n    - {{destination: {{host: {host}, subset: v2}}, weight: 10}}\n"
        ),
        2 => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: DestinationRule\nmetadata: {{name: svc-{i}, namespace: {ns}}}\nspec:\n  host: {host}\n  trafficPolicy:\n    connectionPool: {{tcp: {{maxConnections: {}}}}}\n    tls: {{mode: ISTIO_MUTUAL}}\n  subsets:\n  - {{name: v1, labels: {{version: v1}}}}\n  - {{name: v2, labels: {{version: v2}}}}\n",
            100 + revision
        ),
        _ => format!(
            "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {{name: gw-{i}, namespace: {ns}}}\nspec:\n  selector: {{istio: ingressgateway, rev: \"{revision}\"}}\n  servers:\n  - port: {{number: 80, name: http, protocol: HTTP}}\n    hosts: [\"{ns}/svc-{i}.example.com\"]\n"
        ),
    }
}

/// Writes the config; returns its size in bytes.
fn write_config(dir: &Path, resources: usize, per_file: usize) -> anyhow::Result<u64> {
    let mut bytes = 0;
    for (file, chunk) in (0..resources)
        .collect::<Vec<_>>()
        .chunks(per_file)
        .enumerate()
    {
        let text = chunk
            .iter()
            .map(|&i| document(i, 1))
            .collect::<Vec<_>>()
            .join("---\n");
        bytes += text.len() as u64;
        std::fs::write(dir.join(format!("config-{file:04}.yaml")), text)?;
    }
    Ok(bytes)
}

/// The resource `one_file_edit` changes: a VirtualService in the first file.
const EDITED: usize = 1;

/// Rewrites the first file with resource [`EDITED`] at `revision`.
fn edit_one(dir: &Path, per_file: usize, revision: u32) -> anyhow::Result<()> {
    let text = (0..per_file)
        .map(|i| document(i, if i == EDITED { revision } else { 1 }))
        .collect::<Vec<_>>()
        .join("---\n");
    std::fs::write(dir.join("config-0000.yaml"), text)?;
    Ok(())
}

/// Waits until every sink's snapshot satisfies `done`; returns the time.
async fn all_sinks(
    sinks: &[Arc<Sink>],
    done: impl Fn(&SinkSnapshot) -> bool,
) -> anyhow::Result<Instant> {
    for sink in sinks {
        let mut snapshots = sink.subscribe();
        tokio::time::timeout(Duration::from_secs(120), async {
            while !done(&snapshots.borrow_and_update()) {
                snapshots.changed().await?;
            }
            anyhow::Ok(())
        })
        .await
        .map_err(|_| anyhow::anyhow!("sinks did not converge within 120s"))??;
    }
    Ok(Instant::now())
}

pub async fn run(args: GalleyBenchArgs) -> anyhow::Result<()> {
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    let config = tempfile::tempdir()?;
    let yaml_bytes = write_config(config.path(), args.resources, args.per_file)?;
    eprintln!(
        "bench galley: {} resources, {} bytes of YAML",
        args.resources, yaml_bytes
    );
    let mcp = launch::free_addr()?;

    let start = Instant::now();
    let mut galley = Component::start(
        &bins,
        "galley",
        flags!(Cli<galley::GalleyArgs> {
            args.config_dir: config.path().display(),
            args.mcp_addr: mcp,
        }),
    )
    .await?;
    let pid = galley.pid();
    let ready = start.elapsed();

    let rss_at_ready = rss_bytes(pid, "VmRSS:")?;

    // Each kind of sink in its own phase, so that they do not share the CPU:
    // connect, sync, edit one resource, wait until every sink applied it.
    let mut phases = Vec::new();
    for (revision, incremental) in [(2, true), (3, false)] {
        let stop = CancellationToken::new();
        let sinks = (0..args.sinks)
            .map(|i| {
                let mut options = SinkOptions::new(format!("bench-{incremental}-{i}"), COLLECTIONS);
                options.incremental = incremental;
                let sink = Arc::new(Sink::new(options, McpMetrics::default()));
                let endpoint = parse_endpoint(&mcp.to_string()).map_err(anyhow::Error::msg)?;
                tokio::spawn(run_sink_client(sink.clone(), endpoint, stop.clone()));
                Ok(sink)
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let sync_start = Instant::now();
        let synced = all_sinks(&sinks, SinkSnapshot::synced).await? - sync_start;
        let edit = Instant::now();
        edit_one(config.path(), args.per_file.min(args.resources), revision)?;
        let name = format!("bench-{}/svc-{EDITED}", EDITED % 50);
        let want = format!("{revision}s");
        let applied = all_sinks(&sinks, |s| {
            s.collections[kinds::VIRTUAL_SERVICES]
                .resources
                .get(&name)
                .is_some_and(|r| match &r.payload {
                    Payload::Decoded(body) => body.to_json()["http"][1]["timeout"] == want.as_str(),
                    Payload::Opaque => false,
                })
        })
        .await?;
        stop.cancel();
        phases.push(json!({
            "sinks": args.sinks,
            "incremental": incremental,
            "ms_until_synced": ms(synced),
            "ms_from_edit_until_all_applied_and_acked": ms(applied - edit),
        }));
    }
    let peak_rss = rss_bytes(pid, "VmHWM:")?;
    let _ = galley.child.start_kill();

    let figures = json!({
        "benchmark": "galley",
        "resources": args.resources,
        "files": args.resources.div_ceil(args.per_file),
        "yaml_bytes": yaml_bytes,
        "ms_start_to_ready": ms(ready),
        "rss_at_ready_bytes": rss_at_ready,
        "rss_at_ready_over_yaml_bytes": rss_at_ready as f64 / yaml_bytes as f64,
        "peak_rss_bytes": peak_rss,
        "one_file_edit": phases,
        "edit_includes_debounce_ms": component::watch::DEBOUNCE.as_millis(),
    });
    super::report(&figures, args.out.as_deref())
}
