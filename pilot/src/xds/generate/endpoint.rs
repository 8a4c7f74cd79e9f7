//! Endpoints: the load assignment of every EDS cluster, its subset's label
//! selector applied, grouped by locality (`region/zone/subzone`).

use std::{collections::BTreeMap, sync::Arc};

use envoy_types::pb::{
    envoy::config::{
        core::v3::{Address, Locality, SocketAddress, address, socket_address},
        endpoint::v3::{
            ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints, lb_endpoint,
        },
    },
    google::protobuf::UInt32Value,
};

use super::Scope;
use crate::model::{self, Port, Resolution, Service};
use crate::xds::Resource;

/// Load assignments of every EDS cluster the proxy sees, each encoded as
/// it is built.
pub fn load_assignments(scope: &Scope) -> Vec<Arc<Resource>> {
    scope
        .services()
        .flat_map(|service| of_service(scope, service))
        .collect()
}

/// The load assignments of one service's clusters (none unless its
/// endpoints are listed).
pub fn of_service(scope: &Scope, service: &Service) -> Vec<Arc<Resource>> {
    if service.resolution != Resolution::Static {
        return Vec::new();
    }
    let mut out = Vec::new();
    for port in &service.ports {
        for subset in scope.subsets(service) {
            let cla = load_assignment(scope, service, port, &subset);
            out.push(Resource::new(cla.cluster_name.clone(), &cla));
        }
    }
    out
}

fn load_assignment(
    scope: &Scope,
    service: &Service,
    port: &Port,
    subset: &str,
) -> ClusterLoadAssignment {
    let name = model::cluster_name(port.number, subset, &service.host);
    let selector = scope.subset_labels(service, subset);
    let mut by_locality: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    let endpoints = scope.model.endpoints.get(&service.host);
    for e in endpoints.into_iter().flat_map(|e| e.iter()) {
        if selector.is_some_and(|labels| !e.has_labels(labels)) {
            continue;
        }
        by_locality
            .entry(e.locality.as_str())
            .or_default()
            .push(lb_endpoint(&e.address, e.port(port), e.weight));
    }
    ClusterLoadAssignment {
        cluster_name: name,
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
                    // A locality's weight is its endpoints'; gRPC's xDS
                    // client ignores localities without one.
                    load_balancing_weight: Some(UInt32Value {
                        value: lb_endpoints
                            .iter()
                            .map(|e| e.load_balancing_weight.map_or(1, |w| w.value))
                            .sum(),
                    }),
                    lb_endpoints,
                    ..Default::default()
                }
            })
            .collect(),
        ..Default::default()
    }
}

fn lb_endpoint(address: &str, port: u32, weight: u32) -> LbEndpoint {
    LbEndpoint {
        host_identifier: Some(lb_endpoint::HostIdentifier::Endpoint(Endpoint {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: address.to_string(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        })),
        load_balancing_weight: (weight > 0).then_some(UInt32Value { value: weight }),
        ..Default::default()
    }
}

/// A load assignment listed inline in a cluster (static and DNS clusters).
pub fn fixed(cluster: &str, targets: &[(String, u32)]) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cluster.to_string(),
        endpoints: vec![LocalityLbEndpoints {
            lb_endpoints: targets.iter().map(|(a, p)| lb_endpoint(a, *p, 0)).collect(),
            ..Default::default()
        }],
        ..Default::default()
    }
}
