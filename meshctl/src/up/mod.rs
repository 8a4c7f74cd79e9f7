//! `meshctl up`: the mesh on one machine. In the split topology each
//! control-plane component runs as its own process (its own binary, found
//! next to `meshctl`); in the monolith topology the `monolith` binary runs
//! them all in one process, with the same flags, MCP carried in memory.
//! Either way they listen on loopback with the colliding admin ports moved
//! apart; it waits until every component reports ready, prints where each
//! one listens, and on Ctrl-C or SIGTERM stops them all.

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

mod cluster;
pub mod control;
mod sample;
mod supervisor;

use clap::Args;
use component::{
    CancellationToken,
    cli::{Cli, Flags},
    flags, ports,
};
use tokio::sync::mpsc;

use self::{
    control::{Request, Row},
    supervisor::Supervisor,
};

#[derive(Debug, Args)]
pub struct UpArgs {
    /// Directory of config YAML for Galley to serve; the embedded default
    /// config when absent.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Where logs (and the default config) go; a temporary directory when
    /// absent, removed on exit.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Let the OS pick every port instead of the defaults, so that several
    /// meshes (or tests) can run side by side.
    #[arg(long)]
    pub ephemeral_ports: bool,
    /// Directory holding the component binaries; next to `meshctl` when absent.
    #[arg(long)]
    pub bin_dir: Option<PathBuf>,
    /// Give up if the mesh is not ready within this many seconds.
    #[arg(long, default_value_t = 60)]
    pub ready_timeout_secs: u64,
    /// A process per component, or all of them in one.
    #[arg(long, value_enum, default_value_t = Topology::Split)]
    pub topology: Topology,
    /// Leave out the sample application (Bookinfo and its proxies).
    #[arg(long)]
    pub no_sample: bool,
    /// Run only these of Bookinfo's workloads (`productpage-v1`,
    /// `details-v1`, `reviews-v1`..`reviews-v3`, `ratings-v1`), as a
    /// cluster that holds part of the application does.
    #[arg(long, value_delimiter = ',', conflicts_with = "no_sample")]
    pub workloads: Vec<String>,
    #[command(flatten)]
    pub cluster: cluster::ClusterArgs,
    /// Where `meshctl status` and `meshctl restart` reach this mesh.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub control_addr: SocketAddr,
    /// Lifetime of the certificates the sidecars and the gateway ask
    /// Citadel for; each is renewed at half its life.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "24h")]
    pub workload_cert_ttl: Duration,
}

