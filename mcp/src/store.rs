//! The source's versioned in-memory store: what a source serves, per
//! collection, plus a change log so that an incremental response costs work
//! proportional to what changed, not to the collection's size.
//!
//! Producers (Galley's config sources, `meshctl mcp serve`, benchmarks)
//! write with [`Store::upsert`], [`Store::remove`] and [`Store::replace`];
//! source streams read full states and diffs and wait on [`Store::subscribe`].

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use opentelemetry::trace::SpanContext;
use tokio::sync::watch;

use mesh_api::pb::istio::mcp::v1alpha1::Resource;

/// How many removed names a collection remembers beyond its live size.
/// A sink further behind than that gets the full state instead of a diff.
const MIN_TOMBSTONES: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("collection {0:?} is not served by this source")]
    UnknownCollection(String),
    #[error("resource in collection {0:?} has no metadata or an empty name")]
    Unnamed(String),
}

/// The resources a sink is told to add or change, and the names it is told
/// to remove, to move it from one state of a collection to another.
#[derive(Debug, Default)]
pub struct Diff {
    pub seq: u64,
    pub changed: Vec<Arc<Resource>>,
    pub removed: Vec<String>,
}

pub struct Store {
    collections: RwLock<HashMap<String, Collection>>,
    changed: watch::Sender<u64>,
}

#[derive(Default)]
struct Collection {
    /// Increases with every change; 0 is the empty collection as created.
    seq: u64,
    live: HashMap<String, Entry>,
    tombstones: HashMap<String, u64>,
    /// The same removals ordered by `seq`, oldest first, for trimming.
    tombstone_order: BTreeMap<u64, String>,
    /// `seq -> name` of the last change of every live or removed name.
    log: BTreeMap<u64, String>,
    /// Diffs from a base older than this cannot be computed any more.
    floor: u64,
    /// The span the last change was made in (a Galley reload, say), which
    /// the responses that carry it continue.
    trace: Option<SpanContext>,
}

struct Entry {
    resource: Arc<Resource>,
    seq: u64,
}

impl Store {
    /// A store serving exactly these collections, all empty.
    pub fn new<I, S>(collections: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let collections = collections
            .into_iter()
            .map(|c| (c.into(), Collection::default()))
            .collect();
        Self {
            collections: RwLock::new(collections),
            changed: watch::channel(0).0,
        }
    }

    pub fn serves(&self, collection: &str) -> bool {
        self.read().contains_key(collection)
    }

    /// A receiver woken after every change of any collection.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Adds or replaces one resource. Returns whether anything changed: a
    /// resource whose version is already held is not a change.
    pub fn upsert(&self, collection: &str, resource: Resource) -> Result<bool, StoreError> {
        self.upsert_many(collection, vec![resource])
    }

    /// Adds or replaces several resources as one change: streams see all of
    /// them or none. Returns whether anything changed.
    pub fn upsert_many(
        &self,
        collection: &str,
        resources: Vec<Resource>,
    ) -> Result<bool, StoreError> {
        self.apply(collection, resources, &[])
    }

    /// Removes one resource by name. Returns whether it was there.
    pub fn remove(&self, collection: &str, name: &str) -> Result<bool, StoreError> {
        self.apply(collection, Vec::new(), &[name.to_string()])
    }

    /// Adds or replaces `upserts` and removes `removals`, as one change.
    /// Returns whether anything changed.
    pub fn apply(
        &self,
        collection: &str,
        upserts: Vec<Resource>,
        removals: &[String],
    ) -> Result<bool, StoreError> {
        let names = upserts
            .iter()
            .map(|r| named(collection, r))
            .collect::<Result<Vec<_>, _>>()?;
        let changed = self.write_collection(collection, |c| {
            let removed = removals
                .iter()
                .fold(false, |changed, name| c.remove(name) | changed);
            names
                .into_iter()
                .zip(upserts)
                .fold(removed, |changed, (name, r)| c.upsert(name, r) | changed)
        })?;
        self.notify(changed);
        Ok(changed)
    }

    /// Makes each of `collections` hold exactly the `objects` of its kind
    /// (tools and tests serving parsed YAML).
    pub fn replace_with_objects(
        &self,
        collections: &[&str],
        objects: &[mesh_api::object::ConfigObject],
    ) -> Result<(), StoreError> {
        for collection in collections {
            let resources = objects
                .iter()
                .filter(|o| o.kind.collection == *collection)
                .map(|o| o.to_resource())
                .collect();
            self.replace(collection, resources)?;
        }
        Ok(())
    }

    /// Makes `resources` the whole content of `collection`, touching only
    /// what differs (by name and version). Returns whether anything changed.
    pub fn replace(&self, collection: &str, resources: Vec<Resource>) -> Result<bool, StoreError> {
        let changed = self.write_collection(collection, |c| -> Result<bool, StoreError> {
            let names = resources
                .iter()
                .map(|r| named(collection, r))
                .collect::<Result<Vec<_>, _>>()?;
            let keep: HashSet<&str> = names.iter().map(String::as_str).collect();
            let gone: Vec<String> = c
                .live
                .keys()
                .filter(|n| !keep.contains(n.as_str()))
                .cloned()
                .collect();
            let mut changed = false;
            for name in gone {
                changed |= c.remove(&name);
            }
            for (name, r) in names.into_iter().zip(resources) {
                changed |= c.upsert(name, r);
            }
            Ok(changed)
        })??;
        self.notify(changed);
        Ok(changed)
    }

