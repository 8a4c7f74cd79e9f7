//! `meshctl up` starts every component, as its own process or all in one
//! (the monolith), waits until all are ready, prints where they listen, and
//! stops them all on SIGTERM.

use std::net::SocketAddr;

use e2e::*;

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

/// Brings the mesh up in `topology`, checks every component's row and
/// readiness, stops it, and returns the components' pids.
async fn up_and_down(topology: &str) -> Vec<u32> {
    let bin_dir = bin("meshctl").parent().unwrap().to_path_buf();
    let starting = MESH_STARTING.lock().await;
    let mut up = Proc::start(
        "meshctl",
        &[
            "up",
            "--ephemeral-ports",
            "--topology",
            topology,
            "--no-sample",
            "--bin-dir",
            bin_dir.to_str().unwrap(),
        ],
    );
    let lines = up.stdout_until("mesh ready").await;
    drop(starting);

    let header = lines
        .iter()
        .position(|l| l.starts_with("COMPONENT"))
        .expect("a table of components");
    let rows: Vec<&String> = lines[header + 1..]
        .iter()
        .take_while(|l| !l.starts_with("control: "))
        .collect();
    let names: Vec<&str> = rows
        .iter()
        .map(|r| r.split_whitespace().next().unwrap())
        .collect();
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
    for row in &rows {
        let fields: Vec<&str> = row.split_whitespace().collect();
        pids.push(fields[1].parse::<u32>().unwrap());
        assert_eq!(fields[2], "yes");
        let admin: SocketAddr = fields[3].strip_prefix("admin=").unwrap().parse().unwrap();
        assert_eq!(
            get(admin, "/ready").await,
            Some((200, "ready\n".to_string())),
            "{row}"
        );
    }
    assert!(pids.iter().all(|&p| alive(p)));

    let status = up.terminate().await;
    assert!(
        status.success(),
        "meshctl up exits 0 after SIGTERM: {status}"
    );
    assert!(pids.iter().all(|&p| !alive(p)), "every component stopped");
    pids
}
