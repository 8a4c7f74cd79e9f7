//! Gateways: a router proxy listens on the servers of every Gateway whose
//! selector matches its labels, one listener per port. HTTP servers route
//! by RDS (`http.<port>`); HTTPS servers terminate TLS (certificates from
//! files or, with `credentialName`, by SDS) in a filter chain per server,
//! chosen by SNI, and route by `https.<port>.<name>`; TLS passthrough and
//! TCP servers forward by the VirtualServices' `tls` and `tcp` routes.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::envoy::config::{
    listener::v3::{Filter, FilterChain, FilterChainMatch, Listener},
    route::v3::{RouteConfiguration, VirtualHost, virtual_host::TlsRequirementType},
};
use mesh_api::pb::istio::networking::v1alpha3::{
    Server, server::TlsOptions, server::tls_options::TlSmode,
};

use super::{
    Scope,
    listener::{self, Filters, Routes, TcpDestination},
    route::{self, RouteContext},
    tls,
};
use crate::model::{Named, Protocol, host};

/// A server of a Gateway that applies to this proxy.
struct Bound<'a> {
    /// `namespace/name` of its Gateway.
    gateway: &'a str,
    server: &'a Server,
    protocol: Protocol,
}

impl Bound<'_> {
    fn port(&self) -> u32 {
        self.server.port.as_ref().map_or(0, |p| p.number)
    }

    fn terminates_tls(&self) -> Option<&TlsOptions> {
        self.server.tls.as_ref().filter(|t| {
            matches!(
                TlSmode::try_from(t.mode),
                Ok(TlSmode::Simple | TlSmode::Mutual)
            )
        })
    }

    fn auto_passthrough(&self) -> bool {
        self.server
            .tls
            .as_ref()
            .is_some_and(|t| t.mode == TlSmode::AutoPassthrough as i32)
    }

    fn route_name(&self) -> String {
        match self.terminates_tls() {
            Some(_) => {
                let name = self.server.port.as_ref().map_or("", |p| p.name.as_str());
                format!("https.{}.{name}", self.port())
            }
            None => format!("http.{}", self.port()),
        }
    }

    fn is_http(&self) -> bool {
        self.protocol.is_http()
            || (self.protocol == Protocol::Https && self.terminates_tls().is_some())
    }
}

/// The servers that apply to the proxy, by port.
fn servers<'a>(scope: &Scope<'a>) -> BTreeMap<u32, Vec<Bound<'a>>> {
    let mut out: BTreeMap<u32, Vec<Bound>> = BTreeMap::new();
    for (name, gw) in scope.model.config.gateways.entries() {
        if gw.spec.selector.is_empty() || !scope.proxy.matches(&gw.spec.selector) {
            continue;
        }
        for server in &gw.spec.servers {
            let Some(port) = &server.port else { continue };
            out.entry(port.number).or_default().push(Bound {
                gateway: name,
                server,
                protocol: Protocol::parse(&port.protocol),
            });
        }
    }
    out
}

pub fn listeners(scope: &Scope) -> Vec<Listener> {
    let mut out = Vec::new();
    for (port, bound) in servers(scope) {
        let bind = bound
            .iter()
            .find(|b| !b.server.bind.is_empty())
            .map_or("0.0.0.0", |b| b.server.bind.as_str());
        let name = format!("{bind}_{port}");
        let mut l = Listener {
            name: name.clone(),
            address: listener::socket_address(bind, port),
            ..Default::default()
        };
        let mut plain_http_done = false;
        for b in &bound {
            if let Some(options) = b.terminates_tls().filter(|_| b.is_http()) {
                let routes = Routes::Rds(b.route_name());
                l.filter_chains.push(FilterChain {
                    filter_chain_match: Some(sni_match(&b.server.hosts)),
                    filters: vec![listener::network_filter(
                        listener::HCM,
                        listener::http_connection_manager(&name, routes, Filters::Outbound),
                    )],
                    transport_socket: Some(tls::downstream(
                        server_tls(options),
                        options.mode == TlSmode::Mutual as i32,
                    )),
                    ..Default::default()
                });
            } else if b.is_http() {
                if !plain_http_done {
                    plain_http_done = true;
                    l.filter_chains.push(FilterChain {
                        filters: vec![listener::network_filter(
                            listener::HCM,
                            listener::http_connection_manager(
                                &name,
                                Routes::Rds(b.route_name()),
                                Filters::Outbound,
                            ),
                        )],
                        ..Default::default()
                    });
                }
            } else if b.auto_passthrough() {
                l.filter_chains.push(sni_cluster_chain(b, &name));
            } else {
                l.filter_chains.extend(forwarding_chains(scope, b, &name));
            }
        }
        listener::add_tls_inspector(&mut l);
        out.push(l);
    }
    out
}

fn sni_match(hosts: &[String]) -> FilterChainMatch {
    FilterChainMatch {
        server_names: hosts
            .iter()
            .filter(|h| *h != "*")
            .map(|h| host_only(h).to_string())
            .collect(),
        ..Default::default()
    }
}

/// A server host without its `namespace/` prefix (a later Istio form).
fn host_only(h: &str) -> &str {
    h.rsplit_once('/').map_or(h, |(_, h)| h)
}

fn server_tls(
    options: &TlsOptions,
) -> envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::CommonTlsContext {
    let alpn = ["h2", "http/1.1"];
    if !options.credential_name.is_empty() {
        return tls::sds_certificate_context(
            &options.credential_name,
            options.mode == TlSmode::Mutual as i32,
            &options.subject_alt_names,
            &alpn,
        );
    }
    tls::file_context(
        Some((&options.server_certificate, &options.private_key)),
        &options.ca_certificates,
        &options.subject_alt_names,
        &alpn,
    )
}

