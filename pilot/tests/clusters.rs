//! Clusters and endpoints as a proxy receives them, from config that
//! reaches Pilot over the real MCP path, asserted on their content.

mod support;

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::{
            Cluster,
            cluster::{ClusterDiscoveryType, DiscoveryType, LbConfig, LbPolicy},
        },
        core::v3::{address, socket_address},
        endpoint::v3::{ClusterLoadAssignment, lb_endpoint},
    },
    extensions::{
        transport_sockets::tls::v3::{
            UpstreamTlsContext, common_tls_context::ValidationContextType,
        },
        upstreams::http::v3::{
            HttpProtocolOptions, http_protocol_options::UpstreamProtocolOptions,
        },
    },
};
use pilot::xds::{CLUSTER, ENDPOINT};
use support::{ControlPlane, unpack};

const REVIEWS: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9090, name: grpc, protocol: GRPC}]
  subjectAltNames: [spiffe://cluster.local/ns/shop/sa/reviews]
  endpoints:
  - {address: 10.0.0.1, ports: {http: 19080}, labels: {version: v1}, locality: us-east/zone-a}
  - {address: 10.0.0.2, labels: {version: v2}, locality: us-east/zone-b}
";

/// `(address, port, region/zone)` of every endpoint of `cluster`.
fn endpoints(all: &[ClusterLoadAssignment], cluster: &str) -> Vec<(String, u32, String)> {
    let cla = all.iter().find(|c| c.cluster_name == cluster).unwrap();
    let mut out = Vec::new();
    for locality in &cla.endpoints {
        let l = locality.locality.clone().unwrap();
        // gRPC's xDS client ignores localities without a weight.
        let weight = locality
            .load_balancing_weight
            .expect("a locality weight")
            .value;
        assert_eq!(weight as usize, locality.lb_endpoints.len());
        for lb in &locality.lb_endpoints {
            let Some(lb_endpoint::HostIdentifier::Endpoint(e)) = &lb.host_identifier else {
                panic!("an endpoint")
            };
            let Some(address::Address::SocketAddress(s)) = e.address.clone().unwrap().address
            else {
                panic!("a socket address")
            };
            let Some(socket_address::PortSpecifier::PortValue(port)) = s.port_specifier else {
                panic!("a port")
            };
            out.push((s.address, port, format!("{}/{}", l.region, l.zone)));
        }
    }
    out.sort();
    out
}

fn find<'a>(clusters: &'a [Cluster], name: &str) -> &'a Cluster {
    clusters.iter().find(|c| c.name == name).unwrap_or_else(|| {
        panic!(
            "cluster {name} in {:?}",
            clusters.iter().map(|c| &c.name).collect::<Vec<_>>()
        )
    })
}

fn ep(address: &str, port: u32, locality: &str) -> (String, u32, String) {
    (address.into(), port, locality.into())
}

