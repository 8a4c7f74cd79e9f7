//! The tests' kit: find the workspace's binaries (built once
//! before the tests and shared by all of them), start them as real
//! processes on 127.0.0.1, wait on readiness, and stop them.

pub mod browser;
pub mod fake_kube;
pub mod fuzz;
pub mod mcp_watch;
pub mod netns;
pub mod otlp;

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{Child, ChildStderr, ChildStdout, Command},
};

/// Upper bound on any wait in these tests.
pub const WAIT: Duration = Duration::from_secs(30);

/// Path of a workspace binary, built by `cargo build --workspace --bins`
/// (the README's test command) into the directory above this test
/// executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (`cargo build --workspace --bins && cargo test --workspace`)",
        path.display()
    );
    path
}

/// A free port on 127.0.0.1, never one this process was handed before
/// ([`launch::free_addr`]).
pub fn free_addr() -> SocketAddr {
    launch::free_addr().expect("a free port on 127.0.0.1")
}

/// Held while a `meshctl up --ephemeral-ports` starts, until it says it is
/// ready, and through each benchmark: they probe free ports, release them
/// and let their processes bind them, and another such run probing in
/// between could take the same port.
pub static MESH_STARTING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// `meshctl up --ephemeral-ports ARGS`, waited for until it says the mesh
/// is ready (one such start at a time): the process and what it printed.
pub async fn meshctl_up(args: &[&str]) -> (Proc, Vec<String>) {
    meshctl_up_with_env(args, &[]).await
}

/// [`meshctl_up`] with `env` set for it and every process it starts.
pub async fn meshctl_up_with_env(args: &[&str], env: &[(&str, &str)]) -> (Proc, Vec<String>) {
    let bin_dir = bin("meshctl").parent().unwrap().display().to_string();
    let starting = MESH_STARTING.lock().await;
    let argv = [&["up", "--ephemeral-ports", "--bin-dir", &bin_dir], args].concat();
    let mut up = Proc::start_with_env("meshctl", &argv, env);
    let lines = up.stdout_until("mesh ready").await;
    drop(starting);
    (up, lines)
}

/// The rows of the table `meshctl up` printed, each split into its
/// whitespace-separated fields (name, pid, ready, ports).
pub fn up_table(lines: &[String]) -> Vec<Vec<&str>> {
    let header = lines
        .iter()
        .position(|l| l.starts_with("COMPONENT"))
        .expect("a table of components");
    lines[header + 1..]
        .iter()
        .take_while(|l| !l.starts_with("control: "))
        .map(|row| row.split_whitespace().collect())
        .collect()
}

/// A running process, killed if the test ends without stopping it.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub stdout: Lines<BufReader<ChildStdout>>,
    pub stderr: Lines<BufReader<ChildStderr>>,
}

impl Proc {
    pub fn start(name: &str, args: &[&str]) -> Self {
        Self::start_with_env(name, args, &[])
    }

    /// [`Proc::start`] with environment variables set.
    pub fn start_with_env(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut command = launch::command(&bin(name), args);
        command.env("RUST_LOG", "info").envs(env.iter().copied());
        Self::spawn(name, command)
    }

