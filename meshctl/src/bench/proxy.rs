//! `meshctl bench proxy`: what the proxy adds to a request, in one run on
//! this machine. A small HTTP backend is called four ways, each at a fixed
//! rate (requests sent on schedule over a pool of connections, latency
//! from each sending, and how late each was sent, which a stall would
//! raise) and then flat out:
//! directly; through one proxy (the client's sidecar, used as its HTTP
//! proxy); through two proxies with mutual TLS between them (client
//! sidecar to server sidecar, certificates from Citadel); and through
//! nginx as a reverse proxy, the external baseline (Debian's package,
//! installed when missing). The proxies are configured by the real Galley
//! and Pilot.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use clap::Args;
use http_body_util::{BodyExt, Empty, Full};
use serde_json::json;
use tokio::{net::TcpStream, process::Child};

use component::{cli::Cli, flags};
use launch::free_addr;

use super::{Component, cpu_seconds, ms, rss_bytes};

#[derive(Debug, Args)]
pub struct ProxyBenchArgs {
    /// Requests per second in the fixed-rate phase.
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Length of each phase.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5s")]
    pub duration: Duration,
    /// Connections (and requests in flight) in the throughput phase.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Leave nginx out (when it cannot be installed).
    #[arg(long)]
    pub no_nginx: bool,
    /// Leave out the Bookinfo path (a whole `meshctl up` mesh).
    #[arg(long)]
    pub no_bookinfo: bool,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Also write the JSON figures to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

const DIRECT_HOST: &str = "direct.bench.svc.cluster.local";
const MESHED_HOST: &str = "meshed.bench.svc.cluster.local";

/// The backend: a fixed small answer, served by hyper in this process.
async fn backend() -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|_request| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"hello from the backend\n"),
                    )))
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await
                {
                    eprintln!("backend connection: {e}");
                }
            });
        }
    });
    Ok(addr)
}

fn mesh_config(backend: SocketAddr, egress: SocketAddr, inbound: SocketAddr) -> String {
    format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: direct, namespace: bench}}
spec:
  hosts: [{DIRECT_HOST}]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {backend_port}}}, labels: {{app: backend}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: meshed, namespace: bench}}