#[tokio::test]
async fn clusters_and_endpoints_follow_service_entries_and_subsets() {
    let subsets = "
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";
    let config = format!("{REVIEWS}{subsets}");
    let cp = ControlPlane::start(&config).await;
    let mut proxy = cp.sidecar("10.0.0.9", "web", &[]).await;
    let all = "outbound|9080||reviews.shop.svc.cluster.local";
    let v1 = "outbound|9080|v1|reviews.shop.svc.cluster.local";
    let v2 = "outbound|9080|v2|reviews.shop.svc.cluster.local";
    let clusters: Vec<Cluster> = proxy.fetch(CLUSTER, &[]).await;
    for name in [
        all,
        v1,
        v2,
        "outbound|9090|v2|reviews.shop.svc.cluster.local",
    ] {
        let c = find(&clusters, name);
        assert_eq!(
            c.cluster_discovery_type,
            Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32))
        );
    }
    find(&clusters, "BlackHoleCluster");
    find(&clusters, "PassthroughCluster");

    let eds: Vec<ClusterLoadAssignment> = proxy.fetch(ENDPOINT, &[all, v1, v2]).await;
    assert_eq!(eds.len(), 3, "only the names subscribed");
    assert_eq!(
        endpoints(&eds, all),
        [
            ep("10.0.0.1", 19080, "us-east/zone-a"),
            ep("10.0.0.2", 9080, "us-east/zone-b")
        ]
    );
    assert_eq!(
        endpoints(&eds, v1),
        [ep("10.0.0.1", 19080, "us-east/zone-a")]
    );
    assert_eq!(
        endpoints(&eds, v2),
        [ep("10.0.0.2", 9080, "us-east/zone-b")]
    );

    // An endpoint change reaches the proxy as an EDS push; clusters are
    // not resent, since they did not change.
    cp.publish(&config.replace("10.0.0.2", "10.0.0.3"));
    let next = proxy.next().await;
    assert_eq!(
        next.type_url, ENDPOINT,
        "an endpoint-only change is an EDS push"
    );
    let eds: Vec<ClusterLoadAssignment> = support::decode(&next);
    assert_eq!(
        endpoints(&eds, v2),
        [ep("10.0.0.3", 9080, "us-east/zone-b")]
    );
    // Only the load assignments that changed: v1's did not.
    let names: Vec<&str> = eds.iter().map(|c| c.cluster_name.as_str()).collect();
    assert_eq!(names, [v2, all], "in name order");
}

const POLICIES: &str = "
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy:
    loadBalancer: {simple: LEAST_CONN}
    connectionPool:
      tcp: {maxConnections: 100, connectTimeout: 250ms, tcpKeepalive: {probes: 3, time: 60s, interval: 10s}}
      http: {http1MaxPendingRequests: 10, http2MaxRequests: 200, maxRequestsPerConnection: 5, maxRetries: 4, idleTimeout: 30s}
    outlierDetection: {consecutiveErrors: 7, interval: 5m, baseEjectionTime: 15m, maxEjectionPercent: 50, minHealthPercent: 30}
    tls: {mode: ISTIO_MUTUAL}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: RANDOM}
      tls: {mode: DISABLE}
  subsets:
  - name: v1
    labels: {version: v1}
    trafficPolicy:
      loadBalancer:
        consistentHash: {httpHeaderName: x-user, minimumRingSize: 2048}
      tls: {mode: MUTUAL, clientCertificate: /etc/certs/client.pem, privateKey: /etc/certs/key.pem, caCertificates: /etc/certs/ca.pem, subjectAltNames: [reviews.example.com], sni: reviews.example.com}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      tls: {mode: SIMPLE, caCertificates: /etc/certs/ca.pem}
";

fn tls_of(c: &Cluster) -> Option<UpstreamTlsContext> {
    use envoy_types::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ConfigType::TypedConfig(any)) = c.transport_socket.as_ref()?.config_type.as_ref()
    else {
        panic!("typed TLS config")
    };
    Some(unpack(any))
}

fn uses_http2(c: &Cluster) -> bool {
    use envoy_types::pb::envoy::extensions::upstreams::http::v3::http_protocol_options::explicit_http_config::ProtocolConfig;
    let Some(options) = c
        .typed_extension_protocol_options
        .get("envoy.extensions.upstreams.http.v3.HttpProtocolOptions")
    else {
        return false;
    };
    let options: HttpProtocolOptions = unpack(options);
    matches!(
        options.upstream_protocol_options,
        Some(UpstreamProtocolOptions::ExplicitHttpConfig(e)) if matches!(e.protocol_config, Some(ProtocolConfig::Http2ProtocolOptions(_)))
    )
}

