//! Galley as users run it: a watched config directory served over real
//! gRPC to sinks asking for full state and for incremental updates, with
//! invalid config refused and the last valid config kept.

use std::time::Instant;

use serde_json::Value;
use testkit::{
    mcp_watch::{self, body, names, next_update, write},
    *,
};

const SERVICE_ENTRIES: &str = "istio/networking/v1alpha3/serviceentries";
const VIRTUAL_SERVICES: &str = "istio/networking/v1alpha3/virtualservices";
const WATCHED: &[&str] = &[SERVICE_ENTRIES, VIRTUAL_SERVICES];

const EXTRA: &str = "apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: details, namespace: shop}
spec:
  hosts: [details.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 19082}}]
";

fn route(timeout: &str, weights: (u32, u32)) -> String {
    format!(
        "apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {{name: reviews, namespace: shop}}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  http:
  - timeout: {timeout}
    route:
    - {{destination: {{host: reviews.shop.svc.cluster.local}}, weight: {}}}
    - {{destination: {{host: ratings.shop.svc.cluster.local}}, weight: {}}}
",
        weights.0, weights.1
    )
}

#[tokio::test]
async fn directory_edits_reach_full_state_and_incremental_sinks() {
    let services: String = SAMPLE_CONFIG
        .split("---")
        .take(2)
        .collect::<Vec<_>>()
        .join("---");
    let dir = config_dir(&[
        ("services.yaml", &services),
        ("routes.yaml", &route("2s", (50, 50))),
    ]);
    let Galley {
        proc: galley,
        mcp,
        admin,
    } = Galley::start(dir.path(), &[]).await;
    let mut sinks = [
        mcp_watch::start(&mcp.to_string(), WATCHED, true),
        mcp_watch::start(&mcp.to_string(), WATCHED, false),
    ];
    for sink in &mut sinks {
        assert_eq!(
            names(&next_update(sink, SERVICE_ENTRIES).await),
            ["shop/ratings", "shop/reviews"]
        );
        assert_eq!(
            names(&next_update(sink, VIRTUAL_SERVICES).await),
            ["shop/reviews"]
        );
    }

    // Added file.
    let start = Instant::now();
    write(dir.path(), "extra.yaml", EXTRA);
    for sink in &mut sinks {
        assert_eq!(
            names(&next_update(sink, SERVICE_ENTRIES).await),
            ["shop/details", "shop/ratings", "shop/reviews"]
        );
    }
    // Edited file.
    write(dir.path(), "routes.yaml", &route("3s", (80, 20)));
    for sink in &mut sinks {
        let update = next_update(sink, VIRTUAL_SERVICES).await;
        assert_eq!(body(&update, "shop/reviews")["http"][0]["timeout"], "3s");
    }
    // Deleted file.
    std::fs::remove_file(dir.path().join("extra.yaml")).unwrap();
    for sink in &mut sinks {
        assert_eq!(
            names(&next_update(sink, SERVICE_ENTRIES).await),
            ["shop/ratings", "shop/reviews"]
        );
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed.as_secs() < 10,
        "three edits took {elapsed:?} to reach both sinks"
    );

    // An invalid edit is refused and reported; the last valid version stays.
    write(dir.path(), "routes.yaml", &route("4s", (60, 60)));
    let (_, page) = wait_for_http(admin, "/debug/config", |_, body| {
        body.contains("add up to 120")
    })
    .await;
    let page: Value = serde_json::from_str(&page).unwrap();
    let problem = page["problems"][0].as_str().unwrap();
    assert!(problem.contains("routes.yaml: document 1 (VirtualService shop/reviews): spec.http[0].route: destination weights add up to 120, not 100"), "{problem}");
    let (_, metrics) = get(admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("galley_config_rejected_objects 1"),
        "{metrics}"
    );

    // A broken YAML file beside them hides nothing, and the next valid edit
    // is what the sinks see next: the invalid one never reached them.
    write(dir.path(), "broken.yaml", "kind: [unterminated\n");
    write(dir.path(), "routes.yaml", &route("5s", (90, 10)));
    for sink in &mut sinks {
        let update = next_update(sink, VIRTUAL_SERVICES).await;
        assert_eq!(body(&update, "shop/reviews")["http"][0]["timeout"], "5s");
        assert_eq!(
            body(&update, "shop/reviews")["http"][0]["route"][0]["weight"],
            90
        );
    }
    let (_, page) = wait_for_http(admin, "/debug/config", |_, body| {
        body.contains("broken.yaml")
    })
    .await;
    assert!(page.contains("invalid YAML"), "{page}");
    assert!(
        page.contains(r#""istio/networking/v1alpha3/serviceentries":2"#),
        "{page}"
    );

    for sink in sinks {
        assert!(sink.terminate().await.success());
    }
    assert!(galley.terminate().await.success());
}

#[tokio::test]
async fn meshctl_validate_checks_files_offline() {
    let dir = config_dir(&[
        ("good.yaml", SAMPLE_CONFIG),
        ("bad.yaml", &route("1s", (70, 70))),
    ]);
    let good = dir.path().join("good.yaml");
    let mut ok = Proc::start("meshctl", &["validate", "-f", good.to_str().unwrap()]);
    ok.stdout_until("3 object(s) valid").await;
    assert!(ok.exit().await.success());

    let mut bad = Proc::start("meshctl", &["validate", "-f", dir.path().to_str().unwrap()]);
    let line = bad.stdout_until("weights").await.pop().unwrap();
    assert!(
        line.contains("bad.yaml: document 1 (VirtualService shop/reviews): spec.http[0].route"),
        "{line}"
    );
    assert!(!bad.exit().await.success());
}

const ENVOY_FILTER: &str = "\
apiVersion: networking.istio.io/v1alpha3
kind: EnvoyFilter
metadata: {name: lua, namespace: shop}
spec:
  filters:
  - {filterName: envoy.lua, filterType: HTTP, listenerMatch: {listenerType: SIDECAR_INBOUND}, filterConfig: {inlineCode: x}}
";

/// What the mesh accepts but does not honour is served, and the user is
/// told: by `meshctl validate` (which still succeeds), and by Galley's
/// `/debug/config` and `galley_config_warnings`, the mesh config file's
/// fields included.
#[tokio::test]
async fn ignored_fields_are_served_with_warnings_where_users_look() {
    let dir = config_dir(&[
        ("config.yaml", SAMPLE_CONFIG),
        ("filter.yaml", ENVOY_FILTER),
    ]);
    let mesh_dir = config_dir(&[("mesh.yaml", "enableTracing: false\n")]);
    let mesh = mesh_dir.path().join("mesh.yaml");

    let mut validate = Proc::start(
        "meshctl",
        &[
            "validate",
            "-f",
            dir.path().to_str().unwrap(),
            "--mesh-config",
            mesh.to_str().unwrap(),
        ],
    );
    let lines = validate.stdout_until("2 warning(s)").await;
    assert!(validate.exit().await.success(), "{lines:?}");
    assert!(
        lines.iter().any(|l| l.contains("filter.yaml")
            && l.contains(
                "(EnvoyFilter shop/lua): warning: spec: this mesh's Pilot does not apply"
            )),
        "{lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("mesh.yaml: warning: enableTracing: not honoured")),
        "{lines:?}"
    );

    let galley = Galley::start(dir.path(), &["--mesh-config", mesh.to_str().unwrap()]).await;
    let (_, page) = get(galley.admin, "/debug/config").await.unwrap();
    let page: Value = serde_json::from_str(&page).unwrap();
    let warnings = strings(&page["warnings"]);
    assert_eq!(warnings.len(), 2, "{page}");
    assert!(page["problems"].as_array().unwrap().is_empty(), "{page}");
    assert_eq!(
        page["served"]["istio/networking/v1alpha3/envoyfilters"], 1,
        "{page}"
    );
    let (_, metrics) = get(galley.admin, "/metrics").await.unwrap();
    assert!(metrics.contains("galley_config_warnings 2"), "{metrics}");
    assert!(galley.proc.terminate().await.success());
}

/// `n` ServiceEntries, each its own document, with names from `prefix`.
fn entries(prefix: &str, n: usize) -> String {
    (0..n)
        .map(|i| {
            format!(
                "apiVersion: networking.istio.io/v1alpha3\nkind: ServiceEntry\nmetadata: {{name: {prefix}{i}, namespace: shop}}\nspec:\n  hosts: [{prefix}{i}.example.com]\n  ports: [{{number: 80, name: http, protocol: HTTP}}]\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

/// A gauge of Galley's `/metrics`.
async fn files_over_limit(galley: &Galley, limit: &str) -> String {
    let (_, text) = get(galley.admin, "/metrics").await.unwrap();
    let series = format!("galley_config_files_over_limit{{limit=\"{limit}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in {text}"))
        .to_string()
}

#[tokio::test]
async fn a_generated_file_of_thousands_is_served_and_a_file_over_a_bound_is_named() {
    // 1,000 services with a DestinationRule each is 2,000 documents in
    // one file: served, as Istio's Galley serves it.
    let dir = config_dir(&[("generated.yaml", &entries("gen", 2_000))]);
    let galley = Galley::start(dir.path(), &["--max-file-documents", "2000"]).await;
    let mut sink = mcp_watch::start(&galley.mcp.to_string(), &[SERVICE_ENTRIES], false);
    assert_eq!(
        names(&next_update(&mut sink, SERVICE_ENTRIES).await).len(),
        2_000
    );
    assert_eq!(files_over_limit(&galley, "documents").await, "0");

    // One document more than the bound: the file is refused whole, named
    // where users look, and its last good objects stay served.
    write(dir.path(), "generated.yaml", &entries("gen", 2_001));
    write(dir.path(), "other.yaml", &entries("other", 1));
    let update = next_update(&mut sink, SERVICE_ENTRIES).await;
    assert_eq!(
        names(&update).len(),
        2_001,
        "the last good 2,000 and the other file's one"
    );
    let (_, page) = wait_for_http(galley.admin, "/debug/config", |_, b| {
        b.contains("more than 2000 YAML documents")
    })
    .await;
    assert!(page.contains("generated.yaml"), "{page}");
    assert_eq!(files_over_limit(&galley, "documents").await, "1");
    for proc in [sink, galley.proc] {
        assert!(proc.terminate().await.success());
    }
}
