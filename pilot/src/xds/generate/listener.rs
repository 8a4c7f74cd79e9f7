//! Listeners of a sidecar.
//!
//! With iptables interception (`REDIRECT`), Istio's layout: `virtualOutbound`
//! on 15001 hands each connection to the listener of its original
//! destination: `0.0.0.0_<port>` for an HTTP service port (routes by RDS,
//! named for the port) or `<vip>_<port>`/`0.0.0.0_<port>` for a TCP one
//! (`tcp_proxy`); what matches nothing goes to the passthrough or black-hole
//! cluster, as the mesh's outbound traffic policy says. `virtualInbound` on
//! 15006 has a filter chain per workload port, with the port's mTLS mode
//! and RBAC. Without interception (`NONE`), every listener binds its own
//! address instead: Sidecar egress listeners (an HTTP one on a port no
//! service has is an HTTP proxy for all of them) and one per inbound port.

use std::collections::BTreeMap;

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{Address, SocketAddress, TrafficDirection, address, socket_address},
            listener::v3::{
                Filter, FilterChain, FilterChainMatch, Listener, ListenerFilter, filter,
                listener_filter,
            },
            route::v3::{
                Route, RouteAction, RouteConfiguration, RouteMatch, VirtualHost,
                route as envoy_route, route_action, route_match,
            },
        },
        extensions::filters::{
            http::{
                cors::v3::Cors, fault::v3::HttpFault, jwt_authn::v3::JwtAuthentication,
                rbac::v3::Rbac as RbacFilter, router::v3::Router,
            },
            listener::{original_dst::v3::OriginalDst, tls_inspector::v3::TlsInspector},
            network::{
                http_connection_manager::v3::{
                    HttpConnectionManager, HttpFilter, Rds, http_connection_manager, http_filter,
                },
                tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
        },
    },
    google::protobuf::{Any, BoolValue, Duration, UInt32Value},
};
use mesh_api::pb::istio::{
    mesh::v1alpha1::mesh_config::outbound_traffic_policy, networking::v1alpha3::RouteDestination,
};

use super::{Inbound, Scope, any, cluster, route, security, tls};
use crate::{
    model::{self, Service, host},
    proxy::Interception,
};

pub const VIRTUAL_OUTBOUND: &str = "virtualOutbound";
pub const VIRTUAL_INBOUND: &str = "virtualInbound";

pub(super) const HCM: &str = "envoy.filters.network.http_connection_manager";
const TCP_PROXY: &str = "envoy.filters.network.tcp_proxy";

/// The listeners every sidecar of a scope shares: outbound ones and, with
/// interception, `virtualOutbound`.
pub fn shared(scope: &Scope) -> Vec<Listener> {
    let redirect = scope.proxy.interception == Interception::Redirect;
    let mut out = outbound(scope, redirect);
    if redirect {
        out.push(virtual_outbound(scope));
    }
    out
}

/// The listeners of the sidecar's own inbound ports: `virtualInbound` with
/// interception, else one bound listener per port.
pub fn inbound(scope: &Scope) -> Vec<Listener> {
    if scope.proxy.interception == Interception::Redirect {
        return vec![virtual_inbound(scope)];
    }
    scope
        .inbound()
        .iter()
        .map(|inbound| {
            let bind = inbound
                .bind
                .clone()
                .unwrap_or_else(|| scope.proxy.ip.to_string());
            let mut l = listener(
                &format!("{bind}_{}", inbound.port),
                &bind,
                inbound.port,
                true,
            );
            l.filter_chains = inbound_chains(scope, inbound, false);
            l.traffic_direction = TrafficDirection::Inbound as i32;
            add_tls_inspector(&mut l);
            l
        })
        .collect()
}

pub(super) fn socket_address(ip: &str, port: u32) -> Option<Address> {
    Some(Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(socket_address::PortSpecifier::PortValue(port)),
            ..Default::default()
        })),
    })
}

fn listener(name: &str, ip: &str, port: u32, bind: bool) -> Listener {
    Listener {
        name: name.to_string(),
        address: socket_address(ip, port),
        bind_to_port: (!bind).then_some(BoolValue { value: false }),
        ..Default::default()
    }
}

pub(super) fn network_filter(name: &str, config: Any) -> Filter {
    Filter {
        name: name.to_string(),
        config_type: Some(filter::ConfigType::TypedConfig(config)),
    }
}