#[tokio::test]
async fn destination_rule_policies_shape_clusters_by_port_and_subset() {
    let cp = ControlPlane::start(&format!("{REVIEWS}{POLICIES}")).await;
    let mut proxy = cp.sidecar("10.0.0.9", "web", &[]).await;
    let clusters: Vec<Cluster> = proxy.fetch(CLUSTER, &[]).await;

    let all = find(&clusters, "outbound|9080||reviews.shop.svc.cluster.local");
    assert_eq!(all.lb_policy, LbPolicy::LeastRequest as i32);
    assert_eq!(all.connect_timeout.unwrap().nanos, 250_000_000);
    let thresholds = &all.circuit_breakers.as_ref().unwrap().thresholds[0];
    assert_eq!(thresholds.max_connections.unwrap().value, 100);
    assert_eq!(thresholds.max_pending_requests.unwrap().value, 10);
    assert_eq!(thresholds.max_requests.unwrap().value, 200);
    assert_eq!(thresholds.max_retries.unwrap().value, 4);
    let keepalive = all
        .upstream_connection_options
        .as_ref()
        .unwrap()
        .tcp_keepalive
        .unwrap();
    assert_eq!(
        (
            keepalive.keepalive_probes.unwrap().value,
            keepalive.keepalive_time.unwrap().value
        ),
        (3, 60)
    );
    let outlier = all.outlier_detection.as_ref().unwrap();
    assert_eq!(outlier.consecutive_5xx.unwrap().value, 7);
    assert_eq!(outlier.interval.unwrap().seconds, 300);
    assert_eq!(outlier.base_ejection_time.unwrap().seconds, 900);
    assert_eq!(outlier.max_ejection_percent.unwrap().value, 50);
    assert_eq!(
        all.common_lb_config
            .as_ref()
            .unwrap()
            .healthy_panic_threshold
            .unwrap()
            .value,
        30.0
    );
    // ISTIO_MUTUAL: the cluster named in SNI as Istio 1.1 names it (what a
    // gateway's AUTO_PASSTHROUGH routes by), the workload certificate and
    // root by SDS, the mesh ALPN, the service's identities as the accepted
    // peers.
    let mesh = tls_of(all).expect("mesh TLS");
    assert_eq!(mesh.sni, "outbound_.9080_._.reviews.shop.svc.cluster.local");
    let mesh = mesh.common_tls_context.unwrap();
    assert_eq!(mesh.tls_certificate_sds_secret_configs[0].name, "default");
    assert_eq!(mesh.alpn_protocols, ["istio"]);
    let Some(ValidationContextType::CombinedValidationContext(combined)) =
        mesh.validation_context_type
    else {
        panic!("root by SDS")
    };
    assert_eq!(
        combined.validation_context_sds_secret_config.unwrap().name,
        "ROOTCA"
    );
    let sans = combined
        .default_validation_context
        .unwrap()
        .match_typed_subject_alt_names;
    assert!(format!("{:?}", sans[0].matcher).contains("spiffe://cluster.local/ns/shop/sa/reviews"));

    // Port-level settings override the rule's for port 9090 only.
    let grpc = find(&clusters, "outbound|9090||reviews.shop.svc.cluster.local");
    assert_eq!(grpc.lb_policy, LbPolicy::Random as i32);
    assert!(tls_of(grpc).is_none(), "DISABLE at port level");
    assert!(uses_http2(grpc), "gRPC ports speak HTTP/2 upstream");
    assert!(!uses_http2(all));

    // A subset's policy overrides the rule's, field group by field group.
    let v1 = find(&clusters, "outbound|9080|v1|reviews.shop.svc.cluster.local");
    assert_eq!(v1.lb_policy, LbPolicy::RingHash as i32);
    let Some(LbConfig::RingHashLbConfig(ring)) = &v1.lb_config else {
        panic!("ring config")
    };
    assert_eq!(ring.minimum_ring_size.unwrap().value, 2048);
    assert_eq!(
        v1.circuit_breakers, all.circuit_breakers,
        "the pool is inherited"
    );
    let mutual = tls_of(v1).unwrap();
    assert_eq!(mutual.sni, "reviews.example.com");
    let context = mutual.common_tls_context.unwrap();
    let cert = format!("{:?}", context.tls_certificates[0]);
    assert!(cert.contains("/etc/certs/client.pem") && cert.contains("/etc/certs/key.pem"));
    let v2 = find(&clusters, "outbound|9080|v2|reviews.shop.svc.cluster.local");
    let simple = tls_of(v2).unwrap().common_tls_context.unwrap();
    assert!(
        simple.tls_certificates.is_empty(),
        "SIMPLE presents no client certificate"
    );
    assert!(format!("{:?}", simple.validation_context_type).contains("/etc/certs/ca.pem"));
}

