//! The directory source: every `*.yaml`, `*.yml` and `*.json` file below a
//! directory, parsed into config objects and written into the MCP store,
//! then kept in step with the directory as files are added, changed,
//! renamed and removed.
//!
//! A file that fails to parse keeps the objects it last parsed to, so one
//! bad edit never removes good config from the mesh; the error is logged
//! with the file, object and field.

use std::{
    collections::{BTreeMap, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use component::CancellationToken;
use mcp_proto::{kinds, mcp::Store, object::ConfigObject, pb::istio::mcp::v1alpha1::Resource};

use crate::watch::Changes;

/// What the directory held at its last read, file by file.
#[derive(Default)]
pub struct DirSource {
    dir: PathBuf,
    files: BTreeMap<PathBuf, Vec<ConfigObject>>,
}

/// What one read found wrong, file by file.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub errors: Vec<String>,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            files: BTreeMap::new(),
        }
    }

    /// Reads the directory again and writes every collection into `store`.
    pub fn reload(&mut self, store: &Store) -> LoadReport {
        let mut report = LoadReport::default();
        let mut files = BTreeMap::new();
        for path in config_files(&self.dir, &mut report) {
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| format!("{}: {e}", path.display()))
                .and_then(|text| {
                    ConfigObject::parse_yaml(&text, &path.display().to_string())
                        .map_err(|e| e.to_string())
                });
            match parsed {
                Ok(objects) => {
                    files.insert(path, objects);
                }
                Err(e) => {
                    report.errors.push(e);
                    if let Some(last_good) = self.files.remove(&path) {
                        files.insert(path, last_good);
                    }
                }
            }
        }
        self.files = files;
        self.publish(store, &mut report);
        report
    }

    fn publish(&self, store: &Store, report: &mut LoadReport) {
        let mut by_collection: HashMap<&str, BTreeMap<String, (Resource, &Path)>> = HashMap::new();
        for (path, objects) in &self.files {
            for object in objects {
                let name = object.mcp_name();
                let collection = by_collection.entry(object.kind.collection).or_default();
                if let Some((_, first)) = collection.get(&name) {
                    report.errors.push(format!(
                        "{}: {} {name} is also defined in {}; keeping the first",
                        path.display(),
                        object.kind.kind,
                        first.display()
                    ));
                    continue;
                }
                collection.insert(name, (object.to_resource(), path));
            }
        }
        for kind in kinds::KINDS {
            if !store.serves(kind.collection) || kind.api_version.is_empty() {
                continue;
            }
            let resources = by_collection
                .remove(kind.collection)
                .map(|c| c.into_values().map(|(r, _)| r).collect())
                .unwrap_or_default();
            if let Err(e) = store.replace(kind.collection, resources) {
                report.errors.push(e.to_string());
            }
        }
    }

    /// Starts watching, loads the directory once, and returns that load's
    /// report with the future that keeps `store` in step with the directory
    /// until `shutdown`. The watch starts before the read, so no edit falls
    /// between them; serve only after this returns, so that no sink is ever
    /// sent the empty store that precedes the first load.
    pub fn start(
        mut self,
        store: Arc<Store>,
        shutdown: CancellationToken,
    ) -> anyhow::Result<(LoadReport, impl Future<Output = ()> + Send)> {
        let mut changes = Changes::dir(&self.dir)?;
        let first = self.reload(&store);
        log_report(&self.dir, &first);
        let follow = async move {
            loop {
                tokio::select! {
                    changed = changes.next() => {
                        if changed.is_none() {
                            break;
                        }
                        let report = self.reload(&store);
                        log_report(&self.dir, &report);
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        Ok((first, follow))
    }

    /// Every object held, file by file in path order.
    pub fn objects(&self) -> impl Iterator<Item = &ConfigObject> {
        self.files.values().flatten()
    }
}

pub fn log_report(dir: &Path, report: &LoadReport) {
    for e in &report.errors {
        tracing::error!(dir = %dir.display(), "{e}");
    }
}

/// Config files below `dir`, sorted; hidden files (editor swap files) are
/// skipped.
fn config_files(dir: &Path, report: &mut LoadReport) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) => {
                report.errors.push(format!("{}: {e}", d.display()));
                continue;
            }
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let hidden = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if path.is_dir() {
                pending.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: gw, namespace: ns}\nspec: {selector: {app: a}}\n";

    fn store() -> Store {
        Store::new(kinds::KINDS.iter().map(|k| k.collection))
    }

    #[test]
    fn files_become_collections_and_bad_edits_keep_the_last_good_objects() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("gw.yaml"), GW).unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub/se.json"), r#"{"apiVersion":"networking.istio.io/v1alpha3","kind":"ServiceEntry","metadata":{"name":"se"},"spec":{"hosts":["a.example.com"]}}"#).unwrap();
        std::fs::write(dir.path().join(".gw.yaml.swp"), "garbage").unwrap();
        std::fs::write(dir.path().join("notes.txt"), "ignored").unwrap();
        let store = store();
        let mut source = DirSource::new(dir.path());
        assert!(source.reload(&store).errors.is_empty());
        assert_eq!(store.len(kinds::GATEWAYS), 1);
        assert_eq!(store.len(kinds::SERVICE_ENTRIES), 1);

        std::fs::write(dir.path().join("gw.yaml"), "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: gw}\nspec: {selectr: {}}\n").unwrap();
        let report = source.reload(&store);
        assert!(
            report.errors[0].contains("gw.yaml") && report.errors[0].contains("selectr"),
            "{report:?}"
        );
        assert_eq!(store.len(kinds::GATEWAYS), 1, "last good object kept");

        std::fs::remove_file(dir.path().join("gw.yaml")).unwrap();
        assert!(source.reload(&store).errors.is_empty());
        assert_eq!(
            store.len(kinds::GATEWAYS),
            0,
            "a deleted file removes its objects"
        );
    }

    #[test]
    fn duplicate_names_are_reported_and_the_first_kept() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GW).unwrap();
        std::fs::write(dir.path().join("b.yaml"), GW.replace("app: a", "app: b")).unwrap();
        let store = store();
        let report = DirSource::new(dir.path()).reload(&store);
        assert_eq!(report.errors.len(), 1);
        assert!(report.errors[0].contains("b.yaml") && report.errors[0].contains("a.yaml"));
        assert_eq!(store.len(kinds::GATEWAYS), 1);
    }
}
