//! Our components against peers built on another gRPC stack (Python's
//! grpcio, on gRPC's C core), so that a mistake both our ends share cannot
//! pass. The peers (`interop/peers.py`) behave as grpc-go does where it
//! matters: a server sends its response headers only with its first
//! message. Istio 1.1's Galley is such a server, and it ends a stream that
//! asks for a collection it does not serve.

use std::{net::SocketAddr, path::PathBuf, process::Stdio, sync::OnceLock};

use testkit::*;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStdout, Command},
};

const GATEWAYS: &str = "istio/networking/v1alpha3/gateways";
const SERVICE_ENTRIES: &str = "istio/networking/v1alpha3/serviceentries";
const MESH_CONFIG: &str = "istio/mesh/v1alpha1/MeshConfig";
const SYNTHETIC: &str = "istio/networking/v1alpha3/synthetic/serviceentries";

/// Installs grpcio and its protoc once per test binary (PyPI, when
/// missing).
fn python() -> &'static str {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let have = std::process::Command::new("python3")
            .args(["-c", "import grpc, grpc_tools"])
            .status()
            .expect("python3 runs");
        if !have.success() {
            let installed = std::process::Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", "grpcio", "grpcio-tools"])
                .status()
                .expect("python3 runs");
            assert!(
                installed.success(),
                "pip install grpcio grpcio-tools failed"
            );
        }
    });
    "python3"
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A running peer and the lines it prints.
struct Peer {
    _child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    _generated: tempfile::TempDir,
}

impl Peer {
    fn start(args: &[&str]) -> Self {
        let generated = tempfile::tempdir().unwrap();
        let mut child = Command::new(python())
            .arg(repo().join("e2e/tests/interop/peers.py"))
            .arg(repo().join("mesh-api/proto"))
            .arg(generated.path())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 starts");
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            _child: child,
            lines,
            _generated: generated,
        }
    }

    /// Starts a server role and returns it with its address.
    async fn serve(args: &[&str]) -> (Self, SocketAddr) {
        let mut peer = Self::start(args);
        let line = peer.until("listening ").await;
        let port: u16 = line["listening ".len()..].parse().unwrap();
        (peer, SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// The first line from now that starts with `prefix`.
    async fn until(&mut self, prefix: &str) -> String {
        let read = async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                if line.starts_with(prefix) {
                    return line;
                }
            }
            panic!("the peer exited before printing {prefix:?}");
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), read)
            .await
            .unwrap_or_else(|_| panic!("the peer printed no {prefix:?} in time"))
    }

    /// Every line until the peer exits.
    async fn rest(mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(line) = self.lines.next_line().await.unwrap() {
            out.push(line);
        }
        out
    }
}

#[tokio::test]
async fn a_sink_follows_a_source_that_withholds_headers_and_refuses_collections() {
    let (mut source, addr) =
        Peer::serve(&["mcp-source", "--refuse", MESH_CONFIG, "--refuse", SYNTHETIC]).await;
    let collections = format!("{GATEWAYS},{MESH_CONFIG},{SYNTHETIC}");
    let watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--server",
            &addr.to_string(),
            "--collections",
            &collections,
            "--output",
            "json",
            "--once",
        ],
    );
    source.until(&format!("refused {MESH_CONFIG}")).await;
    source.until(&format!("refused {SYNTHETIC}")).await;
    let output = run_to_end(watch).await;
    assert!(output.contains("istio-system/ingress"), "{output}");
    assert!(!output.contains(MESH_CONFIG), "absent, not empty: {output}");
}

