//! `meshctl bench mixer`: the Mixer binary under Check and Report load over
//! gRPC, with no client cache (every request is distinct and reaches
//! Mixer). The baseline, in the same run, is the same binary with no rules:
//! the cost of gRPC and attribute decoding alone, so the difference is what
//! evaluating policy and running the Prometheus adapter cost.
//!
//! - Checks at a fixed rate, each sent on schedule (HTTP/2 multiplexes
//!   them, so a slow answer delays no other request): latency from each
//!   sending, p50 and p99, and how late the timer sent them.
//! - Checks as fast as `--concurrency` requests in flight allow.
//! - Reports of `--batch` bags, delta-encoded as proxies send them, into
//!   the standard telemetry config: bags per second, and the count the
//!   exporter shows checked against the count sent.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use clap::Args;
use component::{CancellationToken, cli::Cli, flags};
use mcp::Store;
use mesh_api::{
    kinds,
    object::ConfigObject,
    pb::istio::mixer::v1::{
        CheckRequest, ReportRequest, check_request::QuotaParams, mixer_client::MixerClient,
    },
};
use mixer_client::attributes::{Bag, Compressor, Value, dictionary::GLOBAL_WORDS};
use serde_json::json;
use tonic::transport::Channel;

use super::{Component, cpu_seconds, ms, percentile, rss_bytes};

#[derive(Debug, Args)]
pub struct MixerBenchArgs {
    /// Checks per second in the fixed-rate phase.
    #[arg(long, default_value_t = 2_000)]
    pub rate: u32,
    /// Length of each phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Requests in flight in the throughput phases.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Attribute bags per Report request.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,
    /// Directory holding the mixer binary; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const ATTRIBUTES: &str = include_str!("../../../examples/mixer/attributes.yaml");
const TELEMETRY: &str = include_str!("../../../examples/mixer/telemetry.yaml");

/// What a Bookinfo-like mesh asks of the policy Mixer: a denier for one
/// user, a whitelist of calling apps, and a request-count quota per
/// caller and destination.
const POLICY: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyall, namespace: istio-system}
spec: {compiledAdapter: denier, params: {status: {code: 7, message: not allowed}}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: denyrequest, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-jason, namespace: istio-system}
spec:
  match: destination.service.host == "ratings.shop.svc.cluster.local" && request.headers["end-user"] == "jason"
  actions: [{handler: denyall, instances: [denyrequest]}]
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: apps, namespace: istio-system}
spec: {compiledAdapter: listchecker, params: {overrides: [productpage, reviews, ratings, details]}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: appname, namespace: istio-system}
spec: {compiledTemplate: listentry, params: {value: 'source.labels["app"] | "unknown"'}}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: known-apps, namespace: istio-system}
spec:
  match: destination.service.namespace == "shop"
  actions: [{handler: apps, instances: [appname]}]
---
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: quotahandler, namespace: istio-system}
spec:
  compiledAdapter: memquota
  params:
    quotas: [{name: requestcount.instance.istio-system, maxAmount: 1000000000, validDuration: 1s}]
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: requestcount, namespace: istio-system}
spec:
  compiledTemplate: quota
  params:
    dimensions:
      source: source.workload.name | "unknown"
      destination: destination.service.host | "unknown"
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: quota, namespace: istio-system}
spec: {actions: [{handler: quotahandler, instances: [requestcount]}]}
"#;

