//! Every component binary starts, serves its admin port (`/healthz`,
//! `/ready`, `/metrics`) and stops cleanly on SIGTERM; sinks come up before
//! their source and become ready once it appears.

use testkit::*;

/// The admin endpoints answer as documented, and SIGTERM stops the process
/// with status 0.
async fn check_admin_and_stop(proc: Proc, admin: std::net::SocketAddr) {
    let (status, body) = wait_for_http(admin, "/healthz", |s, _| s == 200).await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (_, ready) = wait_for_http(admin, "/ready", |s, _| s == 200).await;
    assert_eq!(ready, "ready\n");
    let (status, metrics) = get(admin, "/metrics").await.unwrap();
    assert_eq!(status, 200);
    assert!(
        metrics.ends_with("# EOF\n"),
        "OpenMetrics text ends with # EOF: {metrics}"
    );
    let status = proc.terminate().await;
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        get(admin, "/healthz").await.is_none(),
        "admin port closed after exit"
    );
}

#[tokio::test]
async fn the_injector_serves_admin_and_stops_on_sigterm() {
    let admin = free_addr();
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) = webhook_certificate(certs.path());
    let webhook = free_addr().to_string();
    let proc = Proc::start(
        "sidecar-injector",
        &[
            "--admin-addr",
            &admin.to_string(),
            "--webhook-addr",
            &webhook,
            "--webhook-cert",
            cert.to_str().unwrap(),
            "--webhook-key",
            key.to_str().unwrap(),
        ],
    );
    check_admin_and_stop(proc, admin).await;
}

#[tokio::test]
async fn a_proxy_without_pilot_is_alive_not_ready_and_stops_when_asked() {
    let admin = free_addr();
    let pilot = free_addr().to_string();
    let proc = Proc::start(
        "proxy",
        &[
            "--admin-addr",
            &admin.to_string(),
            "--pilot",
            &pilot,
            "--stats-addr",
            "127.0.0.1:0",
            "--health-addr",
            "127.0.0.1:0",
        ],
    );
    let (_, body) = wait_for_http(admin, "/ready", |s, _| s == 503).await;
    assert!(body.contains("xds-synced"), "{body}");
    assert_eq!(get(admin, "/healthz").await.unwrap().0, 200);
    // The log level changes while running; a bad one is refused.
    install_crypto();
    let http = reqwest::Client::new();
    let set = |level: &str| {
        http.post(format!("http://{admin}/logging?level={level}"))
            .send()
    };
    assert_eq!(set("debug").await.unwrap().status(), 200);
    let bad = set("proxy=loud").await.unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.text().await.unwrap().contains("proxy=loud"));
    // Envoy's way to stop a proxy.
    let quit = reqwest::Client::new()
        .post(format!("http://{admin}/quitquitquit"))
        .send()
        .await
        .unwrap();
    assert_eq!(quit.status(), 200);
    let status = proc.exit().await;
    assert!(status.success(), "exit after /quitquitquit: {status}");
}

#[tokio::test]
async fn citadel_serves_admin_and_its_root_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let ca_dir = dir.path().join("ca");
    let mut proc = Proc::start(
        "citadel",
        &[
            "--admin-addr",
            &admin.to_string(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--ca-dir",
            &ca_dir.display().to_string(),
        ],
    );
    proc.ready(admin).await;
    // The root is on the admin port as it is in the CA directory.
    let (status, page) = get(admin, "/debug/root").await.unwrap();
    assert_eq!(status, 200);
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let root = std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap();
    assert_eq!(page["root_cert"], root.as_str());
    check_admin_and_stop(proc, admin).await;
}

#[tokio::test]
async fn sinks_started_before_galley_become_ready_when_it_arrives() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let mcp = free_addr();
    let (pilot_admin, policy_admin, telemetry_admin, galley_admin) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let mcp_arg = mcp.to_string();
    let pilot = Proc::start(
        "pilot",
        &[
            "--mcp-server",
            &mcp_arg,
            "--xds-addr",
            "127.0.0.1:0",
            "--admin-addr",
            &pilot_admin.to_string(),
        ],
    );
    let policy = Proc::start(
        "mixer",
        &[
            "--role",
            "policy",
            "--mcp-server",
            &mcp_arg,
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            &policy_admin.to_string(),
        ],
    );
    let telemetry = Proc::start(
        "mixer",
        &[
            "--role",
            "telemetry",
            "--mcp-server",
            &mcp_arg,
            "--grpc-addr",
            "127.0.0.1:0",
            "--prometheus-addr",
            "127.0.0.1:0",
            "--admin-addr",
            &telemetry_admin.to_string(),
        ],
    );

    // No Galley yet: alive, not ready, and saying why.
    for admin in [pilot_admin, policy_admin, telemetry_admin] {
        let (status, body) = wait_for_http(admin, "/ready", |s, _| s == 503).await;
        assert_eq!(status, 503);
        assert!(body.contains("mcp-synced"), "{body}");
        assert_eq!(get(admin, "/healthz").await.unwrap().0, 200);
    }

    let galley = Proc::start(
        "galley",
        &[
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--mcp-addr",
            &mcp_arg,
            "--admin-addr",
            &galley_admin.to_string(),
        ],
    );
    for admin in [pilot_admin, policy_admin, telemetry_admin] {
        wait_for_http(admin, "/ready", |s, _| s == 200).await;
    }
    let (_, metrics) = get(pilot_admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains(
            r#"pilot_mcp_sink_resources{collection="istio/networking/v1alpha3/serviceentries"} 2"#
        ),
        "pilot holds both service entries: {metrics}"
    );
    let (_, metrics) = get(galley_admin, "/metrics").await.unwrap();
    assert!(
        metrics.contains("galley_mcp_source_acks_total"),
        "{metrics}"
    );

    check_admin_and_stop(pilot, pilot_admin).await;
    check_admin_and_stop(policy, policy_admin).await;
    check_admin_and_stop(telemetry, telemetry_admin).await;
    check_admin_and_stop(galley, galley_admin).await;
}

