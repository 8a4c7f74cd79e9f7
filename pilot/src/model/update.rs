//! How the model follows MCP snapshots. Of each collection, only the
//! objects whose resources differ between the last snapshot and the next
//! are read again (the sink's maps are persistent, so that difference skips
//! everything the two share), and what they change is recorded in a
//! [`Change`] for generation to redo only what it touches.
//!
//! A model built by updates and one built from the last snapshot alone are
//! equal; the tests hold the two against each other over random sequences
//! of changes.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use imbl::OrdMap;
use mcp::{Payload, SinkSnapshot};
use mesh_api::{
    kinds::{self, Body},
    pb::istio::{mesh::v1alpha1::MeshConfig, networking::v1alpha3::ServiceEntry},
};

use super::{
    Endpoint, Model, Named, Objects, Port, Protocol, Resolution, Service, host, kubernetes,
    resolve_virtual_service,
};
use crate::xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE};

/// Which entries come first when two define one host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    /// ServiceEntries users wrote.
    User,
    /// Those made from Kubernetes Services, by Galley or from the raw
    /// Kubernetes objects.
    Synthetic,
}

type EntryKey = (Origin, String);

/// The ServiceEntries the services are made from. Of the entries that name
/// a host, the first (user before synthetic, then by name) defines it.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Entries {
    entries: OrdMap<EntryKey, Arc<Named<ServiceEntry>>>,
    /// For each host, the entries that name it, in precedence order.
    naming: OrdMap<String, BTreeSet<EntryKey>>,
}

/// What an update changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Change {
    /// Hosts whose service was added, removed or altered.
    pub services: BTreeSet<String>,
    /// Hosts whose endpoints changed.
    pub endpoints: BTreeSet<String>,
    /// Addresses where endpoints came or went: the workloads whose own
    /// inbound side may differ.
    pub addresses: BTreeSet<String>,
    /// Config collections (service entries aside) whose objects changed.
    pub collections: BTreeSet<&'static str>,
    /// The hosts that changed DestinationRules name, before and after.
    pub rule_hosts: BTreeSet<String>,
    pub mesh: bool,
    /// JWT issuers' keys.
    pub jwks: bool,
}

impl Change {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether authentication or RBAC may differ: a policy, a role, a
    /// binding, the RBAC config or an issuer's keys.
    pub fn security(&self) -> bool {
        let collections = [
            kinds::POLICIES,
            kinds::MESH_POLICIES,
            kinds::SERVICE_ROLES,
            kinds::SERVICE_ROLE_BINDINGS,
            kinds::RBAC_CONFIGS,
            kinds::CLUSTER_RBAC_CONFIGS,
        ];
        self.jwks || collections.iter().any(|c| self.collections.contains(c))
    }

    /// The xDS types whose resources may differ: an endpoint-only change
    /// touches endpoints, and the inbound listeners of the workloads at
    /// the addresses concerned.
    pub fn types(&self) -> BTreeSet<&'static str> {
        let all = [CLUSTER, ENDPOINT, LISTENER, ROUTE];
        let changed = |c| self.collections.contains(c);
        if !self.services.is_empty() || self.mesh || changed(kinds::SIDECARS) {
            return all.into();
        }
        let mut types = BTreeSet::new();
        if !self.endpoints.is_empty() {
            types.extend([ENDPOINT, LISTENER]);
        }
        if changed(kinds::DESTINATION_RULES) {
            // Subsets, policies, and consistent-hash route settings.
            types.extend([CLUSTER, ENDPOINT, ROUTE]);
        }
        if changed(kinds::VIRTUAL_SERVICES) || changed(kinds::GATEWAYS) {
            types.extend([LISTENER, ROUTE]);
        }
        if self.security() {
            types.insert(LISTENER);
        }
        types
    }
}

/// The objects of `collection` that differ between `old` and `new`, by MCP
/// name, with their bodies in `new` (`None`: gone, or not decoded).
fn changed<'a>(
    old: &'a SinkSnapshot,
    new: &'a SinkSnapshot,
    collection: &str,
) -> Vec<(&'a str, Option<&'a Body>)> {
    static NONE: std::sync::LazyLock<mcp::HeldCollection> =
        std::sync::LazyLock::new(Default::default);
    let held = |s: &'a SinkSnapshot| s.collections.get(collection).unwrap_or(&NONE);
    let body = |r: &'a mcp::SinkResource| match &r.payload {
        Payload::Decoded(body) => Some(body),
        Payload::Opaque => None,
    };
    held(old)
        .resources
        .diff(&held(new).resources)
        .map(|item| match item {
            imbl::ordmap::DiffItem::Add(k, v) => (k.as_str(), body(v)),
            imbl::ordmap::DiffItem::Update { new: (k, v), .. } => (k.as_str(), body(v)),
            imbl::ordmap::DiffItem::Remove(k, _) => (k.as_str(), None),
        })
        .collect()
}

