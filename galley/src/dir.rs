//! The directory source: every `*.yaml`, `*.yml` and `*.json` file below a
//! directory, parsed into config objects and written into the MCP store,
//! then kept in step with the directory as files are added, changed,
//! renamed and removed.
//!
//! A file that fails to parse keeps the objects it last parsed to, and an
//! object that fails validation keeps its last valid version served, so one
//! bad edit never removes good config from the mesh; the error names the
//! file, document, object and field. A reload reads only the files that
//! changed and sends the store only the objects that changed.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Arc,
};

use component::{CancellationToken, watch::Changes};
use mcp::Store;
use mesh_api::object::{ConfigObject, Limit, YamlLimits};

use crate::config_set::{ConfigSet, LoadReport, Parsed};

/// A file's content, by hash: reading a file is cheap, parsing it is not.
/// (Size and modification time would miss two same-size writes within the
/// file system's timestamp granularity.)
type Fingerprint = u64;

fn fingerprint(text: &str) -> Fingerprint {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.hash(&mut hasher);
    hasher.finish()
}

/// One file as last read.
struct FileState {
    fingerprint: Fingerprint,
    /// Its objects as last parsed successfully.
    objects: Vec<Arc<Parsed>>,
    /// Why its current content does not parse, if it does not.
    error: Option<String>,
    /// The bound it broke, if that is why.
    exceeded: Option<Limit>,
}

/// What the directory held at its last read, file by file, and what of it
/// is served. A reload parses only files whose content changed.
#[derive(Default)]
pub struct DirSource {
    dir: PathBuf,
    limits: YamlLimits,
    files: BTreeMap<PathBuf, FileState>,
    served: ConfigSet,
}

impl DirSource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            ..Self::default()
        }
    }

    /// Refuses files beyond `limits` (by default, [`YamlLimits::default`]).
    pub fn limits(mut self, limits: YamlLimits) -> Self {
        self.limits = limits;
        self
    }

    /// Reads what changed in the directory and brings `store` in step,
    /// in a span: the root of the trace of every change it makes.
    pub fn reload(&mut self, store: &Store) -> LoadReport {
        let span = component::trace::span(
            "galley",
            "galley reload",
            None,
            None,
            vec![opentelemetry::KeyValue::new(
                "galley.dir",
                self.dir.display().to_string(),
            )],
        );
        let report = {
            let _in_span = span.clone().attach();
            self.read(store)
        };
        let problems = report.errors.len();
        component::trace::end(
            &span,
            (problems > 0).then(|| format!("{problems} problems")),
        );
        report
    }

    fn read(&mut self, store: &Store) -> LoadReport {
        let mut report = LoadReport::default();
        let mut files = BTreeMap::new();
        for path in config_files_in(std::slice::from_ref(&self.dir), &mut report.errors) {
            let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            if let Err(e) = self.limits.check_bytes(size, &path.display().to_string()) {
                // Refused unread; its objects as last read stay served.
                report.errors.push(e.to_string());
                report.exceeded.extend(e.exceeded);
                if let Some(state) = self.files.remove(&path) {
                    files.insert(path, state);
                }
                continue;
            }
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    // Unreadable, or gone between listing and reading.
                    report.errors.push(format!("{}: {e}", path.display()));
                    continue;
                }
            };
            let fingerprint = fingerprint(&text);
            let state = match self.files.remove(&path) {
                Some(state) if state.fingerprint == fingerprint => state,
                previous => {
                    let source = path.display().to_string();
                    match ConfigObject::parse_yaml_within(&text, &source, &self.limits) {
                        Ok(objects) => FileState {
                            fingerprint,
                            objects: objects.into_iter().map(Parsed::new).collect(),
                            error: None,
                            exceeded: None,
                        },
                        Err(e) => FileState {
                            fingerprint,
                            objects: previous.map(|p| p.objects).unwrap_or_default(),
                            error: Some(e.to_string()),
                            exceeded: e.exceeded,
                        },
                    }
                }
            };
            report.errors.extend(state.error.clone());
            report.exceeded.extend(state.exceeded);
            files.insert(path, state);
        }
        self.files = files;
        let candidates = self.files.values().flat_map(|f| &f.objects);
        self.served.publish(store, candidates, &mut report);
        report
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
                        let started = std::time::Instant::now();
                        let report = self.reload(&store);
                        tracing::debug!(elapsed = ?started.elapsed(), problems = report.errors.len(), "config directory reloaded");
                        log_report(&self.dir, &report);
                        on_load(&report);
                    }
                    _ = shutdown.cancelled() => break,
                }
            }
        };
        Ok((first, follow))
    }
}

