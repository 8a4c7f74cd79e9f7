//! Kubernetes core objects in the protobuf form of the raw `k8s/core/v1/*`
//! MCP collections: Services and Nodes as their specs, Endpoints and Pods
//! whole, Namespaces as their specs, as Istio 1.1's Galley sends them. Only
//! the fields `mesh-api`'s Kubernetes messages define are carried.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::core::v1 as k,
    apimachinery::pkg::{apis::meta::v1 as k_meta, util::intstr::IntOrString},
};
use kube::ResourceExt;
use mesh_api::{
    kinds::{self, Body},
    object::versioned_resource,
    pb::{
        istio::mcp::v1alpha1::Resource,
        k8s::io::{
            api::core::v1 as pb,
            apimachinery::pkg::{apis::meta::v1 as meta, util::intstr},
        },
    },
};

fn time(t: &k_meta::Time) -> meta::Time {
    meta::Time {
        seconds: t.0.as_second(),
        nanos: t.0.subsec_nanosecond(),
    }
}

fn object_meta(m: &k_meta::ObjectMeta) -> meta::ObjectMeta {
    meta::ObjectMeta {
        name: m.name.clone().unwrap_or_default(),
        generate_name: m.generate_name.clone().unwrap_or_default(),
        namespace: m.namespace.clone().unwrap_or_default(),
        uid: m.uid.clone().unwrap_or_default(),
        resource_version: m.resource_version.clone().unwrap_or_default(),
        generation: m.generation.unwrap_or_default(),
        creation_timestamp: m.creation_timestamp.as_ref().map(time),
        deletion_timestamp: m.deletion_timestamp.as_ref().map(time),
        labels: m.labels.clone().unwrap_or_default(),
        annotations: m.annotations.clone().unwrap_or_default(),
        finalizers: m.finalizers.clone().unwrap_or_default(),
    }
}

pub fn service_spec(s: &k::Service) -> pb::ServiceSpec {
    let spec = s.spec.clone().unwrap_or_default();
    pb::ServiceSpec {
        ports: spec
            .ports
            .unwrap_or_default()
            .into_iter()
            .map(|p| pb::ServicePort {
                name: p.name.unwrap_or_default(),
                protocol: p.protocol.unwrap_or_default(),
                port: p.port,
                target_port: p.target_port.map(|t| match t {
                    IntOrString::Int(i) => intstr::IntOrString {
                        r#type: 0,
                        int_val: i,
                        str_val: String::new(),
                    },
                    IntOrString::String(s) => intstr::IntOrString {
                        r#type: 1,
                        int_val: 0,
                        str_val: s,
                    },
                }),
                node_port: p.node_port.unwrap_or_default(),
                app_protocol: p.app_protocol.unwrap_or_default(),
            })
            .collect(),
        selector: spec.selector.unwrap_or_default(),
        cluster_ip: spec.cluster_ip.unwrap_or_default(),
        r#type: spec.type_.unwrap_or_default(),
        external_i_ps: spec.external_ips.unwrap_or_default(),
        external_name: spec.external_name.unwrap_or_default(),
        cluster_i_ps: spec.cluster_ips.unwrap_or_default(),
    }
}

