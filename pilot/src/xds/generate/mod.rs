//! Generation: from the model and one proxy to the xDS resources it should
//! have. [`Scope`] is what the proxy sees (services and VirtualServices
//! exported to its namespace and selected by its Sidecar, its own inbound
//! ports); each module turns a scope into one kind of resource.

pub mod cluster;
pub mod endpoint;
pub mod gateway;
pub mod listener;
mod own;
pub mod route;
pub mod security;
pub mod tls;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex, OnceLock, Weak},
};

use envoy_types::pb::{
    envoy::config::core::v3::{
        AggregatedConfigSource, ApiVersion, ConfigSource, Node, config_source,
    },
    google::protobuf::Any,
};
use mesh_api::pb::istio::networking::v1alpha3::{CaptureMode, Sidecar, VirtualService};
use prost::{Message, Name};
use tokio::sync::watch;

use super::{
    CLUSTER, ENDPOINT, Generated, LISTENER, ROUTE, Resource, ResourceGenerator, ResourceSet,
    TypeVersions,
};
use crate::{
    model::{self, Change, Model, Named, Port, Protocol, Service, host},
    proxy::{Interception, Proxy, ProxyKind},
};

pub(crate) fn any<M: Message + Name>(message: &M) -> Any {
    Any {
        type_url: M::type_url(),
        value: message.encode_to_vec(),
    }
}

pub(crate) fn duration(d: &mesh_api::wkt::Duration) -> envoy_types::pb::google::protobuf::Duration {
    envoy_types::pb::google::protobuf::Duration {
        seconds: d.seconds,
        nanos: d.nanos,
    }
}

/// Resources come over the ADS stream itself.
pub(crate) fn ads_source() -> ConfigSource {
    ConfigSource {
        resource_api_version: ApiVersion::V3 as i32,
        config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
            AggregatedConfigSource {},
        )),
        ..Default::default()
    }
}

/// One port on which a sidecar receives its workload's traffic.
pub struct Inbound<'a> {
    /// Where the proxy accepts it.
    pub port: u32,
    /// The address to bind, when listeners bind (no interception).
    pub bind: Option<String>,
    pub protocol: Protocol,
    pub service: &'a Service,
    pub service_port: Port,
    /// `inbound|port|name|host`.
    pub cluster: String,
    /// Where the application listens.
    pub target_address: String,
    pub target_port: u32,
}

/// One egress listener of a Sidecar (or the implicit catch-all).
pub struct Egress<'a> {
    /// Port and protocol, when the listener has one.
    pub port: Option<(u32, Protocol)>,
    pub bind: Option<&'a str>,
    /// `namespace/host` patterns; `*/*` for the implicit listener.
    pub hosts: Vec<String>,
}

/// What one proxy sees of the model.
pub struct Scope<'a> {
    pub model: &'a Model,
    pub proxy: &'a Proxy,
    pub sidecar: Option<&'a Named<Sidecar>>,
}

impl<'a> Scope<'a> {
    pub fn new(model: &'a Model, proxy: &'a Proxy) -> Self {
        let sidecar = match proxy.kind {
            ProxyKind::Sidecar => model.sidecar(proxy),
            ProxyKind::Router => None,
        };
        Self {
            model,
            proxy,
            sidecar,
        }
    }

    /// Whether `patterns` (`namespace/host`, `.` for the Sidecar's own
    /// namespace, `*` for any) select config of `namespace` for `name`.
    fn selects(&self, patterns: &[String], namespace: &str, name: &str) -> bool {
        let own = self
            .sidecar
            .map_or(self.proxy.namespace.as_str(), |s| s.namespace.as_str());
        patterns.iter().any(|p| {
            let (ns, h) = p.split_once('/').unwrap_or(("*", p));
            (ns == "*" || ns == namespace || (ns == "." && namespace == own))
                && host::intersects(h, name)
        })
    }

