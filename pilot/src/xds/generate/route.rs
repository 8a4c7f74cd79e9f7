//! HTTP routes from VirtualServices: every match (uri, headers, method,
//! authority, scheme, query parameters, port, source labels, gateways) and
//! every action (weighted destinations with subsets, redirect, rewrite,
//! timeout, retries, fault injection, mirroring, CORS, header operations),
//! and Istio's default route for a service no VirtualService names.
//!
//! A sidecar's outbound route configuration is named for its listener port
//! (`"9080"`): a virtual host per VirtualService and per remaining service
//! on that port, with every name a caller may use as its domains.

use std::collections::{BTreeMap, BTreeSet};

use envoy_types::pb::{
    envoy::{
        config::{
            core::v3::{HeaderValue, HeaderValueOption, header_value_option::HeaderAppendAction},
            route::v3::{
                HeaderMatcher, QueryParameterMatcher, RedirectAction, RetryPolicy, Route,
                RouteAction, RouteConfiguration, RouteMatch, VirtualHost, WeightedCluster,
                header_matcher, query_parameter_matcher, redirect_action,
                retry_policy::RetryHostPredicate, route, route_action, route_match::PathSpecifier,
                weighted_cluster::ClusterWeight,
            },
        },
        extensions::{
            filters::{
                common::fault::v3::{FaultDelay, fault_delay},
                http::{
                    cors::v3::CorsPolicy,
                    fault::v3::{FaultAbort, HttpFault, fault_abort},
                },
            },
            retry::host::previous_hosts::v3::PreviousHostsPredicate,
        },
        r#type::{
            matcher::v3::{RegexMatcher, StringMatcher, string_matcher},
            v3::{FractionalPercent, fractional_percent::DenominatorType},
        },
    },
    google::protobuf::{BoolValue, Duration, UInt32Value},
};
use mesh_api::pb::istio::networking::v1alpha3::{
    Destination, HttpFaultInjection, HttpMatchRequest, HttpRetry, HttpRoute, Percent, StringMatch,
    VirtualService,
    headers::HeaderOperations,
    http_fault_injection::{abort, delay},
    load_balancer_settings::{self, consistent_hash_lb::HashKey},
    port_selector,
    string_match::MatchType,
};

use super::{Scope, any, cluster, duration};
use crate::model::{self, Named, Service, host};

/// The filters whose per-route settings routes carry; outbound HTTP
/// connection managers run them before the router.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

/// A listener's view for routing: its port, and which gateways it serves
/// (`mesh` for sidecars).
pub struct RouteContext<'a> {
    pub scope: &'a Scope<'a>,
    pub port: u32,
    pub gateways: &'a [String],
}