spec:
  hosts: [{MESHED_HOST}]
  resolution: STATIC
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {inbound_port}}}, labels: {{app: server}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: meshed, namespace: bench}}
spec:
  host: {MESHED_HOST}
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {{name: default}}
spec:
  peers: [{{mtls: {{}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: client, namespace: bench}}
spec:
  workloadSelector: {{labels: {{app: client}}}}
  egress:
  - port: {{number: {egress_port}, protocol: HTTP, name: http-proxy}}
    bind: 127.0.0.1
    hosts: [./*]
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: server, namespace: bench}}
spec:
  workloadSelector: {{labels: {{app: server}}}}
  ingress:
  - port: {{number: {inbound_port}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{backend_port}
  egress:
  - port: {{number: {server_egress}, protocol: HTTP, name: http-proxy}}
    bind: 127.0.0.1
    hosts: [./*]
",
        backend_port = backend.port(),
        inbound_port = inbound.port(),
        egress_port = egress.port(),
        server_egress = free_addr().map(|a| a.port()).unwrap_or(1),
    )
}

/// The control plane and the two proxies.
struct Mesh {
    _dir: tempfile::TempDir,
    _control: Vec<Component>,
    client: Component,
    server: Component,
    egress: SocketAddr,
}

async fn start_mesh(bins: &Path, backend: SocketAddr) -> anyhow::Result<Mesh> {
    let dir = tempfile::tempdir()?;
    let (egress, inbound) = (free_addr()?, free_addr()?);
    let config = dir.path().join("config");
    std::fs::create_dir(&config)?;
    std::fs::write(
        config.join("mesh.yaml"),
        mesh_config(backend, egress, inbound),
    )?;
    std::fs::write(
        dir.path().join("tokens"),
        "bench/client client-token\nbench/server server-token\n",
    )?;
    for sa in ["client", "server"] {
        std::fs::write(
            dir.path().join(format!("{sa}.token")),
            format!("{sa}-token"),
        )?;
    }
    let (mcp, xds, citadel) = (free_addr()?, free_addr()?, free_addr()?);
    let galley = Component::start(
        bins,
        "galley",
        flags!(Cli<galley::GalleyArgs> {
            args.config_dir: config.display(),
            args.mcp_addr: mcp,
        }),
    )
    .await?;
    let pilot = Component::pilot(bins, mcp, xds, None).await?;
    let ca_dir = dir.path().join("ca");
    let ca = Component::start(
        bins,
        "citadel",
        flags!(Cli<citadel::CitadelArgs> {
            args.grpc_addr: citadel,
            args.ca_dir: ca_dir.display(),
            args.bootstrap_tokens: dir.path().join("tokens").display(),
        }),
    )
    .await?;
    let root = ca_dir.join("root-cert.pem");
    let proxy = |pod: &'static str| {
        let token = dir.path().join(format!("{pod}.token"));
        Component::start(
            bins,
            "proxy",
            flags!(Cli<proxy::ProxyArgs> {
                args.pilot: xds,
                args.stats_addr: "127.0.0.1:0",
                args.health_addr: "127.0.0.1:0",
                args.node.pod: pod,
                args.node.namespace: "bench",
                args.node.service_account: pod,
                args.node.labels: format!("app={pod}"),
                args.agent.citadel: citadel,
                args.agent.citadel_hostname: "localhost",
                args.agent.citadel_root: root.display(),
                args.agent.citadel_token_file: token.display(),
            }),
        )
    };
    let (client, server) = tokio::try_join!(proxy("client"), proxy("server"))?;
    Ok(Mesh {
        _dir: dir,
        _control: vec![galley, pilot, ca],
        client,
        server,
        egress,
    })
}

/// nginx in a process group of its own, all of which is stopped with
/// SIGTERM (a stopped master can leave its workers running).
struct Nginx {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(self.child.id().unwrap_or_default() as i32);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGTERM);
    }
}

/// nginx as a reverse proxy in front of `backend`, with keep-alive
/// connections upstream, as a production nginx would be set up.
async fn start_nginx(backend: SocketAddr) -> anyhow::Result<(Nginx, SocketAddr)> {
    let nginx = which("nginx").or_else(|| {
        tracing::info!("installing nginx (Debian's package)");
        let installed = std::process::Command::new("sh")
            .args(["-c", "DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1 || (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx-light >/dev/null 2>&1)"])
            .status()
            .is_ok_and(|s| s.success());
        installed.then(|| which("nginx")).flatten()
    });
    let nginx = nginx.ok_or_else(|| {
        anyhow::anyhow!("nginx is not installed and could not be (pass --no-nginx)")
    })?;
    let dir = tempfile::tempdir()?;
    let listen = free_addr()?;
    let conf = format!(
        "worker_processes 2;\npid {pid};\nerror_log stderr error;\ndaemon off;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n  upstream backend {{ server {backend}; keepalive 64; keepalive_requests 100000000; }}\n  server {{\n    listen {listen};\n    location / {{ proxy_pass http://backend; proxy_http_version 1.1; proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        pid = dir.path().join("nginx.pid").display(),
    );
    let conf_path = dir.path().join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = launch::command(
        &nginx,
        [
            "-p",
            dir.path().to_str().unwrap_or_default(),
            "-c",
            conf_path.to_str().unwrap_or_default(),
        ],
    )
    .stdout(Stdio::null())
    .process_group(0)
    .spawn()?;
    let started = Instant::now();
    while TcpStream::connect(listen).await.is_err() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(10),
            "nginx did not listen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok((Nginx { child, _dir: dir }, listen))
}

fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// How requests reach the backend in one scenario.
#[derive(Clone)]
struct Target {
    /// Where connections go.
    connect: SocketAddr,
    /// The request URI: origin-form, or absolute-form through an HTTP proxy.
    uri: String,
    host: String,
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn connection(target: &Target) -> anyhow::Result<Sender> {
    let stream = TcpStream::connect(target.connect).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn send(sender: &mut Sender, target: &Target) -> anyhow::Result<()> {
    sender.ready().await?;
    let request = hyper::Request::get(&target.uri)
        .header(hyper::header::HOST, &target.host)
        .body(Empty::new())?;
    let response = sender.send_request(request).await?;
    anyhow::ensure!(
        response.status().is_success(),
        "status {}",
        response.status()
    );
    response.into_body().collect().await?;
    Ok(())
}

/// Requests at `rate` for `duration` over a pool of connections, sent on
/// schedule whatever the answers' pace: the latency of each from its
/// sending, and how late it was sent (the timer's granularity, plus any
/// wait for a free connection, which a stalling path would cause).
async fn at_rate(
    target: &Target,
    rate: u32,
    duration: Duration,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let total = (rate as f64 * duration.as_secs_f64()) as usize;
    let (tx, rx) = async_channel(total);
    let mut workers = Vec::new();
    for _ in 0..64 {
        let mut sender = connection(target).await?;
        let (rx, target) = (rx.clone(), target.clone());
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while let Ok(due) = rx.recv().await {
                let sent = Instant::now();
                send(&mut sender, &target)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e}", target.uri))?;
                latencies.push((sent.elapsed(), sent.saturating_duration_since(due)));
            }
            anyhow::Ok(latencies)
        }));
    }
    drop(rx);
    let start = tokio::time::Instant::now() + Duration::from_millis(10);
    for i in 0..total {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due).await;
        // Closed only when every worker failed; their errors say why.
        if tx.send(due.into_std()).await.is_err() {
            break;
        }
    }
    drop(tx);
    let (mut latencies, mut lateness) = (Vec::with_capacity(total), Vec::with_capacity(total));
    for w in workers {
        for (latency, late) in w.await?? {
            latencies.push(latency);
            lateness.push(late);
        }
    }
    latencies.sort();
    lateness.sort();
    Ok((latencies, lateness))
}

fn async_channel(capacity: usize) -> (tokio::sync::mpsc::Sender<Instant>, SharedReceiver) {
    let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
    (tx, SharedReceiver(Arc::new(tokio::sync::Mutex::new(rx))))
}

/// One queue, many workers.
#[derive(Clone)]
struct SharedReceiver(Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>);

impl SharedReceiver {
    async fn recv(&self) -> Result<Instant, ()> {
        self.0.lock().await.recv().await.ok_or(())
    }
}

/// Requests per second with `concurrency` connections, each one request
/// at a time.
async fn flat_out(target: &Target, concurrency: usize, duration: Duration) -> anyhow::Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let mut sender = connection(target).await?;
        let (done, target) = (done.clone(), target.clone());
        workers.push(tokio::spawn(async move {
            while started.elapsed() < duration {
                send(&mut sender, &target)
                    .await
                    .map_err(|e| anyhow::anyhow!("{}: {e}", target.uri))?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for w in workers {
        w.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

fn at(sorted: &[Duration], q: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

/// One scenario's figures; `pids` are the processes in the path, whose
/// CPU and memory are charged to it.
async fn scenario(target: &Target, pids: &[u32], args: &ProxyBenchArgs) -> anyhow::Result<Figures> {
    // Warm up: connections, pools, certificates.
    flat_out(target, 4, Duration::from_millis(300)).await?;
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
    };
    let before = cpu(pids);
    let (latencies, lateness) = at_rate(target, args.rate, args.duration).await?;
    let cpu_at_rate = cpu(pids) - before;
    let quantiles = [
        at(&latencies, 0.5),
        at(&latencies, 0.9),
        at(&latencies, 0.99),
    ];
    let before = cpu(pids);
    let started = Instant::now();
    let per_second = flat_out(target, args.concurrency, args.duration).await?;
    let requests = per_second * started.elapsed().as_secs_f64();
    let cpu_flat_out = cpu(pids) - before;
    let rss: u64 = pids
        .iter()
        .map(|p| rss_bytes(*p, "VmHWM:").unwrap_or(0))
        .sum();
    Ok((
        json!({
            "p50_ms": ms(quantiles[0]),
            "p90_ms": ms(quantiles[1]),
            "p99_ms": ms(quantiles[2]),
            "sent_late_p99_ms": ms(at(&lateness, 0.99)),
            "max_per_second": per_second.round(),
            "cpu_s_per_1000_requests_at_rate": (cpu_at_rate / latencies.len() as f64 * 1000.0 * 1e4).round() / 1e4,
            "cpu_s_per_1000_requests_flat_out": (cpu_flat_out / requests * 1000.0 * 1e4).round() / 1e4,
            "peak_rss_bytes": rss,
        }),
        quantiles,
    ))
}

pub async fn run(args: ProxyBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.rate > 0 && args.concurrency > 0 && !args.duration.is_zero(),
        "--rate, --concurrency and --duration must be positive"
    );
    let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
    let backend = backend().await?;
    let mesh = start_mesh(&bins, backend).await?;
    let origin = |addr: SocketAddr| Target {
        connect: addr,
        uri: "/".into(),
        host: addr.to_string(),
    };
    let through_proxy = |host: &str| Target {
        connect: mesh.egress,
        uri: format!("http://{host}:80/"),
        host: format!("{host}:80"),
    };
    let (client, server) = (mesh.client.pid(), mesh.server.pid());
    let mut figures = serde_json::Map::new();
    let (direct, base) = scenario(&origin(backend), &[], &args).await?;
    figures.insert("direct".into(), direct);
    let one = scenario(&through_proxy(DIRECT_HOST), &[client], &args).await?;
    figures.insert("one_proxy".into(), added(one, &base));
    let two = scenario(&through_proxy(MESHED_HOST), &[client, server], &args).await?;
    figures.insert("two_proxies_mtls".into(), added(two, &base));
    // The first mesh idles from here on; it goes, so as not to share the
    // cores with the next.
    drop(mesh);
    if !args.no_bookinfo {
        let ((direct, base), path) = bookinfo(&args).await?;
        figures.insert("bookinfo_direct".into(), direct);
        figures.insert("bookinfo".into(), added(path, &base));
    }
    if !args.no_nginx {
        let (nginx, listen) = start_nginx(backend).await?;
        // The master and its workers.
        let master = nginx.child.id().unwrap_or_default();
        let mut pids = vec![master];
        pids.extend(children(master));
        let nginx = scenario(&origin(listen), &pids, &args).await?;
        figures.insert("nginx".into(), added(nginx, &base));
    }
    let figures = json!({
        "rate": args.rate,
        "duration_s": args.duration.as_secs_f64(),
        "concurrency": args.concurrency,
        "scenarios": figures,
    });
    super::report(&figures, args.out.as_deref())
}

/// A scenario's figures and its latency quantiles.
type Figures = (serde_json::Value, [Duration; 3]);

/// A scenario's figures with what it adds to the `base` quantiles.
fn added((mut figures, quantiles): Figures, base: &[Duration; 3]) -> serde_json::Value {
    for (key, i) in [
        ("added_p50_ms", 0),
        ("added_p90_ms", 1),
        ("added_p99_ms", 2),
    ] {
        figures[key] = json!(ms(quantiles[i].saturating_sub(base[i])));
    }
    figures
}

/// Bookinfo as `meshctl up` ships it: details called through
/// productpage's sidecar (its `HTTP_PROXY` port, an absolute-form
/// request), so that each call crosses two proxies with mutual TLS, a
/// Mixer check (cached) and a report, and RBAC; against the details app
/// called directly. The two proxies' CPU is charged to the path.
async fn bookinfo(args: &ProxyBenchArgs) -> anyhow::Result<(Figures, Figures)> {
    let up = crate::up::UpArgs::ephemeral(args.bin_dir.clone(), crate::up::Topology::Split);
    let shutdown = component::CancellationToken::new();
    let mesh = crate::up::Mesh::start(&up, &shutdown, false).await?;
    let rows = mesh.rows();
    let pid = |name: &str| rows.iter().find(|r| r.name == name).map(|r| r.pid);
    let proxies: Vec<u32> = ["productpage-v1-proxy", "details-v1-proxy"]
        .into_iter()
        .filter_map(pid)
        .collect();
    let details = super::addr(&rows, "details-v1", "app")?;
    let sidecar = super::addr(&rows, "productpage-v1-proxy", "http-proxy")?;
    let host = "details.bookinfo.svc.cluster.local:9080";
    let direct = Target {
        connect: details,
        uri: "/details/0".into(),
        host: host.into(),
    };
    let path = Target {
        connect: sidecar,
        uri: format!("http://{host}/details/0"),
        host: host.into(),
    };
    let direct = scenario(&direct, &[], args).await?;
    // The Mixers work for the path too, off it: their CPU beside the
    // proxies' says where the time goes.
    let mixers: Vec<u32> = ["mixer-policy", "mixer-telemetry"]
        .into_iter()
        .filter_map(pid)
        .collect();
    let cpu = |pids: &[u32]| {
        pids.iter()
            .map(|p| cpu_seconds(*p).unwrap_or(0.0))
            .sum::<f64>()
    };
    let before = (cpu(&mixers), cpu(&proxies));
    let mut path = scenario(&path, &proxies, args).await?;
    let (mixer_cpu, proxy_cpu) = (cpu(&mixers) - before.0, cpu(&proxies) - before.1);
    path.0["mixer_cpu_per_proxy_cpu"] =
        json!((mixer_cpu / proxy_cpu.max(1e-9) * 100.0).round() / 100.0);
    let figures = (direct, path);
    shutdown.cancel();
    mesh.run_until(
        tokio::net::TcpListener::bind("127.0.0.1:0").await?,
        shutdown,
        false,
    )
    .await?;
    Ok(figures)
}

/// The child processes of `pid`, from /proc.
fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}