    pub fn egress(&self) -> Vec<Egress<'a>> {
        let listeners = self.sidecar.map(|s| &s.spec.egress[..]).unwrap_or_default();
        if listeners.is_empty() {
            return vec![Egress {
                port: None,
                bind: None,
                hosts: vec!["*/*".into()],
            }];
        }
        listeners
            .iter()
            .map(|l| Egress {
                port: l
                    .port
                    .as_ref()
                    .filter(|p| p.number > 0)
                    .map(|p| (p.number, Protocol::parse(&p.protocol))),
                bind: (!l.bind.is_empty()).then_some(l.bind.as_str()),
                hosts: l.hosts.clone(),
            })
            .collect()
    }

    /// Services exported to the proxy's namespace and selected by one of
    /// its egress listeners.
    pub fn services(&self) -> impl Iterator<Item = &'a Service> + '_ {
        let egress = self.egress();
        self.model
            .services
            .values()
            .map(Arc::as_ref)
            .filter(move |s| self.sees_with(&egress, s))
    }

    /// Whether the proxy sees `service` (one of [`Self::services`]).
    pub fn sees(&self, service: &Service) -> bool {
        self.sees_with(&self.egress(), service)
    }

    fn sees_with(&self, egress: &[Egress], service: &Service) -> bool {
        service.visible_from(&self.proxy.namespace)
            && egress
                .iter()
                .any(|e| self.selects(&e.hosts, &service.namespace, &service.host))
    }

    /// Services reachable through the egress listener for `port` (the one
    /// with that port, else the catch-all); `0` asks for the catch-all.
    pub fn egress_services(&self, port: u32) -> impl Iterator<Item = &'a Service> + '_ {
        let egress = self.egress();
        let hosts = egress
            .iter()
            .find(|e| e.port.is_some_and(|(p, _)| p == port))
            .or_else(|| egress.iter().find(|e| e.port.is_none()))
            .map(|e| e.hosts.clone())
            .unwrap_or_default();
        self.model
            .services
            .values()
            .map(Arc::as_ref)
            .filter(|s| s.visible_from(&self.proxy.namespace))
            .filter(move |s| self.selects(&hosts, &s.namespace, &s.host))
    }

    /// VirtualServices bound to `gateway` (`mesh` for sidecars) that the
    /// proxy sees.
    pub fn virtual_services(
        &self,
        gateway: &'a str,
    ) -> impl Iterator<Item = &'a Named<VirtualService>> + '_ {
        let egress = self.egress();
        self.model.config.virtual_services.iter().filter(move |vs| {
            let bound = if vs.spec.gateways.is_empty() {
                gateway == "mesh"
            } else {
                vs.spec.gateways.iter().any(|g| g == gateway)
            };
            let exported = vs.spec.export_to.is_empty()
                || vs
                    .spec
                    .export_to
                    .iter()
                    .any(|e| e == "*" || (e == "." && vs.namespace == self.proxy.namespace));
            let selected = gateway != "mesh"
                || vs.spec.hosts.iter().any(|h| {
                    egress
                        .iter()
                        .any(|e| self.selects(&e.hosts, &vs.namespace, h))
                });
            bound && exported && selected
        })
    }

    /// The service's subsets: `""` (all endpoints) and each of its
    /// DestinationRule's.
    pub fn subsets(&self, service: &Service) -> Vec<String> {
        let mut out = vec![String::new()];
        if let Some(dr) = self
            .model
            .destination_rule(&service.host, &self.proxy.namespace)
        {
            out.extend(dr.spec.subsets.iter().map(|s| s.name.clone()));
        }
        out
    }

    pub fn subset_labels(
        &self,
        service: &Service,
        subset: &str,
    ) -> Option<&'a BTreeMap<String, String>> {
        if subset.is_empty() {
            return None;
        }
        let dr = self
            .model
            .destination_rule(&service.host, &self.proxy.namespace)?;
        dr.spec
            .subsets
            .iter()
            .find(|s| s.name == subset)
            .map(|s| &s.labels)
    }

    /// The proxy's inbound ports: one per port of each of its workload's
    /// endpoints, or, under a Sidecar with ingress listeners, one per
    /// listener, forwarding to its `defaultEndpoint`.
    pub fn inbound(&self) -> Vec<Inbound<'a>> {
        if self.proxy.kind != ProxyKind::Sidecar {
            return Vec::new();
        }
        let instances: Vec<(&Service, &model::Endpoint)> =
            self.model.instances(self.proxy).collect();
        let none = self.proxy.interception == Interception::None;
        let ingress = self
            .sidecar
            .map(|s| &s.spec.ingress[..])
            .unwrap_or_default();
        let mut out = Vec::new();
        if ingress.is_empty() {
            for (service, endpoint) in &instances {
                for port in &service.ports {
                    let target = endpoint.port(port);
                    if out.iter().any(|i: &Inbound| i.port == target) {
                        continue;
                    }
                    out.push(Inbound {
                        port: target,
                        bind: none.then(|| self.proxy.ip.to_string()),
                        protocol: port.protocol,
                        service,
                        service_port: port.clone(),
                        cluster: model::inbound_cluster_name(
                            port.number,
                            &port.name,
                            &service.host,
                        ),
                        target_address: "127.0.0.1".into(),
                        target_port: target,
                    });
                }
            }
            return out;
        }
        for listener in ingress {
            let Some(port) = &listener.port else { continue };
            // The workload port this listener serves: the instance whose
            // endpoint port is the listener's, else the first.
            let found = instances
                .iter()
                .flat_map(|(s, e)| s.ports.iter().map(move |p| (*s, p, e.port(p))))
                .find(|(_, _, target)| *target == port.number)
                .or_else(|| {
                    instances
                        .first()
                        .and_then(|(s, e)| s.ports.first().map(|p| (*s, p, e.port(p))))
                });
            let Some((service, service_port, _)) = found else {
                continue;
            };
            let (address, target) = parse_endpoint(&listener.default_endpoint)
                .unwrap_or(("127.0.0.1".into(), port.number));
            let binds = none || listener.capture_mode == CaptureMode::None as i32;
            out.push(Inbound {
                port: port.number,
                bind: binds.then(|| {
                    if listener.bind.is_empty() {
                        "0.0.0.0".to_string()
                    } else {
                        listener.bind.clone()
                    }
                }),
                protocol: Protocol::parse(&port.protocol),
                service,
                service_port: service_port.clone(),
                cluster: model::inbound_cluster_name(port.number, &port.name, &service.host),
                target_address: address,
                target_port: target,
            });
        }
        out
    }
}