/// The newer-Pilot-before-older-Galley upgrade: Istio 1.1's Galley serves
/// neither the synthetic service entries nor the mesh config.
#[tokio::test]
async fn pilot_serves_routes_from_a_source_that_refuses_collections_to_a_grpcio_client() {
    let (mut source, addr) =
        Peer::serve(&["mcp-source", "--refuse", MESH_CONFIG, "--refuse", SYNTHETIC]).await;
    let xds = free_addr();
    // Its own mesh config stands in for the one the source does not serve.
    let mesh = config_dir(&[("mesh.yaml", "connectTimeout: 7s\n")]);
    let mesh_config = mesh.path().join("mesh.yaml");
    let (_pilot, admin) =
        testkit::start_pilot(addr, xds, &["--mesh-config", mesh_config.to_str().unwrap()]);
    source.until(&format!("ack {SERVICE_ENTRIES}")).await;
    let (_, ready) = wait_for_http(admin, "/ready", |s, _| s == 200).await;
    assert!(ready.contains("absent"), "{ready}");
    assert!(
        ready.contains(MESH_CONFIG) && ready.contains(SYNTHETIC),
        "{ready}"
    );
    let (_, debug) = get(admin, "/debug/mcp").await.unwrap();
    let debug: serde_json::Value = serde_json::from_str(&debug).unwrap();
    let collections = &debug["collections"];
    assert!(
        collections[MESH_CONFIG]["absent"]
            .as_str()
            .unwrap()
            .contains("unsupported collection"),
        "{debug}"
    );
    assert_eq!(collections[SERVICE_ENTRIES]["resources"], 1, "{debug}");
    let (_, metrics) = get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains(&format!(
            "mcp_sink_collections_refused{{collection=\"{MESH_CONFIG}\"}} 1"
        )),
        "{metrics}"
    );
    let (_, configz) = get(admin, "/debug/configz").await.unwrap();
    let configz: serde_json::Value = serde_json::from_str(&configz).unwrap();
    assert_eq!(configz["mesh_config"]["connectTimeout"], "7s", "{configz}");
    // The routes, from the ServiceEntry and VirtualService the source does
    // serve, read by a client on another stack.
    let client = Peer::start(&[
        "xds-client",
        &xds.to_string(),
        "sidecar~127.0.0.2~productpage.bookinfo~bookinfo.svc.cluster.local",
        "9080",
    ]);
    let lines = client.rest().await;
    assert!(lines.contains(&"route 9080".to_string()), "{lines:?}");
    // From the ServiceEntry, and from the raw Kubernetes Service that
    // stands in for the synthetic entries.
    for host in ["details", "ratings"] {
        let domain = format!("domain {host}.bookinfo.svc.cluster.local");
        assert!(lines.contains(&domain), "{lines:?}");
    }
    let (_, endpoints) = get(admin, "/debug/endpointz").await.unwrap();
    let endpoints: serde_json::Value = serde_json::from_str(&endpoints).unwrap();
    let ratings = &endpoints["ratings.bookinfo.svc.cluster.local"][0];
    assert_eq!(ratings["address"], "10.244.0.7", "{endpoints}");
    assert_eq!(ratings["labels"]["version"], "v1", "the pod's labels");
    assert_eq!(ratings["locality"], "us-east1/us-east1-b", "the node's");
}

#[tokio::test]
async fn the_proxy_follows_an_xds_server_that_withholds_headers() {
    let (mut server, addr) = Peer::serve(&["xds-server"]).await;
    let admin = free_addr();
    let _proxy = Proc::start(
        "proxy",
        &[
            "--pilot",
            &addr.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--pod",
            "interop",
            "--namespace",
            "shop",
            // The peer speaks state of the world only.
            "--xds-mode",
            "sotw",
            "--stats-addr",
            &free_addr().to_string(),
            "--health-addr",
            &free_addr().to_string(),
        ],
    );
    server.until("ack Cluster").await;
    server.until("ack Listener").await;
    wait_for_http(admin, "/ready", |s, _| s == 200).await;
}

/// Bookinfo's own policy: the denier for mallory on details.
#[tokio::test]
async fn a_check_answer_is_read_by_a_client_that_knows_only_the_message_words() {
    let example = |path: &str| std::fs::read_to_string(repo().join("examples").join(path)).unwrap();
    let config = config_dir(&[
        ("attributes.yaml", &example("mixer/attributes.yaml")),
        ("policy.yaml", &example("bookinfo/policy.yaml")),
    ]);
    let galley = Galley::start(config.path(), &[]).await;
    let (grpc, admin) = (free_addr(), free_addr());
    let mut _mixer = Proc::start(
        "mixer",
        &[
            "--role",
            "policy",
            "--mcp-server",
            &galley.mcp.to_string(),
            "--grpc-addr",
            &grpc.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ],
    );
    _mixer.ready(admin).await;
    for (user, code) in [("mallory", "7"), ("jason", "0")] {
        let lines = Peer::start(&["mixer-check", &grpc.to_string(), user])
            .rest()
            .await;
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(&format!("status {code}"))),
            "{user}: {lines:?}"
        );
        for read in ["destination.service.host", "request.headers::end-user"] {
            let line = format!("referenced {read}");
            assert!(lines.contains(&line), "{user}: {lines:?}");
        }
    }
}

async fn run_to_end(proc: Proc) -> String {
    let Proc {
        mut child,
        mut stdout,
        ..
    } = proc;
    let read = async {
        let mut out = String::new();
        while let Some(line) = stdout.next_line().await.unwrap() {
            out.push_str(&line);
            out.push('\n');
        }
        out
    };
    let out = tokio::time::timeout(std::time::Duration::from_secs(60), read)
        .await
        .expect("meshctl mcp watch --once ends once every collection settled");
    assert!(child.wait().await.unwrap().success());
    out
}

