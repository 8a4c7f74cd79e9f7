//! Service discovery for Pilot from what Galley watches: Kubernetes
//! Services, with their Endpoints and the Pods and Nodes behind them, in
//! their MCP form (`kube_core`), turned into the collection
//! `istio/networking/v1alpha3/synthetic/serviceentries` by the rule Pilot
//! also applies to a source that serves only the raw objects
//! ([`mesh_api::synthetic`]). Pilot reads services only from MCP, never
//! from the platform.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use mesh_api::{
    kinds,
    pb::{istio::networking::v1alpha3::ServiceEntry, k8s::io::api::core::v1 as pb},
    synthetic,
};

use crate::kube_core;

/// The cluster's pods, converted once to their MCP form, and its nodes.
pub struct Platform<'a> {
    pods: BTreeMap<&'a str, pb::Pod>,
    nodes: &'a BTreeMap<String, Node>,
}

impl<'a> Platform<'a> {
    /// `pods` and `nodes` by MCP name (`namespace/name`, `name`).
    pub fn new(pods: &'a BTreeMap<String, Pod>, nodes: &'a BTreeMap<String, Node>) -> Self {
        Self {
            pods: pods
                .iter()
                .map(|(name, pod)| (name.as_str(), kube_core::pod(pod)))
                .collect(),
            nodes,
        }
    }

    /// The pods in their MCP form, by MCP name.
    pub fn pods(&self) -> impl Iterator<Item = (&str, &pb::Pod)> {
        self.pods.iter().map(|(name, pod)| (*name, pod))
    }
}

impl synthetic::Platform for Platform<'_> {
    fn pod(&self, namespace: &str, name: &str) -> Option<&pb::Pod> {
        self.pods
            .get(kinds::resource_name(Some(namespace), name).as_str())
    }

    fn node_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.nodes.get(name)?.metadata.labels.as_ref()
    }
}

/// The ServiceEntry for `service`, or `None` for services without a name
/// and namespace or of type ExternalName.
pub fn service_entry(
    service: &Service,
    endpoints: Option<&Endpoints>,
    platform: &Platform<'_>,
    domain: &str,
) -> Option<ServiceEntry> {
    let name = service.metadata.name.as_deref()?;
    let namespace = service.metadata.namespace.as_deref()?;
    let endpoints = endpoints.map(kube_core::endpoints);
    synthetic::service_entry(
        namespace,
        name,
        &kube_core::service_spec(service),
        endpoints.as_ref(),
        platform,
        domain,
    )
}

#[cfg(test)]
mod tests {
    use mesh_api::pb::istio::networking::v1alpha3::service_entry;
    use serde_json::json;

    use super::*;

    /// Pods and nodes as the Kubernetes API returns them (trimmed of fields
    /// the converter does not read), by MCP name.
    struct Recorded {
        pods: BTreeMap<String, Pod>,
        nodes: BTreeMap<String, Node>,
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
                ("bookinfo/reviews-v1-7c9b".into(), pod("reviews-v1-7c9b", "v1", "bookinfo-reviews")),
                ("bookinfo/reviews-v2-5d8f".into(), pod("reviews-v2-5d8f", "v2", "bookinfo-reviews")),
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
        let (service, endpoints, recorded) = recorded();
        let platform = Platform::new(&recorded.pods, &recorded.nodes);
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
        let (mut service, _, recorded) = recorded();
        let platform = Platform::new(&recorded.pods, &recorded.nodes);
        service.spec.as_mut().unwrap().cluster_ip = Some("None".into());
        let se = service_entry(&service, None, &platform, "example.org").unwrap();
        assert!(se.addresses.is_empty(), "a headless service has no address");
        assert!(se.endpoints.is_empty(), "no Endpoints object yet");
        assert_eq!(se.hosts, ["reviews.bookinfo.svc.example.org"]);

        service.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
        assert!(service_entry(&service, None, &platform, "cluster.local").is_none());
    }
}