/// `127.0.0.1:8080` (a Sidecar ingress `defaultEndpoint`).
fn parse_endpoint(s: &str) -> Option<(String, u32)> {
    let (address, port) = s.rsplit_once(':')?;
    Some((address.to_string(), port.parse().ok()?))
}

pub use own::Client;

/// Generates from the latest model.
pub struct ModelGenerator {
    changes: watch::Sender<TypeVersions>,
    shared: Mutex<SharedCache>,
}

/// What every proxy of one kind, namespace, label set, interception mode
/// and Sidecar gets alike (everything but its own inbound side), built once
/// per model and handed to each of them.
#[derive(Clone, PartialEq, Eq, Hash)]
struct ScopeKey {
    type_url: &'static str,
    kind: ProxyKind,
    namespace: String,
    labels: BTreeMap<String, String>,
    interception: Interception,
    sidecar: Option<(String, String)>,
}

struct SharedCache {
    /// The model the entries are for.
    model: Arc<Model>,
    /// Its revision, and the changes that led to it.
    log: Arc<own::ChangeLog>,
    /// One entry per key: the first stream to need it builds it, the others
    /// wait for that instead of building it again.
    entries: HashMap<ScopeKey, Arc<ScopeEntry>>,
    /// The span the model was published in, if traced.
    trace: Option<opentelemetry::trace::SpanContext>,
}

/// A scope's resources of one type, and the selections proxies of the scope
/// subscribe to by name.
#[derive(Default)]
struct ScopeEntry {
    built: OnceLock<Arc<ResourceSet>>,
    /// Where the entry starts from when a change touched only some hosts:
    /// the set built before it, with the hosts to build again.
    partial: Option<Partial>,
    /// By the address of an interned name set, kept alive by the key's own
    /// pointer to it; a selection lives while some proxy holds it.
    selections: Mutex<HashMap<usize, Selection>>,
}

