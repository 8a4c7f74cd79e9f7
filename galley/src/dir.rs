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

use component::watch::Changes;

use crate::validation;

/// An object's identity in the store: collection and MCP name.
type Key = (&'static str, String);

/// What the directory held at its last read, file by file, and what of it
/// is served.
#[derive(Default)]
pub struct DirSource {
    dir: PathBuf,
    /// The objects of every file as last parsed successfully.
    files: BTreeMap<PathBuf, Vec<ConfigObject>>,
    /// The objects served: each valid object, or the last valid version of
    /// one that is now invalid.
    served: BTreeMap<Key, ConfigObject>,
}

/// What one read found wrong.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// One line per problem, naming the file, document, object and field.
    pub errors: Vec<String>,
    /// Objects not served as they now are (invalid, or shadowed by a
    /// duplicate).
    pub rejected: usize,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Self::default()
        }
    }

    /// Reads the directory again and writes every collection into `store`.
    pub fn reload(&mut self, store: &Store) -> LoadReport {
        let mut report = LoadReport::default();
        let mut files = BTreeMap::new();
        for path in config_files_in(std::slice::from_ref(&self.dir), &mut report.errors) {
            match read_objects(&path) {
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

    /// Validates what the files hold and writes what passes into `store`.
    /// An invalid object is never served; its last valid version, if any,
    /// stays served in its place.
    fn publish(&mut self, store: &Store, report: &mut LoadReport) {
        let mut current: BTreeMap<Key, &ConfigObject> = BTreeMap::new();
        for object in self.files.values().flatten() {
            let key = (object.kind.collection, object.mcp_name());
            if let Some(first) = current.get(&key) {
                report.rejected += 1;
                report.errors.push(format!(
                    "{}: also defined at {}; keeping the first",
                    object.location, first.location
                ));
                continue;
            }
            current.insert(key, object);
        }
        let objects: Vec<&ConfigObject> = current.values().copied().collect();
        let problems = validation::validate_all(&objects);

        let mut served = BTreeMap::new();
        for (i, (key, object)) in current.into_iter().enumerate() {
            match problems.get(&i) {
                None => {
                    served.insert(key, object.clone());
                }
                Some(found) => {
                    report.rejected += 1;
                    let kept = self.served.get(&key);
                    let outcome = if kept.is_some() {
                        "the last valid version stays served"
                    } else {
                        "not served"
                    };
                    for problem in found {
                        report
                            .errors
                            .push(format!("{}: {problem} ({outcome})", object.location));
                    }
                    if let Some(last_good) = kept {
                        served.insert(key, last_good.clone());
                    }
                }
            }
        }
        self.served = served;

        let mut by_collection: HashMap<&str, Vec<Resource>> = HashMap::new();
        for ((collection, _), object) in &self.served {
            by_collection
                .entry(collection)
                .or_default()
                .push(object.to_resource());
        }
        for kind in kinds::KINDS {
            if !store.serves(kind.collection) || kind.api_version.is_empty() {
                continue;
            }
            let resources = by_collection.remove(kind.collection).unwrap_or_default();
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
    /// `on_load` sees the report of every load, the first included.
    pub fn start(
        mut self,
        store: Arc<Store>,
        shutdown: CancellationToken,
        mut on_load: impl FnMut(&LoadReport) + Send + 'static,
    ) -> anyhow::Result<(LoadReport, impl Future<Output = ()> + Send)> {
        let mut changes = Changes::dir(&self.dir)?;
        let first = self.reload(&store);
        log_report(&self.dir, &first);
        on_load(&first);
        let follow = async move {
            loop {
                tokio::select! {
                    changed = changes.next() => {
                        if changed.is_none() {
                            break;
                        }
                        let report = self.reload(&store);
                        log_report(&self.dir, &report);
                        on_load(&report);
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

/// The config files named by `roots`: a file as it is, a directory's
/// `*.yaml`, `*.yml` and `*.json` files at any depth, sorted, hidden ones
/// (editor swap files) skipped. Unreadable directories are reported.
pub fn config_files_in(roots: &[PathBuf], errors: &mut Vec<String>) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut pending = Vec::new();
    for root in roots {
        if root.is_dir() {
            pending.push(root.clone());
        } else {
            out.push(root.clone());
        }
    }
    while let Some(d) = pending.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(entries) => entries,
            Err(e) => {
                errors.push(format!("{}: {e}", d.display()));
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

/// Reads and parses one config file; the error names the file.
pub fn read_objects(path: &Path) -> Result<Vec<ConfigObject>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    ConfigObject::parse_yaml(&text, &path.display().to_string()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GW: &str = "apiVersion: networking.istio.io/v1alpha3\nkind: Gateway\nmetadata: {name: gw, namespace: ns}\nspec:\n  selector: {app: a}\n  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ['*']}]\n";

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
    fn an_invalid_object_is_not_served_and_its_last_valid_version_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.yaml");
        std::fs::write(&path, GW).unwrap();
        let store = store();
        let mut source = DirSource::new(dir.path());
        assert!(source.reload(&store).errors.is_empty());
        let served = store.full(kinds::GATEWAYS).unwrap().1;

        // Port 0 and a second server without hosts: schema-valid, semantically not.
        let broken = GW.replace("number: 80", "number: 0").replace(
            "}]\n",
            "}, {port: {number: 81, name: web, protocol: HTTP}, hosts: []}]\n",
        );
        std::fs::write(&path, broken).unwrap();
        let report = source.reload(&store);
        assert_eq!(report.rejected, 1);
        let all = report.errors.join("\n");
        assert!(all.contains("gw.yaml: document 1 (Gateway ns/gw): spec.servers[0].port.number: port must be in 1..65535"), "{all}");
        assert!(
            all.contains("spec.servers[1].hosts: a server needs at least one host"),
            "{all}"
        );
        assert!(all.contains("the last valid version stays served"), "{all}");
        assert_eq!(
            store.full(kinds::GATEWAYS).unwrap().1,
            served,
            "the last valid version is still served"
        );

        // A new object that is invalid from the start is not served at all.
        std::fs::write(dir.path().join("vs.yaml"), "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}, weight: 60}, {destination: {host: b}, weight: 60}]}]}\n").unwrap();
        let report = source.reload(&store);
        assert!(
            report.errors.iter().any(|e| e.contains(
                "spec.http[0].route: destination weights add up to 120, not 100 (not served)"
            )),
            "{:?}",
            report.errors
        );
        assert_eq!(store.len(kinds::VIRTUAL_SERVICES), 0);

        // Fixed, both are served as they now are.
        std::fs::write(&path, GW.replace("app: a", "app: fixed")).unwrap();
        std::fs::write(dir.path().join("vs.yaml"), "apiVersion: networking.istio.io/v1alpha3\nkind: VirtualService\nmetadata: {name: r, namespace: ns}\nspec: {hosts: [a], http: [{route: [{destination: {host: a}}]}]}\n").unwrap();
        let report = source.reload(&store);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_ne!(store.full(kinds::GATEWAYS).unwrap().1, served);
        assert_eq!(store.len(kinds::VIRTUAL_SERVICES), 1);
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
