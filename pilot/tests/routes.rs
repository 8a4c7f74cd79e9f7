//! HTTP routes from VirtualServices, as a sidecar receives them over RDS,
//! from config on the real MCP path.

mod support;

use envoy_types::pb::envoy::{
    config::route::v3::{
        Route, RouteAction, RouteConfiguration, VirtualHost, header_matcher, route, route_action,
        route_match::PathSpecifier,
    },
    extensions::filters::http::{cors::v3::CorsPolicy, fault::v3::HttpFault},
    r#type::matcher::v3::string_matcher::MatchPattern,
};
use pilot::xds::ROUTE;
use support::{ControlPlane, unpack};

const SERVICES: &str = "
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.0.1, labels: {version: v1}}, {address: 10.0.0.2, labels: {version: v2}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: {name: ratings, namespace: shop}
spec:
  hosts: [ratings.shop.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 9080, name: http, protocol: HTTP}]
  endpoints: [{address: 10.0.1.1}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: user, ttl: 10s}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
";

const REVIEWS_VS: &str = "
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: reviews, namespace: shop}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}}
      uri: {prefix: /reviews}
      method: {exact: GET}
      queryParams: {debug: {regex: '[01]'}}
    - authority: {prefix: reviews.example}
      uri: {exact: /exact}
    route:
    - destination: {host: reviews, subset: v2}
    timeout: 3s
    retries: {attempts: 5, perTryTimeout: 1s, retryOn: 'gateway-error,503'}
    headers:
      request: {set: {x-route: jason}, remove: [x-debug]}
      response: {add: {x-served-by: v2}}
  - match:
    - sourceLabels: {app: productpage}
      uri: {regex: '/v[0-9]+/.*'}
    fault:
      delay: {fixedDelay: 2s, percentage: {value: 12.5}}
      abort: {httpStatus: 503, percent: 10}
    mirror: {host: ratings}
    corsPolicy: {allowOrigin: ['*'], allowMethods: [GET, POST], maxAge: 24h, allowCredentials: true}
    route:
    - destination: {host: reviews, subset: v1}
  - match:
    - uri: {prefix: /old}
    redirect: {uri: /new, authority: new.example.com}
  - match:
    - uri: {prefix: /api}
    rewrite: {uri: /v2/api, authority: backend.example.com}
    websocketUpgrade: true
    route:
    - destination: {host: reviews, subset: v1}
  - match:
    - port: 8000
    route:
    - destination: {host: ratings}
  - route:
    - destination: {host: reviews, subset: v1}
      weight: 75
      headers: {request: {set: {x-weight: seventy-five}}}
    - destination: {host: reviews, subset: v2}
      weight: 25
    retries: {attempts: 0}
";

fn vhost<'a>(config: &'a RouteConfiguration, domain: &str) -> &'a VirtualHost {
    config
        .virtual_hosts
        .iter()
        .find(|v| v.domains.iter().any(|d| d == domain))
        .unwrap_or_else(|| panic!("a virtual host for {domain}"))
}

fn action(r: &Route) -> &RouteAction {
    let Some(route::Action::Route(a)) = &r.action else {
        panic!("a route action")
    };
    a
}

fn cluster(r: &Route) -> &str {
    let Some(route_action::ClusterSpecifier::Cluster(c)) = &action(r).cluster_specifier else {
        panic!("a single cluster")
    };
    c
}

fn path(r: &Route) -> String {
    match r.r#match.as_ref().unwrap().path_specifier.as_ref().unwrap() {
        PathSpecifier::Prefix(p) => format!("prefix {p}"),
        PathSpecifier::Path(p) => format!("exact {p}"),
        PathSpecifier::SafeRegex(r) => format!("regex {}", r.regex),
        other => format!("{other:?}"),
    }
}

fn header_pattern(r: &Route, name: &str) -> Option<MatchPattern> {
    r.r#match
        .as_ref()
        .unwrap()
        .headers
        .iter()
        .find(|h| h.name == name)
        .and_then(|h| match &h.header_match_specifier {
            Some(header_matcher::HeaderMatchSpecifier::StringMatch(m)) => m.match_pattern.clone(),
            _ => None,
        })
}

const V1: &str = "outbound|9080|v1|reviews.shop.svc.cluster.local";
const V2: &str = "outbound|9080|v2|reviews.shop.svc.cluster.local";