impl UpArgs {
    /// A whole mesh on OS-chosen ports in a temporary directory, as the
    /// benchmarks run it.
    pub fn ephemeral(bin_dir: Option<PathBuf>, topology: Topology) -> Self {
        Self {
            config_dir: None,
            state_dir: None,
            ephemeral_ports: true,
            bin_dir,
            ready_timeout_secs: 120,
            topology,
            no_sample: false,
            workloads: Vec::new(),
            cluster: Default::default(),
            control_addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            workload_cert_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Topology {
    Split,
    Monolith,
}

/// The embedded config at the example files' own ports: Bookinfo and the
/// standard telemetry.
pub fn bookinfo_config() -> Vec<(String, String)> {
    sample::config(None)
}

/// Where Galley serves MCP inside the monolith.
const MEMORY_MCP: &str = "mem://galley";

/// One component to run.
struct Plan {
    name: String,
    /// Its binary, which is also a control-plane component's name in the
    /// monolith.
    binary: &'static str,
    args: Vec<String>,
    env: Vec<(&'static str, String)>,
    /// Where it says it is ready: a URL that answers 200.
    ready: String,
    /// The addresses it listens on, by purpose.
    ports: Vec<(&'static str, String)>,
}

impl Plan {
    /// A control-plane component, with `flags` its own: its admin port is
    /// where it says it is ready.
    fn component<A: clap::Args>(
        name: &str,
        binary: &'static str,
        flags: Flags<Cli<A>>,
        admin: SocketAddr,
        mut ports: Vec<(&'static str, String)>,
    ) -> anyhow::Result<Self> {
        let args = flags
            .admin_addr(admin)
            .build()
            .map_err(|e| anyhow::anyhow!("{name}'s flags: {e}"))?;
        ports.insert(0, ("admin", admin.to_string()));
        Ok(Self {
            name: name.into(),
            binary,
            args,
            env: Vec::new(),
            ready: launch::ready_url(admin),
            ports,
        })
    }
}

/// The control plane's addresses, as its clients (the proxies) need them.
struct ControlPlane {
    xds: SocketAddr,
    ca: SocketAddr,
    /// Citadel's root, once it has generated it.
    ca_root: PathBuf,
    /// The lifetime of the certificates proxies ask for.
    cert_ttl: Duration,
    policy: SocketAddr,
    telemetry: SocketAddr,
}

/// The mesh running: its processes, and each component with the index of
/// the process that hosts it.
struct Running {
    supervisor: Supervisor,
    components: Vec<(Plan, usize)>,
}

impl Running {
    fn rows(&self, only: Option<usize>) -> Vec<Row> {
        self.components
            .iter()
            .filter(|(_, process)| only.is_none_or(|o| o == *process))
            .map(|(plan, process)| Row {
                name: plan.name.clone(),
                pid: self.supervisor.processes[*process].pid,
                ready: true,
                ready_url: plan.ready.clone(),
                ports: plan
                    .ports
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.clone()))
                    .collect(),
            })
            .collect()
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A port picker: the default, or one the OS says is free (never the same
/// one twice, [`launch::free_addr`]).
struct Ports {
    ephemeral: bool,
}

impl Ports {
    fn new(ephemeral: bool) -> Self {
        Self { ephemeral }
    }

    fn pick(&self, default: u16) -> anyhow::Result<SocketAddr> {
        if !self.ephemeral {
            return Ok(loopback(default));
        }
        self.any()
    }

    /// A port the OS says is free, whatever the mode.
    fn any(&self) -> anyhow::Result<SocketAddr> {
        Ok(launch::free_addr()?)
    }
}

/// The control plane's components, and where its clients reach it;
/// Citadel trusts the bearer tokens in `tokens`.
fn plans(
    config_dir: &Path,
    state_dir: &Path,
    tokens: &Path,
    ports: &Ports,
    topology: Topology,
    cluster: &cluster::ClusterArgs,
    cert_ttl: Duration,
) -> anyhow::Result<(Vec<Plan>, ControlPlane)> {
    let mcp = cluster.mcp_addr(ports.pick(ports::GALLEY_MCP)?);
    let xds = ports.pick(ports::PILOT_XDS)?;
    let ca = ports.pick(ports::CITADEL_CA)?;
    // Galley's webhook is not served locally, so the injector keeps 9443.
    let injector = ports.pick(ports::INJECTOR_WEBHOOK)?;
    let (cert, key) = webhook_certificate(state_dir)?;
    // Both Mixer roles default to 9091; on one host telemetry takes 9092.
    let (policy, telemetry, prometheus) = (
        ports.pick(ports::MIXER_GRPC)?,
        ports.pick(ports::MIXER_GRPC + 1)?,
        ports.pick(ports::MIXER_PROMETHEUS)?,
    );
    let mcp_arg = match topology {
        Topology::Split => mcp.to_string(),
        Topology::Monolith => MEMORY_MCP.to_string(),
    };
    // Every control-plane component defaults to admin port 15014; on one
    // host they get 15014, 15015, ...
    let admin = |i: u16| ports.pick(ports::CONTROL_PLANE_ADMIN + i);
    let ca_dir = state_dir.join("ca");
    let mut galley = flags!(Cli<galley::GalleyArgs> {
        args.config_dir: config_dir.display(),
        args.mcp_addr: &mcp_arg,
    });
    if let Some(primary) = cluster.follow {
        galley = galley.extend(flags!(Cli<galley::GalleyArgs> { args.follow: primary }));
    }
    let plans = vec![
        Plan::component(
            "galley",
            "galley",
            galley,
            admin(0)?,
            vec![("mcp", mcp_arg.clone())],
        )?,
        Plan::component(
            "pilot",
            "pilot",
            flags!(Cli<pilot::PilotArgs> {
                args.mcp_server: &mcp_arg,
                args.xds_addr: xds,
            }),
            admin(1)?,
            vec![("xds", xds.to_string())],
        )?,
        Plan::component(
            "mixer-policy",
            "mixer",
            flags!(Cli<mixer::MixerArgs> {
                args.role: "policy",
                args.mcp_server: &mcp_arg,
                args.grpc_addr: policy,
            }),
            admin(2)?,
            vec![("grpc", policy.to_string())],
        )?,
        Plan::component(
            "mixer-telemetry",
            "mixer",
            flags!(Cli<mixer::MixerArgs> {
                args.role: "telemetry",
                args.mcp_server: &mcp_arg,
                args.grpc_addr: telemetry,
                args.prometheus_addr: prometheus,
            }),
            admin(3)?,
            vec![
                ("grpc", telemetry.to_string()),
                ("metrics", prometheus.to_string()),
            ],
        )?,
        Plan::component(
            "citadel",
            "citadel",
            flags!(Cli<citadel::CitadelArgs> {
                args.grpc_addr: ca,
                args.ca_dir: ca_dir.display(),
                args.bootstrap_tokens: tokens.display(),
            }),
            admin(4)?,
            vec![("ca", ca.to_string())],
        )?,
        Plan::component(
            "sidecar-injector",
            "sidecar-injector",
            flags!(Cli<sidecar_injector::InjectorArgs> {
                args.webhook_addr: injector,
                args.webhook_cert: cert.display(),
                args.webhook_key: key.display(),
            }),
            admin(5)?,
            vec![("webhook", injector.to_string())],
        )?,
    ];
    let control_plane = ControlPlane {
        xds,
        ca,
        ca_root: ca_dir.join("root-cert.pem"),
        cert_ttl,
        policy,
        telemetry,
    };
    Ok((plans, control_plane))
}

/// A self-signed certificate for the injector's webhook on loopback
/// (no API server calls it locally, but it serves as it would in a
/// cluster): its certificate and key files in `state_dir`.
fn webhook_certificate(state_dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let key = rcgen::KeyPair::generate()?;
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    let cert = rcgen::CertificateParams::new(names)?.self_signed(&key)?;
    let dir = state_dir.join("webhook");
    std::fs::create_dir_all(&dir)?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem())?;
    std::fs::write(&key_path, key.serialize_pem())?;
    Ok((cert_path, key_path))
}

/// A mesh started by [`Mesh::start`], every component ready.
pub struct Mesh {
    running: Running,
    pub config_dir: PathBuf,
    state_dir: PathBuf,
    /// The temporary state directory, removed when the mesh is dropped.
    _temp: Option<tempfile::TempDir>,
}

impl Mesh {
    /// Starts the control plane and, unless `--no-sample`, Bookinfo; waits
    /// until all are ready. On failure everything started is stopped, and
    /// a temporary state directory is kept for its logs. `announce` prints
    /// where the config and logs are first.
    pub async fn start(
        args: &UpArgs,
        shutdown: &CancellationToken,
        announce: bool,
    ) -> anyhow::Result<Self> {
        let temp = match &args.state_dir {
            Some(_) => None,
            None => Some(tempfile::Builder::new().prefix("meshctl-up-").tempdir()?),
        };
        let state_dir = match (&args.state_dir, &temp) {
            (Some(dir), _) => dir.clone(),
            (None, Some(temp)) => temp.path().to_path_buf(),
            (None, None) => unreachable!("a temporary directory when none is given"),
        };
        anyhow::ensure!(
            args.cluster.cluster_address.is_none() || args.topology == Topology::Split,
            "--cluster-address: the monolith serves MCP in memory only; run a primary split"
        );
        let logs = state_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let ports = Ports::new(args.ephemeral_ports);
        let sample = (!args.no_sample)
            .then(|| sample::Sample::new(&ports, &args.workloads))
            .transpose()?;
        let config_dir = match &args.config_dir {
            Some(dir) => dir.clone(),
            None => {
                let dir = state_dir.join("config");
                std::fs::create_dir_all(&dir)?;
                // A cluster that follows another serves that one's config.
                let files = match args.cluster.follow {
                    Some(_) => Vec::new(),
                    None => sample::config(sample.as_ref()),
                };
                for (name, text) in files.into_iter().chain(args.cluster.config()) {
                    std::fs::write(dir.join(name), text)?;
                }
                dir
            }
        };
        let tokens = state_dir.join("tokens");
        let bins = crate::binaries::dir(args.bin_dir.as_deref())?;
        let ca_dir = state_dir.join("ca");
        let intermediate = format!("meshctl up in {}", state_dir.display());
        args.cluster.plug_ca(&ca_dir, &intermediate)?;
        let (plans, control_plane) = plans(
            &config_dir,
            &state_dir,
            &tokens,
            &ports,
            args.topology,
            &args.cluster,
            args.workload_cert_ttl,
        )?;
        let workloads = match &sample {
            Some(sample) => {
                let cross_cluster = args.cluster.multi_cluster();
                sample.plans(&control_plane, &tokens, &ports, cross_cluster)?
            }
            None => {
                std::fs::write(&tokens, "")?;
                Vec::new()
            }
        };
        if announce {
            println!("config: {}", config_dir.display());
            println!("logs:   {}", logs.display());
            if sample.is_some() {
                let certificate = sample::gateway_certificate(&state_dir);
                println!("gateway certificate: {}", certificate.display());
            }
        }
        let mut running = Running {
            supervisor: Supervisor::new(&logs),
            components: Vec::new(),
        };
        let outcome = async {
            // Everything at once, dependents first (the sample's proxies
            // before Citadel and Pilot, Pilot and the Mixers before
            // Galley): each waits for what it needs, with backoff, and
            // says it is not ready until then.
            let mut sample = Vec::new();
            for plan in workloads {
                let binary = crate::binaries::path(&bins, plan.binary)?;
                let (args, env) = (plan.args.clone(), plan.env.clone());
                let process = running.supervisor.add(&plan.name, binary, args, env)?;
                sample.push((plan, process));
            }
            start(&mut running, plans, args.topology, &bins)?;
            running.components.extend(sample);
            let timeout = Duration::from_secs(args.ready_timeout_secs);
            tokio::select! {
                ready = wait_ready(&mut running, timeout) => ready,
                _ = shutdown.cancelled() => anyhow::bail!("interrupted before the mesh was ready"),
            }
        }
        .await;
        if let Err(e) = outcome {
            running.supervisor.stop_all().await;
            eprintln!("component logs are in {}", logs.display());
            // Keep the logs of a failed run for the user to read.
            if let Some(temp) = temp
                && let Some(kept) = temp_keep(temp)
            {
                eprintln!("kept in {}", kept.display());
            }
            return Err(e);
        }
        Ok(Self {
            running,
            config_dir,
            state_dir,
            _temp: temp,
        })
    }

    /// The table of what runs where.
    pub fn rows(&self) -> Vec<Row> {
        self.running.rows(None)
    }

    /// Citadel's directory of CA files.
    pub fn ca_dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }

    /// The pids of the control plane's processes (not the sample's).
    pub fn control_plane_pids(&self) -> Vec<u32> {
        let mut pids: Vec<u32> = self
            .running
            .components
            .iter()
            .filter(|(plan, _)| !matches!(plan.binary, "proxy" | "sample-app"))
            .map(|(_, process)| self.running.supervisor.processes[*process].pid)
            .collect();
        pids.dedup();
        pids
    }

    /// Keeps it running until `shutdown`, restarting what exits and
    /// answering the control port on `control`, then stops it. `announce`
    /// prints where the control port is and makes it the one `meshctl
    /// status` finds.
    pub async fn run_until(
        mut self,
        control: tokio::net::TcpListener,
        shutdown: CancellationToken,
        announce: bool,
    ) -> anyhow::Result<()> {
        let (requests_tx, requests) = mpsc::channel(8);
        let control_addr = control.local_addr()?;
        tokio::spawn(async move { axum::serve(control, control::router(requests_tx)).await });
        std::fs::write(self.state_dir.join("control"), control_addr.to_string())?;
        if announce {
            std::fs::write(control::pointer(), control_addr.to_string())?;
            println!("control: {control_addr} (meshctl status, meshctl restart)");
            println!(
                "mesh ready: {} components in {} processes; Ctrl-C stops them",
                self.running.components.len(),
                self.running.supervisor.processes.len()
            );
        }
        supervise(&mut self.running, requests, &shutdown).await;
        if announce {
            let _ = std::fs::remove_file(control::pointer());
        }
        self.running.supervisor.stop_all().await;
        Ok(())
    }
}

pub async fn run(args: UpArgs, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mesh = Mesh::start(&args, &shutdown, true).await?;
    control::print(&mesh.rows());
    let control = tokio::net::TcpListener::bind(args.control_addr).await?;
    mesh.run_until(control, shutdown, true).await
}

/// Keeps the mesh running until `shutdown`: a process that exits is
/// started again (with backoff when it keeps exiting), and the control
/// port's requests are answered.
async fn supervise(
    running: &mut Running,
    mut requests: mpsc::Receiver<Request>,
    shutdown: &CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            (index, status) = running.supervisor.next_exit() => {
                let delay = running.supervisor.backoff(index);
                let name = running.supervisor.processes[index].name.clone();
                let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                eprintln!("{name} exited ({status}); starting it again in {delay:?}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
                if let Err(e) = running.supervisor.start(index) {
                    eprintln!("{name} cannot start again: {e:#}");
                }
            }
            Some(request) = requests.recv() => match request {
                Request::Status(reply) => {
                    let _ = reply.send(running.rows(None));
                }
                Request::Restart { name, binary, reply } => {
                    let _ = reply.send(restart(running, &name, binary).await);
                }
            },
        }
    }
}

/// Replaces the process hosting component `name` (in the monolith, the
/// whole control plane), with `binary` when given: SIGTERM, then the
/// same flags again.
async fn restart(
    running: &mut Running,
    name: &str,
    binary: Option<PathBuf>,
) -> Result<Vec<Row>, String> {
    let Some(index) = running
        .components
        .iter()
        .find(|(plan, _)| plan.name == name)
        .map(|(_, process)| *process)
    else {
        let names: Vec<_> = running
            .components
            .iter()
            .map(|(p, _)| p.name.as_str())
            .collect();
        return Err(format!(
            "no component {name:?}; there are {}",
            names.join(", ")
        ));
    };
    let binary = match binary {
        Some(path) if path.is_file() => Some(path),
        Some(path) => return Err(format!("--binary {}: no such file", path.display())),
        None => None,
    };
    running.supervisor.stop(index).await;
    let process = &mut running.supervisor.processes[index];
    if let Some(path) = binary {
        process.binary = path;
    }
    println!(
        "{} restarted by request ({})",
        process.name,
        process.binary.display()
    );
    running
        .supervisor
        .start(index)
        .map_err(|e| format!("{e:#}"))?;
    Ok(running.rows(Some(index)))
}

/// Starts the control plane: a process per component, or one monolith.
fn start(
    running: &mut Running,
    plans: Vec<Plan>,
    topology: Topology,
    bins: &Path,
) -> anyhow::Result<()> {
    match topology {
        Topology::Split => {
            // Last in the config's flow first: Galley starts last.
            let mut started = Vec::new();
            for plan in plans.into_iter().rev() {
                let binary = crate::binaries::path(bins, plan.binary)?;
                let (args, env) = (plan.args.clone(), plan.env.clone());
                let process = running.supervisor.add(&plan.name, binary, args, env)?;
                started.push((plan, process));
            }
            running.components.extend(started.into_iter().rev());
        }
        Topology::Monolith => {
            // `galley FLAGS -- pilot FLAGS -- ...`
            let parts: Vec<Vec<String>> = plans
                .iter()
                .map(|p| [vec![p.binary.to_string()], p.args.clone()].concat())
                .collect();
            let argv = parts.join(&"--".to_string());
            let binary = crate::binaries::path(bins, "monolith")?;
            let process = running
                .supervisor
                .add("monolith", binary, argv, Vec::new())?;
            running
                .components
                .extend(plans.into_iter().map(|p| (p, process)));
        }
    }
    Ok(())
}

/// Keeps a failed run's temporary state from its cleanup.
fn temp_keep(temp: tempfile::TempDir) -> Option<PathBuf> {
    let kept = std::env::temp_dir().join(format!("meshctl-failed-{}", std::process::id()));
    std::fs::rename(temp.keep(), &kept).ok()?;
    Some(kept)
}

/// Times a process may exit before it is ready, and be started again.
const START_RETRIES: u32 = 2;

/// Polls every component's ready URL until all answer 200; a process that
/// exits is started again, up to [`START_RETRIES`] times; fails past that
/// or when the deadline passes.
async fn wait_ready(running: &mut Running, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut backoff =
        component::Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
    let mut exits = vec![0; running.supervisor.processes.len()];
    loop {
        for (index, exited) in exits.iter_mut().enumerate() {
            let Some(status) = running.supervisor.take_exit(index) else {
                continue;
            };
            let name = running.supervisor.processes[index].name.clone();
            let status = status.map_or_else(|e| e.to_string(), |s| s.to_string());
            // A port another process held for a moment, say; a real
            // problem (a bad flag) keeps failing and ends the start.
            *exited += 1;
            if *exited > START_RETRIES {
                anyhow::bail!("{name} exited before it was ready, {exited} times ({status})");
            }
            let delay = running.supervisor.backoff(index);
            eprintln!(
                "{name} exited before it was ready ({status}); starting it again in {delay:?}"
            );
            tokio::time::sleep(delay).await;
            running.supervisor.start(index)?;
        }
        let rows = control::probe(running.rows(None)).await;
        let waiting = control::not_ready(&rows);
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!("not ready after {timeout:?}: {}", waiting.join(", "));
        }
        backoff.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command line is checked as its binary parses it when it is
    /// built, so building them all is the test.
    #[test]
    fn every_command_line_parses_as_its_binary_parses_it() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("tokens");
        let following = cluster::ClusterArgs {
            follow: Some("10.0.0.1:9901".parse().unwrap()),
            ..Default::default()
        };
        for (topology, cluster) in [
            (Topology::Split, Default::default()),
            (Topology::Monolith, Default::default()),
            (Topology::Split, following),
        ] {
            let ports = Ports::new(true);
            let (plans, control_plane) = plans(
                dir.path(),
                dir.path(),
                &tokens,
                &ports,
                topology,
                &cluster,
                Duration::from_secs(3600),
            )
            .unwrap();
            assert_eq!(plans.len(), 6);
            let workloads = sample::Sample::new(&ports, &[])
                .unwrap()
                .plans(&control_plane, &tokens, &ports, cluster.multi_cluster())
                .unwrap();
            // Six apps, their sidecars, and the ingress gateway.
            assert_eq!(workloads.len(), 13);
        }
    }
}
