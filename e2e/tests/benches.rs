//! The benchmarks run end to end, briefly, on the real binaries, and their
//! figures hold together: what a benchmark quotes must be what happened.

use testkit::*;

#[tokio::test]
async fn mixer_bench_figures_account_for_every_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mixer.json");
    let _ports = MESH_STARTING.lock().await;
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "mixer",
            "--duration",
            "300ms",
            "--rate",
            "500",
            "--concurrency",
            "4",
            "--batch",
            "10",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for variant in ["mixer", "no_rules"] {
        let v = &figures["variants"][variant];
        assert_eq!(v["check_at_rate"]["requests"], 150, "{v}");
        assert_eq!(v["check_at_rate"]["failed"], 0, "{v}");
        assert!(v["check_max"]["per_second"].as_f64().unwrap() > 0.0, "{v}");
        // Mixer received every bag sent.
        assert_eq!(v["report"]["bags_received"], v["report"]["bags"], "{v}");
    }
    let with_rules = &figures["variants"]["mixer"];
    // Requests 0, 50 and 100 are jason's, and the denier matches only his
    // requests to ratings: request 100.
    assert_eq!(with_rules["check_at_rate"]["denied"], 1, "{with_rules}");
    assert_eq!(
        figures["variants"]["no_rules"]["check_at_rate"]["denied"],
        0
    );
    // The standard telemetry counted every bag once in istio_requests_total.
    assert_eq!(
        with_rules["report"]["istio_requests_total"],
        with_rules["report"]["bags"]
    );
    assert_eq!(
        figures["variants"]["no_rules"]["report"]["istio_requests_total"],
        0.0
    );
}

#[tokio::test]
async fn proxy_bench_measures_every_path_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("proxy.json");
    let _ports = MESH_STARTING.lock().await;
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "proxy",
            "--duration",
            "200ms",
            "--rate",
            "200",
            "--concurrency",
            "4",
            "--no-nginx",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let scenarios = &figures["scenarios"];
    for name in [
        "direct",
        "one_proxy",
        "two_proxies_mtls",
        "bookinfo_direct",
        "bookinfo",
    ] {
        let s = &scenarios[name];
        assert!(s["max_per_second"].as_f64().unwrap() > 0.0, "{name}: {s}");
        assert!(
            s["p99_ms"].as_f64().unwrap() >= s["p50_ms"].as_f64().unwrap(),
            "{name}: {s}"
        );
    }
    // The proxies' own processes are measured.
    for name in ["one_proxy", "two_proxies_mtls", "bookinfo"] {
        assert!(
            scenarios[name]["peak_rss_bytes"].as_u64().unwrap() > 0,
            "{name}"
        );
        assert!(scenarios[name].get("added_p90_ms").is_some(), "{name}");
    }
}

#[tokio::test]
async fn topology_bench_measures_both_topologies_through_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("topology.json");
    // Its meshes pick ports as `meshctl up --ephemeral-ports` does.
    let _ports = MESH_STARTING.lock().await;
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "topology",
            "--edits",
            "2",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for (topology, processes) in [("split", 6), ("monolith", 1)] {
        let f = &figures[topology];
        assert_eq!(f["control_plane_processes"], processes, "{f}");
        assert!(f["control_plane_rss_bytes"].as_u64().unwrap() > 0, "{f}");
        assert!(f["start_to_all_ready_ms"].as_f64().unwrap() > 0.0, "{f}");
        let edit = &f["edit_to_last_proxy_ack_ms"];
        assert!(
            edit["p50"].as_f64().unwrap() <= edit["max"].as_f64().unwrap(),
            "{f}"
        );
        let kill = &f["galley_killed"];
        assert_eq!(kill["failed_requests"], 0, "{f}");
        assert!(kill["requests"].as_u64().unwrap() > 0, "{f}");
        assert!(
            kill["killed_process_ready_again_ms"].as_f64().unwrap() > 0.0,
            "{f}"
        );
    }
}
