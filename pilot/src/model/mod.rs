//! The service model: services (ServiceEntries, user and synthetic) with
//! their ports and endpoints, every config kind Pilot reads, indexed by
//! what generation looks up, and the mesh config.
//!
//! The model follows MCP snapshots incrementally ([`update`]): an object
//! that changed is read again, nothing else, and the [`Change`] says what
//! moved. Its maps are persistent, so a new model shares all but what
//! changed with the one before it. Endpoints are held apart from services,
//! so that an endpoint-only change is an EDS push.

pub mod host;
mod kubernetes;
mod update;

pub use update::Change;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use imbl::OrdMap;
use mesh_api::{
    mesh,
    pb::istio::{
        authentication::v1alpha1::Policy,
        mesh::v1alpha1::MeshConfig,
        networking::v1alpha3::{DestinationRule, Gateway, Sidecar, VirtualService},
        rbac::v1alpha1::{RbacConfig, ServiceRole, ServiceRoleBinding},
    },
};

use crate::proxy::Proxy;

/// A port's protocol, from its declared protocol (or Istio's name prefix
/// convention upstream of Pilot); unknown protocols are TCP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Protocol {
    Http,
    Http2,
    Grpc,
    Https,
    Tls,
    Tcp,
}

impl Protocol {
    pub fn parse(s: &str) -> Self {
        match s.to_ascii_uppercase().as_str() {
            "HTTP" => Self::Http,
            "HTTP2" => Self::Http2,
            "GRPC" | "GRPC-WEB" => Self::Grpc,
            "HTTPS" => Self::Https,
            "TLS" => Self::Tls,
            _ => Self::Tcp,
        }
    }

    /// Whether requests are visible: routed by HTTP routes.
    pub fn is_http(self) -> bool {
        matches!(self, Self::Http | Self::Http2 | Self::Grpc)
    }

    /// Whether upstream connections speak HTTP/2.
    pub fn is_http2(self) -> bool {
        matches!(self, Self::Http2 | Self::Grpc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub number: u32,
    pub name: String,
    pub protocol: Protocol,
}

/// How a service's endpoints are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// Endpoints are listed (EDS).
    Static,
    /// Endpoints (or the host itself) are DNS names the proxy resolves.
    Dns,
    /// Traffic goes where the caller sent it.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub host: String,
    /// The namespace of the ServiceEntry that defines it.
    pub namespace: String,
    /// Virtual IPs or CIDRs callers use for it.
    pub addresses: Vec<String>,
    pub ports: Vec<Port>,
    pub resolution: Resolution,
    pub mesh_external: bool,
    /// Identities its workloads run as; expected of peers under mTLS.
    pub subject_alt_names: Vec<String>,
    /// Namespaces that see it: `*` (all) or `.` (its own).
    pub export_to: Vec<String>,
}

impl Service {
    pub fn port(&self, number: u32) -> Option<&Port> {
        self.ports.iter().find(|p| p.number == number)
    }

    /// Whether a proxy in `namespace` may see the service.
    pub fn visible_from(&self, namespace: &str) -> bool {
        exported(&self.export_to, &self.namespace, namespace)
    }
}

/// Whether config with `export_to`, defined in `own`, is visible in `namespace`.
fn exported(export_to: &[String], own: &str, namespace: &str) -> bool {
    export_to.is_empty()
        || export_to
            .iter()
            .any(|e| e == "*" || (e == "." && own == namespace))
}

/// One endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub address: String,
    /// Port numbers by service port name; a missing name means the service
    /// port's own number.
    pub ports: BTreeMap<String, u32>,
    pub labels: BTreeMap<String, String>,
    pub locality: String,
    pub weight: u32,
}

impl Endpoint {
    /// The endpoint's port for the service port `port`.
    pub fn port(&self, port: &Port) -> u32 {
        self.ports.get(&port.name).copied().unwrap_or(port.number)
    }

    pub fn has_labels(&self, selector: &BTreeMap<String, String>) -> bool {
        selector.iter().all(|(k, v)| self.labels.get(k) == Some(v))
    }
}

/// A config object with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct Named<T> {
    pub namespace: String,
    pub name: String,
    pub spec: T,
}

