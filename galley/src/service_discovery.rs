//! Service discovery for Pilot: Kubernetes Services, with their Endpoints
//! and the Pods and Nodes behind them, in Istio's ServiceEntry form, for the
//! collection `istio/networking/v1alpha3/synthetic/serviceentries`. Pilot
//! reads services only from here, never from the platform.
//!
//! A Service becomes one STATIC ServiceEntry named `namespace/name`: host
//! `<name>.<namespace>.svc.<domain>`, the cluster IP as address, ports with
//! the protocol their names declare (Istio's `<protocol>[-suffix]`
//! convention), one endpoint per ready address with the pod's labels and
//! its node's locality, and the SPIFFE identities of the pods' service
//! accounts as subject alternative names.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use mcp_proto::pb::istio::networking::v1alpha3::{Port, ServiceEntry, service_entry};

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

/// What the converter looks up while building one ServiceEntry.
pub trait Platform {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod>;
    fn node(&self, name: &str) -> Option<&Node>;
}

/// The protocol Istio infers from a port's name (`http`, `http-web`,
/// `grpc-api`, ...); TCP when the name says nothing Istio knows, UDP for UDP
/// ports.
pub fn protocol(port_name: &str, transport: Option<&str>) -> &'static str {
    if transport == Some("UDP") {
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

/// The ServiceEntry for `service`, or `None` for services without a name
/// and namespace or of type ExternalName (which Pilot does not serve as
/// mesh services).
pub fn service_entry(
    service: &Service,
    endpoints: Option<&Endpoints>,
    platform: &impl Platform,
    domain: &str,
) -> Option<ServiceEntry> {
    let name = service.metadata.name.as_deref()?;
    let namespace = service.metadata.namespace.as_deref()?;
    let spec = service.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let ports: Vec<Port> = spec
        .ports
        .iter()
        .flatten()
        .map(|p| {
            let name = p.name.clone().unwrap_or_else(|| format!("port-{}", p.port));
            Port {
                number: p.port as u32,
                protocol: protocol(&name, p.protocol.as_deref()).into(),
                name,
            }
        })
        .collect();
    let addresses = spec
        .cluster_ip
        .iter()
        .filter(|ip| !ip.is_empty() && ip.as_str() != "None")
        .cloned()
        .collect();

    let mut entries = Vec::new();
    let mut identities = BTreeSet::new();
    for subset in endpoints
        .and_then(|e| e.subsets.as_ref())
        .into_iter()
        .flatten()
    {
        // Endpoint ports by name; an unnamed one belongs to a one-port service.
        let port_numbers: BTreeMap<String, u32> = subset
            .ports
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.name.clone().unwrap_or_else(|| {
                        ports.first().map(|s| s.name.clone()).unwrap_or_default()
                    }),
                    p.port as u32,
                )
            })
            .collect();
        for address in subset.addresses.iter().flatten() {
            let pod = address
                .target_ref
                .as_ref()
                .filter(|r| r.kind.as_deref() == Some("Pod"))
                .and_then(|r| {
                    platform.pod(
                        r.namespace.as_deref().unwrap_or(namespace),
                        r.name.as_deref()?,
                    )
                });
            let labels = pod
                .and_then(|p| p.metadata.labels.clone())
                .unwrap_or_default();
            if let Some(account) = pod
                .and_then(|p| p.spec.as_ref())
                .and_then(|s| s.service_account_name.as_deref())
            {
                identities.insert(format!("spiffe://{domain}/ns/{namespace}/sa/{account}"));
            }
            let node = address
                .node_name
                .as_deref()
                .or_else(|| pod.and_then(|p| p.spec.as_ref()?.node_name.as_deref()));
            let locality = node
                .and_then(|n| platform.node(n))
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
fn locality(node: &Node) -> String {
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let first = |keys: &[&str]| keys.iter().find_map(|k| labels.get(*k).cloned());
    match (first(REGION_LABELS), first(ZONE_LABELS)) {
        (Some(region), Some(zone)) => format!("{region}/{zone}"),
        (Some(region), None) => region,
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use serde_json::json;

    use super::*;

    /// Objects as the Kubernetes API returns them (trimmed of fields the
    /// converter does not read).
    struct Recorded {
        pods: HashMap<(String, String), Pod>,
        nodes: HashMap<String, Node>,
    }

    impl Platform for Recorded {
        fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
            self.pods.get(&(namespace.to_string(), name.to_string()))
        }
        fn node(&self, name: &str) -> Option<&Node> {
            self.nodes.get(name)
        }
    }

    fn recorded() -> (Service, Endpoints, Recorded) {
        let service: Service = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "reviews", "namespace": "bookinfo", "labels": {"app": "reviews"}, "resourceVersion": "1182"},
            "spec": {
                "type": "ClusterIP", "clusterIP": "10.96.14.2", "selector": {"app": "reviews"},
                "ports": [
                    {"name": "http", "port": 9080, "protocol": "TCP", "targetPort": 9080},
                    {"name": "grpc-admin", "port": 9090, "protocol": "TCP", "targetPort": 9090},
                    {"name": "metrics", "port": 9102, "protocol": "TCP", "targetPort": 9102},
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}
                ]
            }
        }))
        .unwrap();
        let endpoints: Endpoints = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Endpoints",
            "metadata": {"name": "reviews", "namespace": "bookinfo"},
            "subsets": [{
                "addresses": [
                    {"ip": "10.244.1.7", "nodeName": "node-b", "targetRef": {"kind": "Pod", "name": "reviews-v2-5d8f", "namespace": "bookinfo"}},
                    {"ip": "10.244.0.5", "nodeName": "node-a", "targetRef": {"kind": "Pod", "name": "reviews-v1-7c9b", "namespace": "bookinfo"}}
                ],
                "notReadyAddresses": [{"ip": "10.244.2.9", "targetRef": {"kind": "Pod", "name": "reviews-v3-0000", "namespace": "bookinfo"}}],
                "ports": [
                    {"name": "http", "port": 9080, "protocol": "TCP"},
                    {"name": "grpc-admin", "port": 9090, "protocol": "TCP"}
                ]
            }]
        }))
        .unwrap();
        let pod = |name: &str, version: &str, account: &str| -> Pod {
            serde_json::from_value(json!({
                "apiVersion": "v1", "kind": "Pod",
                "metadata": {"name": name, "namespace": "bookinfo", "labels": {"app": "reviews", "version": version}},
                "spec": {"serviceAccountName": account, "containers": [{"name": "reviews", "image": "reviews"}]}
            }))
            .unwrap()
        };
        let node = |name: &str, labels: serde_json::Value| -> Node {
            serde_json::from_value(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}})).unwrap()
        };
        let platform = Recorded {
            pods: [
                (("bookinfo".into(), "reviews-v1-7c9b".into()), pod("reviews-v1-7c9b", "v1", "bookinfo-reviews")),
                (("bookinfo".into(), "reviews-v2-5d8f".into()), pod("reviews-v2-5d8f", "v2", "bookinfo-reviews")),
            ]
            .into(),
            nodes: [
                ("node-a".into(), node("node-a", json!({"topology.kubernetes.io/region": "us-east1", "topology.kubernetes.io/zone": "us-east1-b"}))),
                ("node-b".into(), node("node-b", json!({"failure-domain.beta.kubernetes.io/region": "eu-west1", "failure-domain.beta.kubernetes.io/zone": "eu-west1-c"}))),
            ]
            .into(),
        };
        (service, endpoints, platform)
    }

    #[test]
    fn a_service_becomes_a_static_service_entry() {
        let (service, endpoints, platform) = recorded();
        let se = service_entry(&service, Some(&endpoints), &platform, "cluster.local").unwrap();
        assert_eq!(se.hosts, ["reviews.bookinfo.svc.cluster.local"]);
        assert_eq!(se.addresses, ["10.96.14.2"]);
        assert_eq!(se.resolution, service_entry::Resolution::Static as i32);
        assert_eq!(se.location, service_entry::Location::MeshInternal as i32);
        let protocols: Vec<(&str, u32, &str)> = se
            .ports
            .iter()
            .map(|p| (p.name.as_str(), p.number, p.protocol.as_str()))
            .collect();
        assert_eq!(
            protocols,
            [
                ("http", 9080, "HTTP"),
                ("grpc-admin", 9090, "GRPC"),
                ("metrics", 9102, "TCP"),
                ("dns", 53, "UDP")
            ]
        );

        // Ready addresses only, with pod labels and node locality.
        assert_eq!(se.endpoints.len(), 2);
        let v1 = &se.endpoints[0];
        assert_eq!(v1.address, "10.244.0.5");
        assert_eq!(v1.labels["version"], "v1");
        assert_eq!(v1.locality, "us-east1/us-east1-b");
        assert_eq!(
            v1.ports,
            [("grpc-admin".to_string(), 9090), ("http".to_string(), 9080)].into()
        );
        assert_eq!(
            se.endpoints[1].locality, "eu-west1/eu-west1-c",
            "older node labels too"
        );
        assert_eq!(
            se.subject_alt_names,
            ["spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"]
        );
    }

    #[test]
    fn headless_and_external_name_services() {
        let (mut service, _, platform) = recorded();
        service.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        let se = service_entry(&service, None, &platform, "example.org").unwrap();
        assert!(se.addresses.is_empty(), "a headless service has no address");
        assert!(se.endpoints.is_empty(), "no Endpoints object yet");
        assert_eq!(se.hosts, ["reviews.bookinfo.svc.example.org"]);

        service.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(service_entry(&service, None, &platform, "cluster.local").is_none());
    }

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
            assert_eq!(protocol(name, Some("TCP")), want, "{name}");
        }
        assert_eq!(protocol("http", Some("UDP")), "UDP");
    }
}