/// A relay Galley following a primary on another stack that, as Istio
/// 1.1's Galley does, sends no headers before its first response and
/// refuses the mesh config: the relay serves the primary's config, its own
/// mesh config in place of the refused one, and nothing of the primary's
/// cluster registry.
#[tokio::test]
async fn a_relay_galley_follows_a_grpcio_source_that_refuses_collections() {
    let (mut source, addr) = Peer::serve(&["mcp-source", "--refuse", MESH_CONFIG]).await;
    let dir = config_dir(&[]);
    let follow = addr.to_string();
    let relay = Galley::start(dir.path(), &["--follow", &follow]).await;
    source.until(&format!("refused {MESH_CONFIG}")).await;
    let collections = format!("{GATEWAYS},{MESH_CONFIG},k8s/core/v1/services");
    let watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--server",
            &relay.mcp.to_string(),
            "--collections",
            &collections,
            "--output",
            "json",
            "--once",
        ],
    );
    let output = run_to_end(watch).await;
    let served = |collection: &str| -> Vec<String> {
        let line = output
            .lines()
            .find(|l| l.contains(&format!("\"collection\":\"{collection}\"")))
            .unwrap_or_else(|| panic!("no {collection} in {output}"));
        let update: serde_json::Value = serde_json::from_str(line).unwrap();
        let names = testkit::mcp_watch::names(&update);
        names.into_iter().map(str::to_string).collect()
    };
    assert_eq!(served(GATEWAYS), ["istio-system/ingress"]);
    assert_eq!(served(MESH_CONFIG).len(), 1, "the relay's own: {output}");
    assert!(served("k8s/core/v1/services").is_empty(), "{output}");
    assert!(relay.proc.terminate().await.success());
}

/// A primary on grpcio that dials the relay as Istio 1.1's Galley does with
/// `--sinkAddress`: it keeps a stream only if the sink NACKs its opening
/// trigger first, and ends one that asks for a collection it does not
/// serve, naming none. The relay answers the trigger, asks only for what
/// Istio 1.1's Galley serves, and serves the primary's config.
#[tokio::test]
async fn a_relay_galley_takes_a_grpcio_primary_that_dials_as_istio_does() {
    let dir = config_dir(&[]);
    let listen = free_addr().to_string();
    let relay = Galley::spawn(dir.path(), free_addr(), &["--follow-listen", &listen]);
    let mut source = Peer::start(&[
        "mcp-dialing-source",
        &listen,
        "--refuse",
        MESH_CONFIG,
        "--refuse",
        "istio/networking/v1alpha3/synthetic/serviceentries",
        "--refuse",
        "k8s/core/v1/namespaces",
    ]);
    source.until("trigger nacked").await;
    source.until(&format!("ack {GATEWAYS}")).await;
    let (status, _) = wait_for_http(relay.admin, "/ready", |s, _| s == 200).await;
    assert_eq!(status, 200);
    let mut watch = mcp_watch::start(&relay.mcp.to_string(), &[GATEWAYS], false);
    let update = mcp_watch::next_update(&mut watch, GATEWAYS).await;
    assert_eq!(mcp_watch::names(&update), ["istio-system/ingress"]);
    for proc in [watch, relay.proc] {
        assert!(proc.terminate().await.success());
    }
}

/// Galley's bounds as a sink on gRPC's C core meets them: it honours the
/// advertised stream limit (a stream over it waits for one to end, while
/// another connection is served), and a request with headers or a message
/// over the limits ends alone, with a status, the connection serving on.
#[tokio::test]
async fn a_grpcio_sink_meets_galleys_limits_and_its_connection_serves_on() {
    let dir = config_dir(&[]);
    let galley = Galley::start(
        dir.path(),
        &[
            "--max-streams-per-connection",
            "2",
            "--max-header-list-bytes",
            "4096",
            "--max-message-bytes",
            "65536",
        ],
    )
    .await;
    let lines = Peer::start(&[
        "mcp-limits",
        &galley.mcp.to_string(),
        "--streams",
        "2",
        "--header-bytes",
        "4096",
        "--message-bytes",
        "65536",
    ])
    .rest()
    .await;
    let finding = |prefix: &str| -> &str {
        lines
            .iter()
            .find_map(|l| l.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} in {lines:?}"))
    };
    assert_eq!(finding("extra stream "), "waits", "{lines:?}");
    assert!(
        lines.iter().any(|l| l == "extra stream served"),
        "{lines:?}"
    );
    assert_eq!(finding("headers within "), "served");
    // h2 answers 431 and resets the stream; grpc-core reports the reset.
    assert!(
        finding("oversized headers ").starts_with("INTERNAL: Stream removed"),
        "{lines:?}"
    );
    let message = finding("oversized message ");
    assert!(
        message.starts_with("OUT_OF_RANGE") && message.contains("65536"),
        "{message}"
    );
    assert_eq!(finding("after "), "served");

    let (_, metrics) = get(galley.admin, "/metrics").await.unwrap();
    let reached = |limit: &str| -> u64 {
        let series = format!("galley_mcp_limit_reached_total{{limit=\"{limit}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&series))
            .map_or(0, |n| n.parse().unwrap())
    };
    assert!(reached("streams_per_connection") >= 1, "{metrics}");
    assert_eq!(reached("message_bytes"), 1, "{metrics}");
}
