//! Listeners as the proxy runs them: an address, and filter chains chosen
//! per connection by destination port, transport (TLS or not) and ALPN,
//! each ending in an HTTP connection manager or a TCP proxy.

use std::{net::SocketAddr, sync::Arc};

use envoy_types::pb::envoy::{
    config::{
        core::v3::{address, socket_address, transport_socket},
        listener::v3::{self as xds, filter, listener_filter},
    },
    extensions::{
        filters::network::{
            http_connection_manager::v3::{
                HttpConnectionManager, http_connection_manager::RouteSpecifier, http_filter,
            },
            tcp_proxy::v3::{TcpProxy, tcp_proxy},
        },
        transport_sockets::tls::v3::DownstreamTlsContext,
    },
};
use prost::{Message, Name};

use envoy_types::pb::envoy::extensions::filters::{
    http::{jwt_authn::v3::JwtAuthentication, rbac::v3::Rbac as HttpRbac},
    network::rbac::v3::Rbac as NetworkRbac,
};

use super::{
    Problem,
    jwt::{JWT_FILTER, JwtAuthn},
    rbac::RbacFilter,
    route::{CORS_FILTER, FAULT_FILTER, RouteTable},
    tls::Tls,
};

/// The network filter that routes a connection by its TLS server name.
const SNI_CLUSTER: &str = "envoy.filters.network.sni_cluster";

#[derive(Debug)]
pub struct Listener {
    pub name: String,
    pub address: SocketAddr,
    /// Bound by this proxy (else only reached through `virtualOutbound`).
    pub bind: bool,
    /// Hands connections to the listener of their original destination.
    pub use_original_dst: bool,
    pub chains: Vec<Chain>,
}

#[derive(Debug)]
pub struct Chain {
    /// The network RBAC filter, checked when a connection arrives.
    pub rbac: Option<Arc<RbacFilter>>,
    pub destination_port: Option<u16>,
    /// TLS server names (SNI) the chain is for: exact, or `*.suffix`;
    /// empty matches any connection.
    pub server_names: Vec<String>,
    /// `Some("tls")` or `Some("raw_buffer")`; `None` matches either.
    pub transport: Option<String>,
    pub alpn: Vec<String>,
    pub tls: Option<Tls>,
    pub app: App,
}

#[derive(Debug)]
pub enum App {
    Http(Arc<HttpApp>),
    Tcp(TcpApp),
}

#[derive(Debug)]
pub struct HttpApp {
    pub stat_prefix: String,
    pub direction: Direction,
    pub routes: Routes,
    /// The HTTP RBAC filter, checked per request.
    pub rbac: Option<RbacFilter>,
    /// End-user authentication (Envoy's JWT filter).
    pub jwt: Option<Arc<JwtAuthn>>,
    /// Whether the fault and CORS filters run (routes carry their settings).
    pub fault: bool,
    pub cors: bool,
}

/// Which way an app's traffic goes, read once when the listener compiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Direction {
    /// To this workload, for its service and port.
    Inbound(InboundService),
    /// From this workload (or through a gateway) to others.
    Outbound,
}

/// The service and port an inbound app serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundService {
    pub host: String,
    pub port: u16,
}

impl Direction {
    /// From the stat prefix Pilot gives an app: an inbound one is named
    /// for its cluster, `inbound|<port>|<port name>|<host>`.
    fn of(stat_prefix: &str) -> Self {
        let inbound = || {
            let mut parts = stat_prefix.split('|');
            if parts.next()? != "inbound" {
                return None;
            }
            let port = parts.next()?.parse().ok()?;
            let host = parts.nth(1)?.to_string();
            Some(InboundService { host, port })
        };
        inbound().map_or(Self::Outbound, Self::Inbound)
    }

    /// The service, when inbound.
    pub fn inbound(&self) -> Option<&InboundService> {
        match self {
            Self::Inbound(service) => Some(service),
            Self::Outbound => None,
        }
    }

