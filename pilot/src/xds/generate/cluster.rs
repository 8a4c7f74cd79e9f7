//! Clusters: one per visible service port and per DestinationRule subset
//! (`outbound|port|subset|host`), with the rule's traffic policy applied
//! (load balancer, connection pool, outlier detection, TLS), layered as
//! Istio does: the rule's policy, its port-level settings, then the
//! subset's policy and its port-level settings. Sidecars also get a cluster
//! per inbound port (`inbound|port|name|host`) that reaches the application.

use envoy_types::pb::{
    envoy::{
        config::{
            cluster::v3::{
                CircuitBreakers, Cluster, OutlierDetection as EnvoyOutlier,
                UpstreamConnectionOptions,
                circuit_breakers::Thresholds,
                cluster::{
                    ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig,
                    LbConfig, LbPolicy, RingHashLbConfig,
                },
            },
            core::v3::{
                AggregatedConfigSource, ApiVersion, ConfigSource, Http2ProtocolOptions,
                HttpProtocolOptions as CoreHttpOptions, TcpKeepalive, config_source,
            },
        },
        extensions::upstreams::http::v3::{
            HttpProtocolOptions, http_protocol_options::ExplicitHttpConfig,
            http_protocol_options::UpstreamProtocolOptions,
            http_protocol_options::explicit_http_config::ProtocolConfig,
        },
        r#type::v3::Percent,
    },
    google::protobuf::{UInt32Value, UInt64Value},
};
use mesh_api::pb::istio::networking::v1alpha3::{
    ConnectionPoolSettings, LoadBalancerSettings, OutlierDetection, TlsSettings, TrafficPolicy,
    load_balancer_settings::{self, SimpleLb},
    port_selector,
    tls_settings::TlSmode,
};
use prost::Name;
use std::sync::Arc;

use super::{Scope, any, duration, endpoint, tls};
use crate::model::{self, Model, Port, Resolution, Service, host};
use crate::xds::Resource;

/// Drops traffic: the target of routes to nowhere.
pub const BLACK_HOLE: &str = "BlackHoleCluster";
/// Forwards to the original destination: traffic to hosts outside the
/// registry when the mesh allows it.
pub const PASSTHROUGH: &str = "PassthroughCluster";

/// The settings a cluster gets, after layering.
#[derive(Default, Clone, Copy)]
pub struct Settings<'a> {
    pub load_balancer: Option<&'a LoadBalancerSettings>,
    pub connection_pool: Option<&'a ConnectionPoolSettings>,
    pub outlier_detection: Option<&'a OutlierDetection>,
    pub tls: Option<&'a TlsSettings>,
}

impl<'a> Settings<'a> {
    /// Layers `policy` (and its settings for `port`) over `self`.
    fn apply(&mut self, policy: Option<&'a TrafficPolicy>, port: &Port) {
        let Some(policy) = policy else { return };
        self.set(
            policy.load_balancer.as_ref(),
            policy.connection_pool.as_ref(),
            policy.outlier_detection.as_ref(),
            policy.tls.as_ref(),
        );
        let port_level = policy.port_level_settings.iter().find(|p| {
            match p.port.as_ref().and_then(|s| s.port.as_ref()) {
                Some(port_selector::Port::Number(n)) => *n == port.number,
                Some(port_selector::Port::Name(n)) => *n == port.name,
                None => false,
            }
        });
        if let Some(p) = port_level {
            self.set(
                p.load_balancer.as_ref(),
                p.connection_pool.as_ref(),
                p.outlier_detection.as_ref(),
                p.tls.as_ref(),
            );
        }
    }

    fn set(
        &mut self,
        lb: Option<&'a LoadBalancerSettings>,
        pool: Option<&'a ConnectionPoolSettings>,
        outlier: Option<&'a OutlierDetection>,
        tls: Option<&'a TlsSettings>,
    ) {
        self.load_balancer = lb.or(self.load_balancer);
        self.connection_pool = pool.or(self.connection_pool);
        self.outlier_detection = outlier.or(self.outlier_detection);
        self.tls = tls.or(self.tls);
    }

