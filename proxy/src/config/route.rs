//! Route configurations as the proxy runs them: virtual hosts chosen by
//! the request's authority, routes by path, headers and query parameters,
//! and what each route does (forward to weighted clusters with timeouts,
//! retries, rewrites and mirrors; redirect; answer directly). Compiled from
//! xDS once per change, regexes included, so a request only matches.

use std::{collections::HashMap, time::Duration};

use envoy_types::pb::envoy::{
    config::{
        core::v3::{HeaderValueOption, header_value_option::HeaderAppendAction},
        route::v3::{
            self as xds, header_matcher::HeaderMatchSpecifier, query_parameter_matcher,
            route::Action as XdsAction, route_action, route_match::PathSpecifier,
        },
    },
    extensions::filters::{
        common::fault::v3::fault_delay,
        http::{cors::v3::CorsPolicy, fault::v3::HttpFault},
    },
    r#type::{
        matcher::v3::{StringMatcher, string_matcher::MatchPattern},
        v3::{FractionalPercent, fractional_percent::DenominatorType},
    },
};
use prost::Message;
use regex::Regex;

use super::{Problem, duration};

/// The filter names whose per-route settings the proxy reads.
pub const FAULT_FILTER: &str = "envoy.filters.http.fault";
pub const CORS_FILTER: &str = "envoy.filters.http.cors";

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    pub virtual_hosts: Vec<VirtualHost>,
}

/// Where a route is in its table.
#[derive(Debug, Clone, Copy)]
pub struct RouteIndex {
    host: usize,
    route: usize,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    domains: Vec<Domain>,
    pub routes: Vec<Route>,
    /// Plaintext requests are redirected to HTTPS (a Gateway server's
    /// `httpsRedirect`).
    pub require_tls: bool,
}

/// A virtual host domain: `*`, `*.suffix`, `prefix.*` or exact, without
/// case, with or without a port.
#[derive(Debug)]
enum Domain {
    Any,
    Exact(String),
    Suffix(String),
    Prefix(String),
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatch,
    pub action: Action,
    pub headers: HeaderOps,
    pub fault: Option<Fault>,
    pub cors: Option<Cors>,
}

#[derive(Debug)]
pub struct RouteMatch {
    path: PathMatch,
    headers: Vec<HeaderMatch>,
    query: Vec<(String, Option<StringMatch>)>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(Regex),
}

/// A header's value (or presence), as routes and RBAC policies test it;
/// `:authority`, `:method`, `:path` and `:scheme` name the request's own.
#[derive(Debug)]
pub struct HeaderMatch {
    name: String,
    /// `None`: the header need only be present.
    value: Option<StringMatch>,
    invert: bool,
}

#[derive(Debug)]
pub enum StringMatch {
    Exact(String, bool),
    Prefix(String, bool),
    Suffix(String, bool),
    Contains(String, bool),
    Regex(Regex),
}

#[derive(Debug)]
pub enum Action {
    Forward(Box<Forward>),
    Redirect {
        host: String,
        path: String,
        code: u16,
    },
    Direct {
        status: u16,
        body: String,
    },
}

#[derive(Debug)]
pub struct Forward {
    /// Clusters with their weights, and the header operations each adds.
    pub clusters: Vec<WeightedCluster>,
    /// `None`: no limit (Istio's default for routes is none: 0s).
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    pub prefix_rewrite: Option<String>,
    pub host_rewrite: Option<String>,
    pub mirrors: Vec<String>,
    /// What picks a ring-hash cluster's endpoint.
    pub hash: HashPolicy,
}

/// What picks a ring-hash endpoint for a request: header values, a
/// cookie, the caller's address; nothing (a random endpoint) when none
/// of them is there.
#[derive(Debug, Default, PartialEq)]
pub struct HashPolicy {
    /// Header names (lower case).
    pub headers: Vec<String>,
    pub cookie: Option<HashCookie>,
    pub source_ip: bool,
}

/// A cookie that keeps a client on one endpoint. A request without it
/// gets one made up and set on the response, when it has a `ttl`.
#[derive(Debug, PartialEq)]
pub struct HashCookie {
    pub name: String,
    pub path: String,
    /// Zero: for the browser session.
    pub ttl: Option<Duration>,
}

/// A request's hash key, and the cookie to set when the proxy made one.
#[derive(Debug)]
pub struct Hashed {
    pub key: u64,
    pub set_cookie: Option<http::HeaderValue>,
}

