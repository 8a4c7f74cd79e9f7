//! Clusters as the proxy runs them: where endpoints come from (EDS, fixed,
//! DNS names, the original destination), how one is picked, how many
//! connections and requests it may take, when an endpoint is ejected, and
//! the TLS to speak to it.

use std::{net::SocketAddr, time::Duration};

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::{
            self as xds,
            cluster::{ClusterDiscoveryType, DiscoveryType, LbPolicy},
        },
        core::v3::{address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
    },
    extensions::{
        transport_sockets::tls::v3::UpstreamTlsContext,
        upstreams::http::v3::{
            HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
            http_protocol_options::explicit_http_config::ProtocolConfig,
        },
    },
};
use prost::{Message, Name};

use super::{Problem, duration, tls::Tls};

#[derive(Debug, Clone, PartialEq)]
pub struct Cluster {
    pub name: String,
    pub discovery: Discovery,
    pub lb: Lb,
    pub connect_timeout: Duration,
    /// Speak HTTP/2 to the endpoints (else HTTP/1.1).
    pub http2: bool,
    pub limits: Limits,
    pub outlier: Option<Outlier>,
    pub tls: Option<Tls>,
    /// Endpoints below this share of healthy ones: use them all anyway.
    pub panic_threshold: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Discovery {
    /// Endpoints by EDS, under this name.
    Eds(String),
    /// Fixed endpoints (addresses, or names resolved by DNS).
    Fixed(Vec<(String, u16)>),
    /// Wherever the connection was going.
    OriginalDst,
    /// Nowhere: requests fail at once.
    BlackHole,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lb {
    RoundRobin,
    LeastRequest,
    Random,
    /// Consistent hashing on a ring of at least this many points.
    RingHash {
        minimum_ring_size: u64,
    },
}

/// Envoy's default and largest ring sizes.
const RING_SIZE: (u64, u64) = (1024, 8 * 1024 * 1024);

/// Envoy's circuit breaker thresholds, with Envoy's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_connections: u32,
    pub max_pending_requests: u32,
    pub max_requests: u32,
    pub max_retries: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Outlier {
    pub consecutive_5xx: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
}

/// Endpoints of an EDS cluster: address and weight.
pub type Endpoints = Vec<(SocketAddr, u32)>;

impl Cluster {
    pub fn compile(c: &xds::Cluster) -> Result<Self, Problem> {
        let at = |p: String| Problem(format!("cluster {:?}: {p}", c.name));
        let kind = match &c.cluster_discovery_type {
            Some(ClusterDiscoveryType::Type(t)) => {
                DiscoveryType::try_from(*t).unwrap_or(DiscoveryType::Static)
            }
            Some(ClusterDiscoveryType::ClusterType(t)) => {
                return Err(at(format!(
                    "custom cluster type {:?} is not supported",
                    t.name
                )));
            }
            None => DiscoveryType::Static,
        };
        let fixed = || -> Result<Vec<(String, u16)>, Problem> {
            let Some(assignment) = &c.load_assignment else {
                return Ok(Vec::new());
            };
            fixed_endpoints(assignment).map_err(|Problem(p)| at(p))
        };
        let discovery = match kind {
            DiscoveryType::Eds => Discovery::Eds(
                c.eds_cluster_config
                    .as_ref()
                    .map(|e| e.service_name.clone())
                    .filter(|n| !n.is_empty())
                    .unwrap_or_else(|| c.name.clone()),
            ),
            DiscoveryType::OriginalDst => Discovery::OriginalDst,
            DiscoveryType::Static | DiscoveryType::StrictDns | DiscoveryType::LogicalDns => {
                let endpoints = fixed()?;
                if endpoints.is_empty() {
                    Discovery::BlackHole
                } else {
                    Discovery::Fixed(endpoints)
                }
            }
        };
        let lb = match LbPolicy::try_from(c.lb_policy) {
            Ok(LbPolicy::RoundRobin) | Ok(LbPolicy::ClusterProvided) => Lb::RoundRobin,
            Ok(LbPolicy::LeastRequest) => Lb::LeastRequest,
            Ok(LbPolicy::Random) => Lb::Random,
            Ok(LbPolicy::RingHash) | Ok(LbPolicy::Maglev) => Lb::RingHash {
                minimum_ring_size: c
                    .lb_config
                    .as_ref()
                    .and_then(|config| match config {
                        xds::cluster::LbConfig::RingHashLbConfig(ring) => {
                            ring.minimum_ring_size.as_ref().map(|v| v.value)
                        }
                        _ => None,
                    })
                    .unwrap_or(RING_SIZE.0)
                    .clamp(1, RING_SIZE.1),
            },
            _ => {
                return Err(at(format!(
                    "load balancer policy {} is not supported",
                    c.lb_policy
                )));
            }
        };
        let mut limits = Limits::default();
        if let Some(t) = c
            .circuit_breakers
            .as_ref()
            .and_then(|b| b.thresholds.first())
        {
            let set =
                |field: &mut u32, v: &Option<envoy_types::pb::google::protobuf::UInt32Value>| {
                    if let Some(v) = v {
                        *field = v.value;
                    }
                };
            set(&mut limits.max_connections, &t.max_connections);
            set(&mut limits.max_pending_requests, &t.max_pending_requests);
            set(&mut limits.max_requests, &t.max_requests);
            set(&mut limits.max_retries, &t.max_retries);
        }
        let outlier = c.outlier_detection.as_ref().map(|o| Outlier {
            consecutive_5xx: o.consecutive_5xx.as_ref().map_or(5, |v| v.value),
            interval: o
                .interval
                .as_ref()
                .map_or(Duration::from_secs(10), duration),
            base_ejection_time: o
                .base_ejection_time
                .as_ref()
                .map_or(Duration::from_secs(30), duration),
            max_ejection_percent: o.max_ejection_percent.as_ref().map_or(10, |v| v.value),
        });
        let mut http2 = false;
        if let Some(options) = c
            .typed_extension_protocol_options
            .get(&HttpProtocolOptions::full_name())
        {
            let options = HttpProtocolOptions::decode(options.value.as_slice())
                .map_err(|e| at(format!("HTTP protocol options: {e}")))?;
            if let Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) =
                &options.upstream_protocol_options
            {
                http2 = matches!(
                    e.protocol_config,
                    Some(ProtocolConfig::Http2ProtocolOptions(_))
                );
            }
        }
        let tls = match &c.transport_socket {
            None => None,
            Some(socket) => {
                use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
                let Some(ConfigType::TypedConfig(any)) = &socket.config_type else {
                    return Err(at("transport socket without a typed config".into()));
                };
                if any.type_url != UpstreamTlsContext::type_url() {
                    return Err(at(format!(
                        "transport socket {:?} is not supported",
                        any.type_url
                    )));
                }
                let context = UpstreamTlsContext::decode(any.value.as_slice())
                    .map_err(|e| at(format!("upstream TLS context: {e}")))?;
                Some(Tls::upstream(&context).map_err(|Problem(p)| at(p))?)
            }
        };
        let panic_threshold = c
            .common_lb_config
            .as_ref()
            .and_then(|l| l.healthy_panic_threshold.as_ref())
            .map_or(50.0, |p| p.value);
        Ok(Cluster {
            name: c.name.clone(),
            discovery,
            lb,
            connect_timeout: c
                .connect_timeout
                .as_ref()
                .map_or(Duration::from_secs(5), duration),
            http2,
            limits,
            outlier,
            tls,
            panic_threshold,
        })
    }
}

/// One endpoint of a load assignment: host and port, unresolved, weight,
/// and whether EDS says it may take traffic.
type Assigned = ((String, u16), u32, bool);

fn endpoints(assignment: &ClusterLoadAssignment) -> Result<Vec<Assigned>, Problem> {
    use envoy_types::pb::envoy::config::core::v3::HealthStatus;
    let mut out = Vec::new();
    for locality in &assignment.endpoints {
        for e in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(endpoint)) = &e.host_identifier else {
                continue;
            };
            let Some(address::Address::SocketAddress(sa)) =
                endpoint.address.as_ref().and_then(|a| a.address.as_ref())
            else {
                return Err(Problem("an endpoint has no socket address".into()));
            };
            let port = match sa.port_specifier {
                Some(socket_address::PortSpecifier::PortValue(p)) => u16::try_from(p)
                    .map_err(|_| Problem(format!("endpoint port {p} is out of range")))?,
                _ => {
                    return Err(Problem(format!(
                        "endpoint {:?} has no port number",
                        sa.address
                    )));
                }
            };
            let healthy = !matches!(
                HealthStatus::try_from(e.health_status),
                Ok(HealthStatus::Unhealthy | HealthStatus::Draining | HealthStatus::Timeout)
            );
            let weight = e
                .load_balancing_weight
                .as_ref()
                .map_or(1, |w| w.value.max(1));
            out.push(((sa.address.clone(), port), weight, healthy));
        }
    }
    Ok(out)
}

fn fixed_endpoints(assignment: &ClusterLoadAssignment) -> Result<Vec<(String, u16)>, Problem> {
    Ok(endpoints(assignment)?
        .into_iter()
        .map(|(host_port, _, _)| host_port)
        .collect())
}

/// The endpoints EDS assigns that may take traffic: IP addresses with
/// their weights.
pub fn eds_endpoints(assignment: &ClusterLoadAssignment) -> Result<Endpoints, Problem> {
    let at = |p: String| Problem(format!("endpoints of {:?}: {p}", assignment.cluster_name));
    let mut out = Vec::new();
    for ((host, port), weight, healthy) in endpoints(assignment).map_err(|Problem(p)| at(p))? {
        let ip: std::net::IpAddr = host
            .parse()
            .map_err(|_| at(format!("{host:?} is not an IP address")))?;
        if healthy {
            out.push((SocketAddr::new(ip, port), weight));
        }
    }
    Ok(out)
}
