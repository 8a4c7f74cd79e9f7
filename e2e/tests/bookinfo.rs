//! The README's main job, end to end: `meshctl up` (split and monolith)
//! brings up the control plane and Bookinfo with a proxy per workload, and
//! the walkthrough holds: routing by weight and by the `end-user` header,
//! an edit of the VirtualService file taking effect, plaintext refused by
//! a STRICT workload, the denier's 403, the quota's 429, and the standard
//! metrics on the telemetry Mixer. Then every control-plane process is
//! killed (`kill -9`) and one replaced by another binary (`meshctl
//! restart --binary`) while traffic flows: no request fails, and every
//! proxy is SYNCED again.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    time::{Duration, Instant},
};

use serde_json::Value;
use testkit::*;

/// A running `meshctl up`, and each component's addresses by purpose.
struct Up {
    proc: Proc,
    config: std::path::PathBuf,
    /// Where `meshctl status` and `meshctl restart` reach it.
    control: String,
    /// The certificate the ingress gateway serves HTTPS with.
    gateway_certificate: std::path::PathBuf,
    table: BTreeMap<String, BTreeMap<String, String>>,
}

impl Up {
    async fn start(topology: &str) -> Self {
        let (proc, lines) = meshctl_up(&["--topology", topology]).await;
        let config = lines
            .iter()
            .find_map(|l| l.strip_prefix("config: "))
            .expect("the config directory is printed")
            .trim()
            .into();
        let control = lines
            .iter()
            .find_map(|l| l.strip_prefix("control: "))
            .and_then(|l| l.split_whitespace().next())
            .expect("the control address is printed")
            .to_string();
        let gateway_certificate = lines
            .iter()
            .find_map(|l| l.strip_prefix("gateway certificate: "))
            .expect("the gateway's certificate is printed")
            .trim()
            .into();
        let table = up_table(&lines)
            .into_iter()
            .map(|fields| {
                let ports = fields[3..]
                    .iter()
                    .filter_map(|f| f.split_once('='))
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
                (fields[0].to_string(), ports)
            })
            .collect();
        Self {
            proc,
            config,
            control,
            gateway_certificate,
            table,
        }
    }

    /// Runs `meshctl ARGS --control <this mesh>`; its stdout.
    fn meshctl(&self, args: &[&str]) -> String {
        run_ok("meshctl", &[args, &["--control", &self.control]].concat())
    }

    /// `meshctl status`: each component's pid and readiness.
    fn status(&self) -> BTreeMap<String, (u32, bool)> {
        self.meshctl(&["status"])
            .lines()
            .skip(1)
            .map(|row| {
                let fields: Vec<&str> = row.split_whitespace().collect();
                let ready = fields[2] == "yes";
                (fields[0].to_string(), (fields[1].parse().unwrap(), ready))
            })
            .collect()
    }

    fn addr(&self, component: &str, purpose: &str) -> SocketAddr {
        self.table[component][purpose].parse().unwrap()
    }

    /// GET productpage through its sidecar, as `user`.
    async fn page(&self, user: Option<&str>) -> Value {
        install_crypto();
        let url = format!(
            "http://{}/productpage",
            self.addr("productpage-v1-proxy", "inbound")
        );
        let mut request = reqwest::Client::new().get(url);
        if let Some(user) = user {
            request = request.header("end-user", user);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), 200);
        serde_json::from_str(&response.text().await.unwrap()).unwrap()
    }
}