/// A name set and the resources it selects.
type Selection = (Arc<BTreeSet<String>>, Weak<ResourceSet>);

struct Partial {
    previous: Arc<ResourceSet>,
    hosts: Arc<BTreeSet<String>>,
}

impl ScopeEntry {
    /// The entry that follows `self` across a change: built again for
    /// `hosts` alone when given, else whole.
    fn after(&self, hosts: Option<&Arc<BTreeSet<String>>>) -> Self {
        let partial = hosts.and_then(|hosts| match (self.built.get(), &self.partial) {
            (Some(built), _) => Some(Partial {
                previous: built.clone(),
                hosts: hosts.clone(),
            }),
            // Not built since the last change: both changes' hosts.
            (None, Some(p)) => Some(Partial {
                previous: p.previous.clone(),
                hosts: Arc::new(p.hosts.union(hosts).cloned().collect()),
            }),
            (None, None) => None,
        });
        Self {
            partial,
            ..Self::default()
        }
    }

    /// The resources named in `names`, all of them when it is empty: one
    /// set for every proxy of the scope that subscribes to the same names.
    fn select(&self, names: &Arc<BTreeSet<String>>) -> Arc<ResourceSet> {
        let built = self.built.get().expect("selected once built");
        if names.is_empty() {
            return built.clone();
        }
        let key = Arc::as_ptr(names) as usize;
        let mut selections = self.selections.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(set) = selections.get(&key).and_then(|(_, s)| s.upgrade()) {
            return set;
        }
        let set = built.select(names);
        if selections.len() >= 64 {
            selections.retain(|_, (_, s)| s.strong_count() > 0);
        }
        selections.insert(key, (names.clone(), Arc::downgrade(&set)));
        set
    }
}

/// Builds one service's resources of a type.
type OfService<'a> = dyn Fn(&Service) -> Vec<Arc<Resource>> + 'a;

/// The host of a cluster or load assignment named
/// `outbound|port|subset|host`.
fn host_of(name: &str) -> Option<&str> {
    name.splitn(4, '|').nth(3)
}

/// `previous` with the resources of `partial`'s hosts built again, for the
/// ones the scope sees. The same set when the scope sees none of them
/// before or after: proxies of that scope are not sent anything.
fn rebuild(partial: &Partial, scope: &Scope, of_service: &OfService) -> Arc<ResourceSet> {
    let had: BTreeSet<&str> = partial
        .previous
        .resources()
        .iter()
        .filter_map(|r| host_of(&r.name))
        .filter(|h| partial.hosts.contains(*h))
        .collect();
    let now: Vec<&Service> = partial
        .hosts
        .iter()
        .filter_map(|h| scope.model.services.get(h))
        .map(Arc::as_ref)
        .filter(|s| scope.sees(s))
        .collect();
    if had.is_empty() && now.is_empty() {
        return partial.previous.clone();
    }
    let mut resources: Vec<Arc<Resource>> = partial
        .previous
        .resources()
        .iter()
        .filter(|r| host_of(&r.name).is_none_or(|h| !had.contains(h)))
        .cloned()
        .collect();
    for service in now {
        resources.extend(of_service(service));
    }
    ResourceSet::new(resources)
}

/// The hosts whose clusters and load assignments `change` may alter, by
/// type; `None` for a type whose every resource may change.
fn hosts_changed(
    change: &Change,
    before: &Model,
    after: &Model,
) -> BTreeMap<&'static str, Option<Arc<BTreeSet<String>>>> {
    let types = change.types();
    let whole = change.mesh || change.collections.contains(mesh_api::kinds::SIDECARS);
    let rule_hosts = change.rule_hosts.iter().flat_map(|pattern| {
        let covered = before
            .services
            .keys()
            .chain(after.services.keys())
            .filter(move |h| pattern.starts_with('*') && host::covers(pattern, h));
        std::iter::once(pattern).chain(covered)
    });
    let clusters: BTreeSet<String> = change.services.iter().chain(rule_hosts).cloned().collect();
    let endpoints: BTreeSet<String> = clusters.iter().chain(&change.endpoints).cloned().collect();
    types
        .into_iter()
        .map(|t| {
            let hosts = match t {
                _ if whole => None,
                CLUSTER => Some(clusters.clone()),
                ENDPOINT => Some(endpoints.clone()),
                _ => None,
            };
            (t, hosts.map(Arc::new))
        })
        .collect()
}