    /// As metrics label it.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Inbound(_) => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

#[derive(Debug, Clone)]
pub enum Routes {
    /// By RDS, under this name.
    Rds(String),
    Inline(Arc<RouteTable>),
}

#[derive(Debug)]
pub struct TcpApp {
    pub stat_prefix: String,
    pub direction: Direction,
    /// The cluster is the one the connection's TLS server name names
    /// (Envoy's `sni_cluster`, for a gateway's AUTO_PASSTHROUGH).
    pub sni_cluster: bool,
    /// Clusters and weights.
    pub clusters: Vec<(String, u32)>,
}

/// How a connection looks to chain matching.
pub struct Arrival<'a> {
    pub destination_port: u16,
    pub tls: bool,
    /// The TLS server name asked for, lowercase.
    pub sni: Option<&'a str>,
    pub alpn: &'a [String],
}

impl Listener {
    pub fn compile(l: &xds::Listener) -> Result<Self, Problem> {
        let at = |p: String| Problem(format!("listener {:?}: {p}", l.name));
        let Some(address::Address::SocketAddress(sa)) =
            l.address.as_ref().and_then(|a| a.address.as_ref())
        else {
            return Err(at("no socket address".into()));
        };
        let port = match sa.port_specifier {
            Some(socket_address::PortSpecifier::PortValue(p)) => {
                u16::try_from(p).map_err(|_| at(format!("port {p} is out of range")))?
            }
            _ => return Err(at("no port number".into())),
        };
        let ip: std::net::IpAddr = sa
            .address
            .parse()
            .map_err(|_| at(format!("{:?} is not an IP address", sa.address)))?;
        for f in &l.listener_filters {
            let known = matches!(
                f.name.as_str(),
                "envoy.filters.listener.original_dst" | "envoy.filters.listener.tls_inspector"
            ) || matches!(&f.config_type, Some(listener_filter::ConfigType::TypedConfig(a))
                    if a.type_url.ends_with("OriginalDst") || a.type_url.ends_with("TlsInspector"));
            if !known {
                return Err(at(format!("listener filter {:?} is not supported", f.name)));
            }
        }
        let mut chains = Vec::new();
        for (i, c) in l.filter_chains.iter().enumerate() {
            chains.push(
                Chain::compile(c).map_err(|Problem(p)| at(format!("filter chain {i}: {p}")))?,
            );
        }
        if let Some(c) = &l.default_filter_chain {
            chains.push(
                Chain::compile(c).map_err(|Problem(p)| at(format!("default filter chain: {p}")))?,
            );
        }
        Ok(Listener {
            name: l.name.clone(),
            address: SocketAddr::new(ip, port),
            bind: l.bind_to_port.as_ref().is_none_or(|b| b.value),
            use_original_dst: l.use_original_dst.as_ref().is_some_and(|b| b.value),
            chains,
        })
    }

    /// The chain for a connection: the most specific match, as Envoy picks
    /// (destination port, then server name, an exact one before the
    /// longest wildcard, then transport, then ALPN).
    pub fn chain(&self, arrival: &Arrival) -> Option<&Chain> {
        self.chains
            .iter()
            .filter(|c| {
                c.destination_port
                    .is_none_or(|p| p == arrival.destination_port)
            })
            .filter_map(|c| Some((c, c.server_name_rank(arrival.sni)?)))
            .filter(|(c, _)| match c.transport.as_deref() {
                None => true,
                Some("tls") => arrival.tls,
                Some(_) => !arrival.tls,
            })
            .filter(|(c, _)| c.alpn.is_empty() || c.alpn.iter().any(|p| arrival.alpn.contains(p)))
            .max_by_key(|(c, server_name)| {
                (
                    c.destination_port.is_some(),
                    *server_name,
                    c.transport.is_some(),
                    !c.alpn.is_empty(),
                )
            })
            .map(|(c, _)| c)
    }