/// Polls `check` until it holds, for at most [`WAIT`].
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "{what}: not in time");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn walkthrough(topology: &str) {
    let up = Up::start(topology).await;

    // The shipped config is clean: Galley found nothing wrong with it.
    let (_, status) = get(up.addr("galley", "admin"), "/debug/config")
        .await
        .unwrap();
    let status: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["problems"], serde_json::json!([]), "{status}");

    // Everyone but jason is split between v1 (no stars) and v3 (red).
    let mut versions = BTreeMap::new();
    for _ in 0..40 {
        let page = up.page(None).await;
        assert_eq!(page["details"]["author"], "William Shakespeare", "{page}");
        let version = page["reviews"]["version"].as_str().unwrap().to_string();
        *versions.entry(version).or_insert(0) += 1;
    }
    assert_eq!(
        versions.keys().collect::<Vec<_>>(),
        ["v1", "v3"],
        "{versions:?}"
    );
    // From outside the mesh, through the ingress gateway: HTTP, and HTTPS
    // with the certificate `meshctl up` made, checked by the client.
    let gateway = up.addr("istio-ingressgateway", "http");
    let (status, page) = get(gateway, "/productpage").await.unwrap();
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("William Shakespeare"), "{page}");
    let (status, _) = get(gateway, "/not-bookinfo").await.unwrap();
    assert_eq!(status, 404);
    let pem = std::fs::read(&up.gateway_certificate).unwrap();
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&pem).unwrap()])
        .build()
        .unwrap();
    let port = up.addr("istio-ingressgateway", "https").port();
    let response = https
        .get(format!("https://localhost:{port}/productpage"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);

    // jason: v2, black stars from ratings.
    let page = up.page(Some("jason")).await;
    assert_eq!(page["reviews"]["version"], "v2", "{page}");
    assert_eq!(
        page["reviews"]["reviews"][0]["rating"]["color"], "black",
        "{page}"
    );

    // mallory: the denier refuses details.
    let page = up.page(Some("mallory")).await;
    let error = page["details"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("403") && error.contains("PERMISSION_DENIED:mallory may not see details"),
        "{page}"
    );

    // jason reads ratings five times in ten seconds, then 429.
    let mut refused = None;
    for _ in 0..6 {
        let page = up.page(Some("jason")).await;
        if let Some(error) = page["reviews"]["reviews"][0]["rating"]["error"].as_str() {
            refused = Some(error.to_string());
            break;
        }
    }
    let refused = refused.expect("the quota ran out");
    assert!(
        refused.contains("429") && refused.contains("RESOURCE_EXHAUSTED"),
        "{refused}"
    );

    // STRICT: reviews refuses a plaintext caller.
    let plaintext = get(up.addr("reviews-v1-proxy", "inbound"), "/reviews/0").await;
    assert!(plaintext.is_none(), "plaintext answered: {plaintext:?}");

    // The telemetry Mixer's metrics, as Istio labels them.
    let metrics = up.addr("mixer-telemetry", "metrics");
    eventually("istio_requests_total for reviews", async || {
        let text = get(metrics, "/metrics")
            .await
            .map(|(_, t)| t)
            .unwrap_or_default();
        text.lines().any(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains(r#"destination_service="reviews.bookinfo.svc.cluster.local""#)
                && l.contains(
                    r#"source_principal="cluster.local/ns/bookinfo/sa/bookinfo-productpage""#,
                )
                && l.contains(r#"connection_security_policy="mutual_tls""#)
                // What productpage's proxy said of it (x-istio-attributes).
                && l.contains(r#"source_workload="productpage-v1-0""#)
                && l.contains(r#"source_app="productpage""#)
                && l.contains(r#"source_version="v1""#)
                && l.contains(r#"response_code="200""#)
        })
    })
    .await;

    // Edit the routing file: all of reviews to v1.
    let file = up.config.join("virtual-services.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text
        .replace("subset: v1}, weight: 50", "subset: v1}, weight: 100")
        .replace("subset: v3}, weight: 50", "subset: v3}, weight: 0");
    assert_ne!(edited, text);
    std::fs::write(&file, edited).unwrap();
    let edited_at = Instant::now();
    eventually("the edited weights", async || {
        for _ in 0..10 {
            if up.page(None).await["reviews"]["version"] != "v1" {
                return false;
            }
        }
        true
    })
    .await;
    eprintln!(
        "{topology}: routing edit took effect within {:?}",
        edited_at.elapsed()
    );

    debugging_verbs(&up).await;
    assert!(up.proc.terminate().await.success());
}

/// `meshctl proxy-config`, `authn tls-check` and `describe` against the
/// running mesh, as istioctl 1.1 prints them where it has them.
async fn debugging_verbs(up: &Up) {
    let reviews = "reviews.bookinfo.svc.cluster.local";
    // productpage's sidecar: its clusters of reviews, by subset.
    let clusters = up.meshctl(&[
        "proxy-config",
        "clusters",
        "productpage-v1",
        "--fqdn",
        reviews,
    ]);
    let rows: Vec<Vec<&str>> = clusters
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows[0],
        ["SERVICE", "FQDN", "PORT", "SUBSET", "DIRECTION", "TYPE"],
        "{clusters}"
    );
    for subset in ["-", "v1", "v2", "v3"] {
        assert!(
            rows.contains(&vec![reviews, "9080", subset, "outbound", "EDS"]),
            "{subset}: {clusters}"
        );
    }
    let inbound = up.addr("productpage-v1-proxy", "inbound");
    let listeners = up.meshctl(&["pc", "listeners", "productpage-v1-proxy"]);
    let inbound_row = format!("{}     {}     HTTP", inbound.ip(), inbound.port());
    assert!(
        listeners.lines().any(|l| l.starts_with(&inbound_row)),
        "{listeners}"
    );
    let routes = up.meshctl(&["pc", "routes", "productpage-v1"]);
    assert!(
        routes.starts_with("NOTE: This output only contains routes loaded via RDS.\nNAME "),
        "{routes}"
    );
    // reviews-v2's address, as an endpoint of the v2 subset, healthy.
    let v2 = up.addr("reviews-v2-proxy", "inbound");
    let cluster = format!("outbound|9080|v2|{reviews}");
    let endpoints = up.meshctl(&["pc", "endpoints", "productpage-v1", "--cluster", &cluster]);
    let rows: Vec<Vec<&str>> = endpoints
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [vec![v2.to_string().as_str(), "HEALTHY", &cluster]],
        "{endpoints}"
    );
    let secret = up.meshctl(&["pc", "secret", "productpage-v1"]);
    let default = secret
        .lines()
        .find(|l| l.starts_with("default "))
        .unwrap_or_default();
    assert!(
        default.contains(" Cert Chain ") && default.contains(" true "),
        "{secret}"
    );
    let json: Value =
        serde_json::from_str(&up.meshctl(&["pc", "secret", "productpage-v1", "-o", "json"]))
            .unwrap();
    assert_eq!(
        json["certificate"]["identity"],
        "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
    );
    // The ingress gateway presents the credential its Gateway names,
    // which `meshctl up` made for 127.0.0.1.
    let secret = up.meshctl(&["pc", "secret", "istio-ingressgateway"]);
    let credential = secret
        .lines()
        .find(|l| l.starts_with("bookinfo-credential "))
        .unwrap_or_default();
    assert!(
        credential.contains(" ACTIVE ") && credential.contains(" true "),
        "{secret}"
    );
    let json: Value =
        serde_json::from_str(&up.meshctl(&["pc", "clusters", "productpage-v1", "-o", "json"]))
            .unwrap();
    assert!(
        json.as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == cluster),
        "{json}"
    );

    // Every service's port: STRICT servers, ISTIO_MUTUAL clients.
    let checks = up.meshctl(&["authn", "tls-check"]);
    let row = |checks: &str, service: &str| {
        checks
            .lines()
            .find(|l| l.starts_with(&format!("{service}.bookinfo.svc.cluster.local:9080 ")))
            .map(|l| l.split_whitespace().map(String::from).collect::<Vec<_>>())
            .unwrap_or_else(|| panic!("{service} in {checks}"))
    };
    assert_eq!(
        row(&checks, "reviews")[1..],
        ["OK", "mTLS", "mTLS", "default/", "reviews/bookinfo"]
    );
    // productpage's own policy lets the gateway's plaintext in.
    assert_eq!(
        row(&checks, "productpage")[1..4],
        ["OK", "HTTP/mTLS", "mTLS"]
    );

    // Why reviews routes as it does, and which subset reviews-v2's pod is.
    let service = up.meshctl(&["describe", "service", "reviews"]);
    assert!(
        service.contains("VirtualService: reviews.bookinfo (gateways mesh)"),
        "{service}"
    );
    assert!(
        service.contains("DestinationRule: reviews.bookinfo"),
        "{service}"
    );
    assert!(
        service.contains("Traffic policy TLS mode: ISTIO_MUTUAL"),
        "{service}"
    );
    let pod = up.meshctl(&["describe", "pod", "reviews-v2-0"]);
    assert!(pod.contains("Subsets: v1, v2 (this pod), v3"), "{pod}");
    assert!(pod.contains(&format!("(pod port {})", v2.port())), "{pod}");

    // Clients told to send ratings plaintext, while ratings is STRICT: the
    // conflict is named.
    let file = up.config.join("destination-rules.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    let edited = text.replace(
        "host: ratings.bookinfo.svc.cluster.local\n  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}",
        "host: ratings.bookinfo.svc.cluster.local\n  trafficPolicy: {tls: {mode: DISABLE}}",
    );
    assert_ne!(edited, text);
    std::fs::write(&file, edited).unwrap();
    eventually("ratings' conflict", async || {
        let checks = up.meshctl(&["authn", "tls-check", "ratings"]);
        row(&checks, "ratings")[1..4] == ["CONFLICT", "mTLS", "HTTP"]
    })
    .await;
}

/// Kills each of `victims` in turn (`kill -9`), then replaces each of
/// `upgraded` (component, binary) with a copy of its binary (`meshctl
/// restart --binary`), with Bookinfo's traffic flowing throughout.
async fn failures(topology: &str, victims: &[&str], upgraded: &[(&str, &str)]) {
    let up = std::sync::Arc::new(Up::start(topology).await);
    // Every workload has served before the first kill: Mixer's answers
    // are cached by then, as in a mesh that has been running.
    for _ in 0..20 {
        up.page(None).await;
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = tokio::spawn({
        let (up, stop) = (up.clone(), stop.clone());
        async move {
            let (mut sent, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let page = up.page(None).await;
                sent += 1;
                let rating = &page["reviews"]["reviews"][0]["rating"];
                if page["details"]["author"].is_null()
                    || page["reviews"]["version"].is_null()
                    || !rating["error"].is_null()
                {
                    failed.push(page);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (sent, failed)
        }
    });

    // Killed processes free their ports until started again: no other
    // mesh may probe for ports meanwhile.
    let restarting = MESH_STARTING.lock().await;
    for victim in victims {
        let (pid, _) = up.status()[*victim];
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        eventually(&format!("{victim} started again"), async || {
            let status = up.status();
            status.values().all(|(_, ready)| *ready) && status[*victim].0 != pid
        })
        .await;
    }

    // Upgrades: the same flags, another binary, one component at a time.
    let dir = tempfile::tempdir().unwrap();
    for (component, binary) in upgraded {
        let copy = dir.path().join(binary);
        if !copy.exists() {
            std::fs::copy(bin(binary), &copy).unwrap();
        }
        let (before, _) = up.status()[*component];
        let table = up.meshctl(&["restart", component, "--binary", copy.to_str().unwrap()]);
        assert!(
            table.lines().skip(1).all(|row| row.contains(" yes ")),
            "{table}"
        );
        let (after, ready) = up.status()[*component];
        assert!(
            ready && after != before,
            "{component}: pid {before} then {after}"
        );
        let exe = std::fs::read_link(format!("/proc/{after}/exe")).unwrap();
        assert_eq!(exe, copy, "{component} runs the new binary");
    }

    drop(restarting);

    // Every proxy takes Pilot's config again.
    eventually("every proxy SYNCED", async || {
        let out = std::process::Command::new(bin("meshctl"))
            .args([
                "proxy-status",
                "--pilot",
                &up.addr("pilot", "admin").to_string(),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let rows: Vec<&str> = text.lines().skip(1).collect();
        // Six sidecars and the ingress gateway, each saying what it is.
        let ours = concat!("mesh-proxy/", env!("CARGO_PKG_VERSION"));
        rows.len() == 7
            && rows
                .iter()
                .all(|r| r.matches("SYNCED").count() == 4 && r.ends_with(ours))
    })
    .await;

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (sent, failed) = traffic.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failed.len(),
        failed.first()
    );
    assert!(sent > 10, "only {sent} requests");
    eprintln!(
        "{topology}: {sent} requests, none failed, across {} kills and an upgrade",
        victims.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_or_upgrading_any_control_plane_process_loses_no_request_split() {
    failures(
        "split",
        &[
            "galley",
            "pilot",
            "mixer-policy",
            "mixer-telemetry",
            "citadel",
            "sidecar-injector",
        ],
        &[
            ("galley", "galley"),
            ("pilot", "pilot"),
            ("mixer-policy", "mixer"),
            ("mixer-telemetry", "mixer"),
            ("citadel", "citadel"),
            ("sidecar-injector", "sidecar-injector"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_or_upgrading_the_monolith_loses_no_request() {
    failures("monolith", &["galley"], &[("pilot", "monolith")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_works_through_the_proxies_split() {
    walkthrough("split").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bookinfo_works_through_the_proxies_monolith() {
    walkthrough("monolith").await;
}