/// The attributes a server-side proxy sends for request `i`: the same
/// callers and services, a different path, request id and user each time.
fn request_bag(i: usize) -> Bag {
    let s = |v: &str| Value::String(v.into());
    let map = |pairs: &[(&str, String)]| {
        Value::StringMap(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    };
    let user = if i.is_multiple_of(50) {
        "jason".to_string()
    } else {
        format!("user{}", i % 100)
    };
    let (service, version) = [("reviews", "v2"), ("ratings", "v1"), ("details", "v1")][i % 3];
    let host = format!("{service}.shop.svc.cluster.local");
    Bag::from([
        ("context.reporter.kind".into(), s("inbound")),
        ("context.protocol".into(), s("http")),
        ("source.workload.name".into(), s("productpage-v1")),
        ("source.workload.namespace".into(), s("shop")),
        (
            "source.principal".into(),
            s("cluster.local/ns/shop/sa/productpage"),
        ),
        (
            "source.labels".into(),
            map(&[("app", "productpage".into()), ("version", "v1".into())]),
        ),
        (
            "destination.workload.name".into(),
            s(&format!("{service}-{version}")),
        ),
        ("destination.workload.namespace".into(), s("shop")),
        (
            "destination.principal".into(),
            s(&format!("cluster.local/ns/shop/sa/{service}")),
        ),
        (
            "destination.labels".into(),
            map(&[("app", service.into()), ("version", version.into())]),
        ),
        ("destination.service.host".into(), s(&host)),
        ("destination.service.name".into(), s(service)),
        ("destination.service.namespace".into(), s("shop")),
        ("connection.mtls".into(), Value::Bool(true)),
        ("request.path".into(), s(&format!("/{service}/{i}"))),
        ("request.method".into(), s("GET")),
        ("request.host".into(), s(&host)),
        ("request.useragent".into(), s("python-requests/2.21")),
        (
            "request.headers".into(),
            map(&[
                (":path", format!("/{service}/{i}")),
                (":method", "GET".into()),
                (":authority", host.clone()),
                ("x-request-id", format!("bench-{i}")),
                ("end-user", user),
            ]),
        ),
    ])
}

/// [`request_bag`] with what the response adds, for Reports.
fn reported_bag(i: usize) -> Bag {
    let mut bag = request_bag(i);
    let code = if i.is_multiple_of(20) { 503 } else { 200 };
    bag.extend([
        ("response.code".into(), Value::Int64(code)),
        (
            "response.duration".into(),
            Value::Duration(pbjson_types::Duration {
                seconds: 0,
                nanos: (1 + i % 250) as i32 * 1_000_000,
            }),
        ),
        ("request.size".into(), Value::Int64(100 + (i % 900) as i64)),
        (
            "response.size".into(),
            Value::Int64(1_000 + (i % 9_000) as i64),
        ),
    ]);
    bag
}

fn check_request(i: usize) -> CheckRequest {
    let mut compressor = Compressor::default();
    let mut attributes = compressor.compress(&request_bag(i));
    attributes.words = compressor.into_words();
    CheckRequest {
        attributes: Some(attributes),
        global_word_count: GLOBAL_WORDS.len() as u32,
        deduplication_id: format!("bench-{i}"),
        quotas: [(
            "requestcount".to_string(),
            QuotaParams {
                amount: 1,
                best_effort: false,
            },
        )]
        .into(),
    }
}

/// A Mixer child process fed `yaml` over MCP from this process.
struct Running {
    mixer: Component,
    grpc: SocketAddr,
    prometheus: SocketAddr,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Running {
    async fn start(bins: &Path, role: &str, yaml: &str) -> anyhow::Result<Self> {
        let store = Arc::new(Store::new(kinds::KINDS.iter().map(|k| k.collection)));
        let objects = ConfigObject::parse_yaml(yaml, "bench.yaml")
            .map_err(|e| anyhow::anyhow!("bench config: {e:?}"))?;
        store.replace_with_objects(mixer::COLLECTIONS, &objects)?;
        let stop = CancellationToken::new();
        let mcp = super::serve_mcp(store, &stop).await?;
        let (grpc, prometheus) = (launch::free_addr()?, launch::free_addr()?);
        let mixer = Component::start(
            bins,
            "mixer",
            flags!(Cli<mixer::MixerArgs> {
                args.role: role,
                args.mcp_server: mcp,
                args.grpc_addr: grpc,
                args.prometheus_addr: prometheus,
            }),
        )
        .await?;
        Ok(Self {
            mixer,
            grpc,
            prometheus,
            stop,
        })
    }

    fn pid(&self) -> u32 {
        self.mixer.pid()
    }

    async fn channel(&self) -> anyhow::Result<Channel> {
        Ok(Channel::from_shared(format!("http://{}", self.grpc))?
            .tcp_nodelay(true)
            .connect()
            .await?)
    }

    /// The sum of a counter's series on `addr`'s `/metrics`.
    async fn counter(addr: SocketAddr, name: &str) -> anyhow::Result<f64> {
        let text = reqwest::get(format!("http://{addr}/metrics"))
            .await?
            .text()
            .await?;
        Ok(text
            .lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum())
    }
}

/// Checks sent on schedule at `rate`, whatever the answers' pace.
async fn checks_at_rate(
    mixer: &Running,
    requests: &Arc<Vec<CheckRequest>>,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<serde_json::Value> {
    let client = MixerClient::new(mixer.channel().await?);
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let cpu = cpu_seconds(mixer.pid())?;
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        let (mut client, requests) = (client.clone(), requests.clone());
        tasks.push(tokio::spawn(async move {
            let sent = tokio::time::Instant::now();
            let response = client.check(requests[i % requests.len()].clone()).await;
            let denied = match response {
                Ok(r) => {
                    let status = r.into_inner().precondition.and_then(|p| p.status);
                    Some(status.is_some_and(|s| s.code != 0))
                }
                Err(_) => None,
            };
            (sent.elapsed(), sent.saturating_duration_since(due), denied)
        }));
    }
    let mut latencies = Vec::with_capacity(total);
    let mut lateness = Vec::with_capacity(total);
    let (mut denied, mut failed) = (0, 0);
    for task in tasks {
        let (latency, late, outcome) = task.await?;
        latencies.push(latency);
        lateness.push(late);
        match outcome {
            Some(true) => denied += 1,
            Some(false) => {}
            None => failed += 1,
        }
    }
    let wall = start.elapsed();
    latencies.sort();
    lateness.sort();
    Ok(json!({
        "requests": total,
        "per_second": (total as f64 / wall.as_secs_f64()).round(),
        "p50_ms": percentile(&latencies, 0.5),
        "p99_ms": percentile(&latencies, 0.99),
        "max_ms": ms(*latencies.last().unwrap_or(&Duration::ZERO)),
        // Requests go out on schedule over one multiplexed connection,
        // however slow the answers: this is only the timer's lateness.
        "sent_late_p99_ms": percentile(&lateness, 0.99),
        "denied": denied,
        "failed": failed,
        "mixer_cpu_s": cpu_seconds(mixer.pid())? - cpu,
    }))
}

/// `send(client, i)` run by `concurrency` loops for `duration`; how many
/// completed, and the wall time.
async fn closed_loop<F, Fut>(
    channel: Channel,
    concurrency: usize,
    duration: Duration,
    send: F,
) -> anyhow::Result<(u64, Duration)>
where
    F: Fn(MixerClient<Channel>, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), tonic::Status>> + Send,
{
    let send = Arc::new(send);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let loops: Vec<_> = (0..concurrency)
        .map(|worker| {
            let (send, done, client) = (
                send.clone(),
                done.clone(),
                MixerClient::new(channel.clone()),
            );
            tokio::spawn(async move {
                let mut i = worker;
                while started.elapsed() < duration {
                    send(client.clone(), i).await?;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += concurrency;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for task in loops {
        task.await??;
    }
    Ok((done.load(Ordering::Relaxed), started.elapsed()))
}

async fn check_throughput(
    mixer: &Running,
    requests: &Arc<Vec<CheckRequest>>,
    args: &MixerBenchArgs,
) -> anyhow::Result<serde_json::Value> {
    let cpu = cpu_seconds(mixer.pid())?;
    let requests = requests.clone();
    let (count, wall) = closed_loop(
        mixer.channel().await?,
        args.concurrency,
        args.duration,
        move |mut client, i| {
            let request = requests[i % requests.len()].clone();
            async move { client.check(request).await.map(drop) }
        },
    )
    .await?;
    let cpu = cpu_seconds(mixer.pid())? - cpu;
    Ok(json!({
        "per_second": (count as f64 / wall.as_secs_f64()).round(),
        "mixer_cpu_s": cpu,
        "vcpu_per_1000_per_second": cpu / count as f64 * 1000.0,
    }))
}

async fn report_throughput(
    mixer: &Running,
    batches: &Arc<Vec<ReportRequest>>,
    args: &MixerBenchArgs,
) -> anyhow::Result<serde_json::Value> {
    let cpu = cpu_seconds(mixer.pid())?;
    let before = Running::counter(mixer.mixer.admin, "mixer_report_entries_total").await?;
    let exported_before = Running::counter(mixer.prometheus, "istio_requests_total").await?;
    let batches = batches.clone();
    // Reports are few and large; a few in flight keep Mixer busy.
    let (count, wall) = closed_loop(
        mixer.channel().await?,
        args.concurrency.min(4),
        args.duration,
        move |mut client, i| {
            let request = batches[i % batches.len()].clone();
            async move { client.report(request).await.map(drop) }
        },
    )
    .await?;
    let bags = count * args.batch as u64;
    let received =
        Running::counter(mixer.mixer.admin, "mixer_report_entries_total").await? - before;
    let exported =
        Running::counter(mixer.prometheus, "istio_requests_total").await? - exported_before;
    let cpu = cpu_seconds(mixer.pid())? - cpu;
    Ok(json!({
        "bags": bags,
        "bags_per_second": (bags as f64 / wall.as_secs_f64()).round(),
        // Counters, so whole numbers.
        "bags_received": received as u64,
        "istio_requests_total": exported as u64,
        "mixer_cpu_s": cpu,
        // Istio quotes istio-telemetry's cost in this unit (0.6 in 1.2).
        "vcpu_per_1000_bags_per_second": cpu / bags as f64 * 1000.0,
    }))
}

pub async fn run(args: MixerBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate > 0 && args.concurrency > 0 && args.batch > 0 && !args.duration.is_zero(),
        "--rate, --concurrency, --batch and --duration must be positive"
    );
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    // Encoded before anything is timed, as a proxy's client would have.
    let checks: Arc<Vec<CheckRequest>> = Arc::new((0..10_000).map(check_request).collect());
    let reports: Arc<Vec<ReportRequest>> = Arc::new(
        (0..100)
            .map(|b| {
                let bags: Vec<Bag> = (b * args.batch..(b + 1) * args.batch)
                    .map(reported_bag)
                    .collect();
                mixer_client::client::report_request(&bags)
            })
            .collect(),
    );

    let mut figures = serde_json::Map::new();
    for (variant, policy, telemetry) in [
        (
            "mixer",
            format!("{ATTRIBUTES}\n---\n{POLICY}"),
            format!("{ATTRIBUTES}\n---\n{TELEMETRY}"),
        ),
        ("no_rules", ATTRIBUTES.to_string(), ATTRIBUTES.to_string()),
    ] {
        let mixer = Running::start(&bins, "policy", &policy).await?;
        let at_rate = checks_at_rate(&mixer, &checks, args.rate, args.duration).await?;
        let throughput = check_throughput(&mixer, &checks, &args).await?;
        let check_rss = rss_bytes(mixer.pid(), "VmHWM:")?;
        drop(mixer);
        let mixer = Running::start(&bins, "telemetry", &telemetry).await?;
        let report = report_throughput(&mixer, &reports, &args).await?;
        let report_rss = rss_bytes(mixer.pid(), "VmHWM:")?;
        figures.insert(
            variant.into(),
            json!({
                "check_at_rate": at_rate,
                "check_max": throughput,
                "report": report,
                "peak_rss_bytes": {"policy": check_rss, "telemetry": report_rss},
            }),
        );
    }
    let figures = json!({
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "concurrency": args.concurrency,
        "batch": args.batch,
        "variants": figures,
    });
    super::report(&figures, args.out.as_deref())
}