    /// The settings of `subset` (empty for the whole service) of `service`
    /// on `port`, as seen from `namespace`.
    pub fn of(
        model: &'a Model,
        service: &Service,
        port: &Port,
        subset: &str,
        namespace: &str,
    ) -> Self {
        let mut settings = Settings::default();
        if let Some(dr) = model.destination_rule(&service.host, namespace) {
            settings.apply(dr.spec.traffic_policy.as_ref(), port);
            if let Some(s) = dr.spec.subsets.iter().find(|s| s.name == subset) {
                settings.apply(s.traffic_policy.as_ref(), port);
            }
        }
        settings
    }
}

/// The clusters every proxy of a scope shares: one per visible service
/// port and subset, the black hole and the passthrough. Each is encoded as
/// it is built: thousands of decoded clusters would take far more memory.
pub fn shared(scope: &Scope) -> Vec<Arc<Resource>> {
    let mut out: Vec<Arc<Resource>> = scope
        .services()
        .flat_map(|service| of_service(scope, service))
        .collect();
    let mut add = |c: Cluster| out.push(Resource::new(c.name.clone(), &c));
    add(Cluster {
        name: BLACK_HOLE.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Static as i32)),
        connect_timeout: connect_timeout(scope.model, None),
        ..Default::default()
    });
    add(original_destination(PASSTHROUGH, scope.model));
    out
}

/// The clusters of one service: one per port and subset.
pub fn of_service(scope: &Scope, service: &Service) -> Vec<Arc<Resource>> {
    let mut out = Vec::new();
    for port in &service.ports {
        for subset in scope.subsets(service) {
            let c = outbound(scope, service, port, &subset);
            out.push(Resource::new(c.name.clone(), &c));
        }
    }
    out
}

/// A gateway's AUTO_PASSTHROUGH clusters: each visible service port and
/// subset again under the name Istio 1.1 puts in SNI
/// ([`model::sni_cluster_name`]), with the same endpoints and no TLS of its
/// own: the caller's mesh TLS passes through to the workload. A Kubernetes
/// service also answers to its `.global` name, as other clusters call it
/// (what Istio 1.1's multi-cluster install did with an EnvoyFilter that
/// rewrote `.global` to `.svc.cluster.local`). Services that are
/// themselves `.global` names lead to other clusters' gateways, never back
/// out of this one.
pub fn sni_dnat(scope: &Scope) -> Vec<Cluster> {
    let mut out = Vec::new();
    for service in scope.services() {
        if service.host.ends_with(host::GLOBAL_SUFFIX) {
            continue;
        }
        let global = host::global_name(&service.host);
        for port in &service.ports {
            for subset in scope.subsets(service) {
                let mut c = outbound(scope, service, port, &subset);
                if let Some(eds) = c.eds_cluster_config.as_mut() {
                    eds.service_name = c.name.clone();
                }
                c.transport_socket = None;
                if let Some(global) = &global {
                    let mut alias = c.clone();
                    alias.name = model::sni_cluster_name(port.number, &subset, global);
                    out.push(alias);
                }
                c.name = model::sni_cluster_name(port.number, &subset, &service.host);
                out.push(c);
            }
        }
    }
    out
}

/// The clusters of the proxy's own inbound ports.
pub fn inbound(scope: &Scope) -> Vec<Cluster> {
    scope
        .inbound()
        .iter()
        .map(|i| static_cluster(&i.cluster, &i.target_address, i.target_port, scope.model))
        .collect()
}

fn discovery(t: DiscoveryType) -> Option<ClusterDiscoveryType> {
    Some(ClusterDiscoveryType::Type(t as i32))
}

fn connect_timeout(
    model: &Model,
    pool: Option<&ConnectionPoolSettings>,
) -> Option<envoy_types::pb::google::protobuf::Duration> {
    pool.and_then(|p| p.tcp.as_ref())
        .and_then(|t| t.connect_timeout.as_ref())
        .or(model.mesh.connect_timeout.as_ref())
        .map(duration)
        .or(Some(envoy_types::pb::google::protobuf::Duration {
            seconds: 1,
            nanos: 0,
        }))
}

fn original_destination(name: &str, model: &Model) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: discovery(DiscoveryType::OriginalDst),
        lb_policy: LbPolicy::ClusterProvided as i32,
        connect_timeout: connect_timeout(model, None),
        ..Default::default()
    }
}

/// A cluster with one fixed endpoint (an inbound port's application).
fn static_cluster(name: &str, address: &str, port: u32, model: &Model) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: discovery(DiscoveryType::Static),
        connect_timeout: connect_timeout(model, None),
        load_assignment: Some(endpoint::fixed(name, &[(address.to_string(), port)])),
        ..Default::default()
    }
}