impl HashPolicy {
    pub fn hash(&self, headers: &http::HeaderMap, peer: std::net::IpAddr) -> Option<Hashed> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        let mut any = false;
        for name in &self.headers {
            if let Some(v) = headers.get(name.as_str()) {
                v.as_bytes().hash(&mut h);
                any = true;
            }
        }
        let mut set_cookie = None;
        if let Some(cookie) = &self.cookie {
            match cookie_value(headers, &cookie.name) {
                Some(value) => {
                    value.hash(&mut h);
                    any = true;
                }
                None if cookie.ttl.is_some() => {
                    let value = format!("{:016x}", fastrand::u64(..));
                    value.as_str().hash(&mut h);
                    any = true;
                    set_cookie = cookie.set(&value);
                }
                None => {}
            }
        }
        if self.source_ip {
            peer.hash(&mut h);
            any = true;
        }
        any.then(|| Hashed {
            key: h.finish(),
            set_cookie,
        })
    }
}

impl HashCookie {
    /// `Set-Cookie` for `value`.
    fn set(&self, value: &str) -> Option<http::HeaderValue> {
        let mut text = format!("{}={value}", self.name);
        if let Some(ttl) = self.ttl.filter(|t| !t.is_zero()) {
            text.push_str(&format!("; Max-Age={}", ttl.as_secs().max(1)));
        }
        if !self.path.is_empty() {
            text.push_str(&format!("; Path={}", self.path));
        }
        text.push_str("; HttpOnly");
        http::HeaderValue::from_str(&text).ok()
    }
}

/// The value of cookie `name` in the request's `Cookie` headers.
fn cookie_value<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v.trim_matches('"'))
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: String,
    pub weight: u32,
    pub headers: HeaderOps,
}

#[derive(Debug, Default)]
pub struct HeaderOps {
    /// `(name, value, append)`.
    pub request_add: Vec<(String, String, bool)>,
    pub request_remove: Vec<String>,
    pub response_add: Vec<(String, String, bool)>,
    pub response_remove: Vec<String>,
}

/// When to retry, as Envoy's `retry_on` names it.
#[derive(Debug, Default, Clone)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub per_try_timeout: Option<Duration>,
    pub on_5xx: bool,
    pub on_gateway_error: bool,
    pub on_connect_failure: bool,
    pub on_reset: bool,
    pub on_refused_stream: bool,
    pub status_codes: Vec<u16>,
    /// gRPC statuses (by number) that are retried.
    pub grpc_statuses: Vec<u32>,
    /// Prefer hosts not tried yet.
    pub other_hosts: bool,
}

/// A share of requests, in millionths.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share(pub u32);

impl Share {
    fn of(p: Option<&FractionalPercent>) -> Self {
        let Some(p) = p else { return Share(1_000_000) };
        let scale = match DenominatorType::try_from(p.denominator) {
            Ok(DenominatorType::Hundred) => 10_000,
            Ok(DenominatorType::TenThousand) => 100,
            _ => 1,
        };
        Share(p.numerator.saturating_mul(scale).min(1_000_000))
    }

    /// Whether a request falls in this share.
    pub fn roll(self) -> bool {
        fastrand::u32(0..1_000_000) < self.0
    }
}

#[derive(Debug)]
pub struct Fault {
    pub delay: Option<(Duration, Share)>,
    pub abort: Option<(Abort, Share)>,
}

#[derive(Debug, Clone, Copy)]
pub enum Abort {
    Http(u16),
    Grpc(u32),
}

#[derive(Debug)]
pub struct Cors {
    pub origins: Vec<StringMatch>,
    pub methods: String,
    pub headers: String,
    pub expose: String,
    pub max_age: String,
    pub credentials: bool,
}

/// What routing looks at in a request.
pub struct RequestParts<'a> {
    pub authority: &'a str,
    pub path: &'a str,
    pub method: &'a str,
    pub scheme: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl<'a> RequestParts<'a> {
    /// The parts of `request`: its authority from an absolute-form URI (the
    /// proxy used as `HTTP_PROXY`), else from `Host`.
    pub fn of<B>(request: &'a http::Request<B>) -> Self {
        let uri = request.uri();
        RequestParts {
            authority: uri
                .authority()
                .map(|a| a.as_str())
                .or_else(|| request.headers().get(http::header::HOST)?.to_str().ok())
                .unwrap_or_default(),
            path: uri.path_and_query().map_or("/", |p| p.as_str()),
            method: request.method().as_str(),
            scheme: uri.scheme_str().unwrap_or("http"),
            headers: request.headers(),
        }
    }
}

