//! A Galley that follows another (the primary), for a cluster whose
//! components cannot reach the primary's Galley: it takes the mesh's config
//! from the primary over MCP, as a sink, and serves it to its own sinks,
//! merged with what only its own cluster can know.
//!
//! The merge rules, one owner for all of them ([`origin`], [`merge`]):
//! - The cluster's own registry ([`LOCAL`]: Kubernetes services, endpoints,
//!   pods and nodes, and the service entries synthesized from them) comes
//!   from the relay's own source alone; the primary's would describe the
//!   primary's cluster.
//! - Every other collection comes from the primary, with the relay's own
//!   objects of that collection added. On a name clash the primary wins,
//!   and the relay's object is reported as shadowed (on `/debug/relay` and
//!   as a warning on `/debug/config`). A collection the primary does not
//!   serve (it refused it) is the relay's own.
//! - Nothing is served before the primary's first full state: an empty set
//!   would tell every sink that the mesh's config is gone. While the
//!   primary is away the relay serves the last state it had from it.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use component::{Admin, CancellationToken};
use mcp::{McpMetrics, Sink, SinkOptions, SinkSnapshot, Store};
use mesh_api::{kinds, pb::istio::mcp::v1alpha1::Resource};
use serde_json::json;
use tokio::sync::watch;

use crate::status::ConfigStatus;

/// Collections that describe the relay's own cluster: never the primary's.
pub const LOCAL: &[&str] = &[
    kinds::K8S_SERVICES,
    kinds::K8S_ENDPOINTS,
    kinds::K8S_PODS,
    kinds::K8S_NODES,
    kinds::SYNTHETIC_SERVICE_ENTRIES,
];

/// Where a served collection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The relay's own source.
    Local,
    /// The primary, with the relay's own objects under other names.
    Primary,
}

/// The rule for `collection`.
pub fn origin(collection: &str) -> Origin {
    if LOCAL.contains(&collection) {
        Origin::Local
    } else {
        Origin::Primary
    }
}

/// How one collection was merged.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Merged {
    pub resources: Vec<Resource>,
    /// The relay's own objects the primary's hide.
    pub shadowed: Vec<String>,
}

/// Merges one collection by [`origin`]: `primary` is what the primary sent
/// (`None` when it does not serve the collection), `local` the relay's own.
pub fn merge(
    collection: &str,
    primary: Option<&mcp::HeldCollection>,
    local: Vec<Arc<Resource>>,
) -> Merged {
    let own = local.into_iter().map(Arc::unwrap_or_clone);
    let primary = match (origin(collection), primary) {
        (Origin::Primary, Some(held)) if held.refused.is_none() => held,
        _ => {
            return Merged {
                resources: own.collect(),
                shadowed: Vec::new(),
            };
        }
    };
    let mut merged = Merged {
        resources: primary
            .resources
            .values()
            .map(|r| Resource {
                metadata: Some(r.metadata.clone()),
                body: Some(r.body.clone()),
            })
            .collect(),
        shadowed: Vec::new(),
    };
    for resource in own {
        let name = resource.metadata.as_ref().map(|m| m.name.clone());
        match name {
            Some(name) if primary.resources.contains_key(&name) => merged.shadowed.push(name),
            _ => merged.resources.push(resource),
        }
    }
    merged
}

/// Where the relay's primary is.
#[derive(Debug, Clone)]
pub enum Primary {
    /// Dialled: its `ResourceSource` address.
    Dial(String),
    /// It dials the relay's `ResourceSink` at this address.
    Listen(String),
}

/// The relay: the sink that follows the primary, and the task that keeps
/// the served store merged.
pub struct Relay {
    pub sink: Arc<Sink>,
    local: Arc<Store>,
    served: Arc<Store>,
    view: Arc<Mutex<View>>,
    status: ConfigStatus,
}

