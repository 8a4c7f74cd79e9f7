//! The MCP tools of `meshctl` against the project's own source and sink,
//! as real processes: the conformance suite in both roles, `watch` in both
//! connection directions.

use testkit::*;

const COLLECTIONS: &str =
    "istio/networking/v1alpha3/serviceentries,istio/networking/v1alpha3/virtualservices";

/// Starts a `meshctl mcp` command that prints `serving ... on ADDR` to
/// stderr, and returns it with that address.
async fn start_announcing(args: &[&str], announcement: &str) -> (Proc, String) {
    let mut proc = Proc::start("meshctl", &[&["mcp"], args].concat());
    let line = proc.stderr_until(announcement).await;
    let addr = line.rsplit(' ').next().unwrap().to_string();
    (proc, addr)
}

/// `meshctl mcp watch --listen`: a sink that sources dial.
async fn start_listening_sink(extra: &[&str]) -> (Proc, String) {
    let args = [
        &[
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--collections",
            COLLECTIONS,
        ],
        extra,
    ]
    .concat();
    start_announcing(&args, "serving ResourceSink").await
}

/// `meshctl mcp serve` on an OS-chosen port.
async fn start_serving_source(dir: &std::path::Path, extra: &[&str]) -> (Proc, String) {
    let args = [
        &[
            "serve",
            "--dir",
            dir.to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ],
        extra,
    ]
    .concat();
    start_announcing(&args, "serving ResourceSource").await
}

/// Runs `meshctl mcp conformance` with `args`; returns its success and report.
async fn conformance(args: &[&str]) -> (bool, String) {
    let mut check = Proc::start(
        "meshctl",
        &[&["mcp", "conformance", "--quiet-ms", "300"], args].concat(),
    );
    let lines = check.stdout_until(" passed, ").await;
    (check.exit().await.success(), lines.join("\n"))
}

async fn assert_conforms(args: &[&str]) {
    let (passed, report) = conformance(args).await;
    assert!(passed, "conformance failed:\n{report}");
    assert!(!report.contains("FAIL"), "{report}");
    assert!(
        report.lines().filter(|l| l.starts_with("PASS")).count() >= 6,
        "{report}"
    );
}

#[tokio::test]
async fn meshctl_mcp_serve_passes_source_conformance() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let (serve, addr) = start_serving_source(dir.path(), &[]).await;
    assert_conforms(&["--source", &addr, "--dir", dir.path().to_str().unwrap()]).await;
    let files: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        files,
        ["config.yaml"],
        "the checks leave the directory as they found it"
    );
    assert!(serve.terminate().await.success());
}

#[tokio::test]
async fn galley_passes_source_conformance() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let Galley {
        proc: galley, mcp, ..
    } = Galley::start(dir.path(), &[]).await;
    assert_conforms(&[
        "--source",
        &mcp.to_string(),
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(galley.terminate().await.success());
}

/// A source whose config the tool cannot edit: the checks that need a
/// change are skipped, and say why.
#[tokio::test]
async fn galley_passes_source_conformance_without_its_directory() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let Galley {
        proc: galley, mcp, ..
    } = Galley::start(dir.path(), &[]).await;
    let (passed, report) = conformance(&[
        "--source",
        &mcp.to_string(),
        "--collection",
        "istio/networking/v1alpha3/serviceentries",
    ])
    .await;
    assert!(passed, "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    let skipped: Vec<&str> = report.lines().filter(|l| l.starts_with("SKIP")).collect();
    assert_eq!(skipped.len(), 5, "{report}");
    assert!(skipped.iter().all(|l| l.contains("give --dir")), "{report}");
    assert!(galley.terminate().await.success());
}

/// A sink that dials, checked by a source that withholds its headers
/// until asked and then refuses one of the collections asked for.
#[tokio::test]
async fn pilot_passes_sink_conformance_when_it_dials() {
    let listen = free_addr().to_string();
    let mut check = Proc::start(
        "meshctl",
        &[
            "mcp",
            "conformance",
            "--quiet-ms",
            "300",
            "--listen",
            &listen,
        ],
    );
    check.stdout_until("serving ResourceSource").await;
    let _pilot = testkit::start_pilot(&listen, free_addr(), &[]);
    let report = check.stdout_until(" passed, ").await.join("\n");
    assert!(check.exit().await.success(), "{report}");
    assert!(!report.contains("FAIL"), "{report}");
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("PASS  rule 8") && l.contains("left out")),
        "{report}"
    );
}

#[tokio::test]
async fn meshctl_mcp_watch_passes_sink_conformance() {
    let (watch, addr) = start_listening_sink(&[]).await;
    assert_conforms(&["--sink", &addr]).await;
    // Including Istio 1.1's dial-out trigger, answered first.
    let (_, report) = conformance(&["--sink", &addr]).await;
    assert!(
        report
            .lines()
            .any(|l| l.starts_with("PASS  rule 8") && l.contains("trigger")),
        "{report}"
    );
    assert!(watch.terminate().await.success());
}

#[tokio::test]
async fn conformance_fails_against_something_that_is_not_a_conforming_source() {
    // A sink is no source: the check must say so and exit non-zero.
    let (watch, addr) = start_listening_sink(&[]).await;
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let (passed, report) = conformance(&[
        "--source",
        &addr,
        "--dir",
        dir.path().to_str().unwrap(),
        "--timeout-ms",
        "2000",
    ])
    .await;
    assert!(!passed, "{report}");
    assert!(report.contains("FAIL"), "{report}");
    assert!(watch.terminate().await.success());
}

#[tokio::test]
async fn watch_prints_what_a_dialing_source_serves() {
    let (mut watch, sink) = start_listening_sink(&["--once", "--output", "json"]).await;
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let (serve, _) = start_serving_source(dir.path(), &["--dial-sink", &sink]).await;
    let mut updates = Vec::new();
    while updates.len() < 2 {
        updates.push(watch.stdout_until("collection").await.pop().unwrap());
    }
    assert!(
        watch.exit().await.success(),
        "--once exits after the first full state"
    );
    let entries = updates
        .iter()
        .find(|u| u.contains("serviceentries"))
        .unwrap();
    assert!(
        entries.contains(r#""name":"shop/ratings""#)
            && entries.contains(r#""name":"shop/reviews""#),
        "{entries}"
    );
    assert!(
        entries.contains(r#""hosts":["ratings.shop.svc.cluster.local"]"#),
        "{entries}"
    );
    let routes = updates
        .iter()
        .find(|u| u.contains("virtualservices"))
        .unwrap();
    assert!(routes.contains(r#""timeout":"2s""#), "{routes}");
    assert!(serve.terminate().await.success());
}