impl RouteTable {
    pub fn compile(rc: &xds::RouteConfiguration) -> Result<Self, Problem> {
        let at = |what: String| Problem(format!("route configuration {:?}: {what}", rc.name));
        let mut virtual_hosts = Vec::new();
        for vh in &rc.virtual_hosts {
            let mut routes = Vec::new();
            for (i, r) in vh.routes.iter().enumerate() {
                routes.push(Route::compile(r).map_err(|Problem(p)| {
                    at(format!(
                        "virtual host {:?} route {i} ({:?}): {p}",
                        vh.name, r.name
                    ))
                })?);
            }
            use xds::virtual_host::TlsRequirementType;
            let require_tls = match TlsRequirementType::try_from(vh.require_tls) {
                Ok(TlsRequirementType::None) => false,
                Ok(TlsRequirementType::All) => true,
                _ => {
                    return Err(at(format!(
                        "virtual host {:?}: require_tls {} is not supported (NONE and ALL are)",
                        vh.name, vh.require_tls
                    )));
                }
            };
            virtual_hosts.push(VirtualHost {
                name: vh.name.clone(),
                domains: vh.domains.iter().map(|d| Domain::parse(d)).collect(),
                routes,
                require_tls,
            });
        }
        Ok(Self {
            name: rc.name.clone(),
            virtual_hosts,
        })
    }

    /// Whether `request`'s virtual host asks for TLS.
    pub fn requires_tls(&self, request: &RequestParts) -> bool {
        self.host_index(request.authority)
            .is_some_and(|i| self.virtual_hosts[i].require_tls)
    }

    /// Where the route for `request` is: its virtual host's, then the
    /// first of its routes that matches.
    pub fn find(&self, request: &RequestParts) -> Option<RouteIndex> {
        let host = self.host_index(request.authority)?;
        let route = self.virtual_hosts[host]
            .routes
            .iter()
            .position(|r| r.matcher.matches(request))?;
        Some(RouteIndex { host, route })
    }

    /// The route `find` gave.
    pub fn at(&self, index: RouteIndex) -> &Route {
        &self.virtual_hosts[index.host].routes[index.route]
    }

    /// The virtual host for `authority`: an exact domain first, then the
    /// longest suffix, then the longest prefix, then `*`, as Envoy orders
    /// them.
    fn host_index(&self, authority: &str) -> Option<usize> {
        let authority = authority.to_ascii_lowercase();
        let host = authority
            .rsplit_once(':')
            .filter(|(_, p)| p.parse::<u16>().is_ok())
            .map_or(authority.as_str(), |(h, _)| h);
        let mut best: Option<(u8, usize, usize)> = None;
        for (i, vh) in self.virtual_hosts.iter().enumerate() {
            for d in &vh.domains {
                let rank = match d {
                    Domain::Exact(e) if *e == authority || *e == host => (4, e.len()),
                    Domain::Suffix(s)
                        if authority.ends_with(s.as_str()) || host.ends_with(s.as_str()) =>
                    {
                        (3, s.len())
                    }
                    Domain::Prefix(p) if authority.starts_with(p.as_str()) => (2, p.len()),
                    Domain::Any => (1, 0),
                    _ => continue,
                };
                if best.is_none_or(|(r, l, _)| (rank.0, rank.1) > (r, l)) {
                    best = Some((rank.0, rank.1, i));
                }
            }
        }
        best.map(|(_, _, i)| i)
    }
}

impl Domain {
    fn parse(d: &str) -> Self {
        let d = d.to_ascii_lowercase();
        if d == "*" {
            Domain::Any
        } else if let Some(suffix) = d.strip_prefix('*') {
            Domain::Suffix(suffix.to_string())
        } else if let Some(prefix) = d.strip_suffix('*') {
            Domain::Prefix(prefix.to_string())
        } else {
            Domain::Exact(d)
        }
    }
}

impl Route {
    /// `path` (with its query) as sent upstream: with `prefix_rewrite`, the
    /// matched prefix (or the whole path, for other matches) replaced.
    pub fn rewrite(&self, path: &str, prefix_rewrite: Option<&str>) -> String {
        let Some(replacement) = prefix_rewrite else {
            return path.to_string();
        };
        let (bare, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (path, None),
        };
        let rest = match &self.matcher.path {
            PathMatch::Prefix(prefix) => bare.strip_prefix(prefix.as_str()).unwrap_or(bare),
            PathMatch::Exact(_) | PathMatch::Regex(_) => "",
        };
        let mut out = format!("{replacement}{rest}");
        if let Some(q) = query {
            out.push('?');
            out.push_str(q);
        }
        out
    }
}

