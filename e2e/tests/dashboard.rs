//! `meshctl dashboard` in headless Chromium against a running Bookinfo
//! mesh: the graph shows productpage to reviews to ratings with live
//! rates over mTLS, a denied request is an error on its edge, an edit a
//! proxy NACKs shows on that proxy's row with the reason, and a click on a
//! proxy shows its listeners, routes, clusters and endpoints. The
//! screenshot is kept in `target/test-artifacts/dashboard.png`.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use envoy_types::pb::{
    envoy::{
        config::core::v3::Node,
        service::discovery::v3::{
            DiscoveryRequest, aggregated_discovery_service_client::AggregatedDiscoveryServiceClient,
        },
    },
    google::rpc::Status as RpcStatus,
};
use serde_json::{Value, json};
use testkit::{browser::Browser, *};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};

/// An xDS client that plays an older proxy: it takes Pilot's first
/// clusters and refuses every later push, as a proxy refuses what it
/// does not understand.
const OLD_PROXY: &str = "sidecar~127.0.0.1~old-proxy-0.bookinfo~bookinfo.svc.cluster.local";
const REFUSAL: &str = "this proxy predates the edit";

async fn old_proxy(xds: String) {
    let mut client = AggregatedDiscoveryServiceClient::connect(format!("http://{xds}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    let request = |version: &str, nonce: &str, refused: bool| DiscoveryRequest {
        node: Some(Node {
            id: OLD_PROXY.into(),
            ..Default::default()
        }),
        type_url: mesh_api::xds::CLUSTER.into(),
        version_info: version.into(),
        response_nonce: nonce.into(),
        error_detail: refused.then(|| RpcStatus {
            code: 3,
            message: REFUSAL.into(),
            details: Vec::new(),
        }),
        ..Default::default()
    };
    tx.send(request("", "", false)).await.unwrap();
    let mut responses = client
        .stream_aggregated_resources(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut taken = String::new();
    while let Some(Ok(response)) = responses.next().await {
        let refused = !taken.is_empty();
        if !refused {
            taken = response.version_info.clone();
        }
        let answer = request(&taken, &response.nonce, refused);
        if tx.send(answer).await.is_err() {
            return;
        }
    }
}

/// The dashboard's graph edges, as its SVG holds them.
const EDGES: &str = "return [...document.querySelectorAll('#graph g.edge')].map(g => ({
    source: g.dataset.source, destination: g.dataset.destination,
    rps: Number(g.dataset.rps), error_rate: Number(g.dataset.errorRate),
    security: g.dataset.security, drawn_as_error: g.classList.contains('errors')}))";

fn edge<'a>(edges: &'a Value, source: &str, destination: &str) -> Option<&'a Value> {
    edges
        .as_array()?
        .iter()
        .find(|e| e["source"] == source && e["destination"] == destination)
}

/// The address of `name`'s port of purpose `purpose` in `meshctl up`'s
/// table.
fn table_addr(table: &[Vec<&str>], name: &str, purpose: &str) -> String {
    table
        .iter()
        .find(|r| r[0] == name)
        .and_then(|r| {
            r.iter()
                .find_map(|f| f.strip_prefix(&format!("{purpose}=")))
        })
        .unwrap_or_else(|| panic!("{name} {purpose}"))
        .to_string()
}