impl ModelGenerator {
    pub fn new(model: Arc<Model>) -> Arc<Self> {
        let (changes, _) = watch::channel(TypeVersions::default());
        Arc::new(Self {
            changes,
            shared: Mutex::new(SharedCache {
                model,
                log: Arc::default(),
                entries: HashMap::new(),
                trace: None,
            }),
        })
    }

    /// Makes `model`, which differs from the current one by `change`, the
    /// one generation reads. Scopes keep what they built of the types the
    /// change leaves alone, and build again only the hosts it touches of
    /// the others; the types it touches move. The span it is published in
    /// (see [`component::trace::current`]) is the trace responses carry.
    pub fn publish(&self, model: Arc<Model>, change: &Change) {
        let moved = {
            let mut cache = self.lock();
            let moved = hosts_changed(change, &cache.model, &model);
            for (key, entry) in cache.entries.iter_mut() {
                if let Some(hosts) = moved.get(key.type_url) {
                    *entry = Arc::new(entry.after(hosts.as_ref()));
                }
            }
            let mut log = (*cache.log).clone();
            log.push(change.clone());
            cache.log = Arc::new(log);
            cache.model = model;
            cache.trace = component::trace::current();
            moved
        };
        if !moved.is_empty() {
            self.changes.send_modify(|v| {
                for t in moved.keys() {
                    *v.entry(t.to_string()).or_default() += 1;
                }
            });
        }
    }

    /// The model generation reads now.
    pub fn model(&self) -> Arc<Model> {
        self.lock().model.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SharedCache> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The shared resources of `type_url` for the scope that `names`
    /// selects, built at most once per model; `of_service`, for types built
    /// service by service, lets a change build only the services it
    /// touches.
    fn shared(
        &self,
        scope: &Scope,
        type_url: &'static str,
        names: &Arc<BTreeSet<String>>,
        build: impl FnOnce() -> Vec<Arc<Resource>>,
        of_service: Option<&OfService>,
    ) -> Arc<ResourceSet> {
        // Labels matter to a gateway (which Gateways select it) and to
        // routes when some match names source labels; otherwise only
        // through the Sidecar, which is in the key.
        let labels_matter = scope.proxy.kind == ProxyKind::Router
            || (type_url == ROUTE && scope.model.config.matches_source_labels);
        let key = ScopeKey {
            type_url,
            kind: scope.proxy.kind,
            namespace: scope.proxy.namespace.clone(),
            labels: if labels_matter {
                scope.proxy.labels.clone()
            } else {
                BTreeMap::new()
            },
            interception: scope.proxy.interception,
            sidecar: scope.sidecar.map(|s| (s.namespace.clone(), s.name.clone())),
        };
        let entry = {
            let mut cache = self.lock();
            if !std::ptr::eq(cache.model.as_ref(), scope.model) {
                // The scope's model is already stale: build uncached.
                return ResourceSet::new(build()).select(names);
            }
            cache.entries.entry(key).or_default().clone()
        };
        entry
            .built
            .get_or_init(|| match (&entry.partial, of_service) {
                (Some(partial), Some(of_service)) => rebuild(partial, scope, of_service),
                _ => ResourceSet::new(build()),
            });
        entry.select(names)
    }
}

fn named<M: Message + Name>(items: Vec<M>, name: impl Fn(&M) -> String) -> Vec<Arc<Resource>> {
    items.iter().map(|m| Resource::new(name(m), m)).collect()
}

/// The proxy's own resources named in `names`, all when it is empty.
fn own_set(resources: Vec<Arc<Resource>>, names: &BTreeSet<String>) -> Arc<ResourceSet> {
    if resources.is_empty() {
        return ResourceSet::empty();
    }
    ResourceSet::new(resources).select(names)
}

impl ResourceGenerator for ModelGenerator {
    type Client = Client;

