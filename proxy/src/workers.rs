//! The data plane's threads. Each worker is a single-threaded runtime that
//! accepts on its own copy of every listener's socket and keeps its own
//! upstream connection pools, so that a connection is served from accept
//! to close on one thread, with no wake-ups across threads (the worker
//! model of nginx and Envoy). The control plane (xDS, certificates, admin,
//! Mixer batches) runs on the main runtime.

use std::{cell::Cell, future::Future, sync::mpsc, thread};

use component::CancellationToken;
use tokio::runtime::{Builder, Handle};

thread_local! {
    /// This thread's worker number; 0 off the workers.
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The number of the worker running the caller.
pub fn current() -> usize {
    INDEX.get()
}

/// The running workers; they stop on `shutdown`.
pub struct Workers {
    handles: Vec<Handle>,
}

impl Workers {
    /// Starts `count` workers (at least one).
    pub fn start(count: usize, shutdown: &CancellationToken) -> std::io::Result<Self> {
        let mut handles = Vec::new();
        for index in 0..count.max(1) {
            let (tx, rx) = mpsc::channel();
            let shutdown = shutdown.clone();
            thread::Builder::new()
                .name(format!("proxy-worker-{index}"))
                .spawn(move || {
                    let runtime = match Builder::new_current_thread().enable_all().build() {
                        Ok(r) => r,
                        Err(e) => return drop(tx.send(Err(e))),
                    };
                    INDEX.set(index);
                    let _ = tx.send(Ok(runtime.handle().clone()));
                    runtime.block_on(shutdown.cancelled());
                })?;
            let handle = rx
                .recv()
                .map_err(|_| std::io::Error::other("a proxy worker died starting"))??;
            handles.push(handle);
        }
        Ok(Self { handles })
    }

    pub fn count(&self) -> usize {
        self.handles.len()
    }

    /// Runs `task(worker)` on every worker.
    pub fn each<F, T>(&self, mut task: F)
    where
        F: FnMut(usize) -> T,
        T: Future<Output = ()> + Send + 'static,
    {
        for (index, handle) in self.handles.iter().enumerate() {
            handle.spawn(task(index));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_task_runs_on_its_own_worker_thread() {
        let shutdown = CancellationToken::new();
        let workers = Workers::start(3, &shutdown).unwrap();
        let (tx, rx) = mpsc::channel();
        workers.each(|index| {
            let tx = tx.clone();
            async move {
                let name = thread::current().name().map(str::to_string);
                tx.send((index, current(), name)).unwrap();
            }
        });
        let mut seen: Vec<_> = (0..3).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        for (i, (index, current, name)) in seen.into_iter().enumerate() {
            assert_eq!((index, current), (i, i));
            assert_eq!(name, Some(format!("proxy-worker-{i}")));
        }
        shutdown.cancel();
    }
}
