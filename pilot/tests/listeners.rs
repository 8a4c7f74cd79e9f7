//! Listeners as proxies receive them over LDS (sidecars with and without
//! interception, gateways, proxyless gRPC clients), from config on the
//! real MCP path, asserted on their content.

mod support;

use std::collections::BTreeMap;

use envoy_types::pb::envoy::{
    config::{
        cluster::v3::Cluster,
        core::v3::{address, socket_address, transport_socket},
        listener::v3::{FilterChain, Listener, filter},
        rbac::v3::Rbac,
        route::v3::RouteConfiguration,
    },
    extensions::{
        filters::{
            http::rbac::v3::Rbac as RbacFilter,
            network::{
                http_connection_manager::v3::{
                    HttpConnectionManager, http_connection_manager, http_filter,
                },
                tcp_proxy::v3::{TcpProxy, tcp_proxy},
            },
        },
        transport_sockets::tls::v3::DownstreamTlsContext,
    },
};
use mesh_api::{
    kinds::{self, Body},
    mesh,
    object::versioned_resource,
    pb::istio::mesh::v1alpha1::mesh_config::{OutboundTrafficPolicy, outbound_traffic_policy},
};
use pilot::xds::{CLUSTER, LISTENER, ROUTE};
use support::{ControlPlane, node, unpack};

const SERVICES: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}, {number: 9443, name: tcp-admin, protocol: TCP}]
  endpoints:
  - {address: 10.0.0.1, labels: {app: reviews, version: v1}}
  - {address: 10.0.0.2, labels: {app: reviews, version: v2}}
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: mongo, namespace: data}
spec:
  hosts: [mongo.data.svc.cluster.local]
  addresses: [10.96.0.20]
  resolution: STATIC
  ports: [{number: 27017, name: mongo, protocol: MONGO}]
  endpoints: [{address: 10.0.5.1}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: archive, namespace: data}
spec:
  hosts: [archive.data.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: tcp-archive, protocol: TCP}]
  endpoints: [{address: 10.0.5.2}]
";

fn by_name<'a>(listeners: &'a [Listener], name: &str) -> &'a Listener {
    listeners
        .iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| {
            panic!(
                "listener {name} in {:?}",
                listeners.iter().map(|l| &l.name).collect::<Vec<_>>()
            )
        })
}

fn port_of(l: &Listener) -> (String, u32) {
    let Some(address::Address::SocketAddress(s)) = l.address.as_ref().unwrap().address.clone()
    else {
        panic!("a socket address")
    };
    let Some(socket_address::PortSpecifier::PortValue(p)) = s.port_specifier else {
        panic!("a port")
    };
    (s.address, p)
}

fn hcm(chain: &FilterChain) -> Option<HttpConnectionManager> {
    chain.filters.iter().find_map(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any))
            if f.name == "envoy.filters.network.http_connection_manager" =>
        {
            Some(unpack(any))
        }
        _ => None,
    })
}

fn tcp_target(chain: &FilterChain) -> Option<String> {
    chain.filters.iter().find_map(|f| match &f.config_type {
        Some(filter::ConfigType::TypedConfig(any))
            if f.name == "envoy.filters.network.tcp_proxy" =>
        {
            let proxy: TcpProxy = unpack(any);
            match proxy.cluster_specifier {
                Some(tcp_proxy::ClusterSpecifier::Cluster(c)) => Some(c),
                other => Some(format!("{other:?}")),
            }
        }
        _ => None,
    })
}

fn rds_name(chain: &FilterChain) -> String {
    match hcm(chain)
        .expect("an HTTP connection manager")
        .route_specifier
    {
        Some(http_connection_manager::RouteSpecifier::Rds(rds)) => rds.route_config_name,
        other => panic!("RDS, not {other:?}"),
    }
}

fn downstream_tls(chain: &FilterChain) -> Option<DownstreamTlsContext> {
    match chain.transport_socket.as_ref()?.config_type.as_ref()? {
        transport_socket::ConfigType::TypedConfig(any) => Some(unpack(any)),
    }
}