pub fn endpoints(e: &k::Endpoints) -> pb::Endpoints {
    let address = |a: k::EndpointAddress| pb::EndpointAddress {
        ip: a.ip,
        target_ref: a.target_ref.map(|r| pb::ObjectReference {
            kind: r.kind.unwrap_or_default(),
            namespace: r.namespace.unwrap_or_default(),
            name: r.name.unwrap_or_default(),
            uid: r.uid.unwrap_or_default(),
            api_version: r.api_version.unwrap_or_default(),
            resource_version: r.resource_version.unwrap_or_default(),
        }),
        hostname: a.hostname.unwrap_or_default(),
        node_name: a.node_name.unwrap_or_default(),
    };
    pb::Endpoints {
        metadata: Some(object_meta(&e.metadata)),
        subsets: e
            .subsets
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|s| pb::EndpointSubset {
                addresses: s
                    .addresses
                    .unwrap_or_default()
                    .into_iter()
                    .map(address)
                    .collect(),
                not_ready_addresses: s
                    .not_ready_addresses
                    .unwrap_or_default()
                    .into_iter()
                    .map(address)
                    .collect(),
                ports: s
                    .ports
                    .unwrap_or_default()
                    .into_iter()
                    .map(|p| pb::EndpointPort {
                        name: p.name.unwrap_or_default(),
                        port: p.port,
                        protocol: p.protocol.unwrap_or_default(),
                        app_protocol: p.app_protocol.unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

pub fn pod(p: &k::Pod) -> pb::Pod {
    let spec = p.spec.clone().unwrap_or_default();
    let status = p.status.clone().unwrap_or_default();
    pb::Pod {
        metadata: Some(object_meta(&p.metadata)),
        spec: Some(pb::PodSpec {
            containers: spec
                .containers
                .into_iter()
                .map(|c| pb::Container {
                    name: c.name,
                    image: c.image.unwrap_or_default(),
                    ports: c
                        .ports
                        .unwrap_or_default()
                        .into_iter()
                        .map(|p| pb::ContainerPort {
                            name: p.name.unwrap_or_default(),
                            host_port: p.host_port.unwrap_or_default(),
                            container_port: p.container_port,
                            protocol: p.protocol.unwrap_or_default(),
                        })
                        .collect(),
                })
                .collect(),
            service_account_name: spec.service_account_name.unwrap_or_default(),
            node_name: spec.node_name.unwrap_or_default(),
            host_network: spec.host_network.unwrap_or_default(),
        }),
        status: Some(pb::PodStatus {
            phase: status.phase.unwrap_or_default(),
            host_ip: status.host_ip.unwrap_or_default(),
            pod_ip: status.pod_ip.unwrap_or_default(),
            pod_i_ps: status
                .pod_ips
                .unwrap_or_default()
                .into_iter()
                .map(|ip| pb::PodIp { ip: ip.ip })
                .collect(),
        }),
    }
}

fn node_spec(n: &k::Node) -> pb::NodeSpec {
    let spec = n.spec.clone().unwrap_or_default();
    pb::NodeSpec {
        pod_cidr: spec.pod_cidr.unwrap_or_default(),
        unschedulable: spec.unschedulable.unwrap_or_default(),
        pod_cid_rs: spec.pod_cidrs.unwrap_or_default(),
    }
}

fn namespace_spec(n: &k::Namespace) -> pb::NamespaceSpec {
    pb::NamespaceSpec {
        finalizers: n
            .spec
            .clone()
            .and_then(|s| s.finalizers)
            .unwrap_or_default(),
    }
}

/// A Kubernetes object as an MCP resource named `namespace/name` (or
/// `name`), its labels and annotations in the MCP metadata.
pub fn resource<K: kube::Resource>(object: &K, body: Body) -> Resource {
    let labels: BTreeMap<String, String> = object.labels().clone();
    let annotations: BTreeMap<String, String> = object.annotations().clone();
    let name = kinds::resource_name(object.meta().namespace.as_deref(), &object.name_any());
    versioned_resource(name, &body, &labels, &annotations)
}

pub fn service_resource(s: &k::Service) -> Resource {
    resource(s, Body::K8sServiceSpec(Box::new(service_spec(s))))
}

pub fn endpoints_resource(e: &k::Endpoints) -> Resource {
    resource(e, Body::K8sEndpoints(Box::new(endpoints(e))))
}

pub fn node_resource(n: &k::Node) -> Resource {
    resource(n, Body::K8sNodeSpec(Box::new(node_spec(n))))
}

pub fn namespace_resource(n: &k::Namespace) -> Resource {
    resource(n, Body::K8sNamespaceSpec(Box::new(namespace_spec(n))))
}