/// The route configuration of a sidecar's outbound HTTP listener on `port`.
/// When `port` is a port of none of the services in view (a Sidecar egress
/// listener used as an HTTP proxy), every HTTP port of every service is in
/// it, named with its port.
pub fn sidecar_outbound(scope: &Scope, port: u32) -> RouteConfiguration {
    let services: Vec<&Service> = scope.egress_services(port).collect();
    let proxy_mode = !services
        .iter()
        .any(|s| s.port(port).is_some_and(|p| p.protocol.is_http()));
    let mut targets: Vec<(&Service, u32)> = Vec::new();
    for service in services {
        for p in service.ports.iter().filter(|p| p.protocol.is_http()) {
            if proxy_mode || p.number == port {
                targets.push((service, p.number));
            }
        }
    }
    let gateways = ["mesh".to_string()];
    let mut domains_taken = BTreeSet::new();
    let mut virtual_hosts = Vec::new();
    let mut covered: BTreeSet<(&str, u32)> = BTreeSet::new();
    for vs in scope.virtual_services("mesh") {
        let mut by_port: BTreeMap<u32, Vec<&Service>> = BTreeMap::new();
        for (service, p) in &targets {
            if vs.spec.hosts.iter().any(|h| host::covers(h, &service.host)) {
                by_port.entry(*p).or_default().push(service);
            }
        }
        if by_port.is_empty() && !proxy_mode {
            // Hosts outside the registry are still routable by name.
            by_port.insert(port, Vec::new());
        }
        for (p, services) in by_port {
            let ctx = RouteContext {
                scope,
                port: p,
                gateways: &gateways,
            };
            let routes = http_routes(&ctx, vs);
            if routes.is_empty() {
                continue;
            }
            let mut names: Vec<String> = Vec::new();
            for s in &services {
                covered.insert((s.host.as_str(), p));
                names.extend(host::domains(&s.host, p, &scope.proxy.namespace));
            }
            for h in vs
                .spec
                .hosts
                .iter()
                .filter(|h| !services.iter().any(|s| &s.host == *h))
            {
                names.extend([format!("{h}:{p}"), h.clone()]);
            }
            let first = names.first().cloned().unwrap_or_default();
            if let Some(vh) = virtual_host(&first, names, proxy_mode, p, &mut domains_taken, routes)
            {
                virtual_hosts.push(vh);
            }
        }
    }
    for (service, p) in &targets {
        if covered.contains(&(service.host.as_str(), *p)) {
            continue;
        }
        let names = host::domains(&service.host, *p, &scope.proxy.namespace);
        let routes = vec![default_route(scope, service, *p)];
        let name = format!("{}:{p}", service.host);
        if let Some(vh) = virtual_host(&name, names, proxy_mode, *p, &mut domains_taken, routes) {
            virtual_hosts.push(vh);
        }
    }
    RouteConfiguration {
        name: port.to_string(),
        virtual_hosts,
        validate_clusters: Some(BoolValue { value: false }),
        ..Default::default()
    }
}

/// A virtual host with the domains not already taken (a domain may be in
/// one virtual host only); `None` when none are left. Through an HTTP
/// proxy listener, only names with the port are unambiguous.
fn virtual_host(
    name: &str,
    domains: Vec<String>,
    with_port_only: bool,
    port: u32,
    taken: &mut BTreeSet<String>,
    routes: Vec<Route>,
) -> Option<VirtualHost> {
    let suffix = format!(":{port}");
    let domains: Vec<String> = domains
        .into_iter()
        .filter(|d| !with_port_only || d.ends_with(&suffix) || port == 80)
        .filter(|d| taken.insert(d.clone()))
        .collect();
    (!domains.is_empty()).then(|| VirtualHost {
        name: name.to_string(),
        domains,
        routes,
        ..Default::default()
    })
}

/// Istio's route for a service without a VirtualService: everything to the
/// service's cluster, no timeout, the default retries.
pub fn default_route(scope: &Scope, service: &Service, port: u32) -> Route {
    let cluster = model::cluster_name(port, "", &service.host);
    let mut action = RouteAction {
        cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(cluster)),
        timeout: Some(Duration::default()),
        retry_policy: retry_policy(None),
        ..Default::default()
    };
    action
        .hash_policy
        .extend(hash_policy(scope, &service.host, "", port));
    Route {
        name: "default".into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(PathSpecifier::Prefix("/".into())),
            ..Default::default()
        }),
        action: Some(route::Action::Route(action)),
        ..Default::default()
    }
}