impl RouteMatch {
    /// A route's match (or a JWT rule's): the path, then headers and query
    /// parameters.
    pub fn compile(m: &xds::RouteMatch) -> Result<Self, Problem> {
        let path = match &m.path_specifier {
            Some(PathSpecifier::Prefix(p)) => PathMatch::Prefix(p.clone()),
            Some(PathSpecifier::Path(p)) => PathMatch::Exact(p.clone()),
            Some(PathSpecifier::SafeRegex(r)) => PathMatch::Regex(regex(&r.regex)?),
            Some(other) => return Err(Problem(format!("path match {other:?} is not supported"))),
            None => return Err(Problem("no path match".into())),
        };
        let headers = m
            .headers
            .iter()
            .map(HeaderMatch::compile)
            .collect::<Result<Vec<_>, _>>()?;
        let mut query = Vec::new();
        for q in &m.query_parameters {
            let matcher = match &q.query_parameter_match_specifier {
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::StringMatch(s)) => {
                    Some(StringMatch::compile(s)?)
                }
                Some(query_parameter_matcher::QueryParameterMatchSpecifier::PresentMatch(_))
                | None => None,
            };
            query.push((q.name.clone(), matcher));
        }
        Ok(Self {
            path,
            headers,
            query,
        })
    }

    pub fn matches(&self, request: &RequestParts) -> bool {
        let path = request.path.split('?').next().unwrap_or("");
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
            PathMatch::Exact(p) => path == p,
            PathMatch::Regex(r) => r.is_match(path),
        };
        path_ok
            && self.headers.iter().all(|h| h.holds(request))
            && self.query.iter().all(|(name, m)| {
                let value = query_value(request.path, name);
                match (value, m) {
                    (Some(v), Some(m)) => m.matches(&v),
                    (Some(_), None) => true,
                    (None, _) => false,
                }
            })
    }
}

fn query_value(path: &str, name: &str) -> Option<String> {
    let query = path.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then(|| v.to_string())
    })
}

impl HeaderMatch {
    pub fn compile(h: &xds::HeaderMatcher) -> Result<Self, Problem> {
        let value = match &h.header_match_specifier {
            Some(HeaderMatchSpecifier::StringMatch(s)) => Some(StringMatch::compile(s)?),
            Some(HeaderMatchSpecifier::PresentMatch(true)) => None,
            other => {
                return Err(Problem(format!(
                    "header {:?}: match {other:?} is not supported",
                    h.name
                )));
            }
        };
        Ok(HeaderMatch {
            name: h.name.to_ascii_lowercase(),
            value,
            invert: h.invert_match,
        })
    }

    /// Whether the request matches, inversion included.
    pub fn holds(&self, request: &RequestParts) -> bool {
        self.matches(request) != self.invert
    }

    fn matches(&self, request: &RequestParts) -> bool {
        let value = match self.name.as_str() {
            ":authority" | "host" => Some(request.authority.to_string()),
            ":method" => Some(request.method.to_string()),
            ":path" => Some(request.path.to_string()),
            ":scheme" => Some(request.scheme.to_string()),
            name => {
                let values: Vec<&str> = request
                    .headers
                    .get_all(name)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect();
                (!values.is_empty()).then(|| values.join(","))
            }
        };
        match (&value, &self.value) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(v), Some(m)) => m.matches(v),
        }
    }
}

