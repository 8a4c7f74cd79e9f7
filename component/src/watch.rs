//! Debounced change notifications for a directory tree or for some files.
//! Editors save in bursts (write a temp file, rename it over the original,
//! touch metadata); a burst becomes one notification, and reads (our own
//! among them) are not changes.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher, event::ModifyKind};
use tokio::sync::mpsc;

/// Quiet time after a change before it is reported, so that a burst of
/// writes and renames becomes one notification.
pub const DEBOUNCE: Duration = Duration::from_millis(100);

pub struct Changes {
    watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<notify::Result<Event>>,
    /// Only events about these paths count (files watched through their
    /// directories); every event counts when `None`.
    only: Option<Vec<PathBuf>>,
}

impl Changes {
    fn new(only: Option<Vec<PathBuf>>) -> anyhow::Result<Self> {
        let (tx, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })?;
        Ok(Self {
            watcher,
            events,
            only,
        })
    }

    fn watch(&mut self, path: &Path, mode: RecursiveMode) -> anyhow::Result<()> {
        self.watcher
            .watch(path, mode)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", path.display()))
    }

    /// Changes anywhere below `dir`.
    pub fn dir(dir: &Path) -> anyhow::Result<Self> {
        let mut changes = Self::new(None)?;
        changes.watch(dir, RecursiveMode::Recursive)?;
        Ok(changes)
    }

    /// Changes of the file at `path`, including its replacement by a rename.
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        Self::files(&[path])
    }

    /// Changes of any of these files. Their directories are watched, since
    /// editors and secret mounts replace files rather than write them in
    /// place.
    pub fn files(paths: &[&Path]) -> anyhow::Result<Self> {
        let files = paths
            .iter()
            .map(std::path::absolute)
            .collect::<Result<Vec<_>, _>>()?;
        let mut changes = Self::new(Some(files.clone()))?;
        for file in &files {
            let dir = file.parent().unwrap_or(Path::new("/"));
            changes.watch(dir, RecursiveMode::NonRecursive)?;
        }
        Ok(changes)
    }

    /// Waits until a burst of changes is over. `None` once the watch ended.
    pub async fn next(&mut self) -> Option<()> {
        loop {
            match self.events.recv().await? {
                Ok(event) if !self.counts(&event) => continue,
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "file watch error; treating it as a change"),
            }
            while let Ok(Some(_)) = tokio::time::timeout(DEBOUNCE, self.events.recv()).await {}
            return Some(());
        }
    }

    fn counts(&self, event: &Event) -> bool {
        let content = !matches!(
            event.kind,
            EventKind::Access(_) | EventKind::Modify(ModifyKind::Metadata(_))
        );
        // Kubernetes updates a mounted secret by swapping a `..data` symlink
        // beside the files; that counts as a change of the files.
        let swapped = |p: &PathBuf| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(".."))
        };
        let ours = self
            .only
            .as_ref()
            .is_none_or(|files| event.paths.iter().any(|p| files.contains(p) || swapped(p)));
        content && ours
    }
}