/// Config objects of one kind by their MCP name (`namespace/name`), in that
/// order. Cloned in constant time, changed in logarithmic time.
#[derive(Debug, Clone)]
pub struct Objects<T>(OrdMap<String, Arc<Named<T>>>);

impl<T> Default for Objects<T> {
    fn default() -> Self {
        Self(OrdMap::new())
    }
}

impl<T: PartialEq> PartialEq for Objects<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0 == other.0
    }
}

impl<T> Objects<T> {
    pub fn iter(&self) -> impl Iterator<Item = &Named<T>> {
        self.0.values().map(Arc::as_ref)
    }

    /// The objects with their MCP names.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Named<T>)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_ref()))
    }

    pub fn get(&self, key: &str) -> Option<&Named<T>> {
        self.0.get(key).map(Arc::as_ref)
    }
}

/// Every config kind Pilot reads, indexed for generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// Hosts, gateway names and destination hosts resolved to full names.
    pub virtual_services: Objects<VirtualService>,
    /// Hosts resolved.
    pub destination_rules: Objects<DestinationRule>,
    pub gateways: Objects<Gateway>,
    pub sidecars: Objects<Sidecar>,
    pub policies: Objects<Policy>,
    /// The MeshPolicy named `default`, the mesh-wide authentication policy.
    pub mesh_policy: Option<Policy>,
    pub service_roles: Objects<ServiceRole>,
    pub service_role_bindings: Objects<ServiceRoleBinding>,
    /// The ClusterRbacConfig (or, as Istio 1.1 still reads it, the
    /// RbacConfig) named `default`.
    pub rbac_config: Option<RbacConfig>,
    /// Whether some VirtualService route matches on source labels, so that
    /// proxies' routes depend on their labels.
    pub matches_source_labels: bool,
    /// The DestinationRules naming each exact host, and those naming a
    /// wildcard, by MCP name: a rule is looked up per cluster.
    rules_by_host: OrdMap<String, BTreeSet<String>>,
    wildcard_rules: BTreeSet<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Services by host.
    pub services: OrdMap<String, Arc<Service>>,
    /// Endpoints by service host.
    pub endpoints: OrdMap<String, Arc<Vec<Endpoint>>>,
    /// Service hosts with an endpoint at an address, by address.
    pub hosts_by_address: OrdMap<String, BTreeSet<String>>,
    pub config: Config,
    pub mesh: MeshConfig,
    /// JWT issuers' keys (JWKS JSON), by the `jwksUri` policies name them
    /// by, as Pilot fetched them.
    pub jwks: BTreeMap<String, String>,
    /// What the services are made from (see [`update`]).
    entries: update::Entries,
}

impl Default for Model {
    fn default() -> Self {
        Self::new(mesh::defaults())
    }
}

impl Model {
    /// A model of no config, with `mesh` as its mesh config until a
    /// snapshot brings one.
    pub fn new(mesh: MeshConfig) -> Self {
        Self {
            services: OrdMap::new(),
            endpoints: OrdMap::new(),
            hosts_by_address: OrdMap::new(),
            config: Config::default(),
            mesh,
            jwks: BTreeMap::new(),
            entries: update::Entries::default(),
        }
    }

    /// The model of a snapshot. A host defined twice keeps its first
    /// definition (user ServiceEntries before synthetic ones). The mesh
    /// config is the snapshot's, else `mesh`.
    pub fn from_snapshot(snapshot: &mcp::SinkSnapshot, mesh: &MeshConfig) -> Self {
        let mut model = Self::new(mesh.clone());
        model.update(&mcp::SinkSnapshot::default(), snapshot, mesh);
        model
    }

    /// The DestinationRule for `host` as seen from `namespace`: the most
    /// specific host match, then one in `namespace`, then in the root
    /// namespace, then any.
    pub fn destination_rule(&self, host: &str, namespace: &str) -> Option<&Named<DestinationRule>> {
        let root = self.mesh.root_namespace.as_str();
        let config = &self.config;
        config
            .rules_by_host
            .get(host)
            .into_iter()
            .flatten()
            .chain(&config.wildcard_rules)
            .filter_map(|key| config.destination_rules.get(key))
            .filter(|dr| {
                host::covers(&dr.spec.host, host)
                    && exported(&dr.spec.export_to, &dr.namespace, namespace)
            })
            .max_by_key(|dr| {
                (
                    host::specificity(&dr.spec.host),
                    dr.namespace == namespace,
                    dr.namespace == root,
                    std::cmp::Reverse((&dr.namespace, &dr.name)),
                )
            })
    }