/// Whether `collection` may differ between the snapshots.
fn moved(old: &SinkSnapshot, new: &SinkSnapshot, collection: &str) -> bool {
    match (
        old.collections.get(collection),
        new.collections.get(collection),
    ) {
        (Some(a), Some(b)) => !a.resources.ptr_eq(&b.resources),
        (None, None) => false,
        _ => true,
    }
}

/// An object of `key` (`namespace/name`, or a bare name).
fn named<T>(key: &str, spec: T) -> Named<T> {
    let (namespace, name) = key.split_once('/').unwrap_or(("", key));
    Named {
        namespace: namespace.to_string(),
        name: name.to_string(),
        spec,
    }
}

/// The spec of a body of one variant.
macro_rules! spec {
    ($body:expr, $variant:ident) => {
        match $body {
            Some(Body::$variant(spec)) => Some((**spec).clone()),
            _ => None,
        }
    };
}

impl<T> Objects<T> {
    /// Puts (or, for `None`, removes) the object of `key`.
    fn set(&mut self, key: &str, object: Option<Named<T>>) {
        match object {
            Some(o) => {
                self.0.insert(key.to_string(), Arc::new(o));
            }
            None => {
                self.0.remove(key);
            }
        }
    }
}

impl Model {
    /// Moves the model from `old` to `new`, where it was `old`'s; the mesh
    /// config is `new`'s, else `fallback_mesh`. Returns what changed.
    pub fn update(
        &mut self,
        old: &SinkSnapshot,
        new: &SinkSnapshot,
        fallback_mesh: &MeshConfig,
    ) -> Change {
        let mut change = Change::default();
        for (key, body) in changed(old, new, kinds::SERVICE_ENTRIES) {
            let entry = spec!(body, ServiceEntry).map(|s| named(key, s));
            self.set_entry((Origin::User, key.to_string()), entry, &mut change);
        }
        self.update_synthetic(old, new, &mut change);
        self.update_config(old, new, &mut change);
        if moved(old, new, kinds::MESH_CONFIG) {
            let mesh = new
                .bodies(kinds::MESH_CONFIG)
                .find_map(|(_, _, b)| match b {
                    Body::MeshConfig(m) => Some((**m).clone()),
                    _ => None,
                })
                .unwrap_or_else(|| fallback_mesh.clone());
            if mesh != self.mesh {
                self.mesh = mesh;
                change.mesh = true;
            }
        }
        change
    }

    /// Synthetic entries: from their collection while the source serves
    /// it, else made from the raw Kubernetes objects; each time the source
    /// of them changes, replaced whole.
    fn update_synthetic(&mut self, old: &SinkSnapshot, new: &SinkSnapshot, change: &mut Change) {
        let synthetic = kinds::SYNTHETIC_SERVICE_ENTRIES;
        let (was_raw, raw) = (old.absent(synthetic), new.absent(synthetic));
        if raw {
            let raw_moved = [
                kinds::K8S_SERVICES,
                kinds::K8S_ENDPOINTS,
                kinds::K8S_PODS,
                kinds::K8S_NODES,
            ]
            .iter()
            .any(|c| moved(old, new, c));
            if was_raw && !raw_moved {
                return;
            }
            let wanted = kubernetes::service_entries(new)
                .into_iter()
                .map(|se| (format!("{}/{}", se.namespace, se.name), se))
                .collect();
            self.replace_synthetic(wanted, change);
        } else if was_raw {
            // What an earlier source served under the refused name is not
            // current: start again from the collection.
            let wanted = changed(&SinkSnapshot::default(), new, synthetic)
                .into_iter()
                .filter_map(|(key, body)| {
                    let spec = spec!(body, ServiceEntry)?;
                    Some((key.to_string(), named(key, spec)))
                })
                .collect();
            self.replace_synthetic(wanted, change);
        } else {
            for (key, body) in changed(old, new, synthetic) {
                let entry = spec!(body, ServiceEntry).map(|s| named(key, s));
                self.set_entry((Origin::Synthetic, key.to_string()), entry, change);
            }
        }
    }

