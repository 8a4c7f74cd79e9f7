//! The `proxy` binary carrying traffic, configured by the real `pilot`
//! following the real `galley` on a config directory: a client's proxy
//! used as its HTTP proxy, routing by header and by weight to two versions
//! of a service, one of them behind its own sidecar; retries, timeouts and
//! faults as routes say; traffic keeps flowing on the last config while
//! Pilot is down.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use testkit::*;

/// Serves `app` on a port of its own.
async fn serve(app: axum::Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// The body `/stream` sends: chunks of this many bytes...
const STREAM_CHUNK: usize = 1000;
/// ...this many of them...
const STREAM_CHUNKS: u64 = 3;
/// ...this long apart.
const STREAM_GAP: Duration = Duration::from_millis(300);

/// A backend that answers every request with its name and the path,
/// `/whoami` with the caller identity its sidecar forwarded, and
/// `/stream` with a chunked body sent over some time.
async fn backend(name: &'static str) -> SocketAddr {
    use axum::response::IntoResponse;
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap| async move {
            if uri.path() == "/whoami" {
                let xfcc = headers.get("x-forwarded-client-cert");
                let attributes = headers.get("x-istio-attributes");
                return format!("{xfcc:?} attributes: {attributes:?}").into_response();
            }
            if uri.path() == "/traceparent" {
                let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
                return traceparent.unwrap_or_default().to_string().into_response();
            }
            if uri.path() == "/stream" {
                use futures::StreamExt;
                let chunks = futures::stream::iter(0..STREAM_CHUNKS).then(|i| async move {
                    if i > 0 {
                        tokio::time::sleep(STREAM_GAP).await;
                    }
                    Ok::<_, std::convert::Infallible>(vec![b'x'; STREAM_CHUNK])
                });
                return axum::body::Body::from_stream(chunks).into_response();
            }
            format!("{name} {}", uri.path()).into_response()
        },
    );
    serve(app).await
}

/// Ratings: `/flaky` fails every other call with 503, `/slow` answers
/// after two seconds, anything else at once.
async fn ratings() -> SocketAddr {
    let calls = Arc::new(AtomicUsize::new(0));
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let calls = calls.clone();
        async move {
            let path = uri.path().to_string();
            if path.starts_with("/flaky") && calls.fetch_add(1, Ordering::Relaxed).is_multiple_of(2)
            {
                return (
                    axum::http::StatusCode::SERVICE_UNAVAILABLE,
                    "flaked".to_string(),
                );
            }
            if path.starts_with("/slow") {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            (axum::http::StatusCode::OK, format!("ratings {path}"))
        }
    });
    serve(app).await
}

/// Meshes running at once: each is some fifteen processes, and the tests
/// share two cores.
static MESHES: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(3);

struct Mesh {
    _turn: tokio::sync::SemaphorePermit<'static>,
    dir: tempfile::TempDir,
    collector: testkit::otlp::Receiver,
    ports: Ports,
    galley: Galley,
    mixers: Mixers,
    _citadel: Proc,
    /// Where reviews v2's sidecar accepts mesh traffic.
    v2_sidecar: SocketAddr,
    pilot: Option<Proc>,
    pilot_xds: SocketAddr,
    _proxies: Vec<Proc>,
    client_ports: ProxyPorts,
    /// The client proxy's HTTP proxy port.
    egress: SocketAddr,
}

/// Where the test's backends and proxies listen.
struct Ports {
    v1: SocketAddr,
    v2_sidecar: SocketAddr,
    v2_app: SocketAddr,
    ratings: SocketAddr,
    details: SocketAddr,
    details_broken: SocketAddr,
    /// Answers after half a second.
    held: SocketAddr,
    /// A TCP echo server, reviews v2's second port.
    echo_app: SocketAddr,
    /// Where reviews v2's sidecar accepts mesh TCP for it.
    echo_sidecar: SocketAddr,
    /// The client proxy's TCP listener for the echo service.
    echo_egress: SocketAddr,
    /// The policy Mixer, also a gRPC service of the mesh.
    mixer_policy: SocketAddr,
    egress: SocketAddr,
    egress_b: SocketAddr,
}

/// A backend that answers after half a second.
async fn held() -> SocketAddr {
    let app = axum::Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        "held"
    });
    serve(app).await
}

/// A backend that fails every request.
async fn broken() -> SocketAddr {
    let app = axum::Router::new()
        .fallback(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "broken") });
    serve(app).await
}

/// The mesh's config; `v1_weight` percent of reviews goes to v1.
fn config(p: &Ports, v1_weight: u32) -> String {
    format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: policy, namespace: shop}}
spec:
  hosts: [policy.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9091, name: grpc, protocol: GRPC}}]
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {policy_port}}}, labels: {{app: policy}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: echo, namespace: shop}}
spec:
  hosts: [echo.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: {echo_port}, name: tcp, protocol: TCP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{tcp: {echo_sidecar_port}}}, labels: {{app: reviews, version: v2}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: echo, namespace: shop}}
spec:
  host: echo.shop.svc.cluster.local
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: held, namespace: shop}}
spec:
  hosts: [held.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {held_port}}}, labels: {{app: held}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: held, namespace: shop}}
