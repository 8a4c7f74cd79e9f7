//! Network namespaces a test makes for itself: a pod's own network, with
//! its own interfaces, routes and iptables, so that traffic redirection is
//! tested for real without touching the machine's network. Needs root.

use std::{fs::File, process::Command};

use nix::sched::{CloneFlags, setns};

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