    /// Starts `command`, a workspace binary `name` set up by the caller,
    /// its output read by the test; killed when dropped, however the
    /// caller built it.
    pub fn spawn(name: &str, mut command: Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let stderr = BufReader::new(child.stderr.take().unwrap()).lines();
        Self {
            name: name.to_string(),
            child,
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("process still running")
    }

    /// Waits until the component answers `/ready` on `admin`, failing the
    /// test with its stderr if it exits first or takes longer than
    /// [`WAIT`].
    pub async fn ready(&mut self, admin: SocketAddr) {
        let url = launch::ready_url(admin);
        if let Err(e) = launch::wait_ready(&self.name, &mut self.child, &url, WAIT).await {
            let stderr = self.stderr_so_far().await;
            panic!("{e}; stderr: {stderr:#?}");
        }
    }

    /// Reads stdout until a line contains `needle`; returns the lines read.
    pub async fn stdout_until(&mut self, needle: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.stdout.next_line().await.unwrap() {
                let done = line.contains(needle);
                seen.push(line);
                if done {
                    return true;
                }
            }
            false
        })
        .await;
        if found != Ok(true) {
            let stderr = self.stderr_so_far().await;
            panic!(
                "{}: no stdout line with {needle:?}; got {seen:#?}; stderr: {stderr:#?}",
                self.name
            );
        }
        seen
    }

    /// The stderr lines written so far (waiting briefly for more).
    pub async fn stderr_so_far(&mut self) -> Vec<String> {
        let mut lines = Vec::new();
        while let Ok(Ok(Some(line))) =
            tokio::time::timeout(Duration::from_millis(200), self.stderr.next_line()).await
        {
            lines.push(line);
        }
        lines
    }

    /// Reads stderr until a line contains `needle`; returns that line.
    pub async fn stderr_until(&mut self, needle: &str) -> String {
        let found = tokio::time::timeout(WAIT, async {
            while let Some(line) = self.stderr.next_line().await.unwrap() {
                if line.contains(needle) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        found
            .ok()
            .flatten()
            .unwrap_or_else(|| panic!("{}: no stderr line with {needle:?}", self.name))
    }

    /// Sends SIGTERM and returns the exit status, failing if the process
    /// does not stop in time.
    pub async fn terminate(mut self) -> std::process::ExitStatus {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).unwrap();
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not stop after SIGTERM", self.name))
            .unwrap()
    }

    /// Sends SIGKILL and waits for the process to be gone.
    pub async fn kill(mut self) {
        nix::sys::signal::kill(Pid::from_raw(self.pid() as i32), Signal::SIGKILL).unwrap();
        let _ = tokio::time::timeout(WAIT, self.child.wait()).await;
    }

    /// Waits for the process to exit by itself.
    pub async fn exit(mut self) -> std::process::ExitStatus {
        tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit", self.name))
            .unwrap()
    }

    /// Waits for the process to exit by itself, failing the test with its
    /// stderr unless it succeeded.
    pub async fn exit_ok(mut self) {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit", self.name))
            .unwrap();
        if !status.success() {
            let stderr = self.stderr_so_far().await;
            panic!("{} exited with {status}; stderr: {stderr:#?}", self.name);
        }
    }
}

/// Runs workspace binary `name` with `args` to its end; its stdout. A
/// failure fails the test with the arguments and stderr.
pub fn run_ok<S: AsRef<std::ffi::OsStr> + std::fmt::Debug>(name: &str, args: &[S]) -> String {
    let out = std::process::Command::new(bin(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The strings of a JSON array (a container's `args`, say).
pub fn strings(array: &serde_json::Value) -> Vec<&str> {
    array
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| a.as_str().expect("a string"))
        .collect()
}

/// Makes ring rustls's process-wide crypto provider, which reqwest needs
/// even for plain HTTP.
pub fn install_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// GET `http://addr/path`: status and body, or `None` if nothing answers.
pub async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    install_crypto();
    let response = reqwest::get(format!("http://{addr}{path}")).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Polls `http://addr/path` until `accept` holds for its answer.
pub async fn wait_for_http(
    addr: SocketAddr,
    path: &str,
    accept: impl Fn(u16, &str) -> bool,
) -> (u16, String) {
    let deadline = Instant::now() + WAIT;
    let mut delay = Duration::from_millis(10);
    loop {
        let answer = get(addr, path).await;
        if let Some((status, body)) = &answer
            && accept(*status, body)
        {
            return (*status, body.clone());
        }
        assert!(
            Instant::now() < deadline,
            "http://{addr}{path}: last answer {answer:?}"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A running Galley serving `dir`, ready, with its MCP and admin addresses.
pub struct Galley {
    pub proc: Proc,
    pub mcp: SocketAddr,
    pub admin: SocketAddr,
}

impl Galley {
    /// Starts Galley on `dir` with `extra` flags and waits until it is ready.
    pub async fn start(dir: &std::path::Path, extra: &[&str]) -> Self {
        Self::start_at(dir, free_addr(), extra).await
    }

    /// The same, serving MCP on `mcp` (a restarted Galley keeps its address).
    pub async fn start_at(dir: &std::path::Path, mcp: SocketAddr, extra: &[&str]) -> Self {
        let mut galley = Self::spawn(dir, mcp, extra);
        galley.proc.ready(galley.admin).await;
        galley
    }

    /// Starts Galley without waiting for it: one that is ready only once
    /// another process has done its part (a relay's primary, say).
    pub fn spawn(dir: &std::path::Path, mcp: SocketAddr, extra: &[&str]) -> Self {
        Self::spawn_with_env(dir, mcp, extra, &[])
    }

    /// [`Galley::spawn`] with `env` set for it.
    pub fn spawn_with_env(
        dir: &std::path::Path,
        mcp: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let admin = free_addr();
        let (mcp_arg, admin_arg) = (mcp.to_string(), admin.to_string());
        let args = [
            &[
                "--config-dir",
                dir.to_str().unwrap(),
                "--mcp-addr",
                &mcp_arg,
                "--admin-addr",
                &admin_arg,
            ][..],
            extra,
        ]
        .concat();
        let proc = Proc::start_with_env("galley", &args, env);
        Self { proc, mcp, admin }
    }
}

/// Pilot following the MCP source at `mcp`, serving ADS on `xds`, with
/// `extra` flags; not waited for. The process and its admin address.
pub fn start_pilot(
    mcp: impl std::fmt::Display,
    xds: SocketAddr,
    extra: &[&str],
) -> (Proc, SocketAddr) {
    start_pilot_with_env(mcp, xds, extra, &[])
}

/// [`start_pilot`] with environment variables set.
pub fn start_pilot_with_env(
    mcp: impl std::fmt::Display,
    xds: SocketAddr,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Proc, SocketAddr) {
    let admin = free_addr();
    let (mcp, xds_arg, admin_arg) = (mcp.to_string(), xds.to_string(), admin.to_string());
    let args = [
        &[
            "--mcp-server",
            &mcp,
            "--xds-addr",
            &xds_arg,
            "--admin-addr",
            &admin_arg,
        ][..],
        extra,
    ]
    .concat();
    (Proc::start_with_env("pilot", &args, env), admin)
}

/// Galley serving `dir` and Pilot following it, with `pilot_env`, both
/// ready: their processes and Pilot's xDS address.
pub async fn galley_and_pilot(
    dir: &std::path::Path,
    pilot_env: &[(&str, &str)],
) -> (Galley, Proc, SocketAddr) {
    let galley = Galley::start(dir, &[]).await;
    let xds = free_addr();
    let (mut pilot, admin) = start_pilot_with_env(galley.mcp, xds, &[], pilot_env);
    pilot.ready(admin).await;
    (galley, pilot, xds)
}

/// A proxy in local mode, of namespace `shop`, on Pilot at `xds`, with
/// `args`, ready; and its admin address.
pub async fn local_proxy(xds: SocketAddr, args: &[&str]) -> (Proc, SocketAddr) {
    let (xds, admin) = (xds.to_string(), free_addr());
    let (admin_arg, stats, health) = (
        admin.to_string(),
        free_addr().to_string(),
        free_addr().to_string(),
    );
    let mut all = vec![
        "--pilot",
        &xds,
        "--admin-addr",
        &admin_arg,
        "--stats-addr",
        &stats,
        "--health-addr",
        &health,
        "--namespace",
        "shop",
    ];
    all.extend_from_slice(args);
    let mut proc = Proc::start("proxy", &all);
    proc.ready(admin).await;
    (proc, admin)
}

/// Whether a process with this pid still exists.
pub fn alive(pid: u32) -> bool {
    nix::sys::signal::kill(Pid::from_raw(pid as i32), None).is_ok()
}

/// A directory of config YAML for a test to serve and edit.
pub fn config_dir(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(dir.path().join(name), text).unwrap();
    }
    dir
}

/// An HTTP server on loopback that answers every request with `answer`.
pub async fn http_app(answer: &'static str) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().fallback(move || async move { answer });
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A TCP server that sends back what it reads.
pub async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// Installs Debian's `package` when none of `paths` exists: CI starts on
/// a machine where nothing was installed by hand.
pub fn ensure_package(paths: &[&str], package: &str) {
    if paths.iter().any(|p| std::path::Path::new(p).exists()) {
        return;
    }
    let install = format!(
        "DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package} >/dev/null 2>&1 \
         || (apt-get update -q >/dev/null 2>&1 \
             && DEBIAN_FRONTEND=noninteractive apt-get install -y -q {package} >/dev/null 2>&1)"
    );
    let status = std::process::Command::new("sh")
        .args(["-c", &install])
        .status()
        .unwrap_or_else(|e| panic!("installing {package}: {e}"));
    assert!(status.success(), "installing {package}: {status}");
}

/// Citadel on a fresh CA in `dir`, trusting a bootstrap token for each
/// `(namespace, service account)`, ready; and what proxies need to ask it
/// for certificates.
pub struct Citadel {
    pub proc: Proc,
    pub addr: SocketAddr,
    dir: PathBuf,
}

impl Citadel {
    pub async fn start(dir: &std::path::Path, accounts: &[(&str, &str)]) -> Self {
        let (addr, admin) = (free_addr(), free_addr());
        let mut tokens = String::new();
        for (namespace, account) in accounts {
            tokens.push_str(&format!("{namespace}/{account} {account}-token\n"));
            std::fs::write(
                dir.join(format!("{account}.token")),
                format!("{account}-token"),
            )
            .unwrap();
        }
        let tokens_file = dir.join("tokens");
        std::fs::write(&tokens_file, tokens).unwrap();
        let mut proc = Proc::start(
            "citadel",
            &[
                "--grpc-addr",
                &addr.to_string(),
                "--admin-addr",
                &admin.to_string(),
                "--ca-dir",
                dir.join("ca").to_str().unwrap(),
                "--bootstrap-tokens",
                tokens_file.to_str().unwrap(),
            ],
        );
        proc.ready(admin).await;
        Self {
            proc,
            addr,
            dir: dir.to_path_buf(),
        }
    }

    /// The bootstrap token file of `account`.
    pub fn token(&self, account: &str) -> PathBuf {
        self.dir.join(format!("{account}.token"))
    }

    /// The CA's root certificate.
    pub fn root(&self) -> PathBuf {
        self.dir.join("ca").join("root-cert.pem")
    }
}

/// A TLS server answering every request with `body`, its certificate for
/// `hosts` signed by a CA of its own; and that CA's certificate, as PEM.
pub fn tls_server(hosts: &[&str], body: impl Into<String>) -> (SocketAddr, String) {
    let body: std::sync::Arc<str> = body.into().into();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca = rcgen::CertificateParams::new(Vec::new()).unwrap();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let names = hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>();
    let params = rcgen::CertificateParams::new(names).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let key = rustls::pki_types::PrivatePkcs8KeyDer::from(key.serialize_der()).into();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], key)
        .unwrap();
    let config = std::sync::Arc::new(config);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let (config, body) = (config.clone(), body.clone());
            std::thread::spawn(move || {
                let connection = rustls::ServerConnection::new(config).unwrap();
                let mut tls = rustls::StreamOwned::new(connection, stream);
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    match std::io::Read::read(&mut tls, &mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                let _ = std::io::Write::write_fmt(
                    &mut tls,
                    format_args!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                        body.len()
                    ),
                );
                let _ = std::io::Write::flush(&mut tls);
            });
        }
    });
    (addr, ca_cert.pem())
}

pub const SAMPLE_CONFIG: &str = include_str!("../data/config.yaml");

/// A self-signed certificate for 127.0.0.1, as an admission webhook
/// serves: its PEM certificate and key files in `dir`, and the
/// certificate for clients to trust.
pub fn webhook_certificate(dir: &std::path::Path) -> (PathBuf, PathBuf, rcgen::Certificate) {
    let key = rcgen::KeyPair::generate().unwrap();
    let params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path, cert)
}

/// An HTTPS client that trusts exactly `cert`, as the API server trusts
/// a webhook's CA bundle.
pub fn https_client(cert: &rcgen::Certificate) -> reqwest::Client {
    install_crypto();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .build()
        .unwrap()
}
