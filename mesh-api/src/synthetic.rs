//! Kubernetes Services, with their Endpoints and the Pods and Nodes behind
//! them, in Istio's ServiceEntry form: the collection
//! `istio/networking/v1alpha3/synthetic/serviceentries`. Galley makes it from
//! what it watches; Pilot makes it from the raw `k8s/core/v1` collections
//! when its source serves those and not this one (Istio 1.1's Galley). Both
//! read the objects in their MCP form, so the rule lives here once.
//!
//! A Service becomes one STATIC ServiceEntry: host
//! `<name>.<namespace>.svc.<domain>`, the cluster IP as address, ports with
//! the protocol their names declare (Istio's `<protocol>[-suffix]`
//! convention), one endpoint per ready address with the pod's labels and
//! its node's locality, and the SPIFFE identities of the pods' service
//! accounts as subject alternative names.

use std::collections::{BTreeMap, BTreeSet};

use crate::pb::{
    istio::networking::v1alpha3::{Port, ServiceEntry, service_entry},
    k8s::io::api::core::v1::{Endpoints, Pod, ServiceSpec},
};

/// Node labels that give a locality, region first (Kubernetes' own, then
/// the older beta names Istio 1.1 read).
const REGION_LABELS: &[&str] = &[
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/region",
];
const ZONE_LABELS: &[&str] = &[
    "topology.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/zone",
];

/// What the conversion looks up while it builds one ServiceEntry. A node
/// travels as its spec, with its labels in the MCP metadata.
pub trait Platform {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod>;
    fn node_labels(&self, name: &str) -> Option<&BTreeMap<String, String>>;
}

/// The protocol Istio infers from a port's name (`http`, `http-web`,
/// `grpc-api`, ...); TCP when the name says nothing Istio knows, UDP for UDP
/// ports.
pub fn protocol(port_name: &str, transport: &str) -> &'static str {
    if transport == "UDP" {
        return "UDP";
    }
    let prefix = port_name
        .split('-')
        .next()
        .unwrap_or_default()
        .to_ascii_lowercase();
    match prefix.as_str() {
        "http" => "HTTP",
        "http2" => "HTTP2",
        "https" => "HTTPS",
        "grpc" => "GRPC",
        "tls" => "TLS",
        "mongo" => "MONGO",
        "mysql" => "MYSQL",
        "redis" => "REDIS",
        "udp" => "UDP",
        _ => "TCP",
    }
}

/// The ServiceEntry for the Service `namespace/name`, or `None` for one of
/// type ExternalName (which is not a mesh service).
pub fn service_entry(
    namespace: &str,
    name: &str,
    spec: &ServiceSpec,
    endpoints: Option<&Endpoints>,
    platform: &impl Platform,
    domain: &str,
) -> Option<ServiceEntry> {
    if spec.r#type == "ExternalName" {
        return None;
    }
    let ports: Vec<Port> = spec
        .ports
        .iter()
        .map(|p| {
            let name = if p.name.is_empty() {
                format!("port-{}", p.port)
            } else {
                p.name.clone()
            };
            Port {
                number: p.port as u32,
                protocol: protocol(&name, &p.protocol).into(),
                name,
            }
        })
        .collect();
    let addresses = [&spec.cluster_ip]
        .into_iter()
        .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
        .cloned()
        .collect();

    let mut entries = Vec::new();
    let mut identities = BTreeSet::new();
    for subset in endpoints.into_iter().flat_map(|e| &e.subsets) {
        // Endpoint ports by name; an unnamed one belongs to a one-port service.
        let port_numbers: BTreeMap<String, u32> = subset
            .ports
            .iter()
            .map(|p| {
                let name = if p.name.is_empty() {
                    ports.first().map(|s| s.name.clone()).unwrap_or_default()
                } else {
                    p.name.clone()
                };
                (name, p.port as u32)
            })
            .collect();
        for address in &subset.addresses {
            let pod = address
                .target_ref
                .as_ref()
                .filter(|r| r.kind == "Pod" && !r.name.is_empty())
                .and_then(|r| {
                    let ns = if r.namespace.is_empty() {
                        namespace
                    } else {
                        &r.namespace
                    };
                    platform.pod(ns, &r.name)
                });
            let labels = pod
                .and_then(|p| p.metadata.as_ref())
                .map(|m| m.labels.clone())
                .unwrap_or_default();
            let spec = pod.and_then(|p| p.spec.as_ref());
            if let Some(account) = spec
                .map(|s| s.service_account_name.as_str())
                .filter(|a| !a.is_empty())
            {
                identities.insert(format!("spiffe://{domain}/ns/{namespace}/sa/{account}"));
            }
            let node = [
                address.node_name.as_str(),
                spec.map_or("", |s| &s.node_name),
            ]
            .into_iter()
            .find(|n| !n.is_empty());
            let locality = node
                .and_then(|n| platform.node_labels(n))
                .map(locality)
                .unwrap_or_default();
            entries.push(service_entry::Endpoint {
                address: address.ip.clone(),
                ports: port_numbers.clone(),
                labels,
                locality,
                ..Default::default()
            });
        }
    }
    entries.sort_by(|a, b| a.address.cmp(&b.address));

    Some(ServiceEntry {
        hosts: vec![format!("{name}.{namespace}.svc.{domain}")],
        addresses,
        ports,
        location: service_entry::Location::MeshInternal as i32,
        resolution: service_entry::Resolution::Static as i32,
        endpoints: entries,
        subject_alt_names: identities.into_iter().collect(),
        ..Default::default()
    })
}

/// `region/zone` from a node's labels; empty when it has none.
fn locality(labels: &BTreeMap<String, String>) -> String {
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    match (first(REGION_LABELS), first(ZONE_LABELS)) {
        (Some(region), Some(zone)) => format!("{region}/{zone}"),
        (Some(region), None) => region,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_follow_istio_port_naming() {
        for (name, want) in [
            ("http", "HTTP"),
            ("HTTP-web", "HTTP"),
            ("http2", "HTTP2"),
            ("https", "HTTPS"),
            ("grpc", "GRPC"),
            ("tls-db", "TLS"),
            ("mongo", "MONGO"),
            ("mysql", "MYSQL"),
            ("redis", "REDIS"),
            ("web", "TCP"),
            ("", "TCP"),
        ] {
            assert_eq!(protocol(name, "TCP"), want, "{name}");
        }
        assert_eq!(protocol("http", "UDP"), "UDP");
    }
}