    /// The collection's current sequence number.
    pub fn seq(&self, collection: &str) -> Option<u64> {
        self.read().get(collection).map(|c| c.seq)
    }

    /// The span the collection's last change was made in, if traced.
    pub fn trace(&self, collection: &str) -> Option<SpanContext> {
        self.read().get(collection)?.trace.clone()
    }

    /// Number of resources held in `collection`.
    pub fn len(&self, collection: &str) -> usize {
        self.read().get(collection).map_or(0, |c| c.live.len())
    }

    /// Every resource of the collection, sorted by name.
    pub fn full(&self, collection: &str) -> Option<(u64, Vec<Arc<Resource>>)> {
        let guard = self.read();
        let c = guard.get(collection)?;
        let mut all: Vec<_> = c.live.values().map(|e| e.resource.clone()).collect();
        all.sort_by(|a, b| name_of(a).cmp(&name_of(b)));
        Some((c.seq, all))
    }

    /// What changed since `base`: `None` when `base` is older than the
    /// remembered history (the caller then sends the full state).
    pub fn diff_since(&self, collection: &str, base: u64) -> Option<Diff> {
        let guard = self.read();
        let c = guard.get(collection)?;
        if base < c.floor || base > c.seq {
            return None;
        }
        let mut diff = Diff {
            seq: c.seq,
            ..Diff::default()
        };
        for name in c.log.range(base + 1..).map(|(_, name)| name) {
            match c.live.get(name) {
                Some(e) => diff.changed.push(e.resource.clone()),
                None => diff.removed.push(name.clone()),
            }
        }
        Some(diff)
    }

    /// What a sink holding `versions` (name -> version) lacks: the first
    /// response of an incremental stream (MCP rule 5).
    pub fn diff_against(
        &self,
        collection: &str,
        versions: &BTreeMap<String, String>,
    ) -> Option<Diff> {
        let guard = self.read();
        let c = guard.get(collection)?;
        let mut diff = Diff {
            seq: c.seq,
            ..Diff::default()
        };
        for (name, e) in &c.live {
            if versions.get(name).map(String::as_str) != Some(version_of(&e.resource)) {
                diff.changed.push(e.resource.clone());
            }
        }
        diff.changed.sort_by(|a, b| name_of(a).cmp(&name_of(b)));
        diff.removed = versions
            .keys()
            .filter(|n| !c.live.contains_key(*n))
            .cloned()
            .collect();
        diff.removed.sort();
        Some(diff)
    }

    fn read(&self) -> RwLockReadGuard<'_, HashMap<String, Collection>> {
        self.collections.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, HashMap<String, Collection>> {
        self.collections.write().unwrap_or_else(|e| e.into_inner())
    }

    fn write_collection<T>(
        &self,
        collection: &str,
        f: impl FnOnce(&mut Collection) -> T,
    ) -> Result<T, StoreError> {
        let mut guard = self.write();
        let c = guard
            .get_mut(collection)
            .ok_or_else(|| StoreError::UnknownCollection(collection.to_string()))?;
        Ok(f(c))
    }

    fn notify(&self, changed: bool) {
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }
}

impl Collection {
    fn upsert(&mut self, name: String, resource: Resource) -> bool {
        if let Some(e) = self.live.get(&name)
            && version_of(&e.resource) == version_of(&resource)
        {
            return false;
        }
        let seq = self.bump(&name);
        if let Some(removed_at) = self.tombstones.remove(&name) {
            self.tombstone_order.remove(&removed_at);
        }
        self.live.insert(
            name,
            Entry {
                resource: Arc::new(resource),
                seq,
            },
        );
        true
    }

    fn remove(&mut self, name: &str) -> bool {
        if !self.live.contains_key(name) {
            return false;
        }
        let seq = self.bump(name);
        self.live.remove(name);
        self.tombstones.insert(name.to_string(), seq);
        self.tombstone_order.insert(seq, name.to_string());
        self.trim_tombstones();
        true
    }

    /// Advances the sequence and moves `name`'s log entry to it.
    fn bump(&mut self, name: &str) -> u64 {
        let previous = self
            .live
            .get(name)
            .map(|e| e.seq)
            .or_else(|| self.tombstones.get(name).copied());
        if let Some(previous) = previous {
            self.log.remove(&previous);
        }
        self.seq += 1;
        self.log.insert(self.seq, name.to_string());
        self.trace = component::trace::current();
        self.seq
    }

    /// Forgets the oldest removals once there are more than the live size
    /// (and a minimum); sinks older than that get a full state.
    fn trim_tombstones(&mut self) {
        let limit = self.live.len().max(MIN_TOMBSTONES);
        while self.tombstones.len() > limit {
            let Some((seq, name)) = self.tombstone_order.pop_first() else {
                break;
            };
            self.log.remove(&seq);
            self.tombstones.remove(&name);
            self.floor = seq;
        }
    }
}

fn named(collection: &str, r: &Resource) -> Result<String, StoreError> {
    name_of(r)
        .map(str::to_string)
        .ok_or_else(|| StoreError::Unnamed(collection.to_string()))
}

fn name_of(r: &Resource) -> Option<&str> {
    r.metadata
        .as_ref()
        .map(|m| m.name.as_str())
        .filter(|n| !n.is_empty())
}

fn version_of(r: &Resource) -> &str {
    r.metadata.as_ref().map_or("", |m| m.version.as_str())
}
