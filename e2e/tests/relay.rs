//! A Galley that relays another (the primary): the primary's config reaches
//! the relay's sinks merged with the relay's own, the relay keeps serving
//! while the primary is away and catches up when it is back, in both
//! directions of MCP.

use serde_json::Value;
use testkit::{
    mcp_watch::{self, body, names, next_update, write},
    *,
};

const SERVICE_ENTRIES: &str = "istio/networking/v1alpha3/serviceentries";
const VIRTUAL_SERVICES: &str = "istio/networking/v1alpha3/virtualservices";
const WATCHED: &[&str] = &[SERVICE_ENTRIES, VIRTUAL_SERVICES];

fn entry(name: &str, host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: {name}, namespace: shop}}
spec:
  hosts: [{host}]
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 127.0.0.1}}]
"
    )
}

fn route(timeout: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - timeout: {timeout}
    route:
    - destination: {{host: reviews.shop.svc.cluster.local}}
"
    )
}

/// The primary's two entries and route, and the relay's own entries: one
/// only it has, one whose name the primary's shadows.
fn config() -> (tempfile::TempDir, tempfile::TempDir) {
    let primary = config_dir(&[
        (
            "reviews.yaml",
            &entry("reviews", "reviews.shop.svc.cluster.local"),
        ),
        (
            "ratings.yaml",
            &entry("ratings", "ratings.shop.svc.cluster.local"),
        ),
        ("routes.yaml", &route("2s")),
    ]);
    let relay = config_dir(&[
        (
            "local.yaml",
            &entry("local-only", "local-only.shop.svc.cluster.local"),
        ),
        ("clash.yaml", &entry("reviews", "reviews.elsewhere.example")),
    ]);
    (primary, relay)
}

/// What a sink of the relay holds at first: the merge.
async fn assert_merged(sink: &mut Proc) {
    let entries = next_update(sink, SERVICE_ENTRIES).await;
    assert_eq!(
        names(&entries),
        ["shop/local-only", "shop/ratings", "shop/reviews"]
    );
    assert_eq!(
        body(&entries, "shop/reviews")["hosts"][0],
        "reviews.shop.svc.cluster.local",
        "the primary wins a name clash"
    );
}

#[tokio::test]
async fn a_relay_dialling_its_primary_serves_the_merge_through_an_outage() {
    let (primary_dir, relay_dir) = config();
    let primary_mcp = free_addr();
    let primary = Galley::start_at(primary_dir.path(), primary_mcp, &[]).await;
    let follow = primary_mcp.to_string();
    let relay = Galley::start(relay_dir.path(), &["--follow", &follow]).await;
    let mut sink = mcp_watch::start(&relay.mcp.to_string(), WATCHED, false);
    assert_merged(&mut sink).await;
    let routes = next_update(&mut sink, VIRTUAL_SERVICES).await;
    assert_eq!(body(&routes, "shop/reviews")["http"][0]["timeout"], "2s");

    // The clash is reported where users look.
    let (_, page) = wait_for_http(relay.admin, "/debug/relay", |_, b| b.contains("serving")).await;
    let page: Value = serde_json::from_str(&page).unwrap();
    assert_eq!(page["serving"], true, "{page}");
    assert_eq!(
        page["collections"][SERVICE_ENTRIES]["shadowed"][0], "shop/reviews",
        "{page}"
    );
    assert_eq!(
        page["collections"]["k8s/core/v1/services"]["from"], "this cluster",
        "{page}"
    );
    let (_, config) = get(relay.admin, "/debug/config").await.unwrap();
    assert!(config.contains("shadowed by the primary"), "{config}");

    // An edit at the primary reaches the relay's sink as one update.
    write(primary_dir.path(), "routes.yaml", &route("3s"));
    let routes = next_update(&mut sink, VIRTUAL_SERVICES).await;
    assert_eq!(body(&routes, "shop/reviews")["http"][0]["timeout"], "3s");

    // The primary goes away: the relay keeps serving its last state, to
    // sinks already connected and to new ones alike.
    primary.proc.kill().await;
    let mut late = mcp_watch::start(&relay.mcp.to_string(), WATCHED, false);
    assert_merged(&mut late).await;
    let routes = next_update(&mut late, VIRTUAL_SERVICES).await;
    assert_eq!(body(&routes, "shop/reviews")["http"][0]["timeout"], "3s");
    let (status, ready) = get(relay.admin, "/ready").await.unwrap();
    assert_eq!(status, 200, "{ready}");

    // Edited while away, the primary comes back on its address: the relay
    // catches up.
    write(primary_dir.path(), "routes.yaml", &route("4s"));
    let primary = Galley::start_at(primary_dir.path(), primary_mcp, &[]).await;
    for sink in [&mut sink, &mut late] {
        let routes = next_update(sink, VIRTUAL_SERVICES).await;
        assert_eq!(body(&routes, "shop/reviews")["http"][0]["timeout"], "4s");
    }

    for proc in [sink, late, relay.proc, primary.proc] {
        assert!(proc.terminate().await.success());
    }
}