impl StringMatch {
    pub fn compile(m: &StringMatcher) -> Result<Self, Problem> {
        let case = m.ignore_case;
        let lower = |s: &str| {
            if case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        Ok(match &m.match_pattern {
            Some(MatchPattern::Exact(s)) => StringMatch::Exact(lower(s), case),
            Some(MatchPattern::Prefix(s)) => StringMatch::Prefix(lower(s), case),
            Some(MatchPattern::Suffix(s)) => StringMatch::Suffix(lower(s), case),
            Some(MatchPattern::Contains(s)) => StringMatch::Contains(lower(s), case),
            Some(MatchPattern::SafeRegex(r)) => StringMatch::Regex(regex(&r.regex)?),
            Some(MatchPattern::Custom(c)) => {
                return Err(Problem(format!(
                    "custom string matcher {:?} is not supported",
                    c.name
                )));
            }
            None => return Err(Problem("string matcher without a pattern".into())),
        })
    }

    pub fn matches(&self, value: &str) -> bool {
        let fold = |case: bool| {
            if case {
                std::borrow::Cow::Owned(value.to_ascii_lowercase())
            } else {
                std::borrow::Cow::Borrowed(value)
            }
        };
        match self {
            StringMatch::Exact(s, case) => fold(*case) == s.as_str(),
            StringMatch::Prefix(s, case) => fold(*case).starts_with(s.as_str()),
            StringMatch::Suffix(s, case) => fold(*case).ends_with(s.as_str()),
            StringMatch::Contains(s, case) => fold(*case).contains(s.as_str()),
            StringMatch::Regex(r) => r.is_match(value),
        }
    }
}

/// An RE2 pattern matched against the whole value, as Envoy's safe regex
/// (compiled as Galley checked it).
fn regex(pattern: &str) -> Result<Regex, Problem> {
    mesh_api::safe_regex::whole_value(pattern)
        .map_err(|e| Problem(format!("regex {pattern:?}: {e}")))
}

impl Route {
    fn compile(r: &xds::Route) -> Result<Self, Problem> {
        let m = r
            .r#match
            .as_ref()
            .ok_or_else(|| Problem("no match".into()))?;
        let matcher = RouteMatch::compile(m)?;
        let action = match &r.action {
            Some(XdsAction::Route(a)) => Action::Forward(Box::new(Forward::compile(a)?)),
            Some(XdsAction::Redirect(redirect)) => {
                use envoy_types::pb::envoy::config::route::v3::redirect_action::{
                    PathRewriteSpecifier, RedirectResponseCode,
                };
                let code = match RedirectResponseCode::try_from(redirect.response_code) {
                    Ok(RedirectResponseCode::Found) => 302,
                    Ok(RedirectResponseCode::SeeOther) => 303,
                    Ok(RedirectResponseCode::TemporaryRedirect) => 307,
                    Ok(RedirectResponseCode::PermanentRedirect) => 308,
                    _ => 301,
                };
                let path = match &redirect.path_rewrite_specifier {
                    Some(PathRewriteSpecifier::PathRedirect(p)) => p.clone(),
                    _ => String::new(),
                };
                Action::Redirect {
                    host: redirect.host_redirect.clone(),
                    path,
                    code,
                }
            }
            Some(XdsAction::DirectResponse(d)) => {
                use envoy_types::pb::envoy::config::core::v3::data_source::Specifier;
                let body = match d.body.as_ref().and_then(|b| b.specifier.as_ref()) {
                    Some(Specifier::InlineString(s)) => s.clone(),
                    Some(Specifier::InlineBytes(b)) => String::from_utf8_lossy(b).into_owned(),
                    _ => String::new(),
                };
                Action::Direct {
                    status: u16::try_from(d.status).unwrap_or(500),
                    body,
                }
            }
            other => return Err(Problem(format!("action {other:?} is not supported"))),
        };
        let mut headers_ops = HeaderOps::default();
        header_ops(
            &mut headers_ops,
            &r.request_headers_to_add,
            &r.request_headers_to_remove,
            &r.response_headers_to_add,
            &r.response_headers_to_remove,
        );
        let per_filter = |name: &str| r.typed_per_filter_config.get(name);
        let fault = per_filter(FAULT_FILTER)
            .map(|any| {
                HttpFault::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("fault settings: {e}")))
                    .map(|f| Fault::compile(&f))
            })
            .transpose()?;
        let cors = per_filter(CORS_FILTER)
            .map(|any| {
                CorsPolicy::decode(any.value.as_slice())
                    .map_err(|e| Problem(format!("CORS settings: {e}")))
                    .and_then(|c| Cors::compile(&c))
            })
            .transpose()?;
        Ok(Route {
            name: r.name.clone(),
            matcher,
            action,
            headers: headers_ops,
            fault,
            cors,
        })
    }
}

fn header_ops(
    ops: &mut HeaderOps,
    request_add: &[HeaderValueOption],
    request_remove: &[String],
    response_add: &[HeaderValueOption],
    response_remove: &[String],
) {
    let adds = |options: &[HeaderValueOption]| -> Vec<(String, String, bool)> {
        options
            .iter()
            .filter_map(|o| {
                let h = o.header.as_ref()?;
                let append = o.append_action == HeaderAppendAction::AppendIfExistsOrAdd as i32;
                Some((h.key.to_ascii_lowercase(), h.value.clone(), append))
            })
            .collect()
    };
    ops.request_add.extend(adds(request_add));
    ops.request_remove
        .extend(request_remove.iter().map(|h| h.to_ascii_lowercase()));
    ops.response_add.extend(adds(response_add));
    ops.response_remove
        .extend(response_remove.iter().map(|h| h.to_ascii_lowercase()));
}