fn http_filters(chain: &FilterChain) -> Vec<String> {
    hcm(chain)
        .unwrap()
        .http_filters
        .iter()
        .map(|f| f.name.clone())
        .collect()
}

#[tokio::test]
async fn sidecar_outbound_listeners_follow_service_ports_and_the_traffic_policy() {
    let cp = ControlPlane::start(SERVICES).await;
    let mut proxy = cp.sidecar("10.0.9.9", "web", &[]).await;
    let listeners: Vec<Listener> = proxy.fetch(LISTENER, &[]).await;

    // A TCP service on the same port, listed first, does not take the
    // HTTP listener.
    let http = by_name(&listeners, "0.0.0.0_9080");
    assert_eq!(port_of(http), ("0.0.0.0".into(), 9080));
    assert!(
        !http.bind_to_port.unwrap().value,
        "reached through virtualOutbound"
    );
    assert_eq!(rds_name(&http.filter_chains[0]), "9080");
    assert_eq!(
        http_filters(&http.filter_chains[0]),
        [
            "envoy.filters.http.fault",
            "envoy.filters.http.cors",
            "envoy.filters.http.router"
        ]
    );
    // A TCP port without a virtual IP listens on the wildcard, one with a
    // virtual IP on it.
    let admin = by_name(&listeners, "0.0.0.0_9443");
    assert_eq!(
        tcp_target(&admin.filter_chains[0]).unwrap(),
        "outbound|9443||reviews.shop.svc.cluster.local"
    );
    let mongo = by_name(&listeners, "10.96.0.20_27017");
    assert_eq!(
        tcp_target(&mongo.filter_chains[0]).unwrap(),
        "outbound|27017||mongo.data.svc.cluster.local"
    );

    let outbound = by_name(&listeners, "virtualOutbound");
    assert_eq!(port_of(outbound).1, 15001);
    assert!(outbound.use_original_dst.unwrap().value);
    assert_eq!(
        tcp_target(&outbound.filter_chains[0]).unwrap(),
        "PassthroughCluster",
        "ALLOW_ANY by default"
    );

    // With REGISTRY_ONLY, unknown destinations go to the black hole.
    let mut config = mesh::defaults();
    config.outbound_traffic_policy = Some(OutboundTrafficPolicy {
        mode: outbound_traffic_policy::Mode::RegistryOnly as i32,
    });
    let body = Body::MeshConfig(Box::new(config));
    let resource = versioned_resource(
        "istio-system/meshconfig".into(),
        &body,
        &BTreeMap::new(),
        &BTreeMap::new(),
    );
    cp.store
        .replace(kinds::MESH_CONFIG, vec![resource])
        .unwrap();
    proxy
        .until(LISTENER, |ls: &[Listener]| {
            tcp_target(&by_name(ls, "virtualOutbound").filter_chains[0]).as_deref()
                == Some("BlackHoleCluster")
        })
        .await;
}

const SECURITY: &str = "
---
apiVersion: authentication.istio.io/v1alpha1
kind: MeshPolicy
metadata: {name: default}
spec:
  peers: [{mtls: {}}]
---
apiVersion: authentication.istio.io/v1alpha1
kind: Policy
metadata: {name: reviews-admin, namespace: shop}
spec:
  targets: [{name: reviews, ports: [{number: 9443}]}]
  peers: [{mtls: {mode: PERMISSIVE}}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ClusterRbacConfig
metadata: {name: default}
spec:
  mode: ON_WITH_INCLUSION
  inclusion: {namespaces: [shop]}
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: reviews-reader, namespace: shop}
spec:
  rules:
  - services: [reviews.shop.svc.cluster.local]
    methods: [GET]
    paths: [/reviews*]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {name: productpage-reads, namespace: shop}
spec:
  subjects:
  - user: cluster.local/ns/shop/sa/productpage
  - properties: {source.namespace: web}
  roleRef: {kind: ServiceRole, name: reviews-reader}
";

