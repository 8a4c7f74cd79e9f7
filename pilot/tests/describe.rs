//! `/debug/authenticationz` and `/debug/describe`, the pages behind
//! `meshctl authn tls-check` and `meshctl describe`, against Pilot
//! following config over MCP, with a proxy connected over ADS.

mod support;

use axum::body::Body;
use serde_json::Value;
use support::ControlPlane;
use tower::ServiceExt;

const CONFIG: &str = "
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
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.3}]
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
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews.shop.svc.cluster.local
  trafficPolicy: {tls: {mode: ISTIO_MUTUAL}}
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: ratings-plain, namespace: shop}
spec:
  host: ratings.shop.svc.cluster.local
  trafficPolicy: {tls: {mode: DISABLE}}
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v2}}]}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ClusterRbacConfig
metadata: {name: default}
spec:
  mode: ON_WITH_INCLUSION
  inclusion: {services: [reviews.shop.svc.cluster.local]}
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: reviews-reader, namespace: shop}
spec:
  rules: [{services: [reviews.shop.svc.cluster.local], methods: [GET]}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRole
metadata: {name: ratings-reader, namespace: shop}
spec:
  rules: [{services: [ratings.shop.svc.cluster.local], methods: [GET]}]
---
apiVersion: rbac.istio.io/v1alpha1
kind: ServiceRoleBinding
metadata: {name: productpage-reads, namespace: shop}
spec:
  subjects: [{user: cluster.local/ns/shop/sa/productpage}]
  roleRef: {kind: ServiceRole, name: reviews-reader}
";

/// GET `path` of Pilot's admin routes: status and JSON (or text).
async fn page(cp: &ControlPlane, path: &str) -> (u16, String) {
    let request = axum::http::Request::get(path).body(Body::empty()).unwrap();
    let response = cp.admin.router().oneshot(request).await.unwrap();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8(body.to_vec()).unwrap())
}

