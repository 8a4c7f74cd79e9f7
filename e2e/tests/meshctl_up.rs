//! `meshctl up` starts every component, as its own process or all in one
//! (the monolith), waits until all are ready, prints where they listen, and
//! stops them all on SIGTERM.

use std::net::SocketAddr;

use testkit::*;

#[tokio::test]
async fn split_starts_a_process_per_component_and_stops_them_on_sigterm() {
    let pids = up_and_down("split").await;
    let distinct: std::collections::BTreeSet<_> = pids.iter().collect();
    assert_eq!(distinct.len(), pids.len(), "a process each: {pids:?}");
}

#[tokio::test]
async fn monolith_runs_every_component_in_one_process_and_stops_it_on_sigterm() {
    let pids = up_and_down("monolith").await;
    assert!(pids.iter().all(|&p| p == pids[0]), "one process: {pids:?}");
}

/// The binary of a component in the split topology.
fn name_binary(name: &str) -> &str {
    name.strip_prefix("mixer-").map_or(name, |_| "mixer")
}

/// Brings the mesh up in `topology`, checks every component's row and
/// readiness, stops it, and returns the components' pids.
async fn up_and_down(topology: &str) -> Vec<u32> {
    let (up, lines) = meshctl_up(&["--topology", topology, "--no-sample"]).await;
    let rows = up_table(&lines);
    let names: Vec<&str> = rows.iter().map(|fields| fields[0]).collect();
    assert_eq!(
        names,
        [
            "galley",
            "pilot",
            "mixer-policy",
            "mixer-telemetry",
            "citadel",
            "sidecar-injector"
        ]
    );

    let mut pids = Vec::new();
    for fields in &rows {
        pids.push(fields[1].parse::<u32>().unwrap());
        assert_eq!(fields[2], "yes");
        let admin: SocketAddr = fields[3].strip_prefix("admin=").unwrap().parse().unwrap();
        assert_eq!(
            get(admin, "/ready").await,
            Some((200, "ready\n".to_string())),
            "{fields:?}"
        );
    }
    assert!(pids.iter().all(|&p| alive(p)));

    // Every component says its version on its admin port, and in the
    // monolith, which binary hosts it.
    let control = lines
        .iter()
        .find_map(|l| l.strip_prefix("control: "))
        .and_then(|l| l.split_whitespace().next())
        .expect("the control address");
    let out = std::process::Command::new(bin("meshctl"))
        .args(["version", "--remote", "--control", control, "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let versions: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mesh = versions["mesh"].as_array().unwrap();
    assert_eq!(mesh.len(), names.len(), "{versions}");
    for (c, name) in mesh.iter().zip(&names) {
        let binary = match topology {
            "monolith" => "monolith",
            _ => name_binary(name),
        };
        assert_eq!(c["name"], *name, "{versions}");
        assert_eq!(c["version"], versions["client"], "{versions}");
        assert_eq!(c["binary"], binary, "{versions}");
    }

    let status = up.terminate().await;
    assert!(
        status.success(),
        "meshctl up exits 0 after SIGTERM: {status}"
    );
    assert!(pids.iter().all(|&p| !alive(p)), "every component stopped");
    pids
}

/// A component whose port is taken for a moment is started again until it
/// binds; one whose port stays taken ends the start with its name.
#[tokio::test]
async fn a_component_that_cannot_start_is_tried_again_then_named() {
    let bin_dir = bin("meshctl").parent().unwrap().to_path_buf();
    let up = || {
        Proc::start(
            "meshctl",
            &["up", "--no-sample", "--bin-dir", bin_dir.to_str().unwrap()],
        )
    };
    // Galley's admin port, on the default ports.
    let _starting = MESH_STARTING.lock().await;
    let held = std::net::TcpListener::bind("127.0.0.1:15014").unwrap();
    let mut failing = up();
    failing
        .stderr_until("galley exited before it was ready, 3 times")
        .await;
    assert!(!failing.exit().await.success());

    let mut recovering = up();
    recovering
        .stderr_until("galley exited before it was ready")
        .await;
    drop(held);
    recovering.stdout_until("mesh ready").await;
    assert!(recovering.terminate().await.success());
}

/// `meshctl up` killed outright takes its processes with it: none is left
/// holding ports.
#[tokio::test]
async fn killing_meshctl_up_leaves_no_process_behind() {
    let (up, lines) = meshctl_up(&[]).await;
    let pids: Vec<u32> = up_table(&lines)
        .iter()
        .map(|fields| fields[1].parse().unwrap())
        .collect();
    // The control plane, six apps with their sidecars, and the ingress gateway.
    assert_eq!(pids.len(), 19, "{lines:#?}");
    up.kill().await;
    let deadline = std::time::Instant::now() + WAIT;
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            std::time::Instant::now() < deadline,
            "left running: {pids:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