pub fn log_report(dir: &Path, report: &LoadReport) {
    for e in &report.errors {
        tracing::error!(dir = %dir.display(), "{e}");
    }
    for w in &report.warnings {
        tracing::warn!(dir = %dir.display(), "{w}");
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
    use mesh_api::kinds;

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
    fn a_file_over_the_byte_bound_is_refused_unread_and_its_last_objects_stay() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gw.yaml");
        std::fs::write(&path, GW).unwrap();
        let store = store();
        let limits = YamlLimits {
            bytes: GW.len() + 10,
            ..YamlLimits::default()
        };
        let mut source = DirSource::new(dir.path()).limits(limits);
        assert!(source.reload(&store).errors.is_empty());
        std::fs::write(&path, format!("{GW}# {}\n", "x".repeat(20))).unwrap();
        let report = source.reload(&store);
        assert_eq!(report.exceeded, [Limit::Bytes]);
        assert!(
            report.errors[0].contains("gw.yaml") && report.errors[0].contains("over the limit"),
            "{report:?}"
        );
        assert_eq!(store.len(kinds::GATEWAYS), 1, "last good object kept");
        // Still too big on the next read: still said.
        assert_eq!(source.reload(&store).exceeded, [Limit::Bytes]);
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
    fn a_reload_changes_only_what_changed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.yaml"), GW).unwrap();
        std::fs::write(
            dir.path().join("b.yaml"),
            GW.replace("name: gw", "name: other"),
        )
        .unwrap();
        let store = store();
        let mut source = DirSource::new(dir.path());
        source.reload(&store);
        let seq = store.seq(kinds::GATEWAYS).unwrap();

        assert!(source.reload(&store).errors.is_empty());
        assert_eq!(
            store.seq(kinds::GATEWAYS).unwrap(),
            seq,
            "nothing changed, nothing sent"
        );

        // Rewriting a file with the same objects is no change either.
        std::fs::write(dir.path().join("a.yaml"), format!("# comment\n{GW}")).unwrap();
        source.reload(&store);
        assert_eq!(store.seq(kinds::GATEWAYS).unwrap(), seq);

        // One changed object is one change.
        std::fs::write(
            dir.path().join("a.yaml"),
            GW.replace("app: a", "app: changed"),
        )
        .unwrap();
        source.reload(&store);
        assert_eq!(store.seq(kinds::GATEWAYS).unwrap(), seq + 1);
        let diff = store.diff_since(kinds::GATEWAYS, seq).unwrap();
        assert_eq!(diff.changed.len(), 1);
        assert_eq!(diff.changed[0].metadata.as_ref().unwrap().name, "ns/gw");
    }

    #[test]
    fn a_rule_is_served_once_what_it_names_exists() {
        let dir = tempfile::tempdir().unwrap();
        let rule = "apiVersion: config.istio.io/v1alpha2\nkind: rule\nmetadata: {name: deny, namespace: ns}\nspec: {actions: [{handler: denier, instances: [nothing]}]}\n";
        std::fs::write(dir.path().join("rule.yaml"), rule).unwrap();
        let store = store();
        let mut source = DirSource::new(dir.path());
        let report = source.reload(&store);
        assert!(
            report
                .errors
                .iter()
                .any(|e| e.contains("no handler \"denier\" exists")),
            "{:?}",
            report.errors
        );
        assert_eq!(store.len(kinds::RULES), 0);

        let named = "apiVersion: config.istio.io/v1alpha2\nkind: handler\nmetadata: {name: denier, namespace: ns}\nspec: {compiledAdapter: denier}\n---\napiVersion: config.istio.io/v1alpha2\nkind: instance\nmetadata: {name: nothing, namespace: ns}\nspec: {compiledTemplate: checknothing}\n";
        std::fs::write(dir.path().join("handler.yaml"), named).unwrap();
        let report = source.reload(&store);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(store.len(kinds::RULES), 1);
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
