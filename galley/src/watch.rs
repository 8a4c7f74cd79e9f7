//! Debounced change notifications for a directory tree or for one file.
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
    _watcher: RecommendedWatcher,
    events: mpsc::UnboundedReceiver<notify::Result<Event>>,
    /// Only events about this path count (a file watched through its directory).
    only: Option<PathBuf>,
}

impl Changes {
    /// Changes anywhere below `dir`.
    pub fn dir(dir: &Path) -> anyhow::Result<Self> {
        Self::watch(dir, RecursiveMode::Recursive, None)
    }

    /// Changes of the file at `path`, including its replacement by a rename.
    /// The directory is watched, since editors replace files rather than
    /// write them in place.
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let file = std::path::absolute(path)?;
        Self::watch(dir, RecursiveMode::NonRecursive, Some(file))
    }

    fn watch(path: &Path, mode: RecursiveMode, only: Option<PathBuf>) -> anyhow::Result<Self> {
        let (tx, events) = mpsc::unbounded_channel();
        let mut watcher = notify::recommended_watcher(move |event| {
            let _ = tx.send(event);
        })?;
        watcher
            .watch(path, mode)
            .map_err(|e| anyhow::anyhow!("cannot watch {}: {e}", path.display()))?;
        Ok(Self {
            _watcher: watcher,
            events,
            only,
        })
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
        let ours = self
            .only
            .as_ref()
            .is_none_or(|file| event.paths.iter().any(|p| p == file));
        content && ours
    }
}
