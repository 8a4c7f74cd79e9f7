//! The service model, built from one MCP snapshot: services (ServiceEntries,
//! user and synthetic) with their ports and endpoints, every config kind
//! Pilot reads, indexed by what generation looks up, and the mesh config.
//!
//! Endpoints are held apart from services, so that comparing two models
//! tells an endpoint-only change (an EDS push) from one that changes what
//! proxies route ([`Model::changed_types`]).

pub mod host;
mod kubernetes;

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use mcp::SinkSnapshot;
use mesh_api::{
    kinds::{self, Body},
    mesh,
    pb::istio::{
        authentication::v1alpha1::Policy,
        mesh::v1alpha1::MeshConfig,
        networking::v1alpha3::{
            DestinationRule, Gateway, ServiceEntry, Sidecar, VirtualService, service_entry,
        },
        rbac::v1alpha1::{RbacConfig, ServiceRole, ServiceRoleBinding},
    },
};

use crate::{
    proxy::Proxy,
    xds::{CLUSTER, ENDPOINT, LISTENER, ROUTE},
};

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

/// Every config kind Pilot reads, indexed for generation.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Config {
    /// Hosts, gateway names and destination hosts resolved to full names.
    pub virtual_services: Vec<Named<VirtualService>>,
    /// Hosts resolved; in `namespace/name` order.
    pub destination_rules: Vec<Named<DestinationRule>>,
    /// By `namespace/name`.
    pub gateways: BTreeMap<String, Named<Gateway>>,
    pub sidecars: Vec<Named<Sidecar>>,
    pub policies: Vec<Named<Policy>>,
    /// The MeshPolicy named `default`, the mesh-wide authentication policy.
    pub mesh_policy: Option<Policy>,
    /// By `(namespace, name)`.
    pub service_roles: BTreeMap<(String, String), ServiceRole>,
    pub service_role_bindings: Vec<Named<ServiceRoleBinding>>,
    /// The ClusterRbacConfig (or, as Istio 1.1 still reads it, the
    /// RbacConfig) named `default`.
    pub rbac_config: Option<RbacConfig>,
    /// Whether some VirtualService route matches on source labels, so that
    /// proxies' routes depend on their labels.
    pub matches_source_labels: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Model {
    /// Services by host.
    pub services: BTreeMap<String, Arc<Service>>,
    /// Endpoints by service host.
    pub endpoints: BTreeMap<String, Arc<Vec<Endpoint>>>,
    /// Service hosts with an endpoint at an address, by address.
    pub hosts_by_address: BTreeMap<String, BTreeSet<String>>,
    pub config: Config,
    pub mesh: MeshConfig,
    /// JWT issuers' keys (JWKS JSON), by the `jwksUri` policies name them
    /// by, as Pilot fetched them.
    pub jwks: BTreeMap<String, String>,
}

impl Default for Model {
    fn default() -> Self {
        Self {
            services: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            hosts_by_address: BTreeMap::new(),
            config: Config::default(),
            mesh: mesh::defaults(),
            jwks: BTreeMap::new(),
        }
    }
}

macro_rules! named {
    ($snapshot:expr, $collection:expr, $variant:ident) => {
        $snapshot
            .bodies($collection)
            .filter_map(|(namespace, name, body)| match body {
                Body::$variant(spec) => Some(Named {
                    namespace,
                    name,
                    spec: (**spec).clone(),
                }),
                _ => None,
            })
    };
}