    /// Route configuration names this listener's chains take by RDS.
    pub fn rds_names(&self) -> impl Iterator<Item = &str> {
        self.chains.iter().filter_map(|c| match &c.app {
            App::Http(h) => match &h.routes {
                Routes::Rds(name) => Some(name.as_str()),
                Routes::Inline(_) => None,
            },
            App::Tcp(_) => None,
        })
    }

    /// Whether any chain needs to know if the connection is TLS.
    pub fn inspects_tls(&self) -> bool {
        self.chains
            .iter()
            .any(|c| c.transport.is_some() || !c.alpn.is_empty() || !c.server_names.is_empty())
    }
}

impl Chain {
    /// How well `sni` matches the chain's server names: `None` not at
    /// all; then no names (any connection), the longest `*.suffix`, an
    /// exact name.
    fn server_name_rank(&self, sni: Option<&str>) -> Option<(u8, usize)> {
        if self.server_names.is_empty() {
            return Some((0, 0));
        }
        let sni = sni?;
        self.server_names
            .iter()
            .filter_map(|name| match name.strip_prefix('*') {
                None => (name == sni).then_some((2, name.len())),
                Some(suffix) => {
                    (sni.len() > suffix.len() && sni.ends_with(suffix)).then_some((1, suffix.len()))
                }
            })
            .max()
    }

    fn compile(c: &xds::FilterChain) -> Result<Self, Problem> {
        let m = c.filter_chain_match.clone().unwrap_or_default();
        // A match the proxy cannot make would take connections meant for
        // another chain: refused, not ignored.
        let unsupported = [
            ("prefix_ranges", !m.prefix_ranges.is_empty()),
            ("address_suffix", !m.address_suffix.is_empty()),
            ("source_type", m.source_type != 0),
            ("source_prefix_ranges", !m.source_prefix_ranges.is_empty()),
            (
                "direct_source_prefix_ranges",
                !m.direct_source_prefix_ranges.is_empty(),
            ),
            ("source_ports", !m.source_ports.is_empty()),
        ];
        if let Some((field, _)) = unsupported.iter().find(|(_, set)| *set) {
            return Err(Problem(format!(
                "filter chain match on {field} is not supported"
            )));
        }
        let destination_port = m
            .destination_port
            .map(|p| u16::try_from(p.value))
            .transpose()
            .map_err(|_| Problem("destination port is out of range".into()))?;
        let tls = match &c.transport_socket {
            None => None,
            Some(socket) => {
                let Some(transport_socket::ConfigType::TypedConfig(any)) = &socket.config_type
                else {
                    return Err(Problem("transport socket without a typed config".into()));
                };
                if any.type_url != DownstreamTlsContext::type_url() {
                    return Err(Problem(format!(
                        "transport socket {:?} is not supported",
                        any.type_url
                    )));
                }
                let context = DownstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("downstream TLS context: {e}")))?;
                Some(Tls::downstream(&context)?)
            }
        };
        let mut app = None;
        let mut rbac = None;
        let mut sni_cluster = false;
        for f in &c.filters {
            let Some(filter::ConfigType::TypedConfig(any)) = &f.config_type else {
                return Err(Problem(format!("filter {:?} has no typed config", f.name)));
            };
            if app.is_some() {
                return Err(Problem(format!(
                    "filter {:?} follows a terminal filter",
                    f.name
                )));
            }
            if any.type_url == HttpConnectionManager::type_url() {
                let hcm = HttpConnectionManager::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("{}: {e}", f.name)))?;
                app = Some(App::Http(Arc::new(http_app(&hcm)?)));
            } else if any.type_url == TcpProxy::type_url() {
                let tcp = TcpProxy::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("{}: {e}", f.name)))?;
                let clusters = match tcp.cluster_specifier {
                    Some(tcp_proxy::ClusterSpecifier::Cluster(name)) => vec![(name, 1)],
                    Some(tcp_proxy::ClusterSpecifier::WeightedClusters(w)) => {
                        w.clusters.into_iter().map(|c| (c.name, c.weight)).collect()
                    }
                    None => return Err(Problem("tcp proxy without a cluster".into())),
                };
                app = Some(App::Tcp(TcpApp {
                    direction: Direction::of(&tcp.stat_prefix),
                    stat_prefix: tcp.stat_prefix,
                    sni_cluster,
                    clusters,
                }));
            } else if f.name == SNI_CLUSTER || any.type_url.ends_with(".SniCluster") {
                sni_cluster = true;
            } else if any.type_url == NetworkRbac::type_url() {
                let r = NetworkRbac::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("{}: {e}", f.name)))?;
                rbac = Some(Arc::new(RbacFilter::compile(
                    r.rules.as_ref(),
                    r.shadow_rules.as_ref(),
                )?));
            } else {
                // Any other network filter is enforced by nothing here, so
                // the config is refused, not run open.
                return Err(Problem(format!(
                    "network filter {:?} ({}) is not supported",
                    f.name, any.type_url
                )));
            }
        }
        Ok(Chain {
            rbac,
            destination_port,
            server_names: m
                .server_names
                .iter()
                .map(|n| n.to_ascii_lowercase())
                .collect(),
            transport: (!m.transport_protocol.is_empty()).then_some(m.transport_protocol),
            alpn: m.application_protocols,
            tls,
            app: app.ok_or_else(|| Problem("no HTTP connection manager or TCP proxy".into()))?,
        })
    }
}

