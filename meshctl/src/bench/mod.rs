//! `meshctl bench`: benchmarks that measure ours against a baseline in the
//! same run and print their figures as JSON.

pub mod chaos;
pub mod citadel;
pub mod clusters;
pub mod galley;
pub mod mcp;
pub mod mixer;
pub mod pilot;
pub mod proxy;
pub mod topology;
pub mod traces;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use component::cli::{Cli, Flags};

/// Milliseconds with two decimals.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 1e2
}

/// The `q` quantile of `sorted`, in milliseconds; 0 when it is empty.
fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    ms(sorted[((sorted.len() - 1) as f64 * q).round() as usize])
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

/// Where `component`, a row of `meshctl up`'s table, listens for `purpose`.
fn addr(
    rows: &[crate::up::control::Row],
    component: &str,
    purpose: &str,
) -> anyhow::Result<SocketAddr> {
    rows.iter()
        .find(|r| r.name == component)
        .and_then(|r| r.ports.iter().find(|(what, _)| what == purpose))
        .ok_or_else(|| anyhow::anyhow!("no {purpose} address for {component}"))?
        .1
        .parse()
        .map_err(|e| anyhow::anyhow!("{component} {purpose}: {e}"))
}

/// Serves `store` over MCP on a loopback port until `stop`, as Galley
/// would, for a component under benchmark to follow; the port.
async fn serve_mcp(
    store: std::sync::Arc<::mcp::Store>,
    stop: &component::CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    ::mcp::SourceServer::new(
        store,
        ::mcp::IncrementalPolicy::All,
        ::mcp::McpMetrics::default(),
        stop.clone(),
    )
    .spawn(listener);
    Ok(addr)
}

/// Raises this process's limit of open files to its hard limit: a
/// benchmark holds a connection per simulated proxy, and the components it
/// starts inherit the limit.
fn raise_open_files_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    Ok(())
}

/// How long a component may take to be ready under a benchmark's load.
const READY_LIMIT: Duration = Duration::from_secs(120);

/// Connections a bench's Pilot takes from one address: every simulated
/// proxy is on loopback.
const SIMULATED_PROXIES_MAX: usize = 1_000_000;

/// A component started for a benchmark, logging warnings only; killed
/// when dropped.
struct Component {
    child: tokio::process::Child,
    admin: SocketAddr,
}

impl Component {
    /// Starts `binary` (in `bins`) with `flags` and an admin port of its
    /// own, and waits until it is ready.
    async fn start<A: clap::Args>(
        bins: &Path,
        binary: &str,
        flags: Flags<Cli<A>>,
    ) -> anyhow::Result<Self> {
        Self::start_with_env(bins, binary, flags, &[]).await
    }

    /// [`Component::start`] with `env` set for it.
    async fn start_with_env<A: clap::Args>(
        bins: &Path,
        binary: &str,
        flags: Flags<Cli<A>>,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Self> {
        let admin = launch::free_addr()?;
        let args = flags.admin_addr(admin).log_level("warn").build()?;
        let mut child = launch::command(&crate::binaries::path(bins, binary)?, args)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {binary}: {e}"))?;
        launch::wait_ready(binary, &mut child, &launch::ready_url(admin), READY_LIMIT).await?;
        Ok(Self { child, admin })
    }

    /// Pilot following the MCP source at `mcp`, serving ADS on `xds`, with
    /// its `--debounce` when given.
    async fn pilot(
        bins: &Path,
        mcp: SocketAddr,
        xds: SocketAddr,
        debounce: Option<Duration>,
    ) -> anyhow::Result<Self> {
        Self::start(bins, "pilot", Self::pilot_flags(mcp, xds, debounce)).await
    }

    /// The flags of [`Component::pilot`].
    fn pilot_flags(
        mcp: SocketAddr,
        xds: SocketAddr,
        debounce: Option<Duration>,
    ) -> Flags<Cli<::pilot::PilotArgs>> {
        let mut flags = component::flags!(Cli<::pilot::PilotArgs> {
            args.mcp_server: mcp,
            args.xds_addr: xds,
        });
        if let Some(debounce) = debounce {
            let _names_the_field = |a: &::pilot::PilotArgs| a.debounce;
            flags = flags.push("debounce", humantime::format_duration(debounce));
        }
        // Every simulated proxy connects from 127.0.0.1: one peer address.
        let _names_the_field = |a: &::pilot::PilotArgs| a.server_limits.max_connections_per_peer;
        flags.push("max_connections_per_peer", SIMULATED_PROXIES_MAX)
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or_default()
    }

    /// Stops it as a deployment does, with SIGTERM (it closes its streams
    /// and flushes its spans), and waits; one still running 10 s later is
    /// killed, and that is an error.
    async fn terminate(&mut self) -> anyhow::Result<()> {
        let pid = nix::unistd::Pid::from_raw(self.pid() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            anyhow::bail!("process {pid} did not stop within 10 s of SIGTERM");
        }
        Ok(())
    }
}

/// Each sidecar's acknowledged version of `type_url`, from Pilot's
/// `/debug/syncz`; `None` while a sent version waits for its ACK.
async fn acked(
    client: &reqwest::Client,
    pilot: SocketAddr,
    type_url: &str,
) -> anyhow::Result<Vec<Option<String>>> {
    let text = client
        .get(format!("http://{pilot}/debug/syncz"))
        .send()
        .await?
        .text()
        .await?;
    let proxies: Vec<serde_json::Value> = serde_json::from_str(&text)?;
    Ok(proxies
        .iter()
        .filter(|p| {
            p["node"]
                .as_str()
                .is_some_and(|n| n.starts_with("sidecar~"))
        })
        .map(|p| {
            let t = &p["types"][type_url];
            let (sent, acked) = (t["sent_version"].as_str(), t["acked_version"].as_str());
            (sent == acked).then(|| acked.map(str::to_string)).flatten()
        })
        .collect())
}

/// Waits until all `proxies` sidecars have ACKed a version of `type_url`
/// other than those in `before`.
async fn delivered(
    client: &reqwest::Client,
    pilot: SocketAddr,
    type_url: &str,
    before: &[Option<String>],
    proxies: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(now) = acked(client, pilot, type_url).await
            && now.len() == proxies
            && now.iter().all(|v| v.is_some() && !before.contains(v))
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the edit did not reach every proxy in 60 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