/// The routes of a proxyless gRPC client's target `host:port` (the
/// listener's name): the service's VirtualService routes, else its default.
pub fn proxyless(scope: &Scope, service: &Service, port: u32, name: &str) -> RouteConfiguration {
    let gateways = ["mesh".to_string()];
    let ctx = RouteContext {
        scope,
        port,
        gateways: &gateways,
    };
    let routes = scope
        .virtual_services("mesh")
        .filter(|vs| vs.spec.hosts.iter().any(|h| host::covers(h, &service.host)))
        .map(|vs| http_routes(&ctx, vs))
        .find(|routes| !routes.is_empty())
        .unwrap_or_else(|| vec![default_route(scope, service, port)]);
    RouteConfiguration {
        name: name.to_string(),
        virtual_hosts: vec![VirtualHost {
            name: name.to_string(),
            domains: host::domains(&service.host, port, &scope.proxy.namespace),
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// The routes of a VirtualService for one listener: a route per match that
/// applies here, in order, ending at the first catch-all.
pub fn http_routes(ctx: &RouteContext, vs: &Named<VirtualService>) -> Vec<Route> {
    let mut out = Vec::new();
    for (i, http) in vs.spec.http.iter().enumerate() {
        let name = format!("{}/{}#{i}", vs.namespace, vs.name);
        if http.r#match.is_empty() {
            out.push(translate(ctx, &name, http, None));
            break;
        }
        for m in &http.r#match {
            if !applies(ctx, m) {
                continue;
            }
            let route = translate(ctx, &name, http, Some(m));
            let catch_all = is_catch_all(&route);
            out.push(route);
            if catch_all {
                return out;
            }
        }
    }
    out
}

/// Whether a match applies to this listener and this proxy.
fn applies(ctx: &RouteContext, m: &HttpMatchRequest) -> bool {
    let source = if m.gateways.is_empty() {
        ctx.scope.proxy.matches(&m.source_labels)
    } else {
        m.gateways.iter().any(|g| ctx.gateways.contains(g))
    };
    source && (m.port == 0 || m.port == ctx.port)
}

fn is_catch_all(route: &Route) -> bool {
    route.r#match.as_ref().is_some_and(|m| {
        m.headers.is_empty()
            && m.query_parameters.is_empty()
            && matches!(&m.path_specifier, Some(PathSpecifier::Prefix(p)) if p == "/")
    })
}

fn translate(
    ctx: &RouteContext,
    name: &str,
    http: &HttpRoute,
    m: Option<&HttpMatchRequest>,
) -> Route {
    let mut route = Route {
        name: name.to_string(),
        r#match: Some(route_match(m)),
        ..Default::default()
    };
    if let Some(redirect) = &http.redirect {
        route.action = Some(route::Action::Redirect(RedirectAction {
            host_redirect: redirect.authority.clone(),
            path_rewrite_specifier: (!redirect.uri.is_empty())
                .then(|| redirect_action::PathRewriteSpecifier::PathRedirect(redirect.uri.clone())),
            ..Default::default()
        }));
        return route;
    }
    let timeout = http.timeout.as_ref().map(duration).unwrap_or_default();
    let mut action = RouteAction {
        timeout: Some(timeout),
        max_stream_duration: Some(route_action::MaxStreamDuration {
            grpc_timeout_header_max: Some(timeout),
            ..Default::default()
        }),
        retry_policy: retry_policy(http.retries.as_ref()),
        ..Default::default()
    };
    if let Some(rewrite) = &http.rewrite {
        action.prefix_rewrite = rewrite.uri.clone();
        if !rewrite.authority.is_empty() {
            action.host_rewrite_specifier = Some(
                route_action::HostRewriteSpecifier::HostRewriteLiteral(rewrite.authority.clone()),
            );
        }
    }
    if http.websocket_upgrade {
        action.upgrade_configs.push(route_action::UpgradeConfig {
            upgrade_type: "websocket".into(),
            ..Default::default()
        });
    }
    if let Some(mirror) = &http.mirror {
        action
            .request_mirror_policies
            .push(route_action::RequestMirrorPolicy {
                cluster: destination_cluster(ctx, mirror),
                ..Default::default()
            });
    }
    let operations = http.headers.as_ref();
    header_operations(
        operations.and_then(|h| h.request.as_ref()),
        &mut route.request_headers_to_add,
        &mut route.request_headers_to_remove,
    );
    header_operations(
        operations.and_then(|h| h.response.as_ref()),
        &mut route.response_headers_to_add,
        &mut route.response_headers_to_remove,
    );
    let mut weighted = Vec::new();
    for dst in &http.route {
        let weight = match dst.weight {
            0 if http.route.len() == 1 => 100,
            0 => continue,
            w => w.max(0) as u32,
        };
        let Some(destination) = &dst.destination else {
            continue;
        };
        let mut cw = ClusterWeight {
            name: destination_cluster(ctx, destination),
            weight: Some(UInt32Value { value: weight }),
            ..Default::default()
        };
        let operations = dst.headers.as_ref();
        header_operations(
            operations.and_then(|h| h.request.as_ref()),
            &mut cw.request_headers_to_add,
            &mut cw.request_headers_to_remove,
        );
        header_operations(
            operations.and_then(|h| h.response.as_ref()),
            &mut cw.response_headers_to_add,
            &mut cw.response_headers_to_remove,
        );
        let port = destination_port(ctx, destination);
        action.hash_policy.extend(hash_policy(
            ctx.scope,
            &destination.host,
            &destination.subset,
            port,
        ));
        weighted.push(cw);
    }
    action.cluster_specifier = Some(match weighted.len() {
        0 => route_action::ClusterSpecifier::Cluster(cluster::BLACK_HOLE.into()),
        1 => {
            let only = weighted.remove(0);
            route
                .request_headers_to_add
                .extend(only.request_headers_to_add);
            route
                .request_headers_to_remove
                .extend(only.request_headers_to_remove);
            route
                .response_headers_to_add
                .extend(only.response_headers_to_add);
            route
                .response_headers_to_remove
                .extend(only.response_headers_to_remove);
            route_action::ClusterSpecifier::Cluster(only.name)
        }
        _ => route_action::ClusterSpecifier::WeightedClusters(WeightedCluster {
            clusters: weighted,
            ..Default::default()
        }),
    });
    route.action = Some(route::Action::Route(action));
    if let Some(fault) = &http.fault {
        route
            .typed_per_filter_config
            .insert(FAULT_FILTER.into(), any(&translate_fault(fault)));
    }
    if let Some(cors) = &http.cors_policy {
        route
            .typed_per_filter_config
            .insert(CORS_FILTER.into(), any(&translate_cors(cors)));
    }
    route
}