fn http_filter(name: &str, config: Any, optional: bool) -> HttpFilter {
    HttpFilter {
        name: name.to_string(),
        config_type: Some(http_filter::ConfigType::TypedConfig(config)),
        is_optional: optional,
        ..Default::default()
    }
}

/// Where a connection manager's routes come from.
pub enum Routes {
    Rds(String),
    Inline(Box<RouteConfiguration>),
}

/// Which HTTP filters a connection manager runs before the router.
pub enum Filters {
    /// Fault injection and CORS, for outbound routes.
    Outbound,
    /// The workload's end-user authentication and RBAC policy, if any.
    Inbound {
        jwt: Option<Box<JwtAuthentication>>,
        rbac: Option<Box<RbacFilter>>,
    },
    /// Fault injection, optional, for proxyless gRPC clients.
    Proxyless,
}

pub fn http_connection_manager(stat_prefix: &str, routes: Routes, filters: Filters) -> Any {
    let mut http_filters = match filters {
        Filters::Outbound => vec![
            http_filter(route::FAULT_FILTER, any(&HttpFault::default()), false),
            http_filter(route::CORS_FILTER, any(&Cors::default()), false),
        ],
        Filters::Inbound { jwt, rbac } => jwt
            .map(|j| http_filter(security::JWT_FILTER, any(&*j), false))
            .into_iter()
            .chain(rbac.map(|r| http_filter(security::RBAC_HTTP_FILTER, any(&*r), false)))
            .collect(),
        Filters::Proxyless => vec![http_filter(
            route::FAULT_FILTER,
            any(&HttpFault::default()),
            true,
        )],
    };
    http_filters.push(http_filter(
        "envoy.filters.http.router",
        any(&Router::default()),
        false,
    ));
    any(&HttpConnectionManager {
        stat_prefix: stat_prefix.to_string(),
        route_specifier: Some(match routes {
            Routes::Rds(name) => http_connection_manager::RouteSpecifier::Rds(Rds {
                route_config_name: name,
                config_source: Some(super::ads_source()),
            }),
            Routes::Inline(config) => http_connection_manager::RouteSpecifier::RouteConfig(*config),
        }),
        http_filters,
        ..Default::default()
    })
}

pub(super) fn tcp_proxy_filter(stat_prefix: &str, destination: TcpDestination) -> Filter {
    let cluster_specifier = match destination {
        TcpDestination::Cluster(name) => tcp_proxy::ClusterSpecifier::Cluster(name),
        TcpDestination::Weighted(clusters) => {
            tcp_proxy::ClusterSpecifier::WeightedClusters(tcp_proxy::WeightedCluster {
                clusters: clusters
                    .into_iter()
                    .map(
                        |(name, weight)| tcp_proxy::weighted_cluster::ClusterWeight {
                            name,
                            weight,
                            ..Default::default()
                        },
                    )
                    .collect(),
            })
        }
    };
    network_filter(
        TCP_PROXY,
        any(&TcpProxy {
            stat_prefix: stat_prefix.to_string(),
            cluster_specifier: Some(cluster_specifier),
            ..Default::default()
        }),
    )
}

/// Where a TCP listener sends its connections.
pub enum TcpDestination {
    Cluster(String),
    Weighted(Vec<(String, u32)>),
}

