//! The Kubernetes source (`galley --kube`): Istio's custom resources and
//! the core Services, Endpoints, Pods, Nodes and Namespaces, followed with `kube`'s
//! watcher (which resumes after a disconnect and lists again when its
//! resource version has expired). Custom resources go through the same
//! [`ConfigSet`] as files do; the core kinds become the synthetic
//! ServiceEntries of [`service_discovery`], and are served raw in the
//! `k8s/core/v1/*` collections too.
//!
//! A kind whose API the cluster does not serve (a CRD that is not
//! installed) counts as synced and empty, so one missing CRD does not keep
//! Galley from being ready.

use std::{collections::BTreeMap, future::Future, sync::Arc};

use component::CancellationToken;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Namespace, Node, Pod, Service};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ApiResource, DynamicObject},
    runtime::{WatchStreamExt, watcher},
};
use mcp::Store;
use mesh_api::{
    kinds::{self, Body, Kind},
    object::{ConfigObject, versioned_resource},
};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;

use crate::{
    config_set::{ConfigSet, Key, LoadReport, Parsed},
    kube_core,
    service_discovery::{self, Platform},
};

/// What a watcher reports, tagged with what it watches.
enum Update {
    Config(&'static Kind, Box<watcher::Event<DynamicObject>>),
    Service(Box<watcher::Event<Service>>),
    Endpoints(Box<watcher::Event<Endpoints>>),
    Pod(Box<watcher::Event<Pod>>),
    Node(Box<watcher::Event<Node>>),
    Namespace(Box<watcher::Event<Namespace>>),
    /// The cluster does not serve this kind's API.
    Missing(String),
}

/// The objects of one watched kind, by `namespace/name`.
struct Watched<K> {
    objects: BTreeMap<String, K>,
    /// Objects of a relist in progress, swapped in when it completes.
    relisting: Option<BTreeMap<String, K>>,
    synced: bool,
}

impl<K> Default for Watched<K> {
    fn default() -> Self {
        Self {
            objects: BTreeMap::new(),
            relisting: None,
            synced: false,
        }
    }
}

impl<K: Resource> Watched<K> {
    fn apply(&mut self, event: watcher::Event<K>) {
        let key = |o: &K| {
            kinds::resource_name(
                o.meta().namespace.as_deref(),
                o.meta().name.as_deref().unwrap_or_default(),
            )
        };
        match event {
            watcher::Event::Apply(o) => {
                self.objects.insert(key(&o), o);
            }
            watcher::Event::Delete(o) => {
                self.objects.remove(&key(&o));
            }
            watcher::Event::Init => self.relisting = Some(BTreeMap::new()),
            watcher::Event::InitApply(o) => {
                self.relisting.get_or_insert_default().insert(key(&o), o);
            }
            watcher::Event::InitDone => {
                self.objects = self.relisting.take().unwrap_or_default();
                self.synced = true;
            }
        }
    }
}

/// Everything the source has seen.
#[derive(Default)]
struct Cluster {
    config: BTreeMap<&'static str, Watched<DynamicObject>>,
    services: Watched<Service>,
    endpoints: Watched<Endpoints>,
    pods: Watched<Pod>,
    nodes: Watched<Node>,
    namespaces: Watched<Namespace>,
    /// Parsed custom resources with the resource version they were parsed at.
    parsed: BTreeMap<Key, (String, Arc<Parsed>)>,
    set: ConfigSet,
}

impl Cluster {
    fn synced(&self) -> bool {
        self.config.values().all(|w| w.synced)
            && self.services.synced
            && self.endpoints.synced
            && self.pods.synced
            && self.nodes.synced
            && self.namespaces.synced
    }

    fn apply(&mut self, update: Update) {
        match update {
            Update::Config(kind, event) => self
                .config
                .entry(kind.collection)
                .or_default()
                .apply(*event),
            Update::Service(event) => self.services.apply(*event),
            Update::Endpoints(event) => self.endpoints.apply(*event),
            Update::Pod(event) => self.pods.apply(*event),
            Update::Node(event) => self.nodes.apply(*event),
            Update::Namespace(event) => self.namespaces.apply(*event),
            Update::Missing(collection) => {
                if let Some(w) = self
                    .config
                    .iter_mut()
                    .find(|(c, _)| **c == collection)
                    .map(|(_, w)| w)
                {
                    w.objects.clear();
                    w.synced = true;
                }
            }
        }
    }