impl Model {
    /// The model of a snapshot. A host defined twice keeps its first
    /// definition (user ServiceEntries before synthetic ones). The mesh
    /// config is the snapshot's, else `mesh`.
    pub fn from_snapshot(snapshot: &SinkSnapshot, mesh: &MeshConfig) -> Self {
        let mut model = Model {
            mesh: mesh.clone(),
            ..Model::default()
        };
        for se in named!(snapshot, kinds::SERVICE_ENTRIES, ServiceEntry) {
            model.add_service_entry(se);
        }
        // A source that serves no synthetic entries (Istio 1.1's Galley)
        // serves the Kubernetes objects they are made from; what an earlier
        // source served under the refused name is not current.
        if snapshot.absent(kinds::SYNTHETIC_SERVICE_ENTRIES) {
            for se in kubernetes::service_entries(snapshot) {
                model.add_service_entry(se);
            }
        } else {
            for se in named!(snapshot, kinds::SYNTHETIC_SERVICE_ENTRIES, ServiceEntry) {
                model.add_service_entry(se);
            }
        }
        let config = &mut model.config;
        config.virtual_services = named!(snapshot, kinds::VIRTUAL_SERVICES, VirtualService)
            .map(resolve_virtual_service)
            .collect();
        config.matches_source_labels = config.virtual_services.iter().any(|vs| {
            let http = vs
                .spec
                .http
                .iter()
                .flat_map(|h| &h.r#match)
                .any(|m| !m.source_labels.is_empty());
            let tcp = vs
                .spec
                .tcp
                .iter()
                .flat_map(|t| &t.r#match)
                .any(|m| !m.source_labels.is_empty());
            http || tcp
        });
        config.destination_rules = named!(snapshot, kinds::DESTINATION_RULES, DestinationRule)
            .map(|mut dr| {
                dr.spec.host = host::resolve(&dr.spec.host, &dr.namespace);
                dr
            })
            .collect();
        config.gateways = named!(snapshot, kinds::GATEWAYS, Gateway)
            .map(|g| (format!("{}/{}", g.namespace, g.name), g))
            .collect();
        config.sidecars = named!(snapshot, kinds::SIDECARS, Sidecar).collect();
        config.policies = named!(snapshot, kinds::POLICIES, Policy).collect();
        config.mesh_policy = named!(snapshot, kinds::MESH_POLICIES, Policy)
            .find(|p| p.name == "default")
            .map(|p| p.spec);
        config.service_roles = named!(snapshot, kinds::SERVICE_ROLES, ServiceRole)
            .map(|r| ((r.namespace, r.name), r.spec))
            .collect();
        config.service_role_bindings =
            named!(snapshot, kinds::SERVICE_ROLE_BINDINGS, ServiceRoleBinding).collect();
        config.rbac_config = named!(snapshot, kinds::CLUSTER_RBAC_CONFIGS, RbacConfig)
            .chain(named!(snapshot, kinds::RBAC_CONFIGS, RbacConfig))
            .find(|c| c.name == "default")
            .map(|c| c.spec);
        if let Some(mesh) = snapshot
            .bodies(kinds::MESH_CONFIG)
            .find_map(|(_, _, b)| match b {
                Body::MeshConfig(m) => Some((**m).clone()),
                _ => None,
            })
        {
            model.mesh = mesh;
        }
        model
    }

    fn add_service_entry(&mut self, se: Named<ServiceEntry>) {
        let spec = &se.spec;
        let resolution = match service_entry::Resolution::try_from(spec.resolution) {
            Ok(service_entry::Resolution::Static) => Resolution::Static,
            Ok(service_entry::Resolution::Dns) => Resolution::Dns,
            _ => Resolution::Passthrough,
        };
        let endpoints: Arc<Vec<Endpoint>> = Arc::new(
            spec.endpoints
                .iter()
                .map(|e| Endpoint {
                    address: e.address.clone(),
                    ports: e.ports.clone(),
                    labels: e.labels.clone(),
                    locality: e.locality.clone(),
                    weight: e.weight,
                })
                .collect(),
        );
        for h in &spec.hosts {
            let host = host::resolve(h, &se.namespace);
            if self.services.contains_key(&host) {
                continue;
            }
            let service = Service {
                host: host.clone(),
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
            };
            self.services.insert(host.clone(), Arc::new(service));
            for e in endpoints.iter() {
                self.hosts_by_address
                    .entry(e.address.clone())
                    .or_default()
                    .insert(host.clone());
            }
            self.endpoints.insert(host, endpoints.clone());
        }
    }

    /// The xDS types whose resources may differ between `self` and `next`:
    /// an endpoint-only change touches EDS alone.
    pub fn changed_types(&self, next: &Model) -> BTreeSet<&'static str> {
        let mut types = BTreeSet::new();
        if self.services != next.services || self.mesh != next.mesh {
            return [CLUSTER, ENDPOINT, LISTENER, ROUTE].into();
        }
        let (a, b) = (&self.config, &next.config);
        if a.sidecars != b.sidecars {
            return [CLUSTER, ENDPOINT, LISTENER, ROUTE].into();
        }
        if self.endpoints != next.endpoints {
            // Inbound listeners follow the proxy's own endpoints.
            types.extend([ENDPOINT, LISTENER]);
        }
        if a.destination_rules != b.destination_rules {
            // Subsets, policies, and consistent-hash route settings.
            types.extend([CLUSTER, ENDPOINT, ROUTE]);
        }
        if a.virtual_services != b.virtual_services || a.gateways != b.gateways {
            types.extend([LISTENER, ROUTE]);
        }
        if a.policies != b.policies
            || a.mesh_policy != b.mesh_policy
            || a.service_roles != b.service_roles
            || a.service_role_bindings != b.service_role_bindings
            || a.rbac_config != b.rbac_config
        {
            types.insert(LISTENER);
        }
        types
    }

    /// The DestinationRule for `host` as seen from `namespace`: the most
    /// specific host match, then one in `namespace`, then in the root
    /// namespace, then any.
    pub fn destination_rule(&self, host: &str, namespace: &str) -> Option<&Named<DestinationRule>> {
        let root = self.mesh.root_namespace.as_str();
        self.config
            .destination_rules
            .iter()
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
        self.services.values().flat_map(move |service| {
            let ip = ip.clone();
            self.endpoints
                .get(&service.host)
                .into_iter()
                .flat_map(|e| e.iter())
                .filter(move |e| e.address == ip && proxy.matches(&e.labels))
                .map(move |e| (service.as_ref(), e))
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
fn resolve_virtual_service(mut vs: Named<VirtualService>) -> Named<VirtualService> {
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

/// The cluster of a workload's own port: `inbound|<port>|<port name>|<host>`.
pub fn inbound_cluster_name(port: u32, port_name: &str, host: &str) -> String {
    format!("inbound|{port}|{port_name}|{host}")
}