/// Each collection as last merged: what `/debug/relay` shows.
#[derive(Default)]
struct View {
    collections: BTreeMap<&'static str, CollectionView>,
    serving: bool,
}

/// One collection as last merged.
struct CollectionView {
    /// What it was merged from: the primary's version and whether the
    /// primary refuses it, and the local store's sequence number.
    inputs: (String, bool, u64),
    served: usize,
    shadowed: Vec<String>,
}

impl CollectionView {
    fn to_json(&self, collection: &str) -> serde_json::Value {
        let (version, refused, _) = &self.inputs;
        json!({
            "from": match (origin(collection), refused) {
                (Origin::Local, _) => "this cluster",
                (Origin::Primary, true) => "this relay (the primary refuses it)",
                (Origin::Primary, false) => "the primary, then this relay",
            },
            "primary_version": version,
            "served": self.served,
            "shadowed": self.shadowed,
        })
    }
}

impl Relay {
    /// A relay serving `served`, merged from the primary and `local`; its
    /// sink asks the primary for every collection not [`LOCAL`].
    pub fn new(
        primary: &Primary,
        local: Arc<Store>,
        served: Arc<Store>,
        admin: &Admin,
        status: ConfigStatus,
    ) -> Self {
        let collections = kinds::KINDS
            .iter()
            .map(|k| k.collection)
            .filter(|c| origin(c) == Origin::Primary);
        let options = SinkOptions::new("galley-relay", collections);
        let sink = Arc::new(Sink::new(options, McpMetrics::sink(&mut admin.registry())));
        let view = Arc::new(Mutex::new(View::default()));
        let (page, primary) = (view.clone(), primary.clone());
        admin.debug_page("relay", move || {
            let view = page.lock().unwrap_or_else(|e| e.into_inner());
            let (mode, address) = match &primary {
                Primary::Dial(a) => ("dials the primary's ResourceSource", a),
                Primary::Listen(a) => ("serves ResourceSink for the primary", a),
            };
            json!({
                "primary": {"address": address, "mode": mode},
                "serving": view.serving,
                "rules": [
                    format!("from this cluster only: {}", LOCAL.join(", ")),
                    "every other collection: the primary's, then this relay's own objects under other names; the primary wins a name clash",
                    "a collection the primary refuses: this relay's own",
                    "before the primary's first full state nothing is served; while it is away, its last state is",
                ],
                "collections": view
                    .collections
                    .iter()
                    .map(|(c, v)| (c.to_string(), v.to_json(c)))
                    .collect::<serde_json::Map<_, _>>(),
            })
        });
        Self {
            sink,
            local,
            served,
            view,
            status,
        }
    }