/// Bookinfo's traffic at productpage's sidecar until `stop`: everyone,
/// and, a third of the time, mallory, whom the denier refuses details.
fn bookinfo_traffic(productpage: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut n = 0u32;
        while !stop.load(Ordering::Relaxed) {
            let mut request = client.get(format!("http://{productpage}/productpage"));
            if n.is_multiple_of(3) {
                request = request.header("end-user", "mallory");
            }
            let _ = request.send().await;
            n += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

/// `meshctl dashboard` with `mesh` (where the mesh is) on an OS-chosen
/// port, scraping every 500 ms over a 10 s window; its URL.
async fn start_dashboard(mesh: &[&str]) -> (Proc, String) {
    let args = [
        &["dashboard", "--listen", "127.0.0.1:0"][..],
        &["--scrape-interval", "500ms", "--rate-window", "10s"],
        mesh,
    ]
    .concat();
    let mut dashboard = Proc::start("meshctl", &args);
    let url = dashboard
        .stdout_until("dashboard: ")
        .await
        .iter()
        .find_map(|l| l.strip_prefix("dashboard: "))
        .unwrap()
        .to_string();
    (dashboard, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_mesh_live_in_headless_chromium() {
    let (browser, (up, lines)) =
        tokio::join!(Browser::start(), meshctl_up(&["--topology", "split"]));
    let table = up_table(&lines);
    let addr = |name: &str, purpose: &str| table_addr(&table, name, purpose);
    let control = lines
        .iter()
        .find_map(|l| l.strip_prefix("control: "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let config: std::path::PathBuf = lines
        .iter()
        .find_map(|l| l.strip_prefix("config: "))
        .unwrap()
        .trim()
        .into();
    let (dashboard, url) = start_dashboard(&["--control", &control]).await;
    tokio::spawn(old_proxy(addr("pilot", "xds")));

    let stop = Arc::new(AtomicBool::new(false));
    let traffic = bookinfo_traffic(addr("productpage-v1-proxy", "inbound"), stop.clone());

    browser.goto(&url).await;
    let edges = browser
        .wait_for(
            "productpage -> reviews -> ratings over mTLS, and details' denials",
            &format!(
                "const edges = (() => {{ {EDGES} }})();
                 const e = (s, d) => edges.find(x => x.source === s && x.destination === d);
                 const live = (x) => x && x.rps > 0 && x.security === 'mTLS';
                 const denied = e('productpage', 'details');
                 return live(e('productpage', 'reviews')) && live(e('reviews', 'ratings'))
                     && denied && denied.error_rate > 0 && denied.drawn_as_error ? edges : null;"
            ),
            WAIT,
        )
        .await;
    let reviews = edge(&edges, "productpage", "reviews").unwrap();
    assert_eq!(reviews["error_rate"], 0.0, "{edges}");
    assert_eq!(reviews["drawn_as_error"], false, "{edges}");
    // A third of productpage's calls to details are mallory's, refused.
    let details = edge(&edges, "productpage", "details").unwrap();
    let rate = details["error_rate"].as_f64().unwrap();
    assert!((0.15..0.55).contains(&rate), "{details}");
    // Requests from outside the mesh reach productpage in plaintext.
    let outside = edge(&edges, "unknown", "productpage").unwrap();
    assert_eq!(outside["security"], "plaintext", "{edges}");
    // Live: the rates are read again as the page refreshes.
    let refreshes = |b: Value| b.as_str().and_then(|s| s.parse::<u32>().ok()).unwrap_or(0);
    let before = refreshes(
        browser
            .execute("return document.body.dataset.refreshes", json!([]))
            .await,
    );
    browser
        .wait_for(
            "another refresh",
            &format!("return Number(document.body.dataset.refreshes) > {before}"),
            Duration::from_secs(10),
        )
        .await;
    // Each service's golden signals are plotted.
    let plotted = browser
        .execute(
            "return [...document.querySelectorAll('#signals .service')].map(s => s.dataset.service)",
            json!([]),
        )
        .await;
    for service in ["productpage", "reviews", "ratings", "details"] {
        assert!(
            plotted.as_array().unwrap().contains(&json!(service)),
            "{plotted}"
        );
    }

    // The control plane, ready; no config problem; every sidecar's
    // certificate.
    let components = browser
        .execute(
            "return [...document.querySelectorAll('#components tr.component')].map(r => r.innerText)",
            json!([]),
        )
        .await;
    assert_eq!(components.as_array().unwrap().len(), 6, "{components}");
    assert!(
        components
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c.as_str().unwrap().contains("ready"))
    );
    // `meshctl up`'s names say what each is: no kind beside them.
    let named = browser
        .execute(
            "return [...document.querySelectorAll('#components tr.component')].every(r => r.cells[0].innerText === r.dataset.name)",
            json!([]),
        )
        .await;
    assert_eq!(named, json!(true), "{components}");
    let problems = browser
        .execute(
            "return document.querySelector('#problems').innerText",
            json!([]),
        )
        .await;
    assert_eq!(problems.as_str().map(str::trim), Some("none"));
    let certificates = browser
        .execute(
            "return [...document.querySelectorAll('#certificates tr.certificate')].map(r => r.innerText)",
            json!([]),
        )
        .await;
    // Citadel's root first, then the seven proxies'.
    let certificates = certificates.as_array().unwrap();
    assert_eq!(certificates.len(), 8, "{certificates:?}");
    assert!(
        certificates[0]
            .as_str()
            .unwrap()
            .contains("root CA of cluster.local"),
        "{certificates:?}"
    );
    assert!(
        certificates[1..]
            .iter()
            .all(|c| c.as_str().unwrap().contains("spiffe://cluster.local/ns/")),
        "{certificates:?}"
    );

    // An edit the old proxy refuses: its row says so, with its reason;
    // the mesh's own proxies took it.
    let file = config.join("destination-rules.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace(
        "  - {name: v3, labels: {version: v3}}\n",
        "  - {name: v3, labels: {version: v3}}\n  - {name: v4, labels: {version: v4}}\n",
    );
    assert_ne!(edited, text, "reviews' subsets");
    std::fs::write(&file, edited).unwrap();
    let refused = browser
        .wait_for(
            "the old proxy's NACK on its row",
            &format!(
                "const row = [...document.querySelectorAll('#proxies tr.proxy')].find(r => r.dataset.node === '{OLD_PROXY}');
                 const cds = row && row.querySelector('td[data-type=CDS]');
                 return cds && cds.innerText.includes('NACK') ? cds.innerText : null;"
            ),
            WAIT,
        )
        .await;
    assert_eq!(refused, format!("STALE (NACK: {REFUSAL})"));
    browser
        .wait_for(
            "productpage's proxy SYNCED after the edit",
            "const row = document.querySelector('#proxies tr.proxy[data-name=\"productpage-v1-proxy\"]');
             return row && [...row.querySelectorAll('td.sync')].every(td => td.innerText === 'SYNCED');",
            WAIT,
        )
        .await;

    // A click on productpage's proxy shows what it holds.
    browser
        .click("#proxies tr.proxy[data-name=\"productpage-v1-proxy\"]")
        .await;
    let held = browser
        .wait_for(
            "productpage's listeners, routes, clusters and endpoints",
            "const rows = (t) => [...document.querySelectorAll(`#proxy-detail table[data-table=${t}] tbody tr`)].map(r => r.innerText);
             const held = {listeners: rows('listeners'), routes: rows('routes'), clusters: rows('clusters'), endpoints: rows('endpoints')};
             return Object.values(held).every(r => r.length > 0) ? held : null;",
            WAIT,
        )
        .await;
    let clusters = held["clusters"].to_string();
    assert!(
        clusters.contains("outbound|9080|v1|reviews.bookinfo.svc.cluster.local"),
        "{clusters}"
    );
    assert!(
        held["endpoints"].to_string().contains("127.0.0.1:"),
        "{held}"
    );

    let artifacts = bin("meshctl")
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = browser.screenshot(&artifacts.join("dashboard.png")).await;
    eprintln!("screenshot: {}", shot.display());

    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    drop(browser);
    assert!(dashboard.terminate().await.success());
    assert!(up.terminate().await.success());
}

/// A mesh the dashboard is given by address, as on Kubernetes through
/// `kubectl port-forward`, not by `meshctl up`'s table: each component is
/// told by its `/version`, one that does not answer is listed NOT READY,
/// the graph comes from the telemetry Mixer's Prometheus port, every Pilot
/// replica's proxies are listed (with their Pilot) whether or not their
/// admin port was given, and only a given one's config can be opened.
#[tokio::test]
async fn a_mesh_given_by_address_is_shown_as_on_kubernetes() {
    let (up, lines) = meshctl_up(&["--topology", "split"]).await;
    let table = up_table(&lines);
    let addr = |name: &str, purpose: &str| table_addr(&table, name, purpose);
    // A second Pilot replica, with a proxy of its own.
    let xds = free_addr();
    let (mut replica, replica_admin) = start_pilot(addr("galley", "mcp"), xds, &[]);
    replica.ready(replica_admin).await;
    let (_replicas_proxy, _) = local_proxy(xds, &[]).await;
    let gone = free_addr().to_string();
    let mut args = vec![
        "--telemetry-metrics".to_string(),
        addr("mixer-telemetry", "metrics"),
        "--component".into(),
        format!("istio-ingressgateway={gone}"),
        "--component".into(),
        format!("istio-pilot-b={replica_admin}"),
    ];
    for (name, row) in [
        ("istio-galley", "galley"),
        ("istio-pilot", "pilot"),
        ("istio-citadel", "citadel"),
        ("istio-policy", "mixer-policy"),
        ("istio-telemetry", "mixer-telemetry"),
        ("productpage-v1", "productpage-v1-proxy"),
    ] {
        args.push("--component".into());
        args.push(format!("{name}={}", addr(row, "admin")));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (dashboard, url) = start_dashboard(&args).await;
    let at: std::net::SocketAddr = url
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .parse()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = bookinfo_traffic(addr("productpage-v1-proxy", "inbound"), stop.clone());

    let (_, body) = wait_for_http(at, "/api/state", |status, body| {
        let Ok(state) = serde_json::from_str::<Value>(body) else {
            return false;
        };
        let edge = |s: &str, d: &str| {
            state["graph"].as_array().is_some_and(|edges| {
                edges.iter().any(|e| {
                    e["source"] == s && e["destination"] == d && e["rps"].as_f64() > Some(0.0)
                })
            })
        };
        status == 200 && edge("productpage", "reviews") && edge("reviews", "ratings")
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    traffic.await.unwrap();
    let state: Value = serde_json::from_str(&body).unwrap();

    let components = state["components"].as_array().unwrap();
    let component = |name: &str| {
        components
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("{name} in {components:?}"))
    };
    for (name, kind) in [
        ("istio-galley", "galley"),
        ("istio-pilot", "pilot"),
        ("istio-pilot-b", "pilot"),
        ("istio-citadel", "citadel"),
        ("istio-policy", "mixer"),
        ("istio-telemetry", "mixer"),
    ] {
        assert_eq!(component(name)["component"], kind, "{components:?}");
        assert_eq!(component(name)["ready"], true, "{components:?}");
    }
    assert_eq!(component("istio-ingressgateway")["ready"], false);
    assert_eq!(
        components.len(),
        7,
        "the proxy is not a component: {components:?}"
    );

    // Every proxy each Pilot serves; only the given one's config and
    // certificate can be read.
    let proxies = state["proxies"].as_array().unwrap();
    let on = |pilot: &str| proxies.iter().filter(|p| p["pilot"] == pilot).count();
    assert_eq!(
        (on("istio-pilot"), on("istio-pilot-b")),
        (7, 1),
        "{proxies:?}"
    );
    let given: Vec<&Value> = proxies.iter().filter(|p| p["admin"] == true).collect();
    assert_eq!(given.len(), 1, "{proxies:?}");
    assert_eq!(given[0]["name"], "productpage-v1");
    assert!(
        given[0]["sync"]
            .as_object()
            .unwrap()
            .values()
            .all(|s| s == "SYNCED"),
        "{given:?}"
    );
    assert!(given[0]["certificate"].is_object(), "{given:?}");
    let ours = concat!("mesh-proxy/", env!("CARGO_PKG_VERSION"));
    assert_eq!(given[0]["version"], ours, "{given:?}");
    let reviews = proxies
        .iter()
        .find(|p| {
            p["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("reviews-v1"))
        })
        .unwrap_or_else(|| panic!("reviews-v1 by its pod in {proxies:?}"));
    assert_eq!(reviews["admin"], false);

    let (status, dump) = get(at, "/api/proxy/productpage-v1").await.unwrap();
    assert_eq!(status, 200);
    assert!(dump.contains("outbound|9080|v1|reviews.bookinfo.svc.cluster.local"));
    let (status, why) = get(at, "/api/proxy/reviews-v1").await.unwrap();
    assert_eq!(status, 404, "{why}");
    assert!(why.contains("runs no \"reviews-v1\""), "{why}");

    assert!(dashboard.terminate().await.success());
    assert!(up.terminate().await.success());
}