#[tokio::test]
async fn a_component_that_cannot_start_exits_with_a_clear_error() {
    let mut galley = Proc::start(
        "galley",
        &[
            "--config-dir",
            "/nonexistent/mesh-config",
            "--mcp-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ],
    );
    let line = galley.stderr_until("nonexistent").await;
    assert!(line.contains("/nonexistent/mesh-config"), "{line}");
    assert!(!galley.exit().await.success());
}

#[tokio::test]
async fn the_monolith_refuses_what_it_cannot_host_and_stops_with_a_failed_component() {
    let mut unknown = Proc::start("monolith", &["istiod"]);
    let line = unknown.stderr_until("istiod").await;
    assert!(line.contains("is not a component"), "{line}");
    assert!(!unknown.exit().await.success());

    // Pilot's flag is wrong: the message is its binary's.
    let mut bad_flag = Proc::start("monolith", &["pilot", "--xds-addr", "nowhere"]);
    bad_flag
        .stderr_until("invalid value 'nowhere' for '--xds-addr")
        .await;
    assert!(!bad_flag.exit().await.success());

    // Galley cannot start: the rest stop too, and the error names it.
    let mut failing = Proc::start(
        "monolith",
        &[
            "galley",
            "--config-dir",
            "/nonexistent/mesh-config",
            "--mcp-addr",
            "mem://galley",
            "--admin-addr",
            "127.0.0.1:0",
            "--",
            "pilot",
            "--mcp-server",
            "mem://galley",
            "--xds-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
        ],
    );
    failing.stderr_until("galley failed").await;
    failing.stderr_until("/nonexistent/mesh-config").await;
    assert!(!failing.exit().await.success());
}

#[tokio::test]
async fn galley_serves_the_mesh_config_and_dials_sinks() {
    let dir = config_dir(&[("config.yaml", SAMPLE_CONFIG)]);
    let mesh_dir = config_dir(&[(
        "mesh.yaml",
        "disablePolicyChecks: false\ndefaultConfig:\n  discoveryAddress: pilot:15010\n",
    )]);
    let mesh = mesh_dir.path().join("mesh.yaml");
    let mut watch = Proc::start(
        "meshctl",
        &[
            "mcp",
            "watch",
            "--listen",
            "127.0.0.1:0",
            "--output",
            "json",
            "--collections",
            "istio/mesh/v1alpha1/MeshConfig",
        ],
    );
    let line = watch.stderr_until("serving ResourceSink").await;
    let sink = line.rsplit(' ').next().unwrap().to_string();
    let admin = free_addr();
    let mut galley = Proc::start(
        "galley",
        &[
            "--config-dir",
            dir.path().to_str().unwrap(),
            "--mesh-config",
            mesh.to_str().unwrap(),
            "--mcp-addr",
            "127.0.0.1:0",
            "--sink-address",
            &sink,
            "--admin-addr",
            &admin.to_string(),
        ],
    );
    let first = watch.stdout_until("meshconfig").await.pop().unwrap();
    assert!(
        first.contains(r#""name":"istio-system/meshconfig""#),
        "{first}"
    );
    assert!(
        first.contains(r#""discoveryAddress":"pilot:15010""#),
        "{first}"
    );
    assert!(
        first.contains(r#""proxyAdminPort":15000"#),
        "defaults fill the rest: {first}"
    );
    assert!(
        !first.contains("disablePolicyChecks"),
        "false, as the file says: {first}"
    );

    // An edit reaches the sink; a broken edit is reported and changes nothing.
    std::fs::write(&mesh, "disablePolicyChecks: true\n").unwrap();
    let second = watch.stdout_until("meshconfig").await.pop().unwrap();
    assert!(second.contains(r#""disablePolicyChecks":true"#), "{second}");
    std::fs::write(&mesh, "disablePolicyChecks: [not a bool]\n").unwrap();
    let error = galley.stderr_until("mesh config not updated").await;
    assert!(error.contains("disablePolicyChecks"), "{error}");
    std::fs::write(&mesh, "disablePolicyChecks: true\nproxyListenPort: 15002\n").unwrap();
    let third = watch.stdout_until("meshconfig").await.pop().unwrap();
    assert!(third.contains(r#""proxyListenPort":15002"#), "{third}");
    assert!(galley.terminate().await.success());
    assert!(watch.terminate().await.success());
}

#[tokio::test]
async fn proxy_init_prints_the_rules_it_would_apply() {
    let mut init = Proc::start(
        "proxy",
        &[
            "init",
            "--dry-run",
            "--inbound-ports",
            "9080",
            "--exclude-outbound-ip-ranges",
            "169.254.169.254/32",
        ],
    );
    let lines = init.stdout_until("COMMIT").await;
    assert!(init.exit().await.success());
    for line in [
        "-A ISTIO_INBOUND -p tcp --dport 9080 -j ISTIO_IN_REDIRECT",
        "-A ISTIO_OUTPUT -d 169.254.169.254/32 -j RETURN",
        "-A ISTIO_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
    ] {
        assert!(lines.iter().any(|l| l == line), "no {line:?} in {lines:#?}");
    }
    let mut bad = Proc::start("proxy", &["init", "--dry-run", "--inbound-ports", "web"]);
    let error = bad.stderr_until("--inbound-ports").await;
    assert!(error.contains("\"web\" is not a port number"), "{error}");
    assert!(!bad.exit().await.success());
}