/// Outbound listeners, one per address and port; an HTTP port wins over a
/// TCP service without a virtual IP on the same port (as in Istio), since
/// the HTTP listener's routes reach every HTTP service on that port.
fn outbound(scope: &Scope, redirect: bool) -> Vec<Listener> {
    let wildcard = if redirect { "0.0.0.0" } else { "127.0.0.1" };
    // Listeners by name, with whether they route HTTP.
    let mut by_name: BTreeMap<String, (Listener, bool)> = BTreeMap::new();
    for egress in scope.egress() {
        let bind = egress.bind.unwrap_or(wildcard);
        if let Some((port, protocol)) = egress.port {
            let name = format!("{bind}_{port}");
            let mut l = listener(&name, bind, port, !redirect || egress.bind.is_some());
            let chain = if protocol.is_http() {
                http_chain(&name, Routes::Rds(port.to_string()), Filters::Outbound)
            } else {
                let services: Vec<&Service> = scope
                    .egress_services(port)
                    .filter(|s| s.port(port).is_some())
                    .collect();
                l.filter_chains
                    .extend(tls_route_chains(scope, &services, port, &name));
                let destination = match services.first() {
                    Some(s) => tcp_destination(scope, s, port),
                    None => TcpDestination::Cluster(cluster::BLACK_HOLE.into()),
                };
                tcp_chain(&name, destination)
            };
            l.filter_chains.push(chain);
            add_tls_inspector(&mut l);
            l.traffic_direction = TrafficDirection::Outbound as i32;
            by_name.insert(name, (l, protocol.is_http()));
            continue;
        }
        for service in scope.egress_services(0) {
            for port in &service.ports {
                let http = port.protocol.is_http();
                let address = match service.addresses.first() {
                    Some(vip) if !http && !vip.contains('/') => vip.as_str(),
                    _ => bind,
                };
                let name = format!("{address}_{}", port.number);
                if by_name
                    .get(&name)
                    .is_some_and(|(_, taken_by_http)| *taken_by_http || !http)
                {
                    continue;
                }
                let mut l = listener(&name, address, port.number, !redirect);
                l.traffic_direction = TrafficDirection::Outbound as i32;
                if http {
                    l.filter_chains.push(http_chain(
                        &name,
                        Routes::Rds(port.number.to_string()),
                        Filters::Outbound,
                    ));
                } else {
                    // Every service without a virtual IP on this port shares
                    // the listener: the TLS routes of each, by SNI.
                    let sharing: Vec<&Service> = if address == bind {
                        scope
                            .egress_services(0)
                            .filter(|s| s.port(port.number).is_some())
                            .filter(|s| s.addresses.first().is_none_or(|v| v.contains('/')))
                            .collect()
                    } else {
                        vec![service]
                    };
                    l.filter_chains
                        .extend(tls_route_chains(scope, &sharing, port.number, &name));
                    let destination = tcp_destination(scope, service, port.number);
                    l.filter_chains.push(tcp_chain(&name, destination));
                    add_tls_inspector(&mut l);
                }
                by_name.insert(name, (l, http));
            }
        }
    }
    by_name.into_values().map(|(l, _)| l).collect()
}

fn tcp_chain(stat_prefix: &str, destination: TcpDestination) -> FilterChain {
    FilterChain {
        filters: vec![tcp_proxy_filter(stat_prefix, destination)],
        ..Default::default()
    }
}

fn http_chain(stat_prefix: &str, routes: Routes, filters: Filters) -> FilterChain {
    FilterChain {
        filters: vec![network_filter(
            HCM,
            http_connection_manager(stat_prefix, routes, filters),
        )],
        ..Default::default()
    }
}

/// Whether a route's match for `port` applies to this proxy: on the port,
/// and for the mesh (its sidecars, by their labels).
fn applies(
    scope: &Scope,
    port: u32,
    match_port: u32,
    gateways: &[String],
    labels: &BTreeMap<String, String>,
) -> bool {
    (match_port == 0 || match_port == port)
        && if gateways.is_empty() {
            scope.proxy.matches(labels)
        } else {
            gateways.iter().any(|g| g == "mesh")
        }
}

/// Where a route's connections go: its destinations by weight.
fn route_destination(ctx: &route::RouteContext, routes: &[RouteDestination]) -> TcpDestination {
    let mut weighted: Vec<(String, u32)> = routes
        .iter()
        .filter_map(|r| {
            let d = r.destination.as_ref()?;
            let weight = if r.weight == 0 && routes.len() == 1 {
                100
            } else {
                r.weight.max(0) as u32
            };
            (weight > 0).then(|| (route::destination_cluster(ctx, d), weight))
        })
        .collect();
    match weighted.len() {
        0 => TcpDestination::Cluster(cluster::BLACK_HOLE.into()),
        1 => TcpDestination::Cluster(weighted.remove(0).0),
        _ => TcpDestination::Weighted(weighted),
    }
}

/// Where a TCP service port's connections go: the first TCP route of a
/// VirtualService for its host that applies here, else the service itself.
pub fn tcp_destination(scope: &Scope, service: &Service, port: u32) -> TcpDestination {
    let ctx = route::RouteContext {
        scope,
        port,
        gateways: &["mesh".to_string()],
    };
    for vs in scope.virtual_services("mesh") {
        if !vs.spec.hosts.iter().any(|h| host::covers(h, &service.host)) {
            continue;
        }
        let chosen = vs.spec.tcp.iter().find(|tcp| {
            tcp.r#match.is_empty()
                || tcp
                    .r#match
                    .iter()
                    .any(|m| applies(scope, port, m.port, &m.gateways, &m.source_labels))
        });
        if let Some(tcp) = chosen {
            return route_destination(&ctx, &tcp.route);
        }
    }
    TcpDestination::Cluster(model::cluster_name(port, "", &service.host))
}

