//! Services from the raw Kubernetes collections, for a source that serves
//! those and no synthetic service entries (Istio 1.1's Galley): the same
//! ServiceEntries Galley would have made ([`mesh_api::synthetic`]).

use std::collections::{BTreeMap, HashMap};

use mcp::{Payload, SinkSnapshot};
use mesh_api::{
    kinds::{self, Body},
    pb::{istio::networking::v1alpha3::ServiceEntry, k8s::io::api::core::v1::Pod},
    synthetic,
};

use super::{Named, host::DOMAIN_SUFFIX};

/// The pods and node labels of a snapshot, as the conversion looks them up.
struct Raw<'a> {
    pods: HashMap<&'a str, &'a Pod>,
    node_labels: HashMap<&'a str, &'a BTreeMap<String, String>>,
}

impl synthetic::Platform for Raw<'_> {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .get(kinds::resource_name(Some(namespace), name).as_str())
            .copied()
    }

    fn node_labels(&self, name: &str) -> Option<&BTreeMap<String, String>> {
        self.node_labels.get(name).copied()
    }
}

/// The ServiceEntry of every Kubernetes Service in `snapshot`.
pub fn service_entries(snapshot: &SinkSnapshot) -> Vec<Named<ServiceEntry>> {
    let held = |collection| {
        snapshot
            .collections
            .get(collection)
            .into_iter()
            .flat_map(|c| c.resources.iter())
            .map(|(name, r)| (name.as_str(), r.as_ref()))
    };
    let raw = Raw {
        pods: held(kinds::K8S_PODS)
            .filter_map(|(name, r)| match &r.payload {
                Payload::Decoded(Body::K8sPod(pod)) => Some((name, pod.as_ref())),
                _ => None,
            })
            .collect(),
        node_labels: held(kinds::K8S_NODES)
            .map(|(name, r)| (name, &r.metadata.labels))
            .collect(),
    };
    let endpoints: HashMap<&str, _> = held(kinds::K8S_ENDPOINTS)
        .filter_map(|(name, r)| match &r.payload {
            Payload::Decoded(Body::K8sEndpoints(e)) => Some((name, e.as_ref())),
            _ => None,
        })
        .collect();
    snapshot
        .bodies(kinds::K8S_SERVICES)
        .filter_map(|(namespace, name, body)| {
            let Body::K8sServiceSpec(spec) = body else {
                return None;
            };
            let key = kinds::resource_name(Some(&namespace), &name);
            let endpoints = endpoints.get(key.as_str()).copied();
            let spec =
                synthetic::service_entry(&namespace, &name, spec, endpoints, &raw, DOMAIN_SUFFIX)?;
            Some(Named {
                namespace,
                name,
                spec,
            })
        })
        .collect()
}