    /// Brings the store in step with what the cluster holds.
    fn publish(&mut self, store: &Store, domain: &str) -> LoadReport {
        let mut report = LoadReport::default();
        let mut candidates = Vec::new();
        let mut parsed = BTreeMap::new();
        for (collection, watched) in &self.config {
            for (name, object) in &watched.objects {
                let key: Key = (collection, name.clone());
                let version = object.resource_version().unwrap_or_default();
                let previous = self.parsed.remove(&key);
                let entry = match previous {
                    Some((v, p)) if v == version => (v, p),
                    previous => match to_config_object(object) {
                        Ok(o) => (version, Parsed::new(o)),
                        Err(e) => {
                            report.errors.push(e);
                            report.rejected += 1;
                            match previous {
                                Some(kept) => kept,
                                None => continue,
                            }
                        }
                    },
                };
                candidates.push(entry.1.clone());
                parsed.insert(key, entry);
            }
        }
        self.parsed = parsed;
        self.set.publish(store, candidates.iter(), &mut report);

        // Pods are converted once, for the synthetic entries and the raw
        // collection alike.
        let platform = Platform::new(&self.pods.objects, &self.nodes.objects);
        let entries = self
            .services
            .objects
            .iter()
            .filter_map(|(name, service)| {
                let endpoints = self.endpoints.objects.get(name);
                let entry =
                    service_discovery::service_entry(service, endpoints, &platform, domain)?;
                let labels = service.labels().clone().into_iter().collect();
                Some(versioned_resource(
                    name.clone(),
                    &Body::ServiceEntry(Box::new(entry)),
                    &labels,
                    &BTreeMap::new(),
                ))
            })
            .collect();
        let raw = [
            (kinds::SYNTHETIC_SERVICE_ENTRIES, entries),
            (
                kinds::K8S_SERVICES,
                self.services
                    .objects
                    .values()
                    .map(kube_core::service_resource)
                    .collect(),
            ),
            (
                kinds::K8S_ENDPOINTS,
                self.endpoints
                    .objects
                    .values()
                    .map(kube_core::endpoints_resource)
                    .collect(),
            ),
            (
                kinds::K8S_PODS,
                platform
                    .pods()
                    .map(|(name, pod)| {
                        let body = Body::K8sPod(Box::new(pod.clone()));
                        kube_core::resource(&self.pods.objects[name], body)
                    })
                    .collect(),
            ),
            (
                kinds::K8S_NODES,
                self.nodes
                    .objects
                    .values()
                    .map(kube_core::node_resource)
                    .collect(),
            ),
            (
                kinds::K8S_NAMESPACES,
                self.namespaces
                    .objects
                    .values()
                    .map(kube_core::namespace_resource)
                    .collect(),
            ),
        ];
        for (collection, resources) in raw {
            if let Err(e) = store.replace(collection, resources) {
                report.errors.push(e.to_string());
            }
        }
        report
    }
}

fn to_config_object(object: &DynamicObject) -> Result<ConfigObject, String> {
    let json = serde_json::to_value(object).map_err(|e| e.to_string())?;
    ConfigObject::from_json(json, "kubernetes").map_err(|e| e.to_string())
}

/// The API resource of an Istio kind: group and version from its
/// `apiVersion`, plural from its collection name.
fn api_resource(kind: &Kind) -> ApiResource {
    let (group, version) = kind.group_version();
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: kind.api_version.into(),
        kind: kind.kind.into(),
        plural: kind.plural().into(),
    }
}

/// Forwards a watcher's events, tagged, until the receiver is gone.
fn forward<K, F>(api: Api<K>, tx: mpsc::Sender<Update>, tag: F, missing: Option<String>)
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(watcher::Event<K>) -> Update + Send + 'static,
{
    tokio::spawn(async move {
        let mut events = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let update = match event {
                Ok(event) => tag(event),
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if status.code == 404 =>
                {
                    match &missing {
                        Some(collection) => Update::Missing(collection.clone()),
                        None => continue,
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Kubernetes watch failed; retrying");
                    continue;
                }
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    });
}

/// Starts watching the cluster and returns the future that keeps `store`
/// in step with it until `shutdown`. `on_load` sees the report of every
/// change, and `on_synced` is called once every watch has listed.
pub fn start(
    client: Client,
    store: Arc<Store>,
    domain: String,
    shutdown: CancellationToken,
    mut on_load: impl FnMut(&LoadReport) + Send + 'static,
    on_synced: impl FnOnce() + Send + 'static,
) -> impl Future<Output = ()> + Send {
    let (tx, mut rx) = mpsc::channel(1024);
    let mut cluster = Cluster::default();
    for kind in kinds::KINDS.iter().filter(|k| !k.api_version.is_empty()) {
        cluster.config.insert(kind.collection, Watched::default());
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &api_resource(kind));
        forward(
            api,
            tx.clone(),
            move |e| Update::Config(kind, Box::new(e)),
            Some(kind.collection.to_string()),
        );
    }
    forward(
        Api::<Service>::all(client.clone()),
        tx.clone(),
        |e| Update::Service(Box::new(e)),
        None,
    );
    forward(
        Api::<Endpoints>::all(client.clone()),
        tx.clone(),
        |e| Update::Endpoints(Box::new(e)),
        None,
    );
    forward(
        Api::<Pod>::all(client.clone()),
        tx.clone(),
        |e| Update::Pod(Box::new(e)),
        None,
    );
    forward(
        Api::<Node>::all(client.clone()),
        tx.clone(),
        |e| Update::Node(Box::new(e)),
        None,
    );
    forward(
        Api::<Namespace>::all(client),
        tx,
        |e| Update::Namespace(Box::new(e)),
        None,
    );

    async move {
        let mut on_synced = Some(on_synced);
        loop {
            let first = tokio::select! {
                update = rx.recv() => update,
                _ = shutdown.cancelled() => return,
            };
            let Some(first) = first else { return };
            cluster.apply(first);
            // Take everything already waiting, then publish once.
            while let Ok(update) = rx.try_recv() {
                cluster.apply(update);
            }
            if !cluster.synced() {
                continue;
            }
            let report = cluster.publish(&store, &domain);
            for e in &report.errors {
                tracing::error!(source = "kubernetes", "{e}");
            }
            for w in &report.warnings {
                tracing::warn!(source = "kubernetes", "{w}");
            }
            on_load(&report);
            if let Some(synced) = on_synced.take() {
                synced();
            }
        }
    }
}