#[tokio::test]
async fn dns_and_passthrough_services_get_their_cluster_types() {
    let config = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: external, namespace: shop}
spec:
  hosts: [api.example.com]
  location: MESH_EXTERNAL
  resolution: DNS
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: anything, namespace: shop}
spec:
  hosts: ['*.internal.example.com']
  resolution: NONE
  ports: [{number: 80, name: http, protocol: HTTP}]
";
    let cp = ControlPlane::start(config).await;
    let mut proxy = cp.sidecar("10.0.0.9", "web", &[]).await;
    let clusters: Vec<Cluster> = proxy.fetch(CLUSTER, &[]).await;
    let dns = find(&clusters, "outbound|443||api.example.com");
    assert_eq!(
        dns.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(DiscoveryType::StrictDns as i32))
    );
    let target = format!("{:?}", dns.load_assignment);
    assert!(
        target.contains("api.example.com") && target.contains("443"),
        "{target}"
    );
    let passthrough = find(&clusters, "outbound|80||*.internal.example.com");
    assert_eq!(
        passthrough.cluster_discovery_type,
        Some(ClusterDiscoveryType::Type(
            DiscoveryType::OriginalDst as i32
        ))
    );
}

#[tokio::test]
async fn a_multi_cluster_gateway_answers_for_global_names_and_never_loops() {
    // Istio 1.1's multi-cluster gateway: other clusters call this one's
    // services as `<name>.<ns>.global` on 15443, naming the cluster in SNI.
    // This cluster also knows `ratings.shop.global`, a service of another
    // cluster behind that cluster's gateway.
    let config = format!(
        "{REVIEWS}---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {{name: cross-cluster, namespace: istio-system}}
spec:
  selector: {{istio: ingressgateway}}
  servers:
  - port: {{number: 15443, name: tls, protocol: TLS}}
    hosts: ['*.global']
    tls: {{mode: AUTO_PASSTHROUGH}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {{name: ratings-global, namespace: shop}}
spec:
  hosts: [ratings.shop.global]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: 9080, name: http, protocol: HTTP}}]
  endpoints: [{{address: 10.1.0.1, ports: {{http: 15443}}}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {{name: global, namespace: istio-system}}
spec:
  host: '*.global'
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
"
    );
    let cp = ControlPlane::start(&config).await;
    let id = "router~10.0.8.1~gw-1.istio-system~istio-system.svc.cluster.local";
    let mut gateway = cp
        .proxy(support::node(id, &[("istio", "ingressgateway")], &[]))
        .await;
    let clusters: Vec<Cluster> = gateway.fetch(CLUSTER, &[]).await;
    let names: Vec<&str> = clusters.iter().map(|c| c.name.as_str()).collect();
    // The local service under both names, with the outbound cluster's
    // endpoints and no TLS of its own (the caller's passes through).
    for name in [
        "outbound_.9080_._.reviews.shop.svc.cluster.local",
        "outbound_.9080_._.reviews.shop.global",
    ] {
        let c = find(&clusters, name);
        assert_eq!(
            c.eds_cluster_config.as_ref().unwrap().service_name,
            "outbound|9080||reviews.shop.svc.cluster.local"
        );
        assert!(c.transport_socket.is_none(), "{name} passes TLS through");
    }
    // The other cluster's service is not offered on: it would send the
    // connection back out to a gateway.
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with("outbound_.") && n.contains("ratings")),
        "{names:?}"
    );

    // A sidecar calls the remote service through that gateway, naming the
    // cluster the far gateway knows in SNI, over mesh mTLS.
    let mut sidecar = cp.sidecar("10.0.0.9", "shop", &[]).await;
    let clusters: Vec<Cluster> = sidecar.fetch(CLUSTER, &[]).await;
    let remote = find(&clusters, "outbound|9080||ratings.shop.global");
    assert_eq!(
        tls_of(remote).map(|t| t.sni).as_deref(),
        Some("outbound_.9080_._.ratings.shop.global")
    );
}