/// The port a destination names, else the service's only port, else the
/// listener's.
fn destination_port(ctx: &RouteContext, d: &Destination) -> u32 {
    match d.port.as_ref().and_then(|p| p.port.as_ref()) {
        Some(port_selector::Port::Number(n)) => *n,
        Some(port_selector::Port::Name(name)) => ctx
            .scope
            .model
            .services
            .get(&d.host)
            .and_then(|s| s.ports.iter().find(|p| &p.name == name))
            .map_or(ctx.port, |p| p.number),
        None => match ctx.scope.model.services.get(&d.host) {
            Some(s) if s.ports.len() == 1 => s.ports[0].number,
            _ => ctx.port,
        },
    }
}

pub fn destination_cluster(ctx: &RouteContext, d: &Destination) -> String {
    model::cluster_name(destination_port(ctx, d), &d.subset, &d.host)
}

fn string_matcher(m: &StringMatch) -> Option<StringMatcher> {
    let pattern = match m.match_type.as_ref()? {
        MatchType::Exact(s) => string_matcher::MatchPattern::Exact(s.clone()),
        MatchType::Prefix(s) => string_matcher::MatchPattern::Prefix(s.clone()),
        MatchType::Regex(s) => string_matcher::MatchPattern::SafeRegex(regex(s)),
    };
    Some(StringMatcher {
        match_pattern: Some(pattern),
        ..Default::default()
    })
}

fn regex(s: &str) -> RegexMatcher {
    RegexMatcher {
        regex: s.to_string(),
        ..Default::default()
    }
}

fn header(name: &str, m: &StringMatch) -> Option<HeaderMatcher> {
    Some(HeaderMatcher {
        name: name.to_string(),
        header_match_specifier: Some(header_matcher::HeaderMatchSpecifier::StringMatch(
            string_matcher(m)?,
        )),
        ..Default::default()
    })
}