    fn client(&self, node: &Node) -> Result<Client, String> {
        Proxy::from_node(node).map(Client::new)
    }

    fn generate(
        &self,
        client: &Client,
        type_url: &str,
        names: &Arc<BTreeSet<String>>,
    ) -> Generated {
        let (model, log) = {
            let cache = self.lock();
            (cache.model.clone(), cache.log.clone())
        };
        let proxy = &client.proxy;
        let scope = Scope::new(&model, proxy);
        let (type_url, shared) = match type_url {
            CLUSTER => (
                CLUSTER,
                self.shared(
                    &scope,
                    CLUSTER,
                    names,
                    || cluster::shared(&scope),
                    Some(&|s| cluster::of_service(&scope, s)),
                ),
            ),
            ENDPOINT => (
                ENDPOINT,
                self.shared(
                    &scope,
                    ENDPOINT,
                    names,
                    || endpoint::load_assignments(&scope),
                    Some(&|s| endpoint::of_service(&scope, s)),
                ),
            ),
            LISTENER => {
                let listeners = || match proxy.kind {
                    ProxyKind::Sidecar => listener::shared(&scope),
                    ProxyKind::Router => gateway::listeners(&scope),
                };
                let build = || named(listeners(), |l| l.name.clone());
                (LISTENER, self.shared(&scope, LISTENER, names, build, None))
            }
            ROUTE => {
                let build = || named(route_configs(&scope), |r| r.name.clone());
                (ROUTE, self.shared(&scope, ROUTE, names, build, None))
            }
            _ => {
                return Generated {
                    shared: ResourceSet::empty(),
                    own: ResourceSet::empty(),
                };
            }
        };
        let own = client.own(&log, type_url, names, || {
            own_set(own_resources(&scope, type_url, names), names)
        });
        Generated { shared, own }
    }

    fn changes(&self) -> watch::Receiver<TypeVersions> {
        self.changes.subscribe()
    }

    fn trace(&self) -> Option<opentelemetry::trace::SpanContext> {
        self.lock().trace.clone()
    }
}

/// What of `type_url` only this proxy gets: a sidecar's inbound side, a
/// gateway's AUTO_PASSTHROUGH clusters, the listeners a proxyless client
/// asks for.
fn own_resources(scope: &Scope, type_url: &str, names: &BTreeSet<String>) -> Vec<Arc<Resource>> {
    let proxy = scope.proxy;
    match type_url {
        CLUSTER => {
            let mut own = cluster::inbound(scope);
            if proxy.kind == ProxyKind::Router && gateway::auto_passthrough(scope) {
                own.extend(cluster::sni_dnat(scope));
            }
            named(own, |c| c.name.clone())
        }
        LISTENER => {
            let mut own = match proxy.kind {
                ProxyKind::Sidecar => listener::inbound(scope),
                ProxyKind::Router => Vec::new(),
            };
            // Proxyless gRPC clients ask for `host:port` by name; they
            // are never part of a wildcard answer, which Envoy gets.
            own.extend(listener::api_listeners(scope, names));
            named(own, |l| l.name.clone())
        }
        _ => Vec::new(),
    }
}

/// Every route configuration of the scope: a sidecar's are named for its
/// HTTP listener ports, a gateway's for its servers.
fn route_configs(
    scope: &Scope,
) -> Vec<envoy_types::pb::envoy::config::route::v3::RouteConfiguration> {
    match scope.proxy.kind {
        ProxyKind::Router => gateway::route_configs(scope),
        ProxyKind::Sidecar => {
            let mut ports: Vec<u32> = Vec::new();
            for egress in scope.egress() {
                match egress.port {
                    Some((p, protocol)) if protocol.is_http() => ports.push(p),
                    Some(_) => {}
                    None => ports.extend(
                        scope
                            .egress_services(0)
                            .flat_map(|s| s.ports.iter())
                            .filter(|p| p.protocol.is_http())
                            .map(|p| p.number),
                    ),
                }
            }
            ports.sort_unstable();
            ports.dedup();
            ports
                .into_iter()
                .map(|p| route::sidecar_outbound(scope, p))
                .collect()
        }
    }
}