#[tokio::test]
async fn a_relay_serves_a_primary_that_dials_out() {
    let (primary_dir, relay_dir) = config();
    let listen = free_addr().to_string();
    let mut relay = Galley::spawn(relay_dir.path(), free_addr(), &["--follow-listen", &listen]);
    // Not ready, and serving nothing, until the primary has sent its state.
    wait_for_http(relay.admin, "/ready", |status, _| status == 503).await;
    let primary = Galley::start(primary_dir.path(), &["--sink-address", &listen]).await;
    relay.proc.ready(relay.admin).await;
    let mut sink = mcp_watch::start(&relay.mcp.to_string(), WATCHED, false);
    assert_merged(&mut sink).await;
    write(primary_dir.path(), "routes.yaml", &route("5s"));
    loop {
        let routes = next_update(&mut sink, VIRTUAL_SERVICES).await;
        if body(&routes, "shop/reviews")["http"][0]["timeout"] == "5s" {
            break;
        }
    }
    for proc in [sink, relay.proc, primary.proc] {
        assert!(proc.terminate().await.success());
    }
}

#[tokio::test]
async fn the_relay_passes_mcp_conformance_as_a_source_and_as_a_sink() {
    // The relay adds nothing of its own, so that what it serves is the
    // primary's directory, as the checks expect of a source.
    let (primary_dir, _) = config();
    let relay_dir = config_dir(&[]);
    let primary = Galley::start(primary_dir.path(), &[]).await;
    let follow = primary.mcp.to_string();
    let relay = Galley::start(relay_dir.path(), &["--follow", &follow]).await;
    // As a source: the checks edit the primary's directory and watch the
    // edits come out of the relay.
    let source = relay.mcp.to_string();
    let dir = primary_dir.path().to_str().unwrap();
    let report = run_ok(
        "meshctl",
        &["mcp", "conformance", "--source", &source, "--dir", dir],
    );
    assert!(!report.contains("FAIL"), "{report}");

    // As a sink, for a primary that dials out.
    let listen = free_addr().to_string();
    let sink = Galley::spawn(relay_dir.path(), free_addr(), &["--follow-listen", &listen]);
    let listening = async {
        while tokio::net::TcpStream::connect(&listen).await.is_err() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(30), listening)
        .await
        .expect("the relay listens for its primary");
    let report = run_ok("meshctl", &["mcp", "conformance", "--sink", &listen]);
    assert!(!report.contains("FAIL"), "{report}");
    for proc in [sink.proc, relay.proc, primary.proc] {
        assert!(proc.terminate().await.success());
    }
}

/// A counter of a Galley's `/metrics`, for `collection`.
async fn counter(galley: &Galley, metric: &str, collection: &str) -> u64 {
    let (_, text) = get(galley.admin, "/metrics").await.unwrap();
    let series = format!("galley_{metric}_total{{collection=\"{collection}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test]
async fn one_change_at_the_primary_is_one_small_update_at_the_relays_sinks() {
    // Fifty entries at the primary, one of which changes.
    let files: Vec<(String, String)> = (0..50)
        .map(|i| {
            let name = format!("svc-{i}");
            let host = format!("{name}.shop.svc.cluster.local");
            (format!("{name}.yaml"), entry(&name, &host))
        })
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let primary_dir = config_dir(&files);
    let relay_dir = config_dir(&[]);
    let primary = Galley::start(primary_dir.path(), &[]).await;
    let follow = primary.mcp.to_string();
    let relay = Galley::start(relay_dir.path(), &["--follow", &follow]).await;
    let mut sink = mcp_watch::start(&relay.mcp.to_string(), &[SERVICE_ENTRIES], false);
    assert_eq!(
        names(&next_update(&mut sink, SERVICE_ENTRIES).await).len(),
        50
    );
    let metrics = [
        "mcp_sink_responses_received",
        "mcp_sink_bytes_received",
        "mcp_source_responses_sent",
        "mcp_source_bytes_sent",
    ];
    let mut before = Vec::new();
    for metric in metrics {
        before.push(counter(&relay, metric, SERVICE_ENTRIES).await);
    }

    write(
        primary_dir.path(),
        "svc-7.yaml",
        &entry("svc-7", "moved.shop.svc.cluster.local"),
    );
    let update = next_update(&mut sink, SERVICE_ENTRIES).await;
    assert_eq!(
        body(&update, "shop/svc-7")["hosts"][0],
        "moved.shop.svc.cluster.local"
    );
    let mut after = Vec::new();
    for metric in metrics {
        after.push(counter(&relay, metric, SERVICE_ENTRIES).await);
    }
    // One response in from the primary, one out to the sink, each about
    // one entry's size: a fiftieth of the whole collection, with headroom.
    assert_eq!(after[0] - before[0], 1, "{before:?} -> {after:?}");
    assert_eq!(after[2] - before[2], 1, "{before:?} -> {after:?}");
    for (delta, whole) in [
        (after[1] - before[1], before[1]),
        (after[3] - before[3], before[3]),
    ] {
        assert!(
            delta * 10 < whole,
            "{delta} bytes of {whole}: not incremental"
        );
    }
    for proc in [sink, relay.proc, primary.proc] {
        assert!(proc.terminate().await.success());
    }
}

#[tokio::test]
async fn a_relay_still_waiting_for_its_primary_stops_cleanly() {
    let dir = config_dir(&[]);
    for mode in ["--follow", "--follow-listen"] {
        let nowhere = free_addr().to_string();
        let relay = Galley::spawn(dir.path(), free_addr(), &[mode, &nowhere]);
        // Up, and not ready: no primary has sent anything.
        let (status, _) = wait_for_http(relay.admin, "/ready", |_, _| true).await;
        assert_eq!(status, 503);
        let status = relay.proc.terminate().await;
        assert!(status.success(), "{mode}: {status}");
    }
}