fn route_match(m: Option<&HttpMatchRequest>) -> RouteMatch {
    let mut out = RouteMatch {
        path_specifier: Some(PathSpecifier::Prefix("/".into())),
        ..Default::default()
    };
    let Some(m) = m else { return out };
    if let Some(uri) = m.uri.as_ref().and_then(|u| u.match_type.as_ref()) {
        out.path_specifier = Some(match uri {
            MatchType::Exact(p) => PathSpecifier::Path(p.clone()),
            MatchType::Prefix(p) => PathSpecifier::Prefix(p.clone()),
            MatchType::Regex(r) => PathSpecifier::SafeRegex(regex(r)),
        });
    }
    // Map order makes the header order deterministic.
    out.headers
        .extend(m.headers.iter().filter_map(|(n, v)| header(n, v)));
    for (name, value) in [
        (":method", &m.method),
        (":authority", &m.authority),
        (":scheme", &m.scheme),
    ] {
        out.headers
            .extend(value.as_ref().and_then(|v| header(name, v)));
    }
    out.query_parameters = m
        .query_params
        .iter()
        .filter_map(|(name, v)| {
            Some(QueryParameterMatcher {
                name: name.clone(),
                query_parameter_match_specifier: Some(
                    query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(
                        string_matcher(v)?,
                    ),
                ),
            })
        })
        .collect();
    out
}

fn header_operations(
    ops: Option<&HeaderOperations>,
    add: &mut Vec<HeaderValueOption>,
    remove: &mut Vec<String>,
) {
    let Some(ops) = ops else { return };
    let option = |(key, value): (&String, &String), action: HeaderAppendAction| HeaderValueOption {
        header: Some(HeaderValue {
            key: key.clone(),
            value: value.clone(),
            ..Default::default()
        }),
        append_action: action as i32,
        ..Default::default()
    };
    add.extend(
        ops.set
            .iter()
            .map(|kv| option(kv, HeaderAppendAction::OverwriteIfExistsOrAdd)),
    );
    add.extend(
        ops.add
            .iter()
            .map(|kv| option(kv, HeaderAppendAction::AppendIfExistsOrAdd)),
    );
    remove.extend(ops.remove.iter().cloned());
}

/// Istio's retries: without a policy, 2 retries on connection failures and
/// 503s to other hosts; with `attempts: 0`, none; otherwise the default
/// with the policy's fields. Numbers in `retryOn` are status codes.
fn retry_policy(retry: Option<&HttpRetry>) -> Option<RetryPolicy> {
    let mut policy = RetryPolicy {
        num_retries: Some(UInt32Value { value: 2 }),
        retry_on: "connect-failure,refused-stream,unavailable,cancelled,resource-exhausted,retriable-status-codes".into(),
        retriable_status_codes: vec![503],
        retry_host_predicate: vec![RetryHostPredicate {
            name: "envoy.retry_host_predicates.previous_hosts".into(),
            config_type: Some(
                envoy_types::pb::envoy::config::route::v3::retry_policy::retry_host_predicate::ConfigType::TypedConfig(
                    any(&PreviousHostsPredicate::default()),
                ),
            ),
        }],
        host_selection_retry_max_attempts: 3,
        ..Default::default()
    };
    let Some(retry) = retry else {
        return Some(policy);
    };
    // Galley refuses a negative count; were one to arrive, no retries is
    // the cautious reading.
    let attempts = mesh_api::networking::retry_attempts(retry).ok()??;
    policy.num_retries = Some(UInt32Value { value: attempts });
    if !retry.retry_on.is_empty() {
        let (codes, conditions): (Vec<&str>, Vec<&str>) = retry
            .retry_on
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .partition(|s| s.parse::<u16>().is_ok_and(|c| (100..600).contains(&c)));
        policy.retry_on = conditions.join(",");
        policy.retriable_status_codes = codes.iter().filter_map(|c| c.parse().ok()).collect();
    }
    policy.per_try_timeout = retry.per_try_timeout.as_ref().map(duration);
    Some(policy)
}