/// The cluster of one service port and subset.
pub fn outbound(scope: &Scope, service: &Service, port: &Port, subset: &str) -> Cluster {
    let name = model::cluster_name(port.number, subset, &service.host);
    let settings = Settings::of(scope.model, service, port, subset, &scope.proxy.namespace);
    let mut cluster = match service.resolution {
        Resolution::Static => Cluster {
            cluster_discovery_type: discovery(DiscoveryType::Eds),
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
            ..Default::default()
        },
        Resolution::Dns => {
            let endpoints = scope.model.endpoints.get(&service.host);
            let mut targets: Vec<(String, u32)> = endpoints
                .into_iter()
                .flat_map(|e| e.iter())
                .map(|e| (e.address.clone(), e.port(port)))
                .collect();
            if targets.is_empty() {
                targets.push((service.host.clone(), port.number));
            }
            Cluster {
                cluster_discovery_type: discovery(DiscoveryType::StrictDns),
                load_assignment: Some(endpoint::fixed(&name, &targets)),
                ..Default::default()
            }
        }
        Resolution::Passthrough => original_destination(&name, scope.model),
    };
    cluster.name = name;
    cluster.connect_timeout = connect_timeout(scope.model, settings.connection_pool);
    if service.resolution != Resolution::Passthrough {
        load_balancer(&mut cluster, settings.load_balancer);
    }
    connection_pool(&mut cluster, settings.connection_pool, port);
    if let Some(o) = settings.outlier_detection {
        outlier_detection(&mut cluster, o);
    }
    if let Some(t) = client_tls(scope.model, settings, service) {
        cluster.transport_socket = upstream_tls(&t, service, port, subset);
    }
    cluster
}

/// The TLS a client's cluster speaks to `service`: its DestinationRule's
/// (layered into `settings`), else mesh mTLS where Istio 1.1's mesh-wide
/// `authPolicy: MUTUAL_TLS` makes it the default towards services inside
/// the mesh, else none.
pub fn client_tls(model: &Model, settings: Settings<'_>, service: &Service) -> Option<TlsSettings> {
    settings.tls.cloned().or_else(|| {
        #[allow(deprecated)]
        let mesh_mtls = model.mesh.auth_policy == 1 && !service.mesh_external;
        mesh_mtls.then(|| TlsSettings {
            mode: TlSmode::IstioMutual as i32,
            ..Default::default()
        })
    })
}

fn load_balancer(cluster: &mut Cluster, lb: Option<&LoadBalancerSettings>) {
    use load_balancer_settings::LbPolicy as Istio;
    match lb.and_then(|l| l.lb_policy.as_ref()) {
        None => {}
        Some(Istio::Simple(simple)) => {
            cluster.lb_policy = match SimpleLb::try_from(*simple) {
                Ok(SimpleLb::LeastConn) => LbPolicy::LeastRequest,
                Ok(SimpleLb::Random) => LbPolicy::Random,
                Ok(SimpleLb::Passthrough) => {
                    cluster.cluster_discovery_type = discovery(DiscoveryType::OriginalDst);
                    cluster.eds_cluster_config = None;
                    cluster.load_assignment = None;
                    LbPolicy::ClusterProvided
                }
                _ => LbPolicy::RoundRobin,
            } as i32;
        }
        Some(Istio::ConsistentHash(hash)) => {
            // The hash key is a route setting (see `route`); the cluster
            // only needs the ring.
            cluster.lb_policy = LbPolicy::RingHash as i32;
            cluster.lb_config = Some(LbConfig::RingHashLbConfig(RingHashLbConfig {
                minimum_ring_size: (hash.minimum_ring_size > 0).then_some(UInt64Value {
                    value: hash.minimum_ring_size,
                }),
                ..Default::default()
            }));
        }
    }
}

fn positive(n: i32) -> Option<UInt32Value> {
    (n > 0).then_some(UInt32Value { value: n as u32 })
}

