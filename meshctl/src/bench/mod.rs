//! `meshctl bench`: benchmarks that measure ours against a baseline in the
//! same run and print their figures as JSON.

pub mod citadel;
pub mod galley;
pub mod mcp;
pub mod mixer;
pub mod pilot;
pub mod proxy;
pub mod topology;

use std::{path::Path, time::Duration};

/// Milliseconds with two decimals.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// Prints the figures, and writes them to `out` too when given.
fn report(figures: &serde_json::Value, out: Option<&Path>) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(figures)?;
    println!("{text}");
    if let Some(out) = out {
        std::fs::write(out, format!("{text}\n"))?;
    }
    Ok(())
}

/// A memory figure of `/proc/PID/status` (`VmRSS:`, `VmHWM:`), in bytes.
fn rss_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

/// CPU seconds (user and system) of a process, from `/proc/PID/stat`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)?.unwrap_or(100) as f64;
    Ok((ticks(11) + ticks(12)) / hz)
}

/// Waits until the component `child` answers `/ready` on `admin`; an error
/// if it exits first or takes longer than `limit`.
async fn wait_ready(
    name: &str,
    child: &mut tokio::process::Child,
    admin: std::net::SocketAddr,
    limit: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let started = std::time::Instant::now();
    while !client
        .get(format!("http://{admin}/ready"))
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(
            child.try_wait()?.is_none(),
            "{name} exited before it was ready"
        );
        anyhow::ensure!(
            started.elapsed() < limit,
            "{name} not ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}
