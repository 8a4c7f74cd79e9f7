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

#[tokio::test]
async fn pilot_bench_reaches_every_proxy_in_each_flavour_and_mode() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("pilot.json");
    let _ports = MESH_STARTING.lock().await;
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "pilot",
            "--services",
            "20",
            "--namespaces",
            "2",
            "--proxies",
            "24",
            "--baseline-proxies",
            "6",
            "--streams-per-connection",
            "5",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let runs = figures["runs"].as_array().unwrap();
    let mut seen = std::collections::BTreeSet::new();
    for run in runs {
        let key = (
            run["protocol"].as_str().unwrap().to_string(),
            run["streams_per_connection"].as_u64().unwrap(),
            run["proxies"].as_u64().unwrap(),
        );
        let proxies = key.2;
        // Every proxy was sent each type, the routes again after the
        // VirtualService change, and the endpoints after theirs, nothing
        // more: what the change did not touch is not resent.
        let initial = &run["responses_initial"];
        for t in ["CDS", "EDS", "LDS", "RDS"] {
            assert!(initial[t].as_u64().unwrap() >= proxies, "{t}: {run}");
        }
        let routes = &run["responses_after_virtual_service_change"];
        assert_eq!(routes["RDS"], proxies, "{run}");
        assert_eq!(routes["CDS"], 0, "{run}");
        assert_eq!(routes["EDS"], 0, "{run}");
        assert_eq!(routes["LDS"], 0, "{run}");
        let endpoints = &run["responses_after_endpoint_change"];
        assert_eq!(endpoints["EDS"], proxies, "{run}");
        assert_eq!(endpoints["CDS"], 0, "{run}");
        assert_eq!(endpoints["RDS"], 0, "{run}");
        assert_eq!(endpoints["LDS"], 0, "{run}");
        let change = run["ms_from_virtual_service_change_until_every_proxy_acked"]
            .as_f64()
            .unwrap();
        let beyond = run["ms_beyond_debounce_virtual_service_change"]
            .as_f64()
            .unwrap();
        assert!((change - beyond - 100.0).abs() < 0.01, "{run}");
        assert!(run["peak_rss_bytes"].as_u64().unwrap() > 0, "{run}");
        // The routes change moves megabytes of routes; the endpoint
        // change's responses are a sliver of them.
        let responses = &run["megabytes_of_responses"];
        let routes_mb = responses["virtual_service_change"].as_f64().unwrap();
        assert!(routes_mb > 0.0, "{run}");
        assert!(
            responses["endpoint_change"].as_f64().unwrap() < routes_mb,
            "{run}"
        );
        if key.0 == "sotw" {
            // A state-of-the-world ACK repeats every endpoint name.
            let acks = run["megabytes_of_requests"]["endpoint_change"].as_f64();
            assert!(acks > responses["endpoint_change"].as_f64(), "{run}");
        }
        let floor = &run["ms_to_move_those_bytes_over_one_loopback_connection"];
        assert!(
            floor["virtual_service_change"].as_f64().unwrap() > 0.0,
            "{run}"
        );
        seen.insert(key);
    }
    let expected: std::collections::BTreeSet<_> = ["sotw", "delta"]
        .into_iter()
        .flat_map(|p| [1, 5].map(|s| (p, s)))
        .flat_map(|(p, s)| [6, 24].map(|n| (p.to_string(), s, n)))
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(figures["rss_per_proxy"].as_array().unwrap().len(), 4);
}

#[tokio::test]
async fn clusters_bench_times_an_edit_to_both_clusters_last_ack() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("clusters.json");
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "clusters",
            "--proxies",
            "6",
            "--edits",
            "3",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let times = &figures["edit_to_last_ack_ms"];
    let ms = |path: &str, key: &str| times[path][key].as_f64().unwrap();
    for cluster in ["within_the_primary_cluster", "in_the_cluster_that_follows"] {
        // Every edit went through Galley's and Pilot's debounces.
        assert!(ms(cluster, "p50") > 0.0, "{figures}");
        assert!(ms(cluster, "max") >= ms(cluster, "p50"), "{figures}");
    }
    let relay = "follower_minus_primary";
    assert!(ms(relay, "max") >= ms(relay, "p50"), "{figures}");
    for galley in ["primary_galley", "relay_galley"] {
        assert!(
            figures[galley]["rss_bytes"].as_u64().unwrap() > 0,
            "{figures}"
        );
    }
}

/// Tracing's cost, timed against a cluster without it: every edit of the
/// traced cluster is a trace from Galley's reload (reload, MCP push, apply,
/// Pilot's rebuild) to each sidecar's ACK, all received.
#[tokio::test]
async fn traces_bench_compares_a_traced_cluster_with_an_untraced_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("traces.json");
    let (proxies, edits) = (5u64, 2u64);
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "traces",
            "--proxies",
            &proxies.to_string(),
            "--edits",
            &edits.to_string(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for cluster in ["untraced", "traced"] {
        let times = &figures[cluster]["edit_to_last_ack_ms"];
        assert!(times["p50"].as_f64().unwrap() > 0.0, "{figures}");
        assert!(
            figures[cluster]["pilot_rss_bytes"].as_u64().unwrap() > 0,
            "{figures}"
        );
    }
    let spans = figures["spans_exported_over_the_edits"].as_u64().unwrap();
    assert!(spans >= edits * (4 + proxies), "{figures}");
}

/// The chaos benchmark, short and slow: every control-plane process of the
/// split topology killed in turn, Citadel's CA rotated, config edited ten
/// times a second, certificates renewing every few seconds and a proxy
/// restarted; no request fails but those to the restarted proxy's app.
#[tokio::test]
async fn chaos_bench_holds_the_load_through_every_fault() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("chaos.json");
    let _ports = MESH_STARTING.lock().await;
    let bench = Proc::start(
        "meshctl",
        &[
            "bench",
            "chaos",
            "--topology",
            "split",
            "--duration",
            "20s",
            "--rate",
            "40",
            "--cert-ttl",
            "6s",
            // Each second apart, so that a failure says when it came.
            "--window",
            "1s",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    bench.exit_ok().await;
    let figures: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let f = &figures["split"];
    assert_eq!(f["failed_otherwise"], 0, "{f}");
    assert!(f["requests_sent"].as_u64().unwrap() > 500, "{f}");
    let faults = f["faults"].as_array().unwrap();
    // Six control-plane processes and the proxy, each back and ready.
    assert_eq!(faults.len(), 7, "{f}");
    assert!(
        faults
            .iter()
            .all(|x| x["ready_again_ms"].as_f64().unwrap() > 0.0),
        "{f}"
    );
    assert!(
        faults
            .iter()
            .any(|x| x["what"].as_str().unwrap().contains("CA rotated")),
        "{f}"
    );
    assert!(f["config_edits"].as_u64().unwrap() >= 100, "{f}");
    // Seven proxies, each renewing at half of a 6 s life over 20 s.
    assert!(
        f["certificates_issued_during_run"].as_u64().unwrap() >= 14,
        "{f}"
    );
    assert!(f["rss"]["pilot"]["end_bytes"].as_u64().unwrap() > 0, "{f}");
}