/// A percentage as Envoy takes it: Istio's `percentage` (a double) in
/// millionths, else the deprecated integer `percent`, else all requests.
fn fraction(percentage: Option<&Percent>, percent: i32) -> FractionalPercent {
    match percentage {
        Some(p) => FractionalPercent {
            numerator: (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u32,
            denominator: DenominatorType::Million as i32,
        },
        None => FractionalPercent {
            numerator: if percent > 0 {
                percent.min(100) as u32
            } else {
                100
            },
            denominator: DenominatorType::Hundred as i32,
        },
    }
}

// `percent` is deprecated in favour of `percentage`; both are read.
#[allow(deprecated)]
fn translate_fault(fault: &HttpFaultInjection) -> HttpFault {
    let delay = fault.delay.as_ref().and_then(|d| match &d.http_delay_type {
        Some(delay::HttpDelayType::FixedDelay(fixed)) => Some(FaultDelay {
            fault_delay_secifier: Some(fault_delay::FaultDelaySecifier::FixedDelay(duration(
                fixed,
            ))),
            percentage: Some(fraction(d.percentage.as_ref(), d.percent)),
        }),
        // Envoy has no exponential delay; Istio drops it too.
        _ => None,
    });
    let abort = fault.abort.as_ref().and_then(|a| {
        let error_type = match &a.error_type {
            Some(abort::ErrorType::HttpStatus(code)) => {
                fault_abort::ErrorType::HttpStatus(*code as u32)
            }
            Some(abort::ErrorType::GrpcStatus(code)) => {
                fault_abort::ErrorType::GrpcStatus(grpc_code(code)?)
            }
            _ => return None,
        };
        Some(FaultAbort {
            error_type: Some(error_type),
            percentage: Some(fraction(a.percentage.as_ref(), a.percent)),
            ..Default::default()
        })
    });
    HttpFault {
        delay,
        abort,
        ..Default::default()
    }
}

/// A gRPC status by number or by name (`UNAVAILABLE`).
fn grpc_code(code: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    code.parse().ok().or_else(|| {
        NAMES
            .iter()
            .position(|n| n.eq_ignore_ascii_case(code))
            .map(|i| i as u32)
    })
}

fn translate_cors(cors: &mesh_api::pb::istio::networking::v1alpha3::CorsPolicy) -> CorsPolicy {
    CorsPolicy {
        allow_origin_string_match: cors
            .allow_origin
            .iter()
            .map(|o| StringMatcher {
                match_pattern: Some(if o == "*" {
                    string_matcher::MatchPattern::Prefix(String::new())
                } else {
                    string_matcher::MatchPattern::Exact(o.clone())
                }),
                ..Default::default()
            })
            .collect(),
        allow_methods: cors.allow_methods.join(","),
        allow_headers: cors.allow_headers.join(","),
        expose_headers: cors.expose_headers.join(","),
        max_age: cors
            .max_age
            .as_ref()
            .map(|d| d.seconds.to_string())
            .unwrap_or_default(),
        allow_credentials: cors.allow_credentials.map(|b| BoolValue { value: b.value }),
        ..Default::default()
    }
}

/// The consistent-hash key the destination's DestinationRule asks for.
fn hash_policy(
    scope: &Scope,
    host: &str,
    subset: &str,
    port: u32,
) -> Option<route_action::HashPolicy> {
    use route_action::hash_policy::{ConnectionProperties, Cookie, Header, PolicySpecifier};
    let service = scope.model.services.get(host)?;
    let port = service.port(port)?;
    let settings =
        cluster::Settings::of(scope.model, service, port, subset, &scope.proxy.namespace);
    let Some(load_balancer_settings::LbPolicy::ConsistentHash(hash)) =
        settings.load_balancer.and_then(|l| l.lb_policy.as_ref())
    else {
        return None;
    };
    let specifier = match hash.hash_key.as_ref()? {
        HashKey::HttpHeaderName(name) => PolicySpecifier::Header(Header {
            header_name: name.clone(),
            ..Default::default()
        }),
        HashKey::HttpCookie(c) => PolicySpecifier::Cookie(Cookie {
            name: c.name.clone(),
            path: c.path.clone(),
            ttl: c.ttl.as_ref().map(duration),
            ..Default::default()
        }),
        HashKey::UseSourceIp(true) => {
            PolicySpecifier::ConnectionProperties(ConnectionProperties { source_ip: true })
        }
        HashKey::UseSourceIp(false) => return None,
    };
    Some(route_action::HashPolicy {
        policy_specifier: Some(specifier),
        ..Default::default()
    })
}