spec:
  host: held.shop.svc.cluster.local
  trafficPolicy:
    connectionPool: {{tcp: {{maxConnections: 1}}, http: {{http1MaxPendingRequests: 1}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: details, namespace: shop}}
spec:
  hosts: [details.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {details_port}}}, labels: {{app: details}}}}
  - {{address: 127.0.0.1, ports: {{http: {details_broken_port}}}, labels: {{app: details}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: details, namespace: shop}}
spec:
  host: details.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {{consecutiveErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 50}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  # Labelled, so that no proxy at 127.0.0.1 takes it for its own workload.
  endpoints: [{{address: 127.0.0.1, ports: {{http: {ratings_port}}}, labels: {{app: ratings}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: slow, namespace: shop}}
spec:
  hosts: [slow.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1, ports: {{http: {ratings_port}}}, labels: {{app: ratings}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: slow, namespace: shop}}
spec:
  host: slow.shop.svc.cluster.local
  trafficPolicy:
    outlierDetection: {{consecutiveErrors: 1, interval: 1s, baseEjectionTime: 60s, maxEjectionPercent: 100}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: slow, namespace: shop}}
spec:
  hosts: [slow.shop.svc.cluster.local]
  http:
  - timeout: 200ms
    route: [{{destination: {{host: slow.shop.svc.cluster.local}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: ratings, namespace: shop}}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  http:
  - match: [{{uri: {{prefix: /slow}}}}]
    timeout: 300ms
    route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /abort}}}}]
    fault: {{abort: {{httpStatus: 418, percentage: {{value: 50}}}}}}
    route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
  - match: [{{uri: {{prefix: /delay}}}}]
    fault: {{delay: {{fixedDelay: 200ms, percentage: {{value: 100}}}}}}
    route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
  - route: [{{destination: {{host: ratings.shop.svc.cluster.local}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {v1p}}}, labels: {{app: reviews, version: v1}}}}
  - {{address: 127.0.0.1, ports: {{http: {v2p}}}, labels: {{app: reviews, version: v2}}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: reviews, namespace: shop}}
spec:
  host: reviews.shop.svc.cluster.local
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - name: v2
    labels: {{version: v2}}
    trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