/// A chain per TLS route (by SNI) of the VirtualServices for `services`
/// that applies on `port`: the connection passed through, undecrypted, to
/// the route's destination.
fn tls_route_chains(
    scope: &Scope,
    services: &[&Service],
    port: u32,
    stat_prefix: &str,
) -> Vec<FilterChain> {
    let ctx = route::RouteContext {
        scope,
        port,
        gateways: &["mesh".to_string()],
    };
    let mut chains = Vec::new();
    for vs in scope.virtual_services("mesh") {
        let for_these = vs
            .spec
            .hosts
            .iter()
            .any(|h| services.iter().any(|s| host::covers(h, &s.host)));
        if !for_these {
            continue;
        }
        for tls in &vs.spec.tls {
            for m in &tls.r#match {
                if !applies(scope, port, m.port, &m.gateways, &m.source_labels) {
                    continue;
                }
                chains.push(FilterChain {
                    filter_chain_match: Some(FilterChainMatch {
                        server_names: m.sni_hosts.clone(),
                        ..Default::default()
                    }),
                    filters: vec![tcp_proxy_filter(
                        stat_prefix,
                        route_destination(&ctx, &tls.route),
                    )],
                    ..Default::default()
                });
            }
        }
    }
    chains
}

fn virtual_outbound(scope: &Scope) -> Listener {
    let mode = scope
        .model
        .mesh
        .outbound_traffic_policy
        .as_ref()
        .map_or(outbound_traffic_policy::Mode::AllowAny as i32, |p| p.mode);
    let target = if mode == outbound_traffic_policy::Mode::RegistryOnly as i32 {
        cluster::BLACK_HOLE
    } else {
        cluster::PASSTHROUGH
    };
    let port = scope.model.mesh.proxy_listen_port.max(0) as u32;
    let port = if port == 0 { 15001 } else { port };
    let mut l = listener(VIRTUAL_OUTBOUND, "0.0.0.0", port, true);
    l.use_original_dst = Some(BoolValue { value: true });
    l.traffic_direction = TrafficDirection::Outbound as i32;
    l.filter_chains.push(FilterChain {
        filters: vec![tcp_proxy_filter(
            target,
            TcpDestination::Cluster(target.into()),
        )],
        ..Default::default()
    });
    l
}

/// Port of the inbound capture listener.
pub const INBOUND_CAPTURE_PORT: u32 = 15006;

fn virtual_inbound(scope: &Scope) -> Listener {
    let mut l = listener(VIRTUAL_INBOUND, "0.0.0.0", INBOUND_CAPTURE_PORT, true);
    l.traffic_direction = TrafficDirection::Inbound as i32;
    for inbound in scope.inbound() {
        l.filter_chains
            .extend(inbound_chains(scope, &inbound, true));
    }
    l.filter_chains.push(FilterChain {
        filters: vec![tcp_proxy_filter(
            "InboundPassthrough",
            TcpDestination::Cluster(cluster::PASSTHROUGH.into()),
        )],
        ..Default::default()
    });
    l.listener_filters.push(listener_filter(
        "envoy.filters.listener.original_dst",
        any(&OriginalDst::default()),
    ));
    add_tls_inspector(&mut l);
    l
}

fn listener_filter(name: &str, config: Any) -> ListenerFilter {
    ListenerFilter {
        name: name.to_string(),
        config_type: Some(listener_filter::ConfigType::TypedConfig(config)),
        ..Default::default()
    }
}

/// The TLS inspector, when a chain matches on what it reads.
pub(super) fn add_tls_inspector(l: &mut Listener) {
    let inspects = l.filter_chains.iter().any(|c| {
        c.filter_chain_match.as_ref().is_some_and(|m| {
            !m.transport_protocol.is_empty()
                || !m.application_protocols.is_empty()
                || !m.server_names.is_empty()
        })
    });
    if inspects {
        l.listener_filters.push(listener_filter(
            "envoy.filters.listener.tls_inspector",
            any(&TlsInspector::default()),
        ));
    }
}