    /// The endpoints of the workload behind `proxy`, with their services:
    /// those at the proxy's IP whose labels the proxy carries.
    pub fn instances<'a>(
        &'a self,
        proxy: &'a Proxy,
    ) -> impl Iterator<Item = (&'a Service, &'a Endpoint)> + 'a {
        let ip = proxy.ip.to_string();
        let hosts = self.hosts_by_address.get(&ip).into_iter().flatten();
        hosts.flat_map(move |host| {
            let service = self.services.get(host).map(Arc::as_ref);
            let ip = ip.clone();
            self.endpoints
                .get(host)
                .into_iter()
                .flat_map(|e| e.iter())
                .filter(move |e| e.address == ip && proxy.matches(&e.labels))
                .filter_map(move |e| Some((service?, e)))
        })
    }

    /// The Sidecar that scopes `proxy`: in its namespace, the one whose
    /// workload selector matches it (most labels first), else the one
    /// without a selector; else the root namespace's without a selector.
    pub fn sidecar(&self, proxy: &Proxy) -> Option<&Named<Sidecar>> {
        fn selector(s: &Named<Sidecar>) -> Option<&BTreeMap<String, String>> {
            s.spec.workload_selector.as_ref().map(|w| &w.labels)
        }
        let in_namespace = self
            .config
            .sidecars
            .iter()
            .filter(|s| s.namespace == proxy.namespace)
            .filter(|s| selector(s).is_none_or(|labels| proxy.matches(labels)))
            .max_by_key(|s| selector(s).map_or(0, |l| l.len() + 1));
        in_namespace.or_else(|| {
            self.config
                .sidecars
                .iter()
                .find(|s| s.namespace == self.mesh.root_namespace && selector(s).is_none())
        })
    }
}

/// A VirtualService with every host name made full: its hosts, its
/// gateways (`name` -> `namespace/name`, `mesh` kept) and its destinations.
pub(crate) fn resolve_virtual_service(mut vs: Named<VirtualService>) -> Named<VirtualService> {
    let ns = vs.namespace.clone();
    let gateway = |g: &mut String| {
        if g != "mesh" && !g.contains('/') {
            *g = format!("{ns}/{g}");
        }
    };
    let spec = &mut vs.spec;
    spec.hosts = spec.hosts.iter().map(|h| host::resolve(h, &ns)).collect();
    spec.gateways.iter_mut().for_each(gateway);
    for http in &mut spec.http {
        for m in &mut http.r#match {
            m.gateways.iter_mut().for_each(gateway);
        }
        for d in http.route.iter_mut().filter_map(|r| r.destination.as_mut()) {
            d.host = host::resolve(&d.host, &ns);
        }
        if let Some(m) = http.mirror.as_mut() {
            m.host = host::resolve(&m.host, &ns);
        }
    }
    for tcp in &mut spec.tcp {
        for m in &mut tcp.r#match {
            m.gateways.iter_mut().for_each(gateway);
        }
        for d in tcp.route.iter_mut().filter_map(|r| r.destination.as_mut()) {
            d.host = host::resolve(&d.host, &ns);
        }
    }
    for tls in &mut spec.tls {
        for m in &mut tls.r#match {
            m.gateways.iter_mut().for_each(gateway);
        }
        for d in tls.route.iter_mut().filter_map(|r| r.destination.as_mut()) {
            d.host = host::resolve(&d.host, &ns);
        }
    }
    vs
}

/// Istio's cluster name: `<direction>|<port>|<subset>|<host>`.
pub fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}

/// The same cluster as Istio 1.1 names it in SNI, where `|` cannot go
/// (`outbound_.<port>_.<subset>_.<host>`): what a mesh client sends, and
/// what a gateway's AUTO_PASSTHROUGH routes by.
pub fn sni_cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound_.{port}_.{subset}_.{host}")
}

/// The cluster of a workload's own port: `inbound|<port>|<port name>|<host>`.
pub fn inbound_cluster_name(port: u32, port_name: &str, host: &str) -> String {
    format!("inbound|{port}|{port_name}|{host}")
}
