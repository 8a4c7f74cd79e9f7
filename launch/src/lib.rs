//! The one way the mesh's processes are started and waited on. `meshctl
//! up`'s supervisor, the benchmarks and the tests start a process the same
//! way, and call a component ready on the same signal: its admin server
//! answering `/ready` with 200.

use std::{
    ffi::OsStr,
    fmt,
    net::{SocketAddr, TcpListener},
    path::Path,
    process::{ExitStatus, Stdio},
    time::Duration,
};

use http_body_util::Empty;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use tokio::{
    process::{Child, Command},
    time::Instant,
};

/// `binary` with `args`, set up as every process of the mesh is: no
/// stdin, killed when its handle is dropped, and killed when its starter
/// dies, even by SIGKILL, so that nothing outlives it. The caller chooses
/// where its output goes.
///
/// The kernel ties the child to the *thread* that spawns it: spawn from a
/// thread that lives as long as the child should (a tokio worker, the
/// main thread), not from a short-lived one.
pub fn command<S: AsRef<OsStr>>(binary: &Path, args: impl IntoIterator<Item = S>) -> Command {
    let mut command = Command::new(binary);
    command.args(args).stdin(Stdio::null()).kill_on_drop(true);
    // SAFETY: prctl is one system call, safe between fork and exec.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
    command
}

/// The URL where a component's admin server at `admin` says it is ready.
pub fn ready_url(admin: impl std::fmt::Display) -> String {
    format!("http://{admin}/ready")
}

/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Whether `url` (`http://host:port/path`) answers 200 now.
pub async fn is_ready(url: &str) -> bool {
    tokio::time::timeout(PROBE_TIMEOUT, status(url))
        .await
        .ok()
        .flatten()
        == Some(200)
}

/// The status a GET of `url` answers, or `None` if nothing does.
async fn status(url: &str) -> Option<u16> {
    let uri: hyper::Uri = url.parse().ok()?;
    let authority = uri.authority()?.clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str())
        .await
        .ok()?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .ok()?;
    // Ends when `sender` is dropped.
    tokio::spawn(connection);
    let request = hyper::Request::get(uri.path_and_query()?.as_str())
        .header(hyper::header::HOST, authority.as_str())
        .body(Empty::<Bytes>::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    Some(response.status().as_u16())
}

/// Why a process did not become ready.
#[derive(Debug)]
pub enum NotReady {
    Exited { name: String, status: ExitStatus },
    Late { name: String, limit: Duration },
    Wait { name: String, error: std::io::Error },
}

impl fmt::Display for NotReady {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Exited { name, status } => {
                write!(f, "{name} exited before it was ready ({status})")
            }
            Self::Late { name, limit } => write!(f, "{name} not ready within {limit:?}"),
            Self::Wait { name, error } => write!(f, "{name}: cannot tell whether it runs: {error}"),
        }
    }
}

impl std::error::Error for NotReady {}

/// Waits until `child`, named `name` in errors, answers 200 at `url`:
/// an error as soon as it exits, or once `limit` has passed. Probes come
/// fast at first, so that a start is timed to within a few milliseconds.
pub async fn wait_ready(
    name: &str,
    child: &mut Child,
    url: &str,
    limit: Duration,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + limit;
    let mut delay = Duration::from_millis(5);
    loop {
        if is_ready(url).await {
            return Ok(());
        }
        let name = name.to_string();
        match child.try_wait() {
            Ok(Some(status)) => return Err(NotReady::Exited { name, status }),
            Err(error) => return Err(NotReady::Wait { name, error }),
            Ok(None) if Instant::now() >= deadline => return Err(NotReady::Late { name, limit }),
            Ok(None) => {}
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(50));
    }
}

/// A free port on 127.0.0.1, chosen by the OS, and never one this process
/// was handed before: the OS may hand out a just-released port again, and
/// a port picked for one process must not go to another before the first
/// has bound it. Never one of the mesh's default ports either, which a
/// mesh on the defaults beside it needs.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        if component::ports::DEFAULTS.contains(&addr.port()) {
            continue;
        }
        let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
        if !handed_out.contains(&addr.port()) {
            handed_out.push(addr.port());
            return Ok(addr);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_exit_before_ready_is_reported_at_once() {
        let mut child = command(Path::new("/bin/sh"), ["-c", "exit 3"])
            .spawn()
            .unwrap();
        let url = ready_url(free_addr().unwrap());
        let started = std::time::Instant::now();
        let error = wait_ready("sh", &mut child, &url, Duration::from_secs(30))
            .await
            .unwrap_err();
        assert!(matches!(error, NotReady::Exited { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(
            error
                .to_string()
                .starts_with("sh exited before it was ready")
        );
    }

    #[tokio::test]
    async fn a_process_that_never_answers_is_late() {
        let mut child = command(Path::new("/bin/sleep"), ["30"]).spawn().unwrap();
        let url = ready_url(free_addr().unwrap());
        let error = wait_ready("sleep", &mut child, &url, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(error, NotReady::Late { .. }), "{error}");
    }

    #[tokio::test]
    async fn ready_means_200_on_the_path() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let service = hyper::service::service_fn(|request: hyper::Request<_>| async move {
                    let status = if request.uri().path() == "/ready" {
                        200
                    } else {
                        503
                    };
                    hyper::Response::builder()
                        .status(status)
                        .body(Empty::<Bytes>::new())
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        assert!(is_ready(&ready_url(addr)).await);
        assert!(!is_ready(&format!("http://{addr}/other")).await);
        assert!(!is_ready(&ready_url(free_addr().unwrap())).await);
    }

    #[test]
    fn free_addresses_are_never_handed_out_twice() {
        let addrs: Vec<_> = (0..50).map(|_| free_addr().unwrap()).collect();
        let mut ports: Vec<_> = addrs.iter().map(SocketAddr::port).collect();
        ports.sort_unstable();
        ports.dedup();
        assert_eq!(ports.len(), addrs.len());
    }
}
