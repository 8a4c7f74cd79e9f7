//! Network namespaces a test makes for itself: a pod's own network, with
//! its own interfaces, routes and iptables, so that traffic redirection is
//! tested for real without touching the machine's network. Needs root.

use std::{
    fs::File,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    os::unix::process::CommandExt,
    process::Command,
    time::{Duration, Instant},
};

use nix::sched::{CloneFlags, setns};

use crate::{Proc, WAIT, bin};

/// A named network namespace, deleted when dropped.
pub struct Netns {
    pub name: String,
    file: File,
}

impl Netns {
    /// A new namespace with its loopback up; `role` tells it apart from the
    /// test's other namespaces, the pid from other tests' ones.
    pub fn new(role: &str) -> Self {
        let name = format!("e2e-{}-{role}", std::process::id());
        run("ip", &["netns", "add", &name]);
        let file = File::open(format!("/run/netns/{name}"))
            .unwrap_or_else(|e| panic!("netns {name}: {e}"));
        let ns = Self { name, file };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) {
        run("ip", &[&["-n", self.name.as_str()][..], args].concat());
    }

    /// Runs `f` on a thread inside the namespace: the sockets it opens and
    /// the processes it starts belong to the namespace for their lifetime.
    /// The caller's tokio runtime, if any, is entered on that thread.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let runtime = tokio::runtime::Handle::try_current().ok();
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.file, CloneFlags::CLONE_NEWNET)
                        .unwrap_or_else(|e| panic!("entering netns {}: {e}", self.name));
                    let _entered = runtime.as_ref().map(|r| r.enter());
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Starts a workspace binary inside the namespace, as `uid` when given.
    pub fn start(&self, name: &str, args: &[&str], uid: Option<u32>) -> Proc {
        self.run(|| {
            let mut command = tokio::process::Command::new(bin(name));
            command.args(args).env("RUST_LOG", "info");
            if let Some(uid) = uid {
                command.as_std_mut().uid(uid).gid(uid);
            }
            Proc::spawn(name, command)
        })
    }

    /// `GET path` to `addr` with `host` and `headers`, from inside the
    /// namespace: the status and body, or `None` if nothing answers.
    /// Blocking I/O on the namespace's thread; `path` may be absolute, for
    /// a proxy.
    pub fn get(
        &self,
        addr: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Option<(u16, String)> {
        self.run(|| {
            let addr: SocketAddr = addr.parse().unwrap();
            let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            let mut head = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n");
            for (name, value) in headers {
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            stream.write_all(head.as_bytes()).ok()?;
            let mut answer = String::new();
            stream.read_to_string(&mut answer).ok()?;
            let (head, body) = answer.split_once("\r\n\r\n")?;
            let status = head.split(' ').nth(1)?.parse().ok()?;
            Some((status, body.to_string()))
        })
    }

    /// Polls [`Netns::get`] until `accept` holds, for up to [`WAIT`].
    pub async fn wait_for(
        &self,
        addr: &str,
        host: &str,
        path: &str,
        headers: &[(&str, &str)],
        accept: impl Fn(u16, &str) -> bool,
    ) -> (u16, String) {
        let deadline = Instant::now() + WAIT;
        loop {
            let answer = self.get(addr, host, path, headers);
            if let Some((status, body)) = &answer
                && accept(*status, body)
            {
                return (*status, body.clone());
            }
            assert!(
                Instant::now() < deadline,
                "{addr}{path} in {}: last answer {answer:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs a command to success, failing the test with its output otherwise.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes sure `iptables-restore` is installed (Debian's package), which
/// `proxy init` runs.
pub fn ensure_iptables() {
    crate::ensure_package(
        &["/usr/sbin/iptables-restore", "/sbin/iptables-restore"],
        "iptables",
    );
}

/// Joins two namespaces by a veth pair, `veth0` in each, with addresses
/// in one /24.
pub fn link(a: &Netns, a_ip: &str, b: &Netns, b_ip: &str) {
    run(
        "ip",
        &[
            "link", "add", "veth0", "netns", &a.name, "type", "veth", "peer", "name", "veth0",
            "netns", &b.name,
        ],
    );
    for (ns, ip) in [(a, a_ip), (b, b_ip)] {
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", "veth0"]);
        ns.ip(&["link", "set", "veth0", "up"]);
    }
}