/// The network filter that routes by the TLS server name.
const SNI_CLUSTER: &str = "envoy.filters.network.sni_cluster";

/// An AUTO_PASSTHROUGH server: connections for its hosts go, undecrypted,
/// to the cluster their SNI names (`outbound_.<port>_.<subset>_.<host>`,
/// which [`cluster::sni_dnat`](super::cluster::sni_dnat) provides).
fn sni_cluster_chain(b: &Bound, stat_prefix: &str) -> FilterChain {
    use envoy_types::pb::envoy::extensions::filters::network::sni_cluster::v3::SniCluster;
    FilterChain {
        filter_chain_match: Some(sni_match(&b.server.hosts)),
        filters: vec![
            listener::network_filter(SNI_CLUSTER, super::any(&SniCluster::default())),
            tcp(stat_prefix, super::cluster::BLACK_HOLE.into()),
        ],
        ..Default::default()
    }
}

/// Whether any of the proxy's servers is AUTO_PASSTHROUGH.
pub fn auto_passthrough(scope: &Scope) -> bool {
    servers(scope)
        .values()
        .flatten()
        .any(|b| b.auto_passthrough())
}

/// TCP and TLS-passthrough servers: per VirtualService route bound to the
/// gateway, a chain forwarding to its destination (TLS routes by SNI).
fn forwarding_chains(scope: &Scope, b: &Bound, stat_prefix: &str) -> Vec<FilterChain> {
    let port = b.port();
    let gateways = [b.gateway.to_string()];
    let ctx = RouteContext {
        scope,
        port,
        gateways: &gateways,
    };
    let mut chains = Vec::new();
    for vs in scope.virtual_services(b.gateway) {
        if !serves(b, vs) {
            continue;
        }
        for tls_route in &vs.spec.tls {
            for m in tls_route
                .r#match
                .iter()
                .filter(|m| m.port == 0 || m.port == port)
            {
                if let Some(d) = tls_route.route.first().and_then(|r| r.destination.as_ref()) {
                    chains.push(FilterChain {
                        filter_chain_match: Some(sni_match(&m.sni_hosts)),
                        filters: vec![tcp(stat_prefix, route::destination_cluster(&ctx, d))],
                        ..Default::default()
                    });
                }
            }
        }
        let tcp_route = vs.spec.tcp.iter().find(|t| {
            t.r#match.is_empty() || t.r#match.iter().any(|m| m.port == 0 || m.port == port)
        });
        if let Some(d) = tcp_route
            .and_then(|t| t.route.first())
            .and_then(|r| r.destination.as_ref())
        {
            chains.push(FilterChain {
                filters: vec![tcp(stat_prefix, route::destination_cluster(&ctx, d))],
                ..Default::default()
            });
        }
    }
    chains
}

fn tcp(stat_prefix: &str, cluster: String) -> Filter {
    listener::tcp_proxy_filter(stat_prefix, TcpDestination::Cluster(cluster))
}

/// Whether a VirtualService has a host the server serves.
fn serves(
    b: &Bound,
    vs: &Named<mesh_api::pb::istio::networking::v1alpha3::VirtualService>,
) -> bool {
    vs.spec.hosts.iter().any(|h| {
        b.server
            .hosts
            .iter()
            .any(|s| host::intersects(host_only(s), h))
    })
}

/// The route configurations of the proxy's HTTP servers: per VirtualService
/// bound to the server's Gateway, a virtual host for the hosts both name.
pub fn route_configs(scope: &Scope) -> Vec<RouteConfiguration> {
    let mut by_name: BTreeMap<String, RouteConfiguration> = BTreeMap::new();
    for (port, bound) in servers(scope) {
        for b in bound.iter().filter(|b| b.is_http()) {
            let config = by_name
                .entry(b.route_name())
                .or_insert_with(|| RouteConfiguration {
                    name: b.route_name(),
                    ..Default::default()
                });
            let gateways = [b.gateway.to_string()];
            let ctx = RouteContext {
                scope,
                port,
                gateways: &gateways,
            };
            let redirect = b.server.tls.as_ref().is_some_and(|t| t.https_redirect);
            let mut taken: BTreeSet<String> = config
                .virtual_hosts
                .iter()
                .flat_map(|v| v.domains.clone())
                .collect();
            for vs in scope.virtual_services(b.gateway) {
                let hosts: Vec<&String> = vs
                    .spec
                    .hosts
                    .iter()
                    .filter(|h| {
                        b.server
                            .hosts
                            .iter()
                            .any(|s| host::intersects(host_only(s), h))
                    })
                    .collect();
                if hosts.is_empty() {
                    continue;
                }
                let routes = route::http_routes(&ctx, vs);
                if routes.is_empty() {
                    continue;
                }
                let domains: Vec<String> = hosts
                    .iter()
                    .flat_map(|h| [h.to_string(), format!("{h}:{port}")])
                    .filter(|d| taken.insert(d.clone()))
                    .collect();
                if domains.is_empty() {
                    continue;
                }
                config.virtual_hosts.push(VirtualHost {
                    name: format!("{}:{port}", hosts[0]),
                    domains,
                    routes,
                    require_tls: if redirect {
                        TlsRequirementType::All as i32
                    } else {
                        0
                    },
                    ..Default::default()
                });
            }
        }
    }
    by_name.into_values().collect()
}
