//! The service model, built from what Galley serves: services with their
//! ports and endpoints from ServiceEntries (user and synthetic), and the
//! subsets DestinationRules define for them.

use std::collections::BTreeMap;

use mcp_proto::{
    kinds::{self, Body},
    mcp::{Payload, SinkSnapshot},
    pb::istio::networking::v1alpha3::service_entry,
};

/// One service port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Port {
    pub number: u32,
    pub name: String,
    pub protocol: String,
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

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Service {
    pub host: String,
    pub ports: Vec<Port>,
    pub endpoints: Vec<Endpoint>,
    /// Subset name -> the labels its endpoints carry.
    pub subsets: BTreeMap<String, BTreeMap<String, String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Model {
    /// Services by host.
    pub services: BTreeMap<String, Service>,
}

impl Model {
    /// The model of a snapshot. STATIC ServiceEntries carry their endpoints;
    /// a host defined twice keeps the first definition.
    pub fn from_snapshot(snapshot: &SinkSnapshot) -> Self {
        let mut services: BTreeMap<String, Service> = BTreeMap::new();
        for collection in [kinds::SERVICE_ENTRIES, kinds::SYNTHETIC_SERVICE_ENTRIES] {
            let Some(held) = snapshot.collections.get(collection) else {
                continue;
            };
            for resource in held.resources.values() {
                let Payload::Decoded(Body::ServiceEntry(se)) = &resource.payload else {
                    continue;
                };
                let endpoints: Vec<Endpoint> = se
                    .endpoints
                    .iter()
                    .map(|e| Endpoint {
                        address: e.address.clone(),
                        ports: e.ports.clone(),
                        labels: e.labels.clone(),
                        locality: e.locality.clone(),
                        weight: e.weight,
                    })
                    .collect();
                let static_endpoints = se.resolution == service_entry::Resolution::Static as i32;
                for host in &se.hosts {
                    services.entry(host.clone()).or_insert_with(|| Service {
                        host: host.clone(),
                        ports: se
                            .ports
                            .iter()
                            .map(|p| Port {
                                number: p.number,
                                name: p.name.clone(),
                                protocol: p.protocol.clone(),
                            })
                            .collect(),
                        endpoints: if static_endpoints {
                            endpoints.clone()
                        } else {
                            Vec::new()
                        },
                        subsets: BTreeMap::new(),
                    });
                }
            }
        }
        if let Some(held) = snapshot.collections.get(kinds::DESTINATION_RULES) {
            for resource in held.resources.values() {
                let Payload::Decoded(Body::DestinationRule(dr)) = &resource.payload else {
                    continue;
                };
                if let Some(service) = services.get_mut(&dr.host) {
                    for subset in &dr.subsets {
                        service
                            .subsets
                            .entry(subset.name.clone())
                            .or_insert_with(|| subset.labels.clone());
                    }
                }
            }
        }
        Self { services }
    }
}

/// Istio's cluster name: `outbound|<port>|<subset>|<host>`.
pub fn cluster_name(port: u32, subset: &str, host: &str) -> String {
    format!("outbound|{port}|{subset}|{host}")
}