#[tokio::test]
async fn inbound_ports_get_mtls_by_policy_and_rbac_by_role() {
    let cp = ControlPlane::start(&format!("{SERVICES}{SECURITY}")).await;
    let mut reviews = cp
        .sidecar("10.0.0.1", "shop", &[("app", "reviews"), ("version", "v1")])
        .await;
    let listeners: Vec<Listener> = reviews.fetch(LISTENER, &[]).await;
    let inbound = by_name(&listeners, "virtualInbound");
    assert_eq!(port_of(inbound).1, 15006);
    let chains_for = |port: u32| -> Vec<&FilterChain> {
        inbound
            .filter_chains
            .iter()
            .filter(|c| {
                c.filter_chain_match
                    .as_ref()
                    .and_then(|m| m.destination_port)
                    .map(|p| p.value)
                    == Some(port)
            })
            .collect()
    };
    // The mesh policy makes 9080 STRICT: one chain, TLS, client certificate required.
    let http = chains_for(9080);
    assert_eq!(http.len(), 1);
    let tls = downstream_tls(http[0]).expect("TLS on a STRICT port");
    assert!(tls.require_client_certificate.unwrap().value);
    assert_eq!(
        tls.common_tls_context
            .unwrap()
            .tls_certificate_sds_secret_configs[0]
            .name,
        "default"
    );
    // RBAC before the router, with the role's permissions and principals.
    assert_eq!(
        http_filters(http[0]),
        ["envoy.filters.http.rbac", "envoy.filters.http.router"]
    );
    let hcm = hcm(http[0]).unwrap();
    let Some(http_filter::ConfigType::TypedConfig(any)) = &hcm.http_filters[0].config_type else {
        panic!()
    };
    let rbac: RbacFilter = unpack(any);
    let rules: Rbac = rbac.rules.expect("enforced rules");
    let policy = &rules.policies["reviews-reader"];
    let text = format!("{policy:?}");
    assert!(text.contains("GET") && text.contains("/reviews"), "{text}");
    assert!(
        text.contains("spiffe://cluster.local/ns/shop/sa/productpage"),
        "{text}"
    );
    assert!(text.contains("/ns/web/"), "{text}");
    // The inbound route reaches the application on its port.
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)) = hcm.route_specifier
    else {
        panic!()
    };
    let route = format!("{:?}", routes.virtual_hosts[0].routes[0]);
    assert!(route.contains("inbound|9080|http|reviews.shop.svc.cluster.local"));

    // The port-level policy makes 9443 PERMISSIVE: mesh TLS by ALPN, or plaintext.
    let admin = chains_for(9443);
    assert_eq!(admin.len(), 2);
    let m = admin[0].filter_chain_match.as_ref().unwrap();
    assert_eq!(
        (
            m.transport_protocol.as_str(),
            m.application_protocols.clone()
        ),
        ("tls", vec!["istio".to_string()])
    );
    assert!(downstream_tls(admin[0]).is_some());
    assert!(downstream_tls(admin[1]).is_none());
    assert_eq!(
        tcp_target(admin[1]).unwrap(),
        "inbound|9443|tcp-admin|reviews.shop.svc.cluster.local"
    );
    assert!(
        inbound
            .listener_filters
            .iter()
            .any(|f| f.name == "envoy.filters.listener.tls_inspector")
    );

    // The inbound cluster points at the application on loopback.
    let clusters: Vec<Cluster> = reviews.fetch(CLUSTER, &[]).await;
    let app = clusters
        .iter()
        .find(|c| c.name == "inbound|9080|http|reviews.shop.svc.cluster.local")
        .unwrap();
    let target = format!("{:?}", app.load_assignment);
    assert!(
        target.contains("127.0.0.1") && target.contains("9080"),
        "{target}"
    );

    // Another workload's proxy (v2) has its own inbound ports; a proxy of
    // no workload has none.
    let mut stranger = cp.sidecar("10.0.9.9", "web", &[]).await;
    let listeners: Vec<Listener> = stranger.fetch(LISTENER, &[]).await;
    assert_eq!(
        by_name(&listeners, "virtualInbound").filter_chains.len(),
        1,
        "passthrough only"
    );
}