impl Forward {
    fn compile(a: &xds::RouteAction) -> Result<Self, Problem> {
        use route_action::ClusterSpecifier;
        let clusters = match &a.cluster_specifier {
            Some(ClusterSpecifier::Cluster(name)) => vec![WeightedCluster {
                name: name.clone(),
                weight: 1,
                headers: HeaderOps::default(),
            }],
            Some(ClusterSpecifier::WeightedClusters(w)) => w
                .clusters
                .iter()
                .map(|c| {
                    let mut headers = HeaderOps::default();
                    header_ops(
                        &mut headers,
                        &c.request_headers_to_add,
                        &c.request_headers_to_remove,
                        &c.response_headers_to_add,
                        &c.response_headers_to_remove,
                    );
                    WeightedCluster {
                        name: c.name.clone(),
                        weight: c.weight.as_ref().map_or(0, |w| w.value),
                        headers,
                    }
                })
                .filter(|c| c.weight > 0)
                .collect(),
            other => {
                return Err(Problem(format!(
                    "cluster specifier {other:?} is not supported"
                )));
            }
        };
        if clusters.is_empty() {
            return Err(Problem("no cluster has a weight".into()));
        }
        let host_rewrite = match &a.host_rewrite_specifier {
            Some(route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(h.clone()),
            _ => None,
        };
        let mut hash = HashPolicy::default();
        for h in &a.hash_policy {
            use route_action::hash_policy::PolicySpecifier;
            match &h.policy_specifier {
                Some(PolicySpecifier::Header(h)) => {
                    hash.headers.push(h.header_name.to_ascii_lowercase())
                }
                Some(PolicySpecifier::Cookie(c)) => {
                    hash.cookie = Some(HashCookie {
                        name: c.name.clone(),
                        path: c.path.clone(),
                        ttl: c.ttl.as_ref().map(duration),
                    })
                }
                Some(PolicySpecifier::ConnectionProperties(c)) => hash.source_ip |= c.source_ip,
                Some(other) => {
                    return Err(Problem(format!("hash policy {other:?} is not supported")));
                }
                _ => {}
            }
        }
        Ok(Forward {
            clusters,
            timeout: a.timeout.as_ref().map(duration).filter(|d| !d.is_zero()),
            retry: a.retry_policy.as_ref().map(RetryPolicy::compile),
            prefix_rewrite: (!a.prefix_rewrite.is_empty()).then(|| a.prefix_rewrite.clone()),
            host_rewrite,
            mirrors: a
                .request_mirror_policies
                .iter()
                .map(|m| m.cluster.clone())
                .collect(),
            hash,
        })
    }

    /// A cluster by weight, as its index in `clusters` (compiling keeps
    /// only weighted ones, and at least one).
    pub fn pick(&self) -> usize {
        super::pick_weighted(&self.clusters, |c| c.weight).unwrap_or(0)
    }
}

impl RetryPolicy {
    fn compile(p: &xds::RetryPolicy) -> Self {
        let mut out = RetryPolicy {
            attempts: p.num_retries.as_ref().map_or(1, |n| n.value),
            per_try_timeout: p
                .per_try_timeout
                .as_ref()
                .map(duration)
                .filter(|d| !d.is_zero()),
            status_codes: p
                .retriable_status_codes
                .iter()
                .filter_map(|c| u16::try_from(*c).ok())
                .collect(),
            other_hosts: !p.retry_host_predicate.is_empty(),
            ..Default::default()
        };
        let retriable_codes = out.status_codes.clone();
        out.status_codes.clear();
        for condition in p.retry_on.split(',').map(str::trim) {
            match condition {
                "5xx" => out.on_5xx = true,
                "gateway-error" => out.on_gateway_error = true,
                "connect-failure" => out.on_connect_failure = true,
                "reset" => out.on_reset = true,
                "refused-stream" => out.on_refused_stream = true,
                "retriable-status-codes" => out.status_codes = retriable_codes.clone(),
                "cancelled" => out.grpc_statuses.push(1),
                "deadline-exceeded" => out.grpc_statuses.push(4),
                "resource-exhausted" => out.grpc_statuses.push(8),
                "internal" => out.grpc_statuses.push(13),
                "unavailable" => out.grpc_statuses.push(14),
                _ => {}
            }
        }
        out
    }
}

impl Fault {
    fn compile(f: &HttpFault) -> Self {
        let delay = f
            .delay
            .as_ref()
            .and_then(|d| match &d.fault_delay_secifier {
                Some(fault_delay::FaultDelaySecifier::FixedDelay(fixed)) => {
                    Some((duration(fixed), Share::of(d.percentage.as_ref())))
                }
                _ => None,
            });
        let abort = f.abort.as_ref().and_then(|a| {
            use envoy_types::pb::envoy::extensions::filters::http::fault::v3::fault_abort::ErrorType;
            let kind = match &a.error_type {
                Some(ErrorType::HttpStatus(code)) => Abort::Http(u16::try_from(*code).ok()?),
                Some(ErrorType::GrpcStatus(code)) => Abort::Grpc(*code),
                _ => return None,
            };
            Some((kind, Share::of(a.percentage.as_ref())))
        });
        Fault { delay, abort }
    }
}

impl Cors {
    fn compile(c: &CorsPolicy) -> Result<Self, Problem> {
        Ok(Cors {
            origins: c
                .allow_origin_string_match
                .iter()
                .map(StringMatch::compile)
                .collect::<Result<_, _>>()?,
            methods: c.allow_methods.clone(),
            headers: c.allow_headers.clone(),
            expose: c.expose_headers.clone(),
            max_age: c.max_age.clone(),
            credentials: c.allow_credentials.as_ref().is_some_and(|b| b.value),
        })
    }