/// The chains of one inbound port: mTLS as its authentication policy says
/// (STRICT: TLS only; PERMISSIVE: mesh TLS, told apart by its ALPN, or
/// plaintext), then the application's port through RBAC.
fn inbound_chains(scope: &Scope, inbound: &Inbound, match_port: bool) -> Vec<FilterChain> {
    let mtls = security::inbound_mtls(scope.model, inbound.service, &inbound.service_port);
    let filters = inbound_filters(scope, inbound);
    let base = FilterChainMatch {
        destination_port: match_port.then_some(UInt32Value {
            value: inbound.port,
        }),
        ..Default::default()
    };
    let alpn: &[&str] = if inbound.protocol.is_http() {
        &["h2", "http/1.1"]
    } else {
        &[]
    };
    let tls_chain = |require: bool, m: FilterChainMatch| FilterChain {
        filter_chain_match: Some(m),
        filters: filters.clone(),
        transport_socket: Some(tls::downstream(tls::mesh_context(alpn, &[]), require)),
        ..Default::default()
    };
    let plain = FilterChain {
        filter_chain_match: Some(base.clone()),
        filters: filters.clone(),
        ..Default::default()
    };
    match mtls {
        security::Mtls::Off => vec![plain],
        security::Mtls::Strict => vec![tls_chain(true, base)],
        security::Mtls::Permissive => vec![
            tls_chain(
                true,
                FilterChainMatch {
                    transport_protocol: "tls".into(),
                    application_protocols: vec![tls::MESH_ALPN.into()],
                    ..base
                },
            ),
            plain,
        ],
    }
}

fn inbound_filters(scope: &Scope, inbound: &Inbound) -> Vec<Filter> {
    let model = scope.model;
    if inbound.protocol.is_http() {
        let route_config = RouteConfiguration {
            name: inbound.cluster.clone(),
            virtual_hosts: vec![VirtualHost {
                name: format!("inbound|http|{}", inbound.port),
                domains: vec!["*".into()],
                routes: vec![Route {
                    name: "default".into(),
                    r#match: Some(RouteMatch {
                        path_specifier: Some(route_match::PathSpecifier::Prefix("/".into())),
                        ..Default::default()
                    }),
                    action: Some(envoy_route::Action::Route(RouteAction {
                        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(
                            inbound.cluster.clone(),
                        )),
                        timeout: Some(Duration::default()),
                        ..Default::default()
                    })),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let rbac = security::rbac_http(model, inbound.service).map(Box::new);
        let jwt = security::jwt_authn(model, inbound.service, &inbound.service_port).map(Box::new);
        vec![network_filter(
            HCM,
            http_connection_manager(
                &inbound.cluster,
                Routes::Inline(Box::new(route_config)),
                Filters::Inbound { jwt, rbac },
            ),
        )]
    } else {
        let mut filters: Vec<Filter> = security::rbac_tcp(model, inbound.service, &inbound.cluster)
            .map(|rbac| network_filter(security::RBAC_NETWORK_FILTER, any(&rbac)))
            .into_iter()
            .collect();
        filters.push(tcp_proxy_filter(
            &inbound.cluster,
            TcpDestination::Cluster(inbound.cluster.clone()),
        ));
        filters
    }
}

/// A listener per requested `host:port` target, for proxyless gRPC clients
/// (`xds:///host:port`): an API listener whose routes are the service's.
pub fn api_listeners(scope: &Scope, names: &std::collections::BTreeSet<String>) -> Vec<Listener> {
    names
        .iter()
        .filter_map(|name| {
            let (h, p) = name.rsplit_once(':')?;
            let port: u32 = p.parse().ok()?;
            let service = scope.services().find(|s| {
                s.port(port).is_some()
                    && host::domains(&s.host, port, &scope.proxy.namespace)
                        .iter()
                        .any(|d| d == h)
            })?;
            let config = route::proxyless(scope, service, port, name);
            Some(Listener {
                name: name.clone(),
                api_listener: Some(envoy_types::pb::envoy::config::listener::v3::ApiListener {
                    api_listener: Some(http_connection_manager(
                        name,
                        Routes::Inline(Box::new(config)),
                        Filters::Proxyless,
                    )),
                }),
                ..Default::default()
            })
        })
        .collect()
}