#[tokio::test]
async fn virtual_service_matches_and_actions_become_routes() {
    let cp = ControlPlane::start(&format!("{SERVICES}{REVIEWS_VS}")).await;
    let mut product = cp
        .sidecar("10.0.2.1", "shop", &[("app", "productpage")])
        .await;
    let configs: Vec<RouteConfiguration> = product.fetch(ROUTE, &["9080"]).await;
    let config = &configs[0];
    assert_eq!(config.name, "9080");
    let reviews = vhost(config, "reviews.shop.svc.cluster.local:9080");
    for short in [
        "reviews",
        "reviews:9080",
        "reviews.shop",
        "reviews.shop.svc.cluster.local",
    ] {
        assert!(
            reviews.domains.iter().any(|d| d == short),
            "{short} in {:?}",
            reviews.domains
        );
    }
    let routes = &reviews.routes;
    // Two matches of the first HTTP route, then one route per later match;
    // the port-8000 match does not apply on 9080.
    assert_eq!(
        routes.iter().map(path).collect::<Vec<_>>(),
        [
            "prefix /reviews",
            "exact /exact",
            "regex /v[0-9]+/.*",
            "prefix /old",
            "prefix /api",
            "prefix /"
        ]
    );

    let jason = &routes[0];
    assert_eq!(
        header_pattern(jason, "end-user"),
        Some(MatchPattern::Exact("jason".into()))
    );
    assert_eq!(
        header_pattern(jason, ":method"),
        Some(MatchPattern::Exact("GET".into()))
    );
    let query = &jason.r#match.as_ref().unwrap().query_parameters[0];
    assert_eq!(query.name, "debug");
    assert!(format!("{query:?}").contains("[01]"));
    assert_eq!(cluster(jason), V2);
    let a = action(jason);
    assert_eq!(a.timeout.unwrap().seconds, 3);
    let retry = a.retry_policy.as_ref().unwrap();
    assert_eq!(retry.num_retries.unwrap().value, 5);
    assert_eq!(retry.per_try_timeout.unwrap().seconds, 1);
    assert_eq!(retry.retry_on, "gateway-error");
    assert_eq!(retry.retriable_status_codes, [503]);
    assert_eq!(
        jason.request_headers_to_add[0].header.as_ref().unwrap().key,
        "x-route"
    );
    assert_eq!(jason.request_headers_to_remove, ["x-debug"]);
    assert_eq!(
        jason.response_headers_to_add[0]
            .header
            .as_ref()
            .unwrap()
            .value,
        "v2"
    );
    // The DestinationRule's consistent hash becomes the route's hash policy.
    assert!(
        format!("{:?}", a.hash_policy).contains("user"),
        "{:?}",
        a.hash_policy
    );
    assert_eq!(
        header_pattern(&routes[1], ":authority"),
        Some(MatchPattern::Prefix("reviews.example".into()))
    );

    // Fault, mirror and CORS for the productpage source only.
    let faulty = &routes[2];
    let fault: HttpFault = unpack(&faulty.typed_per_filter_config["envoy.filters.http.fault"]);
    let delay = fault.delay.unwrap();
    assert_eq!(
        delay.percentage.unwrap().numerator,
        125_000,
        "12.5% in millionths"
    );
    let abort = fault.abort.unwrap();
    assert_eq!(abort.percentage.unwrap().numerator, 10);
    assert!(format!("{:?}", abort.error_type).contains("503"));
    assert_eq!(
        action(faulty).request_mirror_policies[0].cluster,
        "outbound|9080||ratings.shop.svc.cluster.local"
    );
    let cors: CorsPolicy = unpack(&faulty.typed_per_filter_config["envoy.filters.http.cors"]);
    assert_eq!(cors.allow_methods, "GET,POST");
    assert_eq!(cors.max_age, "86400");
    assert!(cors.allow_credentials.unwrap().value);

    let Some(route::Action::Redirect(redirect)) = &routes[3].action else {
        panic!("a redirect")
    };
    assert_eq!(redirect.host_redirect, "new.example.com");
    assert!(format!("{:?}", redirect.path_rewrite_specifier).contains("/new"));
    let rewrite = action(&routes[4]);
    assert_eq!(rewrite.prefix_rewrite, "/v2/api");
    assert!(format!("{:?}", rewrite.host_rewrite_specifier).contains("backend.example.com"));
    assert_eq!(rewrite.upgrade_configs[0].upgrade_type, "websocket");

    let Some(route_action::ClusterSpecifier::WeightedClusters(weighted)) =
        &action(&routes[5]).cluster_specifier
    else {
        panic!("weighted clusters")
    };
    let weights: Vec<(&str, u32)> = weighted
        .clusters
        .iter()
        .map(|c| (c.name.as_str(), c.weight.unwrap().value))
        .collect();
    assert_eq!(weights, [(V1, 75), (V2, 25)]);
    assert_eq!(
        weighted.clusters[0].request_headers_to_add[0]
            .header
            .as_ref()
            .unwrap()
            .value,
        "seventy-five"
    );
    assert!(
        action(&routes[5]).retry_policy.is_none(),
        "attempts: 0 disables retries"
    );

    // A service without a VirtualService gets the default route.
    let ratings = vhost(config, "ratings:9080");
    let default = &ratings.routes[0];
    assert_eq!(
        cluster(default),
        "outbound|9080||ratings.shop.svc.cluster.local"
    );
    assert_eq!(action(default).timeout.unwrap().seconds, 0);
    assert_eq!(
        action(default)
            .retry_policy
            .as_ref()
            .unwrap()
            .num_retries
            .unwrap()
            .value,
        2
    );

    // Another source does not get the productpage-only route, and sees
    // short names only for its own namespace.
    let mut other = cp.sidecar("10.0.3.1", "web", &[("app", "web")]).await;
    let configs: Vec<RouteConfiguration> = other.fetch(ROUTE, &["9080"]).await;
    let reviews = vhost(&configs[0], "reviews.shop:9080");
    assert!(!reviews.domains.iter().any(|d| d == "reviews"));
    assert!(!reviews.routes.iter().any(|r| path(r).starts_with("regex")));
}

#[tokio::test]
async fn a_virtual_service_change_reaches_every_connected_proxy() {
    let cp = ControlPlane::start(&format!("{SERVICES}{REVIEWS_VS}")).await;
    let mut proxies = Vec::new();
    for i in 0..5 {
        let mut p = cp.sidecar(&format!("10.0.4.{i}"), "shop", &[]).await;
        let _: Vec<RouteConfiguration> = p.fetch(ROUTE, &["9080"]).await;
        proxies.push(p);
    }
    cp.publish(&format!(
        "{SERVICES}{}",
        REVIEWS_VS.replace("timeout: 3s", "timeout: 7s")
    ));
    for p in &mut proxies {
        let configs: Vec<RouteConfiguration> = p
            .until(ROUTE, |c: &[RouteConfiguration]| {
                let jason = &vhost(&c[0], "reviews:9080").routes[0];
                action(jason).timeout.unwrap().seconds == 7
            })
            .await;
        assert_eq!(configs.len(), 1);
    }
}
