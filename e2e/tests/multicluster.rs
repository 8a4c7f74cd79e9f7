//! Two clusters on one machine, each `meshctl up` in a network namespace
//! of its own with its own addresses and control plane, in Istio 1.1's
//! multi-cluster model with gateways. Cluster A is the primary; cluster
//! B's Galley follows A's, and B runs the one Bookinfo workload A lacks,
//! ratings. Both Citadels sign under one root, each with its own
//! intermediate. Needs root (CI runs as root).

use std::time::Duration;

use testkit::{WAIT, bin, netns::Netns, up_table};

const A_IP: &str = "10.93.0.1";
const B_IP: &str = "10.93.0.2";

/// What A's config adds for B's ratings: the service by its `.global`
/// name, at B's gateway; and Bookinfo's ratings calls sent there.
fn ratings_in_b() -> String {
    format!(
        "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: ratings-global, namespace: bookinfo}}
spec:
  hosts: [ratings.bookinfo.global]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: {B_IP}, ports: {{http: 15443}}}}]
"
    )
}

/// The address `meshctl up` printed for `component`'s `port`.
fn port_of(lines: &[String], component: &str, port: &str) -> String {
    let rows = up_table(lines);
    let row = rows
        .iter()
        .find(|r| r[0] == component)
        .unwrap_or_else(|| panic!("{component} in {lines:#?}"));
    row[3..]
        .iter()
        .find_map(|p| p.strip_prefix(&format!("{port}=")))
        .unwrap_or_else(|| panic!("{component} {port} in {row:?}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clusters_share_config_and_call_each_other_through_their_gateways() {
    let a = Netns::new("cluster-a");
    let b = Netns::new("cluster-b");
    testkit::netns::link(&a, A_IP, &b, B_IP);
    let root = tempfile::tempdir().unwrap();
    let (state_a, state_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let bin_dir = bin("meshctl").parent().unwrap().display().to_string();
    let root_ca = root.path().display().to_string();
    let up = |ns: &Netns, state: &tempfile::TempDir, extra: &[&str]| {
        let state = state.path().display().to_string();
        let args = [
            &["up", "--bin-dir", &bin_dir, "--state-dir", &state][..],
            &["--root-ca", &root_ca, "--ready-timeout-secs", "120"],
            extra,
        ]
        .concat();
        ns.start("meshctl", &args, None)
    };

    // A: the primary, with Bookinfo but ratings.
    let mut up_a = up(
        &a,
        &state_a,
        &[
            "--cluster-address",
            A_IP,
            "--workloads",
            "productpage-v1,details-v1,reviews-v1,reviews-v2,reviews-v3",
        ],
    );
    let lines_a = up_a.stdout_until("mesh ready").await;
    let mcp_a = port_of(&lines_a, "galley", "mcp");
    assert!(mcp_a.starts_with(A_IP), "{mcp_a}");
    // B: follows A's Galley, runs ratings.
    let mut up_b = up(
        &b,
        &state_b,
        &["--follow", &mcp_a, "--workloads", "ratings-v1"],
    );
    let lines_b = up_b.stdout_until("mesh ready").await;
    let ratings_b_admin = port_of(&lines_b, "ratings-v1-proxy", "admin");
    let gateway_a = port_of(&lines_a, "istio-ingressgateway", "http");

    // Without B, A's reviews v2 gets no stars: ratings runs nowhere in A.
    let jason = [("end-user", "jason")];
    let (_, page) = a
        .wait_for(&gateway_a, "bookinfo", "/productpage", &jason, |s, _| {
            s == 200
        })
        .await;
    assert!(page.contains("\"error\""), "{page}");

    // An edit at A: ratings by its `.global` name, and Bookinfo's ratings
    // calls sent there.
    let config_a = state_a.path().join("config");
    std::fs::write(config_a.join("ratings-global.yaml"), ratings_in_b()).unwrap();
    let routes = config_a.join("virtual-services.yaml");
    let text = std::fs::read_to_string(&routes).unwrap();
    let local = "{destination: {host: ratings.bookinfo.svc.cluster.local, subset: v1}}";
    assert!(text.contains(local));
    let text = text.replace(local, "{destination: {host: ratings.bookinfo.global}}");
    std::fs::write(&routes, text).unwrap();

    // It reaches B's proxies through B's Galley.
    b.wait_for(&ratings_b_admin, "admin", "/config_dump", &[], |s, body| {
        s == 200 && body.contains("outbound|9080||ratings.bookinfo.global")
    })
    .await;

    // jason's reviews (v2, in A) now show ratings from B: A's sidecar
    // calls B's gateway on 15443, which passes the connection by its SNI
    // to ratings' sidecar. That sidecar takes mutual TLS only (Bookinfo's
    // MeshPolicy), so the answer proves mTLS across the two
    // intermediates.
    let stars = "\"stars\":{\"Reviewer1\":5,\"Reviewer2\":4}";
    let (_, page) = a
        .wait_for(&gateway_a, "bookinfo", "/productpage", &jason, |s, body| {
            s == 200 && body.contains(stars)
        })
        .await;
    assert!(page.contains("\"color\":\"black\""), "{page}");
    // A plaintext caller at B's gateway gets nothing through.
    assert_eq!(
        a.get(
            &format!("{B_IP}:15443"),
            "ratings.bookinfo.global",
            "/ratings/0",
            &[]
        ),
        None
    );

    // A's Galley down: its supervisor held, so that it stays down.
    let galley_a: u32 = up_table(&lines_a)
        .iter()
        .find(|r| r[0] == "galley")
        .unwrap()[1]
        .parse()
        .unwrap();
    signal(up_a.pid(), "STOP");
    signal(galley_a, "KILL");
    // Gone when its admin port no longer answers (unreaped, it lingers
    // as a zombie while its supervisor is held).
    let galley_a_admin = port_of(&lines_a, "galley", "admin");
    let deadline = std::time::Instant::now() + WAIT;
    while a.get(&galley_a_admin, "galley", "/ready", &[]).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "galley outlived kill -9"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // B keeps its last state and keeps serving: its Galley stays ready,
    // and the cross-cluster path still answers.
    let galley_b_admin = port_of(&lines_b, "galley", "admin");
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    while std::time::Instant::now() < deadline {
        assert_eq!(
            b.get(&galley_b_admin, "galley", "/ready", &[]).map(|r| r.0),
            Some(200)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, page) = a
        .wait_for(&gateway_a, "bookinfo", "/productpage", &jason, |s, _| {
            s == 200
        })
        .await;
    assert!(page.contains(stars), "{page}");
    // An edit while A's Galley is down.
    let later = ratings_in_b()
        .replace("ratings-global", "ratings-later")
        .replace("ratings.bookinfo.global", "ratings-later.bookinfo.global");
    std::fs::write(config_a.join("ratings-later.yaml"), later).unwrap();

    // A's Galley back: B catches up.
    signal(up_a.pid(), "CONT");
    b.wait_for(&ratings_b_admin, "admin", "/config_dump", &[], |s, body| {
        s == 200 && body.contains("ratings-later.bookinfo.global")
    })
    .await;
    assert!(
        tokio::time::timeout(WAIT, up_a.terminate()).await.is_ok()
            && tokio::time::timeout(WAIT, up_b.terminate()).await.is_ok()
    );
}

fn signal(pid: u32, name: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{name} {pid}");
}

/// What a cluster's Citadel needs to join others: `meshctl ca
/// intermediate` makes the root once and an intermediate per cluster.
#[test]
fn meshctl_makes_one_root_and_an_intermediate_per_cluster() {
    let root = tempfile::tempdir().unwrap();
    let clusters = tempfile::tempdir().unwrap();
    let read = |dir: &std::path::Path, file: &str| std::fs::read_to_string(dir.join(file)).unwrap();
    let mut cas = Vec::new();
    for name in ["cluster-a", "cluster-b"] {
        let out = clusters.path().join(name);
        testkit::run_ok(
            "meshctl",
            &[
                "ca",
                "intermediate",
                "--root-ca",
                root.path().to_str().unwrap(),
                "--out",
                out.to_str().unwrap(),
                "--name",
                name,
            ],
        );
        let chain = read(&out, "cert-chain.pem");
        let ca = read(&out, "ca-cert.pem");
        assert!(
            chain.starts_with(&ca),
            "the chain starts at the intermediate"
        );
        assert!(
            chain.ends_with(&read(&out, "root-cert.pem")),
            "and ends at the root"
        );
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(read(&out, "ca-key.pem").contains("PRIVATE KEY"));
        cas.push((ca, read(&out, "root-cert.pem")));
    }
    assert_ne!(cas[0].0, cas[1].0, "an intermediate each");
    assert_eq!(cas[0].1, cas[1].1, "one root");
    assert_eq!(cas[0].1, read(root.path(), "root-cert.pem"));
}
