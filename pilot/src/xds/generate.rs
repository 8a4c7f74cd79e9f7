//! Clusters and endpoints from the model: one EDS cluster per service port
//! and per DestinationRule subset, named as Istio names them, and its
//! endpoints, the subset's label selector applied, grouped by locality.

use std::sync::Arc;

use envoy_types::pb::{
    envoy::config::{
        cluster::v3::{
            Cluster,
            cluster::{ClusterDiscoveryType, DiscoveryType, EdsClusterConfig},
        },
        core::v3::{
            Address, AggregatedConfigSource, ApiVersion, ConfigSource, Locality, SocketAddress,
            address, config_source, socket_address,
        },
        endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        },
    },
    google::protobuf::{Any, Duration, UInt32Value},
};
use prost::Message;
use tokio::sync::watch;

use super::{CLUSTER, ENDPOINT, ResourceGenerator};
use crate::model::{self, Model, Service};

/// Generates from the latest model.
pub struct ModelGenerator {
    model: watch::Receiver<Arc<Model>>,
    changes: watch::Sender<u64>,
}

impl ModelGenerator {
    /// Follows `model`; every new model is a change.
    pub fn new(mut model: watch::Receiver<Arc<Model>>) -> Arc<Self> {
        let (changes, _) = watch::channel(0);
        let generator = Arc::new(Self {
            model: model.clone(),
            changes,
        });
        let notify = generator.changes.clone();
        tokio::spawn(async move {
            while model.changed().await.is_ok() {
                notify.send_modify(|n| *n += 1);
            }
        });
        generator
    }
}

/// Every cluster of a service: one per port, and one per port and subset.
fn clusters(service: &Service) -> impl Iterator<Item = (String, u32, Option<&str>)> + '_ {
    service.ports.iter().flat_map(move |p| {
        std::iter::once((
            model::cluster_name(p.number, "", &service.host),
            p.number,
            None,
        ))
        .chain(service.subsets.keys().map(move |s| {
            (
                model::cluster_name(p.number, s, &service.host),
                p.number,
                Some(s.as_str()),
            )
        }))
    })
}

fn eds_cluster(name: &str) -> Cluster {
    Cluster {
        name: name.to_string(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ConfigSource {
                resource_api_version: ApiVersion::V3 as i32,
                config_source_specifier: Some(config_source::ConfigSourceSpecifier::Ads(
                    AggregatedConfigSource {},
                )),
                ..Default::default()
            }),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 10,
            nanos: 0,
        }),
        ..Default::default()
    }
}

fn load_assignment(
    name: &str,
    service: &Service,
    port: u32,
    subset: Option<&str>,
) -> ClusterLoadAssignment {
    let selector = subset.and_then(|s| service.subsets.get(s));
    let port_name = service
        .ports
        .iter()
        .find(|p| p.number == port)
        .map(|p| p.name.as_str())
        .unwrap_or_default();
    let mut by_locality: std::collections::BTreeMap<&str, Vec<LbEndpoint>> =
        std::collections::BTreeMap::new();
    for e in &service.endpoints {
        if selector.is_some_and(|labels| labels.iter().any(|(k, v)| e.labels.get(k) != Some(v))) {
            continue;
        }
        let target = e.ports.get(port_name).copied().unwrap_or(port);
        by_locality
            .entry(e.locality.as_str())
            .or_default()
            .push(LbEndpoint {
                host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
                    address: Some(Address {
                        address: Some(address::Address::SocketAddress(SocketAddress {
                            address: e.address.clone(),
                            port_specifier: Some(socket_address::PortSpecifier::PortValue(target)),
                            ..Default::default()
                        })),
                    }),
                    ..Default::default()
                })),
                load_balancing_weight: (e.weight > 0).then_some(UInt32Value { value: e.weight }),
                ..Default::default()
            });
    }
    ClusterLoadAssignment {
        cluster_name: name.to_string(),
        endpoints: by_locality
            .into_iter()
            .map(|(locality, lb_endpoints)| {
                let mut parts = locality.splitn(3, '/');
                LocalityLbEndpoints {
                    locality: Some(Locality {
                        region: parts.next().unwrap_or_default().into(),
                        zone: parts.next().unwrap_or_default().into(),
                        sub_zone: parts.next().unwrap_or_default().into(),
                    }),
                    lb_endpoints,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn any(type_url: &str, message: &impl Message) -> Any {
    Any {
        type_url: type_url.to_string(),
        value: message.encode_to_vec(),
    }
}

impl ResourceGenerator for ModelGenerator {
    fn generate(
        &self,
        _node: &envoy_types::pb::envoy::config::core::v3::Node,
        type_url: &str,
        names: &[String],
    ) -> Vec<(String, Any)> {
        let model = self.model.borrow().clone();
        let wanted = |name: &str| names.is_empty() || names.iter().any(|n| n == name);
        let mut out = Vec::new();
        for service in model.services.values() {
            for (name, port, subset) in clusters(service) {
                if !wanted(&name) {
                    continue;
                }
                match type_url {
                    CLUSTER => out.push((name.clone(), any(CLUSTER, &eds_cluster(&name)))),
                    ENDPOINT => out.push((
                        name.clone(),
                        any(ENDPOINT, &load_assignment(&name, service, port, subset)),
                    )),
                    _ => {}
                }
            }
        }
        out
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}