    pub fn allows(&self, origin: &str) -> bool {
        self.origins.iter().any(|m| m.matches(origin))
    }
}

/// Route tables by name.
pub type RouteTables = HashMap<String, std::sync::Arc<RouteTable>>;

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::envoy::{
        config::route::v3::{
            HeaderMatcher, RouteAction, RouteMatch as XdsMatch, VirtualHost as XdsVh,
        },
        r#type::matcher::v3::RegexMatcher,
    };

    fn route(name: &str, path: PathSpecifier, headers: Vec<HeaderMatcher>) -> xds::Route {
        xds::Route {
            name: name.into(),
            r#match: Some(XdsMatch {
                path_specifier: Some(path),
                headers,
                ..Default::default()
            }),
            action: Some(XdsAction::Route(RouteAction {
                cluster_specifier: Some(route_action::ClusterSpecifier::Cluster(name.into())),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn table(vhosts: Vec<(&str, Vec<&str>, Vec<xds::Route>)>) -> Result<RouteTable, Problem> {
        RouteTable::compile(&xds::RouteConfiguration {
            name: "9080".into(),
            virtual_hosts: vhosts
                .into_iter()
                .map(|(name, domains, routes)| XdsVh {
                    name: name.into(),
                    domains: domains.into_iter().map(String::from).collect(),
                    routes,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
    }

    fn parts<'a>(
        authority: &'a str,
        path: &'a str,
        headers: &'a http::HeaderMap,
    ) -> RequestParts<'a> {
        RequestParts {
            authority,
            path,
            method: "GET",
            scheme: "http",
            headers,
        }
    }

    #[test]
    fn virtual_hosts_by_exact_then_suffix_then_prefix_then_any() {
        let any = |n: &str| vec![route(n, PathSpecifier::Prefix("/".into()), vec![])];
        let t = table(vec![
            ("any", vec!["*"], any("any")),
            ("prefix", vec!["reviews.*"], any("prefix")),
            ("suffix", vec!["*.svc.cluster.local"], any("suffix")),
            (
                "exact",
                vec!["reviews.shop.svc.cluster.local:9080", "reviews"],
                any("exact"),
            ),
        ])
        .unwrap();
        let vh = |a: &str| t.virtual_hosts[t.host_index(a).unwrap()].name.clone();
        assert_eq!(vh("reviews.shop.svc.cluster.local:9080"), "exact");
        assert_eq!(vh("REVIEWS:9080"), "exact", "without case, port or not");
        assert_eq!(vh("ratings.shop.svc.cluster.local"), "suffix");
        assert_eq!(vh("reviews.other"), "prefix");
        assert_eq!(vh("example.com"), "any");
    }

    #[test]
    fn routes_match_paths_headers_and_queries_in_order() {
        let exact = |v: &str| HeaderMatcher {
            name: "End-User".into(),
            header_match_specifier: Some(HeaderMatchSpecifier::StringMatch(StringMatcher {
                match_pattern: Some(MatchPattern::Exact(v.into())),
                ..Default::default()
            })),
            ..Default::default()
        };
        let regex = PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/ratings/[0-9]+".into(),
            ..Default::default()
        });
        let t = table(vec![(
            "vh",
            vec!["*"],
            vec![
                route(
                    "jason",
                    PathSpecifier::Prefix("/".into()),
                    vec![exact("jason")],
                ),
                route("numbered", regex, vec![]),
                route("exact", PathSpecifier::Path("/health".into()), vec![]),
                route("rest", PathSpecifier::Prefix("/api/".into()), vec![]),
            ],
        )])
        .unwrap();
        let mut headers = http::HeaderMap::new();
        let name = |path: &str, headers: &http::HeaderMap| {
            t.find(&parts("x", path, headers))
                .map(|i| t.at(i).name.clone())
        };
        assert_eq!(
            name("/ratings/7?x=1", &headers).as_deref(),
            Some("numbered")
        );
        // A safe regex matches the whole path.
        assert_eq!(name("/ratings/7/more", &headers), None);
        assert_eq!(name("/health", &headers).as_deref(), Some("exact"));
        assert_eq!(name("/healthz", &headers), None);
        assert_eq!(name("/api/v1", &headers).as_deref(), Some("rest"));
        headers.insert("end-user", "jason".parse().unwrap());
        assert_eq!(name("/api/v1", &headers).as_deref(), Some("jason"));
    }

    #[test]
    fn a_bad_regex_is_a_problem_naming_the_route() {
        let bad = PathSpecifier::SafeRegex(RegexMatcher {
            regex: "/(unclosed".into(),
            ..Default::default()
        });
        let problem =
            table(vec![("vh", vec!["*"], vec![route("broken", bad, vec![])])]).unwrap_err();
        assert!(problem.0.contains("route 0 (\"broken\")"), "{problem}");
        assert!(problem.0.contains("/(unclosed"), "{problem}");
    }

    #[test]
    fn prefix_rewrite_replaces_the_matched_prefix_and_keeps_the_query() {
        let t = table(vec![(
            "vh",
            vec!["*"],
            vec![route("r", PathSpecifier::Prefix("/old".into()), vec![])],
        )])
        .unwrap();
        let r = &t.virtual_hosts[0].routes[0];
        assert_eq!(r.rewrite("/old/a?b=1", Some("/new")), "/new/a?b=1");
        assert_eq!(r.rewrite("/old/a", None), "/old/a");
    }

    #[test]
    fn shares_scale_to_millionths() {
        let p = |n, d: DenominatorType| FractionalPercent {
            numerator: n,
            denominator: d as i32,
        };
        assert_eq!(Share::of(Some(&p(50, DenominatorType::Hundred))).0, 500_000);
        assert_eq!(Share::of(Some(&p(5, DenominatorType::TenThousand))).0, 500);
        assert_eq!(Share::of(None).0, 1_000_000);
        assert!(!Share(0).roll());
        assert!(Share(1_000_000).roll());
    }

    #[test]
    fn requests_hash_by_header_cookie_and_source_ip() {
        let peer: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let headers = |pairs: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (name, value) in pairs {
                h.append(
                    http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    value.parse().unwrap(),
                );
            }
            h
        };
        let by_header = HashPolicy {
            headers: vec!["end-user".into()],
            ..Default::default()
        };
        let key = |p: &HashPolicy, h: &http::HeaderMap| p.hash(h, peer).map(|h| h.key);
        let jason = headers(&[("end-user", "jason")]);
        assert_eq!(key(&by_header, &jason), key(&by_header, &jason));
        assert_ne!(
            key(&by_header, &jason),
            key(&by_header, &headers(&[("end-user", "ann")]))
        );
        assert_eq!(key(&by_header, &headers(&[])), None, "no header: no key");

        let cookie = |ttl| HashPolicy {
            cookie: Some(HashCookie {
                name: "user".into(),
                path: "/app".into(),
                ttl,
            }),
            ..Default::default()
        };
        let session = cookie(Some(Duration::from_secs(3600)));
        let with = headers(&[("cookie", "a=1; user=abc"), ("cookie", "b=2")]);
        let hashed = session.hash(&with, peer).unwrap();
        assert!(hashed.set_cookie.is_none(), "the client has it already");
        let again = headers(&[("cookie", "user=\"abc\"")]);
        assert_eq!(session.hash(&again, peer).unwrap().key, hashed.key);
        // Without the cookie one is made up, set on the response, and the
        // request hashed by it.
        let made = session.hash(&headers(&[]), peer).unwrap();
        let set = made.set_cookie.unwrap();
        let set = set.to_str().unwrap();
        assert!(set.starts_with("user="), "{set}");
        assert!(set.contains("; Max-Age=3600; Path=/app; HttpOnly"), "{set}");
        let value = set["user=".len()..].split(';').next().unwrap();
        let back = headers(&[("cookie", &format!("user={value}"))]);
        assert_eq!(session.hash(&back, peer).unwrap().key, made.key);
        // No ttl: nothing to make; no key.
        assert!(cookie(None).hash(&headers(&[]), peer).is_none());

        let by_ip = HashPolicy {
            source_ip: true,
            ..Default::default()
        };
        let other: std::net::IpAddr = "10.1.2.4".parse().unwrap();
        assert_ne!(
            by_ip.hash(&jason, peer).unwrap().key,
            by_ip.hash(&jason, other).unwrap().key
        );
    }
}