fn connection_pool(cluster: &mut Cluster, pool: Option<&ConnectionPoolSettings>, port: &Port) {
    let tcp = pool.and_then(|p| p.tcp.as_ref());
    let http = pool.and_then(|p| p.http.as_ref());
    let thresholds = Thresholds {
        max_connections: tcp.and_then(|t| positive(t.max_connections)),
        max_pending_requests: http.and_then(|h| positive(h.http1_max_pending_requests)),
        max_requests: http.and_then(|h| positive(h.http2_max_requests)),
        max_retries: http.and_then(|h| positive(h.max_retries)),
        ..Default::default()
    };
    if thresholds != Thresholds::default() {
        cluster.circuit_breakers = Some(CircuitBreakers {
            thresholds: vec![thresholds],
            ..Default::default()
        });
    }
    if let Some(k) = tcp.and_then(|t| t.tcp_keepalive.as_ref()) {
        cluster.upstream_connection_options = Some(UpstreamConnectionOptions {
            tcp_keepalive: Some(TcpKeepalive {
                keepalive_probes: (k.probes > 0).then_some(UInt32Value { value: k.probes }),
                keepalive_time: k.time.as_ref().map(|d| UInt32Value {
                    value: d.seconds.max(0) as u32,
                }),
                keepalive_interval: k.interval.as_ref().map(|d| UInt32Value {
                    value: d.seconds.max(0) as u32,
                }),
            }),
            ..Default::default()
        });
    }
    let common = CoreHttpOptions {
        idle_timeout: http.and_then(|h| h.idle_timeout.as_ref()).map(duration),
        max_requests_per_connection: http.and_then(|h| positive(h.max_requests_per_connection)),
        ..Default::default()
    };
    let http2 = port.protocol.is_http2();
    if http2 || common != CoreHttpOptions::default() {
        let options = HttpProtocolOptions {
            common_http_protocol_options: (common != CoreHttpOptions::default()).then_some(common),
            upstream_protocol_options: Some(UpstreamProtocolOptions::ExplicitHttpConfig(
                ExplicitHttpConfig {
                    protocol_config: Some(if http2 {
                        ProtocolConfig::Http2ProtocolOptions(Http2ProtocolOptions::default())
                    } else {
                        ProtocolConfig::HttpProtocolOptions(Default::default())
                    }),
                },
            )),
            ..Default::default()
        };
        cluster
            .typed_extension_protocol_options
            .insert(HttpProtocolOptions::full_name(), any(&options));
    }
}

fn outlier_detection(cluster: &mut Cluster, o: &OutlierDetection) {
    cluster.outlier_detection = Some(EnvoyOutlier {
        consecutive_5xx: positive(o.consecutive_errors),
        interval: o.interval.as_ref().map(duration),
        base_ejection_time: o.base_ejection_time.as_ref().map(duration),
        max_ejection_percent: positive(o.max_ejection_percent),
        ..Default::default()
    });
    if o.min_health_percent > 0 {
        cluster.common_lb_config = Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent {
                value: f64::from(o.min_health_percent),
            }),
            ..Default::default()
        });
    }
}

fn upstream_tls(
    settings: &TlsSettings,
    service: &Service,
    port: &Port,
    subset: &str,
) -> Option<envoy_types::pb::envoy::config::core::v3::TransportSocket> {
    let identities = if settings.subject_alt_names.is_empty() {
        &service.subject_alt_names
    } else {
        &settings.subject_alt_names
    };
    let alpn: &[&str] = if port.protocol.is_http2() {
        &[tls::MESH_ALPN, "h2"]
    } else {
        &[tls::MESH_ALPN]
    };
    let mode = TlSmode::try_from(settings.mode).unwrap_or(TlSmode::Disable);
    // TLS names its destination by SNI unless the DestinationRule says
    // otherwise: a server outside the mesh by the service's host; a mesh
    // peer by the cluster, as Istio 1.1 does, so that a gateway's
    // AUTO_PASSTHROUGH can route the connection without decrypting it.
    let sni = match mode {
        _ if !settings.sni.is_empty() => settings.sni.clone(),
        TlSmode::Simple | TlSmode::Mutual => service.host.clone(),
        TlSmode::IstioMutual => model::sni_cluster_name(port.number, subset, &service.host),
        TlSmode::Disable => String::new(),
    };
    let context = match mode {
        TlSmode::Disable => return None,
        TlSmode::Simple => tls::file_context(None, &settings.ca_certificates, identities, &[]),
        TlSmode::Mutual => tls::file_context(
            Some((&settings.client_certificate, &settings.private_key)),
            &settings.ca_certificates,
            identities,
            &[],
        ),
        TlSmode::IstioMutual => tls::mesh_context(alpn, identities),
    };
    Some(tls::upstream(context, &sni))
}
