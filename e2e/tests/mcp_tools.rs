//! The MCP tools of `meshctl` against the project's own source and sink,
//! as real processes: the conformance suite in both roles, `watch` in both
//! connection directions.

use e2e::*;

fn addr_from(line: &str) -> String {
    line.rsplit(' ').next().unwrap().to_string()
}

async fn conformance(args: &[&str]) {
    let mut check = Proc::start(
        "meshctl",
        &[&["mcp", "conformance", "--quiet-ms", "300"], args].concat(),
    );
    let lines = check.stdout_until(" passed, ").await;
    let status = check.exit().await;
    let report = lines.join("\n");
    assert!(status.success(), "conformance failed:\n{report}");
    assert!(!report.contains("FAIL"), "{report}");
    assert!(
        report.lines().filter(|l| l.starts_with("PASS")).count() >= 6,
        "{report}"
    );
}

#[tokio::test]
async fn meshctl_mcp_serve_passes_source_conformance() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let mut serve = Proc::start(
        "meshctl",
        &[
            "mcp",
            "serve",
            "--dir",
            dir.path().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
        ],
    );
    let addr = addr_from(&serve.stderr_until("serving ResourceSource").await);
    conformance(&["--source", &addr, "--dir", dir.path().to_str().unwrap()]).await;
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
    let (mcp, admin) = (free_addr(), free_addr());
    let galley = Proc::start(
        "galley",
        &[
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--mcp-addr",
            &mcp.to_string(),
            "--admin-addr",
            &admin.to_string(),
        ],
    );
    wait_for_http(admin, "/ready", |s, _| s == 200).await;
    conformance(&[
        "--source",
        &mcp.to_string(),
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(galley.terminate().await.success());
}

#[tokio::test]
async fn meshctl_mcp_watch_passes_sink_conformance() {
    let mut watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--collections",
            "istio/networking/v1alpha3/serviceentries,istio/networking/v1alpha3/virtualservices",
        ],
    );
    let addr = addr_from(&watch.stderr_until("serving ResourceSink").await);
    conformance(&["--sink", &addr]).await;
    assert!(watch.terminate().await.success());
}

#[tokio::test]
async fn conformance_fails_against_something_that_is_not_a_conforming_source() {
    // A sink is no source: the check must say so and exit non-zero.
    let mut watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--collections",
            "istio/networking/v1alpha3/serviceentries",
        ],
    );
    let addr = addr_from(&watch.stderr_until("serving ResourceSink").await);
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let check = Proc::start(
        "meshctl",
        &[
            "mcp",
            "conformance",
            "--source",
            &addr,
            "--dir",
            dir.path().to_str().unwrap(),
            "--timeout-ms",
            "2000",
        ],
    );
    assert!(!check.exit().await.success());
    assert!(watch.terminate().await.success());
}

#[tokio::test]
async fn watch_prints_what_a_dialing_source_serves() {
    let mut watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--once",
            "--output",
            "json",
            "--collections",
            "istio/networking/v1alpha3/serviceentries,istio/networking/v1alpha3/virtualservices",
        ],
    );
    let sink = addr_from(&watch.stderr_until("serving ResourceSink").await);
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let serve = Proc::start(
        "meshctl",
        &[
            "mcp",
            "serve",
            "--dir",
            dir.path().to_str().unwrap(),
            "--addr",
            "127.0.0.1:0",
            "--dial-sink",
            &sink,
        ],
    );
    let mut updates = Vec::new();
    while updates.len() < 2 {
        let line = watch.stdout_until("collection").await.pop().unwrap();
        updates.push(line);
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