async fn json(cp: &ControlPlane, path: &str) -> Value {
    let (status, body) = page(cp, path).await;
    assert_eq!(status, 200, "{path}: {body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test]
async fn tls_check_sets_each_ports_server_side_against_its_clients() {
    let cp = ControlPlane::start(CONFIG).await;
    // A proxy that has its config has seen the whole model.
    let mut proxy = cp
        .sidecar("10.0.0.1", "shop", &[("app", "reviews"), ("version", "v1")])
        .await;
    proxy
        .fetch::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(pilot::xds::CLUSTER, &[])
        .await;

    let checks = json(&cp, "/debug/authenticationz").await;
    let row = |host: &str, port: u64| {
        checks
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["host"] == host && c["port"] == port)
            .unwrap_or_else(|| panic!("{host}:{port} in {checks}"))
            .clone()
    };
    let reviews = row("reviews.shop.svc.cluster.local", 9080);
    assert_eq!(reviews["server_protocol"], "mTLS", "{reviews}");
    assert_eq!(reviews["client_protocol"], "mTLS", "{reviews}");
    assert_eq!(reviews["TLS_conflict_status"], "OK", "{reviews}");
    assert_eq!(
        reviews["authentication_policy_name"], "default/",
        "the MeshPolicy"
    );
    assert_eq!(reviews["destination_rule_name"], "reviews/shop");
    // The port-level policy: plaintext or mTLS, either client is fine.
    let admin = row("reviews.shop.svc.cluster.local", 9443);
    assert_eq!(admin["server_protocol"], "HTTP/mTLS", "{admin}");
    assert_eq!(admin["authentication_policy_name"], "reviews-admin/shop");
    assert_eq!(admin["TLS_conflict_status"], "OK");
    // STRICT server, clients told to send plaintext: the conflict.
    let ratings = row("ratings.shop.svc.cluster.local", 9080);
    assert_eq!(ratings["server_protocol"], "mTLS", "{ratings}");
    assert_eq!(ratings["client_protocol"], "HTTP", "{ratings}");
    assert_eq!(ratings["TLS_conflict_status"], "CONFLICT", "{ratings}");
    assert_eq!(ratings["destination_rule_name"], "ratings-plain/shop");

    // Asked for one service, by a prefix of its host.
    let one = json(&cp, "/debug/authenticationz?service=ratings").await;
    assert_eq!(one.as_array().unwrap().len(), 1, "{one}");
}

#[tokio::test]
async fn describe_names_what_applies_to_a_service_and_a_pod_and_why() {
    let cp = ControlPlane::start(CONFIG).await;
    let mut proxy = cp
        .sidecar("10.0.0.2", "shop", &[("app", "reviews"), ("version", "v2")])
        .await;
    proxy
        .fetch::<envoy_types::pb::envoy::config::cluster::v3::Cluster>(pilot::xds::CLUSTER, &[])
        .await;

    let answer = json(&cp, "/debug/describe?service=reviews.shop").await;
    let reviews = &answer["services"][0];
    assert_eq!(
        reviews["host"], "reviews.shop.svc.cluster.local",
        "{answer}"
    );
    assert_eq!(
        reviews["virtual_services"][0]["name"], "reviews",
        "{reviews}"
    );
    assert_eq!(
        reviews["virtual_services"][0]["gateways"],
        serde_json::json!(["mesh"])
    );
    assert_eq!(reviews["destination_rule"]["name"], "reviews", "{reviews}");
    assert_eq!(reviews["destination_rule"]["tls_mode"], "ISTIO_MUTUAL");
    assert_eq!(reviews["ports"][0]["server_mode"], "STRICT", "{reviews}");
    assert_eq!(
        reviews["ports"][1]["server_mode"], "PERMISSIVE",
        "{reviews}"
    );
    // RBAC is on for reviews (the inclusion lists it); one role names it,
    // bound once.
    assert_eq!(reviews["rbac"]["enabled"], true, "{reviews}");
    let roles = reviews["rbac"]["roles"].as_array().unwrap();
    assert_eq!(
        roles.len(),
        1,
        "ratings-reader does not name reviews: {roles:?}"
    );
    assert_eq!(roles[0]["name"], "reviews-reader");
    assert_eq!(
        roles[0]["bindings"],
        serde_json::json!(["productpage-reads"])
    );
    // ratings is left out of RBAC, and has no VirtualService.
    let ratings = json(&cp, "/debug/describe?service=ratings").await;
    let ratings = &ratings["services"][0];
    assert_eq!(ratings["rbac"]["enabled"], false, "{ratings}");
    assert!(
        ratings["rbac"]["why"]
            .as_str()
            .unwrap()
            .contains("ON_WITH_INCLUSION")
    );
    assert_eq!(ratings["virtual_services"], serde_json::json!([]));

    // The pod behind the connected proxy: its service, and its subset.
    let pod = json(&cp, "/debug/describe?pod=app.shop").await;
    assert_eq!(pod["namespace"], "shop", "{pod}");
    assert_eq!(pod["services"][0]["host"], "reviews.shop.svc.cluster.local");
    let subsets = &pod["services"][0]["destination_rule"]["subsets"];
    assert_eq!(subsets[0]["pod_matches"], false, "{subsets}");
    assert_eq!(subsets[1]["pod_matches"], true, "v2: {subsets}");
    // And what Pilot sent it.
    assert_eq!(
        pod["sync"]["types"][pilot::xds::CLUSTER]["sent_version"],
        "1",
        "{pod}"
    );

    // What cannot be answered is said, as the client's error.
    let (status, body) = page(&cp, "/debug/describe?service=nothing").await;
    assert_eq!(status, 400);
    assert!(body.contains("no service is named \"nothing\""), "{body}");
    let (status, body) = page(&cp, "/debug/describe?pod=gone.shop").await;
    assert_eq!(status, 400);
    assert!(body.contains("no proxy of a pod named"), "{body}");
    let (status, _) = page(&cp, "/debug/describe").await;
    assert_eq!(status, 400);
}