const LOCAL: &str = "
---
apiVersion: networking.istio.io/v1alpha3
kind: Sidecar
metadata: {name: reviews, namespace: shop}
spec:
  workloadSelector: {labels: {app: reviews}}
  ingress:
  - port: {number: 19080, protocol: HTTP, name: http}
    defaultEndpoint: 127.0.0.1:9080
  egress:
  - port: {number: 15101, protocol: HTTP, name: http-proxy}
    bind: 127.0.0.1
    hosts: [./*]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: local-reviews, namespace: shop}
spec:
  hosts: [local-reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1, ports: {http: 19080}, labels: {app: reviews}}]
";

#[tokio::test]
async fn without_interception_listeners_bind_and_a_sidecar_scopes_what_is_seen() {
    let cp = ControlPlane::start(&format!("{SERVICES}{LOCAL}")).await;
    let id = "sidecar~127.0.0.1~reviews-1.shop~shop.svc.cluster.local";
    let mut proxy = cp
        .proxy(node(
            id,
            &[("app", "reviews")],
            &[("INTERCEPTION_MODE", "NONE")],
        ))
        .await;
    let listeners: Vec<Listener> = proxy.fetch(LISTENER, &[]).await;
    let names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    assert!(
        !names.contains(&"virtualOutbound") && !names.contains(&"virtualInbound"),
        "{names:?}"
    );
    // The egress listener is an HTTP proxy on its own port, bound.
    let egress = by_name(&listeners, "127.0.0.1_15101");
    assert!(egress.bind_to_port.is_none(), "binds (the default)");
    assert_eq!(rds_name(&egress.filter_chains[0]), "15101");
    // The ingress listener binds the Sidecar's port and reaches the app
    // at its default endpoint.
    let ingress = by_name(&listeners, "0.0.0.0_19080");
    assert_eq!(port_of(ingress), ("0.0.0.0".into(), 19080));
    let clusters: Vec<Cluster> = proxy.fetch(CLUSTER, &[]).await;
    let app = clusters
        .iter()
        .find(|c| c.name.starts_with("inbound|19080|"))
        .expect("inbound cluster");
    let target = format!("{:?}", app.load_assignment);
    assert!(
        target.contains("127.0.0.1") && target.contains("9080"),
        "{target}"
    );
    // `./*` sees the shop namespace only.
    assert!(
        clusters
            .iter()
            .any(|c| c.name == "outbound|9080||reviews.shop.svc.cluster.local")
    );
    assert!(
        !clusters.iter().any(|c| c.name.contains("mongo.data")),
        "mongo is in another namespace"
    );

    // Through the proxy port every HTTP service of the scope is routable
    // by host and port.
    let routes: Vec<RouteConfiguration> = proxy.fetch(ROUTE, &["15101"]).await;
    let domains: Vec<&String> = routes[0]
        .virtual_hosts
        .iter()
        .flat_map(|v| &v.domains)
        .collect();
    assert!(domains.iter().any(|d| *d == "reviews:9080"), "{domains:?}");
    assert!(
        domains
            .iter()
            .any(|d| *d == "local-reviews.shop.svc.cluster.local:9080"),
        "{domains:?}"
    );
    assert!(
        domains.iter().all(|d| d.ends_with(":9080")),
        "only names with ports: {domains:?}"
    );
}

const GATEWAY: &str = "
---
apiVersion: networking.istio.io/v1alpha3
kind: Gateway
metadata: {name: shop-gateway, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [shop.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [shop.example.com]
    tls: {mode: SIMPLE, serverCertificate: /etc/gw/cert.pem, privateKey: /etc/gw/key.pem}
  - port: {number: 8443, name: https-sds, protocol: HTTPS}
    hosts: [api.example.com]
    tls: {mode: SIMPLE, credentialName: api-cert}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: shop, namespace: shop}
spec:
  hosts: [shop.example.com]
  gateways: [shop-gateway]
  http:
  - match: [{uri: {prefix: /reviews}}]
    route: [{destination: {host: reviews, port: {number: 9080}}}]
";

#[tokio::test]
async fn gateways_listen_on_their_servers_and_route_bound_virtual_services() {
    let cp = ControlPlane::start(&format!("{SERVICES}{GATEWAY}")).await;
    let id = "router~10.0.8.1~ingress-1.istio-system~istio-system.svc.cluster.local";
    let mut gw = cp
        .proxy(node(id, &[("istio", "ingressgateway")], &[]))
        .await;
    let listeners: Vec<Listener> = gw.fetch(LISTENER, &[]).await;
    let mut names: Vec<&str> = listeners.iter().map(|l| l.name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["0.0.0.0_443", "0.0.0.0_80", "0.0.0.0_8443"]);
    let https = by_name(&listeners, "0.0.0.0_443");
    let chain = &https.filter_chains[0];
    assert_eq!(
        chain.filter_chain_match.as_ref().unwrap().server_names,
        ["shop.example.com"]
    );
    let tls = downstream_tls(chain).unwrap().common_tls_context.unwrap();
    let cert = format!("{:?}", tls.tls_certificates);
    assert!(cert.contains("/etc/gw/cert.pem") && cert.contains("/etc/gw/key.pem"));
    assert_eq!(rds_name(chain), "https.443.https");
    let sds = downstream_tls(&by_name(&listeners, "0.0.0.0_8443").filter_chains[0]).unwrap();
    assert_eq!(
        sds.common_tls_context
            .unwrap()
            .tls_certificate_sds_secret_configs[0]
            .name,
        "api-cert"
    );

    let routes: Vec<RouteConfiguration> = gw.fetch(ROUTE, &["http.80", "https.443.https"]).await;
    let http = routes.iter().find(|r| r.name == "http.80").unwrap();
    let vh = &http.virtual_hosts[0];
    assert!(vh.domains.contains(&"shop.example.com".to_string()));
    assert_eq!(vh.require_tls, 2, "httpsRedirect: ALL");
    let route = format!("{:?}", vh.routes[0]);
    assert!(
        route.contains("outbound|9080||reviews.shop.svc.cluster.local")
            && route.contains("/reviews")
    );
    let secure = routes.iter().find(|r| r.name == "https.443.https").unwrap();
    assert_eq!(secure.virtual_hosts[0].require_tls, 0);

    // A sidecar does not get the gateway-bound routes.
    let mut sidecar = cp.sidecar("10.0.9.9", "shop", &[]).await;
    let routes: Vec<RouteConfiguration> = sidecar.fetch(ROUTE, &["9080"]).await;
    assert!(
        !routes[0]
            .virtual_hosts
            .iter()
            .any(|v| v.domains.iter().any(|d| d.contains("shop.example.com")))
    );
}

#[tokio::test]
async fn proxyless_grpc_clients_get_an_api_listener_per_target() {
    let cp = ControlPlane::start(SERVICES).await;
    let mut client = cp.sidecar("10.0.9.9", "web", &[]).await;
    let target = "reviews.shop.svc.cluster.local:9080";
    let listeners: Vec<Listener> = client.fetch(LISTENER, &[target]).await;
    assert_eq!(listeners.len(), 1);
    let api = listeners[0].api_listener.as_ref().expect("an API listener");
    let hcm: HttpConnectionManager = unpack(api.api_listener.as_ref().unwrap());
    let Some(http_connection_manager::RouteSpecifier::RouteConfig(routes)) = hcm.route_specifier
    else {
        panic!("inline routes")
    };
    assert!(
        routes.virtual_hosts[0]
            .domains
            .contains(&target.to_string())
    );
    assert!(
        format!("{:?}", routes.virtual_hosts[0].routes[0])
            .contains("outbound|9080||reviews.shop.svc.cluster.local")
    );
    assert_eq!(
        hcm.http_filters.last().unwrap().name,
        "envoy.filters.http.router"
    );
    // A wildcard request (Envoy's) never carries API listeners.
    let all: Vec<Listener> = client.fetch(LISTENER, &[]).await;
    assert!(all.iter().all(|l| l.api_listener.is_none()));
}