fn http_app(hcm: &HttpConnectionManager) -> Result<HttpApp, Problem> {
    let routes = match &hcm.route_specifier {
        Some(RouteSpecifier::Rds(rds)) => Routes::Rds(rds.route_config_name.clone()),
        Some(RouteSpecifier::RouteConfig(rc)) => Routes::Inline(Arc::new(RouteTable::compile(rc)?)),
        _ => return Err(Problem("HTTP connection manager without routes".into())),
    };
    let (mut fault, mut cors, mut router, mut rbac, mut jwt) = (false, false, false, None, None);
    for f in &hcm.http_filters {
        let config = match &f.config_type {
            Some(http_filter::ConfigType::TypedConfig(a)) => Some(a),
            _ => None,
        };
        match f.name.as_str() {
            FAULT_FILTER => fault = true,
            CORS_FILTER => cors = true,
            "envoy.filters.http.router" => router = true,
            JWT_FILTER => {
                let c = config
                    .map(|a| JwtAuthentication::decode(a.value.as_slice()))
                    .transpose()
                    .map_err(|e| Problem(format!("{}: {e}", f.name)))?
                    .unwrap_or_default();
                jwt = Some(Arc::new(JwtAuthn::compile(&c)?));
            }
            _ if config.is_some_and(|a| a.type_url == HttpRbac::type_url()) => {
                let r = config
                    .map(|a| HttpRbac::decode(a.value.as_slice()))
                    .transpose()
                    .map_err(|e| Problem(format!("{}: {e}", f.name)))?
                    .unwrap_or_default();
                rbac = Some(RbacFilter::compile(
                    r.rules.as_ref(),
                    r.shadow_rules.as_ref(),
                )?);
            }
            _ if f.is_optional => {}
            name => {
                let url = match &f.config_type {
                    Some(http_filter::ConfigType::TypedConfig(a)) => a.type_url.as_str(),
                    _ => "",
                };
                return Err(Problem(format!(
                    "HTTP filter {name:?} ({url}) is not supported"
                )));
            }
        }
    }
    if !router {
        return Err(Problem(
            "HTTP connection manager without a router filter".into(),
        ));
    }
    Ok(HttpApp {
        direction: Direction::of(&hcm.stat_prefix),
        stat_prefix: hcm.stat_prefix.clone(),
        routes,
        rbac,
        jwt,
        fault,
        cors,
    })
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::{
        core::v3::{Address, SocketAddress},
        listener::v3::{Filter, FilterChain, FilterChainMatch},
    };

    use super::*;

    /// A listener of TCP chains, each named by its cluster and matching
    /// `server_names`.
    fn by_server_name(chains: &[(&str, &[&str])]) -> Listener {
        let chain = |(cluster, names): &(&str, &[&str])| FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                server_names: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            }),
            filters: vec![Filter {
                name: "envoy.filters.network.tcp_proxy".into(),
                config_type: Some(filter::ConfigType::TypedConfig(
                    envoy_types::pb::google::protobuf::Any {
                        type_url: TcpProxy::type_url(),
                        value: TcpProxy {
                            stat_prefix: cluster.to_string(),
                            cluster_specifier: Some(tcp_proxy::ClusterSpecifier::Cluster(
                                cluster.to_string(),
                            )),
                            ..Default::default()
                        }
                        .encode_to_vec(),
                    },
                )),
            }],
            ..Default::default()
        };
        Listener::compile(&xds::Listener {
            name: "0.0.0.0_443".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            filter_chains: chains.iter().map(chain).collect(),
            ..Default::default()
        })
        .unwrap()
    }

    fn chosen(l: &Listener, sni: Option<&str>) -> Option<String> {
        let arrival = Arrival {
            destination_port: 443,
            tls: sni.is_some(),
            sni,
            alpn: &[],
        };
        match &l.chain(&arrival)?.app {
            App::Tcp(tcp) => Some(tcp.clusters[0].0.clone()),
            App::Http(_) => None,
        }
    }

    #[test]
    fn the_server_name_picks_an_exact_chain_then_the_longest_wildcard_then_any() {
        let l = by_server_name(&[
            ("exact", &["bookinfo.example.com"]),
            ("wildcard", &["*.example.com"]),
            ("longer", &["*.shop.example.com"]),
            ("default", &[]),
        ]);
        assert!(l.inspects_tls());
        assert_eq!(
            chosen(&l, Some("bookinfo.example.com")).as_deref(),
            Some("exact")
        );
        assert_eq!(
            chosen(&l, Some("cart.shop.example.com")).as_deref(),
            Some("longer")
        );
        assert_eq!(
            chosen(&l, Some("api.example.com")).as_deref(),
            Some("wildcard")
        );
        // A wildcard needs something before its suffix.
        assert_eq!(chosen(&l, Some("example.com")).as_deref(), Some("default"));
        assert_eq!(chosen(&l, None).as_deref(), Some("default"));

        let named_only = by_server_name(&[("exact", &["Bookinfo.Example.com"])]);
        assert_eq!(
            chosen(&named_only, Some("bookinfo.example.com")).as_deref(),
            Some("exact")
        );
        assert_eq!(chosen(&named_only, Some("other.example.com")), None);
        assert_eq!(chosen(&named_only, None), None);
    }

    #[test]
    fn a_match_the_proxy_cannot_make_is_refused() {
        let mut l = xds::Listener {
            name: "l".into(),
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "0.0.0.0".into(),
                    port_specifier: Some(socket_address::PortSpecifier::PortValue(443)),
                    ..Default::default()
                })),
            }),
            ..Default::default()
        };
        l.filter_chains.push(FilterChain {
            filter_chain_match: Some(FilterChainMatch {
                source_ports: vec![8080],
                ..Default::default()
            }),
            ..Default::default()
        });
        let Err(Problem(why)) = Listener::compile(&l) else {
            panic!("compiled");
        };
        assert!(why.contains("source_ports is not supported"), "{why}");
    }

    #[test]
    fn inbound_apps_are_known_by_the_stat_prefix_pilot_gives_them() {
        assert_eq!(
            Direction::of("inbound|9080|http|reviews.shop.svc.cluster.local"),
            Direction::Inbound(InboundService {
                host: "reviews.shop.svc.cluster.local".into(),
                port: 9080
            })
        );
        assert_eq!(
            Direction::of("outbound|9080||reviews.shop.svc.cluster.local"),
            Direction::Outbound
        );
        assert_eq!(Direction::of("0.0.0.0_9080"), Direction::Outbound);
        assert_eq!(
            Direction::of("inbound|web|http|reviews"),
            Direction::Outbound,
            "a port that is no number"
        );
    }
}