    /// Keeps the served store merged until `shutdown`; `ready` is sent
    /// once the primary's first full state is merged.
    pub async fn run(self, ready: watch::Sender<bool>, shutdown: CancellationToken) {
        let mut primary = self.sink.subscribe();
        let mut local = self.local.subscribe();
        let mut last_trace = None;
        loop {
            let snapshot = primary.borrow_and_update().clone();
            local.borrow_and_update();
            if snapshot.synced() {
                // A traced update of the primary's is merged in a span of
                // its trace, which the pushes of what it changed continue:
                // one edit is one trace across clusters.
                let traced = snapshot
                    .trace
                    .as_ref()
                    .filter(|t| last_trace.as_ref() != Some(*t));
                let span = match traced {
                    Some(update) => component::trace::span(
                        "galley",
                        "galley relay merge",
                        Some(update),
                        None,
                        Vec::new(),
                    ),
                    None => opentelemetry::Context::new(),
                };
                {
                    let _in_span = span.clone().attach();
                    self.merge_changed(&snapshot);
                }
                component::trace::end(&span, None);
                last_trace = snapshot.trace.clone();
                ready.send_replace(true);
            }
            tokio::select! {
                changed = primary.changed() => if changed.is_err() { return },
                changed = local.changed() => if changed.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
        }
    }

    /// Merges again each collection whose inputs moved.
    fn merge_changed(&self, snapshot: &SinkSnapshot) {
        let mut view = self.view.lock().unwrap_or_else(|e| e.into_inner());
        for kind in kinds::KINDS {
            let c = kind.collection;
            let held = snapshot.collections.get(c);
            let inputs = (
                held.map(|h| h.version.clone()).unwrap_or_default(),
                held.is_some_and(|h| h.refused.is_some()),
                self.local.seq(c).unwrap_or_default(),
            );
            if view.collections.get(c).is_some_and(|v| v.inputs == inputs) {
                continue;
            }
            let local = self.local.full(c).map(|(_, r)| r).unwrap_or_default();
            let Merged {
                resources,
                shadowed,
            } = merge(c, held, local);
            let served = resources.len();
            if let Err(e) = self.served.replace(c, resources) {
                tracing::error!(collection = c, error = %e, "cannot serve a relayed collection");
            }
            let merged = CollectionView {
                inputs,
                served,
                shadowed,
            };
            view.collections.insert(c, merged);
        }
        view.serving = true;
        let shadowed = view.collections.iter().flat_map(|(c, v)| {
            v.shadowed.iter().map(move |n| {
                format!(
                    "{c} {n:?}: this relay's object is shadowed by the primary's of the same name"
                )
            })
        });
        self.status.record_relay(shadowed.collect());
    }
}

#[cfg(test)]
mod tests {
    use mcp::{HeldCollection, Payload, SinkResource};
    use mesh_api::pb::istio::mcp::v1alpha1::Metadata;

    use super::*;

    fn resource(name: &str, version: &str) -> Resource {
        Resource {
            metadata: Some(Metadata {
                name: name.into(),
                version: version.into(),
                ..Metadata::default()
            }),
            body: Some(Default::default()),
        }
    }

    fn held(names: &[&str]) -> HeldCollection {
        let mut held = HeldCollection {
            synced: true,
            ..HeldCollection::default()
        };
        for name in names {
            let r = resource(name, "primary");
            let sink = SinkResource {
                metadata: r.metadata.unwrap(),
                body: r.body.unwrap(),
                payload: Payload::Opaque,
            };
            held.resources.insert(name.to_string(), Arc::new(sink));
        }
        held
    }

    fn served(merged: &Merged) -> Vec<(String, String)> {
        let mut all: Vec<_> = merged
            .resources
            .iter()
            .map(|r| {
                let m = r.metadata.as_ref().unwrap();
                (m.name.clone(), m.version.clone())
            })
            .collect();
        all.sort();
        all
    }

    fn local(names: &[&str]) -> Vec<Arc<Resource>> {
        names
            .iter()
            .map(|n| Arc::new(resource(n, "local")))
            .collect()
    }

    #[test]
    fn the_primary_wins_a_clash_and_the_relays_own_objects_fill_in() {
        let primary = held(&["a", "b"]);
        let merged = merge(kinds::VIRTUAL_SERVICES, Some(&primary), local(&["b", "c"]));
        let want = [("a", "primary"), ("b", "primary"), ("c", "local")];
        assert_eq!(served(&merged), want.map(|(n, v)| (n.into(), v.into())));
        assert_eq!(merged.shadowed, ["b"]);
    }

    #[test]
    fn this_clusters_registry_is_its_own_and_a_refused_collection_too() {
        let primary = held(&["a"]);
        let merged = merge(kinds::K8S_SERVICES, Some(&primary), local(&["x"]));
        assert_eq!(served(&merged), [("x".into(), "local".into())]);
        let mut refused = held(&[]);
        refused.refused = Some("not served".into());
        let merged = merge(kinds::MESH_CONFIG, Some(&refused), local(&["default"]));
        assert_eq!(served(&merged), [("default".into(), "local".into())]);
        assert!(merged.shadowed.is_empty());
    }
}