    /// Makes the synthetic entries exactly `wanted`, by MCP name.
    fn replace_synthetic(
        &mut self,
        mut wanted: BTreeMap<String, Named<ServiceEntry>>,
        change: &mut Change,
    ) {
        let current: Vec<String> = self
            .entries
            .entries
            .keys()
            .filter(|(origin, _)| *origin == Origin::Synthetic)
            .map(|(_, key)| key.clone())
            .collect();
        for key in current {
            let entry = wanted.remove(&key);
            self.set_entry((Origin::Synthetic, key), entry, change);
        }
        for (key, entry) in wanted {
            self.set_entry((Origin::Synthetic, key), Some(entry), change);
        }
    }

    /// Puts (or removes) one entry, and defines again each host it names
    /// or named.
    fn set_entry(
        &mut self,
        key: EntryKey,
        entry: Option<Named<ServiceEntry>>,
        change: &mut Change,
    ) {
        let entries = &mut self.entries;
        let old = entries.entries.get(&key).cloned();
        if old.as_deref() == entry.as_ref() {
            return;
        }
        let hosts_of = |se: &Named<ServiceEntry>| -> Vec<String> {
            se.spec
                .hosts
                .iter()
                .map(|h| host::resolve(h, &se.namespace))
                .collect()
        };
        let mut hosts = BTreeSet::new();
        if let Some(old) = old {
            for host in hosts_of(&old) {
                if let Some(keys) = entries.naming.get_mut(&host) {
                    keys.remove(&key);
                    if keys.is_empty() {
                        entries.naming.remove(&host);
                    }
                }
                hosts.insert(host);
            }
            entries.entries.remove(&key);
        }
        if let Some(entry) = entry {
            for host in hosts_of(&entry) {
                entries
                    .naming
                    .entry(host.clone())
                    .or_default()
                    .insert(key.clone());
                hosts.insert(host);
            }
            entries.entries.insert(key, Arc::new(entry));
        }
        for host in hosts {
            self.define(&host, change);
        }
    }

    /// Makes `host`'s service and endpoints those of the first entry that
    /// names it, if any does.
    fn define(&mut self, host: &str, change: &mut Change) {
        let first = self
            .entries
            .naming
            .get(host)
            .and_then(|keys| keys.iter().next())
            .and_then(|key| self.entries.entries.get(key))
            .cloned();
        let service = first.as_ref().map(|se| Arc::new(service(se, host)));
        if self.services.get(host) != service.as_ref() {
            change.services.insert(host.to_string());
            match service {
                Some(s) => self.services.insert(host.to_string(), s),
                None => self.services.remove(host),
            };
        }
        let endpoints = first.map(|se| Arc::new(endpoints(&se.spec)));
        let old = self.endpoints.get(host).cloned();
        if old == endpoints {
            return;
        }
        change.endpoints.insert(host.to_string());
        if self
            .services
            .get(host)
            .is_some_and(|s| s.resolution == Resolution::Dns)
        {
            // A DNS service's clusters list its endpoints.
            change.services.insert(host.to_string());
        }
        let addresses = |e: &Option<Arc<Vec<Endpoint>>>| -> BTreeSet<String> {
            e.iter()
                .flat_map(|e| e.iter().map(|e| e.address.clone()))
                .collect()
        };
        let (before, after) = (addresses(&old), addresses(&endpoints));
        for address in before.difference(&after) {
            if let Some(hosts) = self.hosts_by_address.get_mut(address) {
                hosts.remove(host);
                if hosts.is_empty() {
                    self.hosts_by_address.remove(address);
                }
            }
        }
        for address in after.difference(&before) {
            self.hosts_by_address
                .entry(address.clone())
                .or_default()
                .insert(host.to_string());
        }
        change.addresses.extend(before.union(&after).cloned());
        match endpoints {
            Some(e) => self.endpoints.insert(host.to_string(), e),
            None => self.endpoints.remove(host),
        };
    }

