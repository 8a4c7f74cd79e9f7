//! The mesh's processes under `meshctl up`: started with their logs in
//! the state directory, watched, started again with backoff when they
//! exit (as Kubernetes restarts a container), replaced on request (an
//! upgrade: another binary, the same flags), and stopped, SIGTERM first.

use std::{
    collections::VecDeque,
    fs::OpenOptions,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::sync::mpsc;

/// How long a process gets to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// A process that ran this long before exiting is not crash-looping.
const HEALTHY_RUN: Duration = Duration::from_secs(10);

/// One process, and how to start it again.
pub struct Process {
    pub name: String,
    /// The binary's path.
    pub binary: PathBuf,
    pub argv: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    pub pid: u32,
    /// Counts the starts, so that a late exit of an old one is ignored.
    generation: u64,
    started: Instant,
    /// Quick exits in a row, for the backoff.
    quick_exits: u32,
    /// Started and not seen to exit since.
    alive: bool,
}

/// An exit: which process, which start of it, and how.
type Exit = (usize, u64, std::io::Result<ExitStatus>);

pub struct Supervisor {
    logs: PathBuf,
    pub processes: Vec<Process>,
    exits_tx: mpsc::UnboundedSender<Exit>,
    exits: mpsc::UnboundedReceiver<Exit>,
    /// Exits seen while waiting for another.
    pending: VecDeque<Exit>,
}

impl Supervisor {
    pub fn new(logs: &Path) -> Self {
        let (exits_tx, exits) = mpsc::unbounded_channel();
        Self {
            logs: logs.to_path_buf(),
            processes: Vec::new(),
            exits_tx,
            exits,
            pending: VecDeque::new(),
        }
    }

    /// Starts a new process; its index.
    pub fn add(
        &mut self,
        name: &str,
        binary: PathBuf,
        argv: Vec<String>,
        env: Vec<(&'static str, String)>,
    ) -> anyhow::Result<usize> {
        self.processes.push(Process {
            name: name.into(),
            binary,
            argv,
            env,
            pid: 0,
            generation: 0,
            started: Instant::now(),
            quick_exits: 0,
            alive: false,
        });
        let index = self.processes.len() - 1;
        self.start(index)?;
        Ok(index)
    }

    /// Starts process `index` (again), appending to its log. It dies with
    /// `meshctl up`, even when that is killed.
    pub fn start(&mut self, index: usize) -> anyhow::Result<()> {
        let p = &mut self.processes[index];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{}.log", p.name)))?;
        let mut command = launch::command(&p.binary, &p.argv);
        command
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdout(log.try_clone()?)
            .stderr(log);
        let mut child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {}: {e}", p.binary.display()))?;
        p.generation += 1;
        p.alive = true;
        p.pid = child.id().unwrap_or_default();
        p.started = Instant::now();
        let (tx, generation) = (self.exits_tx.clone(), p.generation);
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send((index, generation, status));
        });
        Ok(())
    }

    /// The next exit of a process's current start (older ones are dropped).
    pub async fn next_exit(&mut self) -> (usize, std::io::Result<ExitStatus>) {
        loop {
            let exit = match self.pending.pop_front() {
                Some(exit) => exit,
                None => self
                    .exits
                    .recv()
                    .await
                    .expect("the supervisor holds a sender"),
            };
            let (index, generation, status) = exit;
            if self.processes[index].generation == generation {
                self.processes[index].alive = false;
                return (index, status);
            }
        }
    }

    /// How long to wait before starting `index` again after it exited:
    /// nothing after a healthy run, then doubling from 100 ms to 5 s.
    pub fn backoff(&mut self, index: usize) -> Duration {
        let p = &mut self.processes[index];
        if p.started.elapsed() >= HEALTHY_RUN {
            p.quick_exits = 0;
        }
        p.quick_exits += 1;
        Duration::from_millis(100 << p.quick_exits.min(6)).min(Duration::from_secs(5))
    }

    /// Stops process `index`: SIGTERM, then SIGKILL after the grace.
    pub async fn stop(&mut self, index: usize) {
        if self.take_exit(index).is_some() || !self.processes[index].alive {
            return;
        }
        let generation = self.processes[index].generation;
        self.signal(index, Signal::SIGTERM);
        let mut deadline = tokio::time::Instant::now() + STOP_GRACE;
        let mut killed = false;
        loop {
            let exit = tokio::select! {
                exit = self.exits.recv() => exit.expect("the supervisor holds a sender"),
                _ = tokio::time::sleep_until(deadline) => {
                    let name = &self.processes[index].name;
                    if killed {
                        eprintln!("{name} did not exit even after SIGKILL");
                        return;
                    }
                    eprintln!("{name} did not stop within {STOP_GRACE:?}; killing it");
                    self.signal(index, Signal::SIGKILL);
                    (killed, deadline) = (true, tokio::time::Instant::now() + STOP_GRACE);
                    continue;
                }
            };
            if exit.0 == index && exit.1 == generation {
                self.processes[index].alive = false;
                return;
            }
            self.pending.push_back(exit);
        }
    }

    /// Stops every process, in the reverse of their start order.
    pub async fn stop_all(&mut self) {
        for index in (0..self.processes.len()).rev() {
            self.stop(index).await;
        }
    }

    fn signal(&self, index: usize, signal: Signal) {
        if let Ok(pid) = i32::try_from(self.processes[index].pid) {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), signal);
        }
    }

    /// Whether process `index` has exited and not been started again.
    fn exited(&mut self, index: usize) -> bool {
        while let Ok(exit) = self.exits.try_recv() {
            self.pending.push_back(exit);
        }
        let generation = self.processes[index].generation;
        self.pending
            .iter()
            .any(|(i, g, _)| *i == index && *g == generation)
    }

    /// How process `index` exited, if it has since its last start.
    pub fn take_exit(&mut self, index: usize) -> Option<std::io::Result<ExitStatus>> {
        if !self.exited(index) {
            return None;
        }
        let generation = self.processes[index].generation;
        let at = self
            .pending
            .iter()
            .position(|(i, g, _)| *i == index && *g == generation)?;
        self.processes[index].alive = false;
        self.pending.remove(at).map(|(_, _, status)| status)
    }
}