---
apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {{name: default}}
spec:
  peers: [{{mtls: {{}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - match: [{{headers: {{end-user: {{regex: 'jason|mallory'}}}}}}]
    route: [{{destination: {{host: reviews.shop.svc.cluster.local, subset: v2}}}}]
  - route:
    - {{destination: {{host: reviews.shop.svc.cluster.local, subset: v1}}, weight: {v1_weight}}}
    - {{destination: {{host: reviews.shop.svc.cluster.local, subset: v2}}, weight: {v2_weight}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: productpage, namespace: shop}}
spec:
  workloadSelector: {{labels: {{app: productpage}}}}
  egress:
  - port: {{number: {egress_port}, protocol: HTTP, name: http-proxy}}
    bind: 127.0.0.1
    hosts: [./*]
  - port: {{number: {echo_port}, protocol: TCP, name: tcp-echo}}
    bind: 127.0.0.1
    hosts: [./echo.shop.svc.cluster.local]
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: reviews-v2, namespace: shop}}
spec:
  workloadSelector: {{labels: {{app: reviews, version: v2}}}}
  ingress:
  - port: {{number: {v2p}, protocol: HTTP, name: http}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{v2_app_port}
  - port: {{number: {echo_sidecar_port}, protocol: TCP, name: tcp}}
    bind: 127.0.0.1
    defaultEndpoint: 127.0.0.1:{echo_app_port}
  egress:
  - port: {{number: {egress_b_port}, protocol: HTTP, name: http-proxy}}
    bind: 127.0.0.1
    hosts: [./*]
",
        v1p = p.v1.port(),
        v2p = p.v2_sidecar.port(),
        v2_app_port = p.v2_app.port(),
        ratings_port = p.ratings.port(),
        details_port = p.details.port(),
        details_broken_port = p.details_broken.port(),
        held_port = p.held.port(),
        policy_port = p.mixer_policy.port(),
        echo_port = p.echo_egress.port(),
        echo_sidecar_port = p.echo_sidecar.port(),
        echo_app_port = p.echo_app.port(),
        v2_weight = 100 - v1_weight,
        egress_port = p.egress.port(),
        egress_b_port = p.egress_b.port(),
    )
}

/// Where a proxy serves its admin endpoints, stats and health.
#[derive(Clone, Copy)]
struct ProxyPorts {
    admin: SocketAddr,
    stats: SocketAddr,
    health: SocketAddr,
}

/// The policy and telemetry Mixers, following Galley.
struct Mixers {
    _policy: Proc,
    _telemetry: Proc,
    policy: SocketAddr,
    telemetry: SocketAddr,
    /// The telemetry Mixer's Prometheus exporter.
    prometheus: SocketAddr,
}

async fn start_mixers(mcp: SocketAddr, policy: SocketAddr) -> Mixers {
    let (telemetry, prometheus) = (free_addr(), free_addr());
    let (policy_admin, telemetry_admin) = (free_addr(), free_addr());
    let start = |role: &str, grpc: SocketAddr, admin: SocketAddr| {
        Proc::start(
            "mixer",
            &[
                "--role",
                role,
                "--mcp-server",
                &mcp.to_string(),
                "--grpc-addr",
                &grpc.to_string(),
                "--admin-addr",
                &admin.to_string(),
                "--prometheus-addr",
                &prometheus.to_string(),
            ],
        )
    };
    let mixers = Mixers {
        _policy: start("policy", policy, policy_admin),
        _telemetry: start("telemetry", telemetry, telemetry_admin),
        policy,
        telemetry,
        prometheus,
    };
    for admin in [policy_admin, telemetry_admin] {
        wait_for_http(admin, "/ready", |s, _| s == 200).await;
    }
    mixers
}

/// Reviews may be read (GET) by productpage, and by no one else, nor
/// written; echo (TCP) may be used by productpage.
const RBAC: &str = r#"
apiVersion: rbac.istio.io/v1alpha1
kind: ClusterRbacConfig
metadata: {name: default}
spec: {mode: ON_WITH_INCLUSION, inclusion: {namespaces: [shop]}}
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: reviews-reader, namespace: shop}
spec:
  rules: [{services: [reviews.shop.svc.cluster.local], methods: [GET]}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {name: productpage-reads-reviews, namespace: shop}
spec:
  subjects: [{user: cluster.local/ns/shop/sa/productpage}]
  roleRef: {kind: ServiceRole, name: reviews-reader}
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: echo-user, namespace: shop}
spec:
  rules: [{services: [echo.shop.svc.cluster.local]}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {name: productpage-uses-echo, namespace: shop}
spec:
  subjects: [{user: cluster.local/ns/shop/sa/productpage}]
  roleRef: {kind: ServiceRole, name: echo-user}
"#;

/// Mallory may not read reviews.
const DENY_MALLORY: &str = r#"
apiVersion: config.istio.io/v1alpha2
kind: handler
metadata: {name: denyall, namespace: istio-system}
spec: {compiledAdapter: denier, params: {status: {code: 7, message: "not for mallory"}}}
---
apiVersion: config.istio.io/v1alpha2
kind: instance
metadata: {name: denyrequest, namespace: istio-system}
spec: {compiledTemplate: checknothing}
---
apiVersion: config.istio.io/v1alpha2
kind: rule
metadata: {name: deny-mallory, namespace: istio-system}
spec:
  match: destination.service.host == "reviews.shop.svc.cluster.local" && request.headers["end-user"] == "mallory"
  actions: [{handler: denyall, instances: [denyrequest]}]
"#;

/// What the proxies of the fixture talk to.
struct ControlPlane<'a> {
    xds: SocketAddr,
    ca: &'a Citadel,
    mixers: &'a Mixers,
    /// The OTLP trace collector.
    collector: SocketAddr,
}

/// One workload's proxy: its pod, service account, labels, and the xDS
/// flavour it speaks (the fixture runs one of each).
struct Workload<'a> {
    pod: &'a str,
    account: &'a str,
    labels: &'a str,
    xds_mode: &'a str,
}

fn start_proxy(cp: &ControlPlane, w: Workload) -> (Proc, ProxyPorts) {
    let ControlPlane {
        xds,
        ca,
        mixers,
        collector,
    } = *cp;
    let Workload {
        pod,
        account,
        labels,
        xds_mode,
    } = w;
    let ports = ProxyPorts {
        admin: free_addr(),
        stats: free_addr(),
        health: free_addr(),
    };
    let admin = ports.admin;
    let token = ca.token(account);
    let root = ca.root();
    let endpoint = format!("http://{collector}");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        // Spans go out every 100 ms, not every 5 s.
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let proc = Proc::start_with_env(
        "proxy",
        &[
            "--pilot",
            &xds.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--pod",
            pod,
            "--namespace",
            "shop",
            "--service-account",
            account,
            "--labels",
            labels,
            "--citadel",
            &ca.addr.to_string(),
            "--citadel-root",
            root.to_str().unwrap(),
            "--citadel-token-file",
            token.to_str().unwrap(),
            "--citadel-hostname",
            "localhost",
            // Short-lived, so that every test runs across renewals.
            "--cert-ttl",
            "4s",
            "--mixer-policy",
            &mixers.policy.to_string(),
            "--mixer-telemetry",
            &mixers.telemetry.to_string(),
            "--xds-mode",
            xds_mode,
            "--stats-addr",
            &ports.stats.to_string(),
            "--health-addr",
            &ports.health.to_string(),
            // Short, so that a test sees a silent client closed.
            "--protocol-detection-timeout",
            &format!("{}ms", HANDSHAKE_LIMIT.as_millis()),
            "--tls-handshake-timeout",
            &format!("{}ms", HANDSHAKE_LIMIT.as_millis()),
        ],
        &env,
    );
    (proc, ports)
}

/// The proxies' protocol detection and TLS handshake timeouts.
const HANDSHAKE_LIMIT: Duration = Duration::from_millis(300);

/// Pilot following Galley at `mcp`, serving ADS on `xds`, ready.
async fn start_pilot(mcp: SocketAddr, xds: SocketAddr) -> Proc {
    let (mut pilot, admin) = testkit::start_pilot(mcp, xds, &[]);
    pilot.ready(admin).await;
    pilot
}

async fn start() -> Mesh {
    let turn = MESHES.acquire().await.unwrap();
    let ports = Ports {
        v1: backend("reviews-v1").await,
        v2_app: backend("reviews-v2").await,
        ratings: ratings().await,
        details: backend("details").await,
        details_broken: broken().await,
        held: held().await,
        echo_app: echo_server().await,
        echo_sidecar: free_addr(),
        echo_egress: free_addr(),
        mixer_policy: free_addr(),
        v2_sidecar: free_addr(),
        egress: free_addr(),
        egress_b: free_addr(),
    };
    let egress = ports.egress;
    let v2_sidecar = ports.v2_sidecar;
    let dir = config_dir(&[
        ("mesh.yaml", &config(&ports, 70)),
        (
            "attributes.yaml",
            include_str!("../../examples/mixer/attributes.yaml"),
        ),
        (
            "telemetry.yaml",
            include_str!("../../examples/mixer/telemetry.yaml"),
        ),
        ("policy.yaml", DENY_MALLORY),
        ("rbac.yaml", RBAC),
    ]);
    let ca = Citadel::start(dir.path(), &[("shop", "productpage"), ("shop", "reviews")]).await;
    let galley = Galley::start(dir.path(), &[]).await;
    let mixers = start_mixers(galley.mcp, ports.mixer_policy).await;
    let pilot_xds = free_addr();
    let pilot = start_pilot(galley.mcp, pilot_xds).await;
    let (collector, collector_addr) = testkit::otlp::Receiver::start().await;
    let control_plane = ControlPlane {
        xds: pilot_xds,
        ca: &ca,
        mixers: &mixers,
        collector: collector_addr,
    };
    let (client, client_admin) = start_proxy(
        &control_plane,
        Workload {
            pod: "productpage-1",
            account: "productpage",
            labels: "app=productpage,version=v1",
            xds_mode: "delta",
        },
    );
    let (sidecar, sidecar_admin) = start_proxy(
        &control_plane,
        Workload {
            pod: "reviews-v2-1",
            account: "reviews",
            labels: "app=reviews,version=v2",
            xds_mode: "sotw",
        },
    );
    for ports in [client_admin, sidecar_admin] {
        wait_for_http(ports.admin, "/ready", |s, _| s == 200).await;
    }
    Mesh {
        _turn: turn,
        dir,
        collector,
        ports,
        galley,
        mixers,
        _citadel: ca.proc,
        v2_sidecar,
        pilot: Some(pilot),
        pilot_xds,
        _proxies: vec![client, sidecar],
        client_ports: client_admin,
        egress,
    }
}

impl Mesh {
    fn client(&self) -> reqwest::Client {
        install_crypto();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://{}", self.egress)).unwrap())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap()
    }
}

/// Which backend answered, by name, for `count` requests.
async fn spread(
    client: &reqwest::Client,
    user: Option<&str>,
    count: usize,
) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for i in 0..count {
        let mut request = client.get(format!(
            "http://reviews.shop.svc.cluster.local:9080/reviews/{i}"
        ));
        if let Some(user) = user {
            request = request.header("end-user", user);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        let body = response.text().await.unwrap();
        assert!(body.ends_with(&format!("/reviews/{i}")), "{body}");
        let name = body.split(' ').next().unwrap().to_string();
        *seen.entry(name).or_default() += 1;
    }
    seen
}

#[tokio::test]
async fn routes_by_header_and_weight_and_survive_pilot_going_away() {
    let mut mesh = start().await;
    let client = mesh.client();

    // Jason's requests go to v2, through v2's own sidecar.
    let jason = spread(&client, Some("jason"), 20).await;
    assert_eq!(jason, BTreeMap::from([("reviews-v2".to_string(), 20)]));

    // Everyone else's are split 70/30.
    let others = spread(&client, None, 400).await;
    let v1 = others.get("reviews-v1").copied().unwrap_or(0);
    assert!(
        (240..=320).contains(&v1),
        "70% of 400 to v1 within 10 points: {others:?}"
    );

    // The admin endpoints show what the client proxy holds and did.
    let ports = mesh.client_ports;
    let (_, dump) = get(ports.admin, "/config_dump").await.unwrap();
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert_eq!(dump["synced"], true);
    assert_eq!(dump["xds_flavour"], "delta");
    let egress = format!("127.0.0.1_{}", mesh.egress.port());
    assert!(
        dump["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == egress.as_str()),
        "{dump}"
    );
    let (_, clusters) = get(ports.admin, "/clusters").await.unwrap();
    assert!(
        clusters.contains("outbound|9080|v1|reviews.shop.svc.cluster.local::127.0.0.1:"),
        "{clusters}"
    );
    let v2 = "outbound|9080|v2|reviews.shop.svc.cluster.local";
    let (_, stats) = get(ports.stats, "/stats/prometheus").await.unwrap();
    let line = format!(
        r#"proxy_requests_total{{direction="outbound",cluster="{v2}",response_code="200"}} "#
    );
    assert!(stats.contains(&line), "no {line:?} in {stats}");
    let (status, _) = get(ports.health, "/healthz/ready").await.unwrap();
    assert_eq!(status, 200);

    // Without Pilot, the last config keeps routing.
    mesh.pilot.take().unwrap().kill().await;
    let jason = spread(&client, Some("jason"), 10).await;
    assert_eq!(jason, BTreeMap::from([("reviews-v2".to_string(), 10)]));

    // Pilot comes back; a config change made since takes effect.
    let config = config(&mesh.ports, 0);
    std::fs::write(mesh.dir.path().join("mesh.yaml"), config).unwrap();
    mesh.pilot = Some(start_pilot(mesh.galley.mcp, mesh.pilot_xds).await);
    tokio::time::timeout(Duration::from_secs(30), async {
        while spread(&client, None, 20).await.contains_key("reviews-v1") {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .expect("all of reviews on v2 within 30 s");
}

async fn ratings_get(client: &reqwest::Client, path: &str) -> (u16, String, Duration) {
    let started = Instant::now();
    let response = client
        .get(format!("http://ratings.shop.svc.cluster.local:9080{path}"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.text().await.unwrap(), started.elapsed())
}

#[tokio::test]
async fn retries_timeouts_and_faults_apply_as_routes_say() {
    let mesh = start().await;
    let client = mesh.client();
    // Every other call fails upstream; the retry hides each failure.
    for i in 0..10 {
        let (status, body, _) = ratings_get(&client, &format!("/flaky/{i}")).await;
        assert_eq!(
            (status, body.as_str()),
            (200, format!("ratings /flaky/{i}").as_str())
        );
    }
    // The route's 300 ms timeout cuts a two-second answer short.
    let (status, body, took) = ratings_get(&client, "/slow").await;
    assert_eq!(status, 504, "{body}");
    assert!(took < Duration::from_millis(1500), "{took:?}");
    // The request cut short is no longer counted in flight (least-request
    // balancing reads the count).
    let ratings = "outbound|9080||ratings.shop.svc.cluster.local::";
    let (_, clusters) = get(mesh.client_ports.admin, "/clusters").await.unwrap();
    let in_flight: Vec<&str> = clusters
        .lines()
        .filter(|l| l.starts_with(ratings) && l.contains("::rq_active::"))
        .collect();
    assert!(!in_flight.is_empty(), "{clusters}");
    assert!(
        in_flight.iter().all(|l| l.ends_with("::0")),
        "{in_flight:?}"
    );
    // A route timeout is an error of the endpoint for outlier detection,
    // as Envoy counts it: one (consecutiveErrors: 1) ejects it.
    let response = client
        .get("http://slow.shop.svc.cluster.local:9080/slow")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 504);
    let (_, clusters) = get(mesh.client_ports.admin, "/clusters").await.unwrap();
    let ratings = mesh.ports.ratings;
    let ejected = format!(
        "outbound|9080||slow.shop.svc.cluster.local::{ratings}::health_flags::/failed_outlier_check"
    );
    assert!(clusters.contains(&ejected), "{clusters}");
    // Half the requests are aborted with 418, the rest pass.
    let mut aborted = 0;
    for i in 0..200 {
        let (status, _, _) = ratings_get(&client, &format!("/abort/{i}")).await;
        assert!(status == 418 || status == 200, "{status}");
        aborted += usize::from(status == 418);
    }
    assert!(
        (70..=130).contains(&aborted),
        "50% of 200 aborted within 15 points: {aborted}"
    );
    // Every request is delayed 200 ms.
    let (status, _, took) = ratings_get(&client, "/delay").await;
    assert_eq!(status, 200);
    assert!(took >= Duration::from_millis(200), "{took:?}");
}

/// A response's report is sent when its body ends: its size is the bytes
/// the body carried (chunked, with no length), its duration the time to
/// the last byte.
#[tokio::test]
async fn mixer_reports_measure_the_whole_response_body() {
    let mesh = start().await;
    let response = mesh
        .client()
        .get("http://reviews.shop.svc.cluster.local:9080/stream")
        .header("end-user", "jason")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    assert_eq!(body.len() as u64, STREAM_CHUNKS * STREAM_CHUNK as u64);
    let reported = |metrics: &str, name: &str| -> Option<f64> {
        metrics
            .lines()
            .filter(|l| l.starts_with(&format!("{name}{{")))
            .filter(|l| l.contains(r#"destination_service="reviews.shop.svc.cluster.local""#))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .reduce(f64::max)
    };
    let (_, metrics) = wait_for_http(mesh.mixers.prometheus, "/metrics", |_, text| {
        reported(text, "istio_response_bytes_sum").is_some()
    })
    .await;
    let size = reported(&metrics, "istio_response_bytes_sum").unwrap();
    assert_eq!(
        size,
        (STREAM_CHUNKS * STREAM_CHUNK as u64) as f64,
        "{metrics}"
    );
    let duration = reported(&metrics, "istio_request_duration_seconds_sum").unwrap();
    let body_time = (STREAM_GAP * (STREAM_CHUNKS as u32 - 1)).as_secs_f64();
    assert!(
        duration >= body_time,
        "{duration} s, under {body_time} s: {metrics}"
    );
}

/// A client that connects to a mesh port and says nothing, or stops in
/// the middle of its TLS handshake, is closed once the proxy's timeout
/// passes: it does not hold a task for ever.
#[tokio::test]
async fn silent_and_stalled_clients_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = start().await;
    // Reads until the proxy closes the connection; how long that took.
    async fn closed_after(mut stream: tokio::net::TcpStream) -> Duration {
        let started = Instant::now();
        let mut buf = [0u8; 4096];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while !matches!(stream.read(&mut buf).await, Ok(0) | Err(_)) {}
        })
        .await;
        assert!(closed.is_ok(), "the proxy kept the connection open");
        started.elapsed()
    }
    let silent = tokio::net::TcpStream::connect(mesh.ports.v2_sidecar)
        .await
        .unwrap();
    let took = closed_after(silent).await;
    assert!(took >= HANDSHAKE_LIMIT / 2, "closed at once: {took:?}");
    // A ClientHello, then nothing: the handshake waits for the client's
    // certificate until the timeout.
    let mut stalled = tokio::net::TcpStream::connect(mesh.ports.v2_sidecar)
        .await
        .unwrap();
    stalled.write_all(&client_hello()).await.unwrap();
    closed_after(stalled).await;
    // Plaintext HTTP (the client's HTTP_PROXY port): nothing said, closed,
    // and counted where users look.
    let silent = tokio::net::TcpStream::connect(mesh.ports.egress)
        .await
        .unwrap();
    closed_after(silent).await;
    let (_, stats) = get(mesh.client_ports.stats, "/stats/prometheus")
        .await
        .unwrap();
    assert!(
        stats.contains(r#"proxy_limit_reached_total{limit="protocol_detection_timeout"} 1"#),
        "{stats}"
    );
}

/// The first flight of a TLS client, as bytes.
fn client_hello() -> Vec<u8> {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("reviews.shop.svc.cluster.local").unwrap();
    let mut client = rustls::ClientConnection::new(std::sync::Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    hello
}

#[tokio::test]
async fn strict_mtls_carries_the_callers_identity_and_refuses_plaintext() {
    let mesh = start().await;
    let client = mesh.client();
    // Through the client's sidecar: mesh TLS with Citadel's certificates,
    // and the caller's identity reaches the application.
    let response = client
        .get("http://reviews.shop.svc.cluster.local:9080/whoami")
        .header("end-user", "jason")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = response.text().await.unwrap();
    assert!(
        body.contains("URI=spiffe://cluster.local/ns/shop/sa/productpage"),
        "{body}"
    );
    // The caller's attributes were for the sidecar, not the application.
    assert!(body.ends_with("attributes: None"), "{body}");
    // Plaintext straight to the STRICT sidecar is refused.
    install_crypto();
    let direct = reqwest::Client::new()
        .get(format!("http://{}/whoami", mesh.v2_sidecar))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(direct.is_err(), "plaintext got through: {direct:?}");
}

#[tokio::test]
async fn mixer_denies_what_its_rules_say_and_reports_the_rest() {
    let mesh = start().await;
    let client = mesh.client();
    let get = |user: &'static str| {
        client
            .get("http://reviews.shop.svc.cluster.local:9080/reviews/1")
            .header("end-user", user)
            .send()
    };
    // The denier rule refuses mallory at reviews' sidecar.
    let denied = get("mallory").await.unwrap();
    assert_eq!(denied.status(), 403);
    let body = denied.text().await.unwrap();
    assert!(body.contains("PERMISSION_DENIED:not for mallory"), "{body}");
    // Jason passes, and the request is reported with Istio's labels.
    let allowed = get("jason").await.unwrap();
    assert_eq!(allowed.status(), 200);
    let expected = [
        r#"reporter="destination""#,
        r#"destination_service="reviews.shop.svc.cluster.local""#,
        r#"source_principal="cluster.local/ns/shop/sa/productpage""#,
        // Said by the client's proxy, taken from a caller proven by TLS.
        r#"source_workload="productpage-1""#,
        r#"source_app="productpage""#,
        r#"destination_version="v2""#,
        r#"connection_security_policy="mutual_tls""#,
        r#"response_code="200""#,
    ];
    let (_, metrics) = wait_for_http(mesh.mixers.prometheus, "/metrics", |_, text| {
        text.lines().any(|l| {
            l.starts_with("istio_requests_total{") && expected.iter().all(|e| l.contains(e))
        })
    })
    .await;
    // The denial was reported too, with its status.
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("istio_requests_total{") && l.contains(r#"response_code="403""#)),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_endpoint_that_keeps_failing_is_ejected() {
    let mesh = start().await;
    let client = mesh.client();
    // The broken endpoint's 503s are retried on the other, and its first
    // failure ejects it.
    for i in 0..20 {
        let response = client
            .get(format!(
                "http://details.shop.svc.cluster.local:9080/details/{i}"
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let broken = mesh.ports.details_broken;
    let cluster = "outbound|9080||details.shop.svc.cluster.local";
    let (_, clusters) = get(mesh.client_ports.admin, "/clusters").await.unwrap();
    assert!(
        clusters.contains(&format!(
            "{cluster}::{broken}::health_flags::/failed_outlier_check"
        )),
        "{clusters}"
    );
    let (_, stats) = get(mesh.client_ports.stats, "/stats/prometheus")
        .await
        .unwrap();
    let line = format!(r#"proxy_outlier_ejections_total{{cluster="{cluster}"}} 1"#);
    assert!(stats.contains(&line), "no {line:?} in {stats}");
}

#[tokio::test]
async fn certificates_renew_under_load_without_a_dropped_request() {
    let mesh = start().await;
    let client = mesh.client();
    let certificate = || async {
        let (_, dump) = get(mesh.client_ports.admin, "/config_dump").await.unwrap();
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
        dump["certificate"]["not_after"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let first = certificate().await;
    // Mesh TLS to reviews v2, new connections and old, across renewals
    // (a 4 s certificate is renewed every 2 s).
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(5) {
        let fresh = mesh.client();
        for c in [&client, &fresh] {
            let response = c
                .get("http://reviews.shop.svc.cluster.local:9080/renewal")
                .header("end-user", "jason")
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 200, "request {sent}");
            sent += 1;
        }
    }
    assert_ne!(certificate().await, first, "renewed during the run");
    assert!(sent > 20, "{sent} requests");
}

#[tokio::test]
async fn rbac_lets_the_bound_caller_read_and_refuses_the_rest() {
    let mesh = start().await;
    let client = mesh.client();
    let url = "http://reviews.shop.svc.cluster.local:9080/reviews/1";
    // Productpage may GET (through reviews v2's sidecar, which enforces).
    let read = client
        .get(url)
        .header("end-user", "jason")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    // It may not POST.
    let write = client
        .post(url)
        .header("end-user", "jason")
        .send()
        .await
        .unwrap();
    assert_eq!(write.status(), 403);
    assert_eq!(write.text().await.unwrap().trim(), "RBAC: access denied");
}

#[tokio::test]
async fn over_the_connection_pool_limits_requests_overflow_at_once() {
    let mesh = start().await;
    let client = mesh.client();
    // One in progress and one waiting are allowed; the rest overflow.
    let calls = (0..4).map(|i| {
        let client = client.clone();
        async move {
            let started = Instant::now();
            let response = client
                .get(format!("http://held.shop.svc.cluster.local:9080/{i}"))
                .send()
                .await
                .unwrap();
            let overloaded = response.headers().contains_key("x-envoy-overloaded");
            (response.status().as_u16(), overloaded, started.elapsed())
        }
    });
    let mut results = futures::future::join_all(calls).await;
    results.sort_by_key(|(status, _, took)| (*status, *took));
    let statuses: Vec<u16> = results.iter().map(|r| r.0).collect();
    assert_eq!(statuses, [200, 200, 503, 503], "{results:?}");
    for (_, overloaded, took) in &results[2..] {
        assert!(
            *overloaded && *took < Duration::from_millis(400),
            "{results:?}"
        );
    }
}

#[tokio::test]
async fn tcp_crosses_both_proxies_in_mesh_tls_and_is_reported() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = start().await;

    // Through the client's TCP listener, mesh TLS to reviews v2's sidecar,
    // and on to the echo server.
    let mut stream = tokio::net::TcpStream::connect(mesh.ports.echo_egress)
        .await
        .unwrap();
    let message = b"twelve bytes";
    stream.write_all(message).await.unwrap();
    let mut back = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut back))
        .await
        .expect("the echo in time")
        .unwrap();
    assert_eq!(&back, message);
    drop(stream);
    // The server side reports the connection to Mixer when it closes.
    let expected = [
        r#"destination_service="echo.shop.svc.cluster.local""#,
        r#"source_principal="cluster.local/ns/shop/sa/productpage""#,
        r#"connection_security_policy="mutual_tls""#,
    ];
    wait_for_http(mesh.mixers.prometheus, "/metrics", |_, text| {
        text.lines().any(|l| {
            l.starts_with("istio_tcp_received_bytes_total{")
                && expected.iter().all(|e| l.contains(e))
                && l.ends_with(" 12.0")
        })
    })
    .await;
}

#[tokio::test]
async fn grpc_goes_through_over_http2() {
    use mesh_api::pb::istio::mixer::v1::{CheckRequest, mixer_client::MixerClient};
    let mesh = start().await;
    // A gRPC client using the client proxy (HTTP/2 without TLS to it),
    // naming the service as its authority; the proxy speaks HTTP/2 on to
    // the policy Mixer.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", mesh.egress))
        .unwrap()
        .origin("http://policy.shop.svc.cluster.local:9091".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let response = MixerClient::new(channel)
        .check(CheckRequest::default())
        .await
        .expect("the policy Mixer's answer, through the proxy")
        .into_inner();
    // An empty request matches no deny rule.
    assert_eq!(
        response
            .precondition
            .unwrap()
            .status
            .unwrap_or_default()
            .code,
        0
    );
    let (_, stats) = get(mesh.client_ports.stats, "/stats/prometheus")
        .await
        .unwrap();
    assert!(
        stats.contains(
            r#"cluster="outbound|9091||policy.shop.svc.cluster.local",response_code="200""#
        ),
        "{stats}"
    );
}

#[tokio::test]
async fn trace_context_is_carried_and_spans_are_exported() {
    let mesh = start().await;
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let response = mesh
        .client()
        .get("http://reviews.shop.svc.cluster.local:9080/traceparent")
        .header("end-user", "jason")
        .header("traceparent", format!("00-{trace}-{caller_span}-01"))
        .send()
        .await
        .unwrap();
    // The application sees the same trace, with the last proxy's span as
    // its parent.
    let seen = response.text().await.unwrap();
    let parts: Vec<&str> = seen.split('-').collect();
    assert_eq!(parts.len(), 4, "{seen:?}");
    assert_eq!(parts[1], trace);
    assert_ne!(parts[2], caller_span);
    // Both proxies exported their spans: the client's a child of the
    // caller's, the server's a child of the client's.
    let spans = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let spans: Vec<_> = mesh
                .collector
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace)
                .collect();
            if spans.len() >= 2 {
                return spans;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("both spans exported");
    let client = spans
        .iter()
        .find(|s| s.parent_span_id == caller_span)
        .expect("the client proxy's span");
    let server = spans
        .iter()
        .find(|s| s.parent_span_id == client.span_id)
        .expect("the server proxy's span");
    assert_eq!(
        server.span_id, parts[2],
        "the application's parent is the server proxy's span"
    );
    assert!(client.service.contains("productpage-1.shop"), "{client:?}");
    assert!(server.service.contains("reviews-v2-1.shop"), "{server:?}");
}

#[tokio::test]
async fn a_listener_whose_port_is_taken_binds_once_it_is_free() {
    let egress = free_addr();
    let config = format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {{name: solo, namespace: shop}}
spec:
  workloadSelector: {{labels: {{app: solo}}}}
  egress:
  - port: {{number: {port}, protocol: HTTP, name: http-proxy}}
    bind: 127.0.0.1
    hosts: [./*]
",
        port = egress.port()
    );
    let dir = config_dir(&[("solo.yaml", &config)]);
    let galley = Galley::start(dir.path(), &[]).await;
    let xds = free_addr();
    let _pilot = start_pilot(galley.mcp, xds).await;
    // Something else holds the port when the proxy comes.
    let squatter = std::net::TcpListener::bind(egress).unwrap();
    let admin = free_addr();
    let _proxy = Proc::start(
        "proxy",
        &[
            "--pilot",
            &xds.to_string(),
            "--admin-addr",
            &admin.to_string(),
            "--stats-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
            "--pod",
            "solo-1",
            "--namespace",
            "shop",
            "--labels",
            "app=solo",
        ],
    );
    let (_, dump) =
        wait_for_http(admin, "/config_dump", |_, d| d.contains("\"synced\":true")).await;
    assert!(
        dump.contains(&format!("127.0.0.1_{}", egress.port())),
        "{dump}"
    );
    let (status, _) = get(admin, "/ready").await.unwrap();
    assert_eq!(status, 503, "ready without its listener");
    drop(squatter);
    wait_for_http(admin, "/ready", |s, _| s == 200).await;
    assert!(tokio::net::TcpStream::connect(egress).await.is_ok());
}

/// Any HTTP/1 head sent to the proxy (well-formed, broken, smuggling-shaped
/// or random bytes) is answered or the connection closed, within a bound,
/// and the proxy keeps serving: a fuzz property over a running proxy.
#[tokio::test]
async fn any_http1_head_is_answered_or_closed_and_the_proxy_keeps_serving() {
    use proptest::{
        strategy::{Strategy, ValueTree},
        test_runner::TestRunner,
    };
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mesh = start().await;
    let mut runner = TestRunner::default();
    let heads = http1_heads();
    for case in 0..300 {
        let head = heads.new_tree(&mut runner).unwrap().current();
        let mut stream = tokio::net::TcpStream::connect(mesh.egress).await.unwrap();
        stream.write_all(&head).await.unwrap();
        // No more is coming: a head the proxy is still reading ends here.
        let _ = stream.shutdown().await;
        let mut answer = Vec::new();
        let ended =
            tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut answer)).await;
        assert!(
            ended.is_ok(),
            "case {case}: neither answered nor closed: {:?}",
            String::from_utf8_lossy(&head)
        );
        if !answer.is_empty() {
            assert!(
                answer.starts_with(b"HTTP/1."),
                "case {case}: not an HTTP answer to {:?}: {:?}",
                String::from_utf8_lossy(&head),
                String::from_utf8_lossy(&answer)
            );
        }
    }
    let (status, ..) = ratings_get(&mesh.client(), "/ratings/0").await;
    assert_eq!(status, 200, "the proxy serves on after the fuzzing");

    // A header block over --max-request-headers-kb (60 by default) is
    // answered 431 and counted where users look.
    let counted = r#"proxy_limit_reached_total{limit="request_headers"} "#;
    let count = |stats: &str| -> u64 {
        stats
            .lines()
            .find_map(|l| l.strip_prefix(counted))
            .map_or(0, |n| n.trim().parse().unwrap())
    };
    let (_, before) = get(mesh.client_ports.stats, "/stats/prometheus")
        .await
        .unwrap();
    let response = mesh
        .client()
        .get("http://ratings.shop.svc.cluster.local:9080/ratings/0")
        .header("x-big", "b".repeat(70 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 431);
    let (_, after) = get(mesh.client_ports.stats, "/stats/prometheus")
        .await
        .unwrap();
    assert_eq!(count(&after), count(&before) + 1, "{after}");
}

/// HTTP/1 heads: request lines and headers from the mesh's own vocabulary
/// and beyond it, bare-LF lines, conflicting lengths, bodies, and random
/// bytes.
fn http1_heads() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::{collection::vec, prelude::*, sample::select};
    let token = || "[!-~]{0,12}";
    let method = prop_oneof![
        5 => select(vec!["GET", "POST", "PUT", "HEAD", "OPTIONS", "CONNECT", "DELETE", "PRI"])
            .prop_map(str::to_string),
        1 => token().prop_map(String::from),
    ];
    let target = prop_oneof![
        5 => select(vec![
            "http://ratings.shop.svc.cluster.local:9080/ratings/1",
            "http://reviews.shop.svc.cluster.local:9080/",
            "ratings.shop.svc.cluster.local:9080",
            "/",
            "*",
            "http://[::1]:9080/",
            "http://ratings.shop.svc.cluster.local:99999/",
            "http://ratings.shop.svc.cluster.local:9080/%zz/../..//",
        ])
        .prop_map(str::to_string),
        1 => "[ -~]{0,40}".prop_map(String::from),
    ];
    let version = prop_oneof![
        8 => Just("HTTP/1.1".to_string()),
        2 => select(vec!["HTTP/1.0", "HTTP/2.0", "HTTP/9.9", "http/1.1", ""])
            .prop_map(str::to_string),
        1 => token().prop_map(String::from),
    ];
    let name = prop_oneof![
        8 => select(vec![
            "host",
            "content-length",
            "transfer-encoding",
            "connection",
            "upgrade",
            "expect",
            "te",
            "authorization",
            "end-user",
            "x-request-id",
            "traceparent",
            "x-b3-traceid",
            "x-forwarded-for",
            "x-envoy-upstream-rq-timeout-ms",
            "cookie",
        ])
        .prop_map(str::to_string),
        1 => token().prop_map(String::from),
    ];
    let value = prop_oneof![
        8 => select(vec![
            "0",
            "5",
            "-1",
            "18446744073709551616",
            "chunked",
            "gzip, chunked",
            "close",
            "100-continue",
            "h2c",
            "Bearer a.b.c",
            "ratings.shop.svc.cluster.local:9080",
            "jason",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ])
        .prop_map(str::to_string),
        2 => "[ -~]{0,64}".prop_map(String::from),
        1 => "[ -~]{4096,9000}".prop_map(String::from),
    ];
    let eol = prop_oneof![6 => Just("\r\n"), 1 => Just("\n")];
    let structured = (
        method,
        target,
        version,
        vec((name, value), 0..5),
        eol,
        vec(any::<u8>(), 0..64),
    )
        .prop_map(|(method, target, version, headers, eol, body)| {
            let mut head = format!("{method} {target} {version}{eol}");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}{eol}"));
            }
            head.push_str(eol);
            let mut bytes = head.into_bytes();
            bytes.extend(body);
            bytes
        });
    prop_oneof![
        6 => structured,
        1 => vec(any::<u8>(), 0..512),
    ]
}