    /// Every config kind but the service entries.
    fn update_config(&mut self, old: &SinkSnapshot, new: &SinkSnapshot, change: &mut Change) {
        let config = &mut self.config;
        for (key, body) in changed(old, new, kinds::VIRTUAL_SERVICES) {
            let vs = spec!(body, VirtualService).map(|s| resolve_virtual_service(named(key, s)));
            config.virtual_services.set(key, vs);
            change.collections.insert(kinds::VIRTUAL_SERVICES);
        }
        if change.collections.contains(kinds::VIRTUAL_SERVICES) {
            config.matches_source_labels = config.virtual_services.iter().any(|vs| {
                let http = vs.spec.http.iter().flat_map(|h| &h.r#match);
                let tcp = vs.spec.tcp.iter().flat_map(|t| &t.r#match);
                http.map(|m| &m.source_labels)
                    .chain(tcp.map(|m| &m.source_labels))
                    .any(|labels| !labels.is_empty())
            });
        }
        for (key, body) in changed(old, new, kinds::DESTINATION_RULES) {
            let rule = spec!(body, DestinationRule).map(|s| {
                let mut dr = named(key, s);
                dr.spec.host = host::resolve(&dr.spec.host, &dr.namespace);
                dr
            });
            if let Some(before) = config.destination_rules.get(key) {
                let host = before.spec.host.clone();
                config.unindex_rule(key, &host);
                change.rule_hosts.insert(host);
            }
            if let Some(after) = &rule {
                config.index_rule(key, &after.spec.host);
                change.rule_hosts.insert(after.spec.host.clone());
            }
            config.destination_rules.set(key, rule);
            change.collections.insert(kinds::DESTINATION_RULES);
        }
        macro_rules! follow {
            ($collection:expr, $field:ident, $variant:ident) => {
                for (key, body) in changed(old, new, $collection) {
                    let object = spec!(body, $variant).map(|s| named(key, s));
                    config.$field.set(key, object);
                    change.collections.insert($collection);
                }
            };
        }
        follow!(kinds::GATEWAYS, gateways, Gateway);
        follow!(kinds::SIDECARS, sidecars, Sidecar);
        follow!(kinds::POLICIES, policies, Policy);
        follow!(kinds::SERVICE_ROLES, service_roles, ServiceRole);
        follow!(
            kinds::SERVICE_ROLE_BINDINGS,
            service_role_bindings,
            ServiceRoleBinding
        );
        if moved(old, new, kinds::MESH_POLICIES) {
            config.mesh_policy = new
                .bodies(kinds::MESH_POLICIES)
                .find(|(_, name, _)| name == "default")
                .and_then(|(_, _, body)| spec!(Some(body), Policy));
            change.collections.insert(kinds::MESH_POLICIES);
        }
        let rbac = [kinds::CLUSTER_RBAC_CONFIGS, kinds::RBAC_CONFIGS];
        if rbac.iter().any(|c| moved(old, new, c)) {
            config.rbac_config = rbac
                .iter()
                .flat_map(|c| new.bodies(c))
                .find(|(_, name, _)| name == "default")
                .and_then(|(_, _, body)| spec!(Some(body), RbacConfig));
            change.collections.extend(rbac);
        }
    }
}

impl super::Config {
    fn index_rule(&mut self, key: &str, host: &str) {
        if host.starts_with('*') {
            self.wildcard_rules.insert(key.to_string());
        } else {
            self.rules_by_host
                .entry(host.to_string())
                .or_default()
                .insert(key.to_string());
        }
    }

    fn unindex_rule(&mut self, key: &str, host: &str) {
        self.wildcard_rules.remove(key);
        if let Some(keys) = self.rules_by_host.get_mut(host) {
            keys.remove(key);
            if keys.is_empty() {
                self.rules_by_host.remove(host);
            }
        }
    }
}

/// The service `se` defines for one of its hosts.
fn service(se: &Named<ServiceEntry>, host: &str) -> Service {
    use mesh_api::pb::istio::networking::v1alpha3::service_entry;
    let spec = &se.spec;
    let resolution = match service_entry::Resolution::try_from(spec.resolution) {
        Ok(service_entry::Resolution::Static) => Resolution::Static,
        Ok(service_entry::Resolution::Dns) => Resolution::Dns,
        _ => Resolution::Passthrough,
    };
    Service {
        host: host.to_string(),
        namespace: se.namespace.clone(),
        addresses: spec.addresses.clone(),
        ports: spec
            .ports
            .iter()
            .map(|p| Port {
                number: p.number,
                name: p.name.clone(),
                protocol: Protocol::parse(&p.protocol),
            })
            .collect(),
        resolution,
        mesh_external: spec.location == service_entry::Location::MeshExternal as i32,
        subject_alt_names: spec.subject_alt_names.clone(),
        export_to: spec.export_to.clone(),
    }
}

fn endpoints(spec: &ServiceEntry) -> Vec<Endpoint> {
    spec.endpoints
        .iter()
        .map(|e| Endpoint {
            address: e.address.clone(),
            ports: e.ports.clone(),
            labels: e.labels.clone(),
            locality: e.locality.clone(),
            weight: e.weight,
        })
        .collect()
}
