//! The config a source serves, and how it reaches the MCP store: each object
//! parsed once into its resource and its own problems, references between
//! objects checked on every change, invalid objects held back with their
//! last valid version served instead, and only differences written to the
//! store. The directory source and the Kubernetes source feed it.

use std::{collections::BTreeMap, sync::Arc};

use mcp::Store;
use mesh_api::{kinds, object::ConfigObject, pb::istio::mcp::v1alpha1::Resource};

use crate::validation::{self, Problem};

/// An object's identity in the store: collection and MCP name.
pub type Key = (&'static str, String);

/// An object as read: its MCP resource and its own problems, computed once
/// when its file is read. The decoded object is kept only where validation
/// between objects needs it (Mixer rules and what they name); elsewhere the
/// encoded resource is all that is served, and memory stays near the size of
/// the config.
pub struct Parsed {
    key: Key,
    location: String,
    resource: Resource,
    problems: Vec<Problem>,
    object: Option<ConfigObject>,
}

impl Parsed {
    pub fn new(object: ConfigObject) -> Arc<Self> {
        Arc::new(Self {
            key: (object.kind.collection, object.mcp_name()),
            resource: object.to_resource(),
            problems: validation::validate(&object),
            location: object.location.clone(),
            object: validation::has_references(object.kind).then_some(object),
        })
    }
}

/// What one read found wrong: every current problem, not only new ones.
#[derive(Debug, Default, Clone)]
pub struct LoadReport {
    /// One line per problem, naming the file, document, object and field.
    pub errors: Vec<String>,
    /// One line per thing served but not honoured, named the same way.
    pub warnings: Vec<String>,
    /// Objects not served as they now are (invalid, or shadowed by a
    /// duplicate).
    pub rejected: usize,
    /// The bound of [`YamlLimits`](mesh_api::object::YamlLimits) each file
    /// this read refused whole broke.
    pub exceeded: Vec<mesh_api::object::Limit>,
}

/// What a source serves: each valid object, or the last valid version of
/// one that is now invalid.
#[derive(Default)]
pub struct ConfigSet {
    served: BTreeMap<Key, Arc<Parsed>>,
}

impl ConfigSet {
    /// Makes `candidates` (every object a source holds, in its order of
    /// precedence) what is served, and writes the differences into `store`.
    /// An invalid object is never served; its last valid version, if any,
    /// stays served in its place. Problems go to `report`.
    pub fn publish<'a>(
        &mut self,
        store: &Store,
        candidates: impl Iterator<Item = &'a Arc<Parsed>>,
        report: &mut LoadReport,
    ) {
        let mut current: BTreeMap<Key, &Arc<Parsed>> = BTreeMap::new();
        for parsed in candidates {
            match current.get(&parsed.key) {
                Some(first) => {
                    report.rejected += 1;
                    report.errors.push(format!(
                        "{}: also defined at {}; keeping the first",
                        parsed.location, first.location
                    ));
                }
                None => {
                    current.insert(parsed.key.clone(), parsed);
                }
            }
        }
        let with_references: Vec<(&Key, &ConfigObject)> = current
            .iter()
            .filter_map(|(key, p)| p.object.as_ref().map(|o| (key, o)))
            .collect();
        let objects: Vec<&ConfigObject> = with_references.iter().map(|(_, o)| *o).collect();
        let mut references: BTreeMap<&Key, Vec<Problem>> = BTreeMap::new();
        for (i, problem) in validation::validate_references(&objects) {
            references
                .entry(with_references[i].0)
                .or_default()
                .push(problem);
        }

        let mut served = BTreeMap::new();
        for (key, parsed) in &current {
            let key = (*key).clone();
            let (problems, warnings): (Vec<&Problem>, Vec<&Problem>) = parsed
                .problems
                .iter()
                .chain(references.get(&key).into_iter().flatten())
                .partition(|p| p.is_error());
            report.warnings.extend(
                warnings
                    .into_iter()
                    .map(|w| format!("{}: {w}", parsed.location)),
            );
            if problems.is_empty() {
                served.insert(key, (*parsed).clone());
                continue;
            }
            report.rejected += 1;
            let kept = self.served.get(&key);
            let outcome = if kept.is_some() {
                "the last valid version stays served"
            } else {
                "not served"
            };
            for problem in problems {
                report
                    .errors
                    .push(format!("{}: {problem} ({outcome})", parsed.location));
            }
            if let Some(last_good) = kept {
                served.insert(key, last_good.clone());
            }
        }

        // Only what changed goes to the store.
        let mut upserts: BTreeMap<&str, Vec<Resource>> = BTreeMap::new();
        let mut removals: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (key, parsed) in &served {
            if !self
                .served
                .get(key)
                .is_some_and(|old| Arc::ptr_eq(old, parsed))
            {
                upserts
                    .entry(key.0)
                    .or_default()
                    .push(parsed.resource.clone());
            }
        }
        for key in self.served.keys().filter(|k| !served.contains_key(*k)) {
            removals.entry(key.0).or_default().push(key.1.clone());
        }
        for kind in kinds::KINDS.iter().filter(|k| !k.api_version.is_empty()) {
            let up = upserts.remove(kind.collection).unwrap_or_default();
            let gone = removals.remove(kind.collection).unwrap_or_default();
            if up.is_empty() && gone.is_empty() {
                continue;
            }
            if let Err(e) = store.apply(kind.collection, up, &gone) {
                report.errors.push(e.to_string());
            }
        }
        self.served = served;
    }
}
