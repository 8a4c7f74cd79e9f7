//! What the HTTP path does to requests and responses on the way, each a
//! function of its inputs alone: CORS, redirects, faults' answers, header
//! operations, the headers a forwarded request carries, mirrors' hosts,
//! the upstream request's hop-by-hop headers.

use std::net::SocketAddr;

use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};

use super::local_reply;
use crate::{
    config::route::{Abort, Cors, HeaderOps},
    upstream::Body,
};

/// The answer to a CORS preflight from `origin`: the route's policy when
/// it allows the origin, an empty 200 when not.
pub fn cors_preflight(cors: &Cors, origin: &str) -> Response<Body> {
    let mut response = local_reply(StatusCode::OK, "");
    if !cors.allows(origin) {
        return response;
    }
    let headers = response.headers_mut();
    let mut set = |name: HeaderName, value: &str| {
        if !value.is_empty()
            && let Ok(v) = HeaderValue::from_str(value)
        {
            headers.insert(name, v);
        }
    };
    set(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    set(header::ACCESS_CONTROL_ALLOW_METHODS, &cors.methods);
    set(header::ACCESS_CONTROL_ALLOW_HEADERS, &cors.headers);
    set(header::ACCESS_CONTROL_EXPOSE_HEADERS, &cors.expose);
    set(header::ACCESS_CONTROL_MAX_AGE, &cors.max_age);
    if cors.credentials {
        set(header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true");
    }
    response
}

/// Marks a response to `origin` as allowed, when the policy allows it.
pub fn cors_allow(cors: &Cors, origin: &str, headers: &mut http::HeaderMap) {
    if cors.allows(origin)
        && let Ok(value) = HeaderValue::from_str(origin)
    {
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
}

/// A redirect to `host` and `to` (each, when empty, the request's own
/// `authority` and `path`).
pub fn redirect(host: &str, to: &str, code: u16, authority: &str, path: &str) -> Response<Body> {
    let host = if host.is_empty() { authority } else { host };
    let path = if to.is_empty() { path } else { to };
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::MOVED_PERMANENTLY);
    let mut response = local_reply(status, "redirected");
    if let Ok(location) = HeaderValue::from_str(&format!("http://{host}{path}")) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    response
}

/// The fault filter's answer.
pub fn aborted(abort: Abort) -> Response<Body> {
    match abort {
        Abort::Http(code) => local_reply(
            StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "fault filter abort",
        ),
        Abort::Grpc(code) => {
            let mut r = local_reply(StatusCode::OK, "");
            let headers = r.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert("grpc-status", HeaderValue::from(code));
            headers.insert(
                "grpc-message",
                HeaderValue::from_static("fault filter abort"),
            );
            r
        }
    }
}

pub fn apply_request_ops(ops: &HeaderOps, headers: &mut http::HeaderMap) {
    apply(&ops.request_remove, &ops.request_add, headers);
}

pub fn apply_response_ops(ops: &HeaderOps, headers: &mut http::HeaderMap) {
    apply(&ops.response_remove, &ops.response_add, headers);
}

fn apply(remove: &[String], add: &[(String, String, bool)], headers: &mut http::HeaderMap) {
    for name in remove {
        headers.remove(name.as_str());
    }
    for (name, value, append) in add {
        let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) else {
            continue;
        };
        if *append {
            headers.append(name, value);
        } else {
            headers.insert(name, value);
        }
    }
}

/// The headers a forwarded request carries: the host (rewritten, or from
/// an absolute-form request's URI, as a proxy used as `HTTP_PROXY`
/// receives them), `x-forwarded-proto`, this workload's Mixer attributes
/// when given (outbound: a caller's are the server proxy's alone), the
/// caller's proven identity as Envoy forwards it, and a request id.
pub fn forwarded_headers(
    parts: &mut http::request::Parts,
    host_rewrite: Option<&str>,
    attributes: Option<&HeaderValue>,
    peer_identity: Option<&str>,
) {
    let headers = &mut parts.headers;
    if let Some(host) = host_rewrite
        && let Ok(value) = HeaderValue::from_str(host)
    {
        headers.insert(header::HOST, value);
    } else if !headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(value) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, value);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    headers.remove(crate::mixer::FORWARDED_ATTRIBUTES);
    if let Some(attributes) = attributes {
        headers.insert(crate::mixer::FORWARDED_ATTRIBUTES, attributes.clone());
    }
    headers.remove("x-forwarded-client-cert");
    if let Some(identity) = peer_identity
        && let Ok(value) = HeaderValue::from_str(&format!("URI={identity}"))
    {
        headers.insert("x-forwarded-client-cert", value);
    }
    if !headers.contains_key("x-request-id") {
        let id = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
        if let Ok(id) = HeaderValue::from_str(&id) {
            headers.insert("x-request-id", id);
        }
    }
}

/// A mirrored request's host, marked with `-shadow` as Envoy marks it.
pub fn shadow(headers: &mut http::HeaderMap) {
    if let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&format!("{host}-shadow"))
    {
        headers.insert(header::HOST, v);
    }
}

/// The request to send to `addr`: the request's method, path and headers
/// but the connection's own (hop-by-hop) ones, as HTTP/1.1 (the cluster's
/// client speaks HTTP/2 when the cluster does).
pub fn upstream_request(
    mut parts: http::request::Parts,
    addr: SocketAddr,
    body: Body,
) -> Result<Request<Body>, http::Error> {
    let path = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    parts.uri = format!("http://{addr}{path}").parse::<Uri>()?;
    parts.version = http::Version::HTTP_11;
    parts.extensions = http::Extensions::new();
    // Hop-by-hop headers belong to the downstream connection.
    let headers = &mut parts.headers;
    for name in [
        header::CONNECTION,
        header::PROXY_AUTHORIZATION,
        header::TE,
        header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    headers.remove("proxy-connection");
    headers.remove("keep-alive");
    Ok(Request::from_parts(parts, body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::route::StringMatch;

    fn cors() -> Cors {
        Cors {
            origins: vec![StringMatch::Exact("https://shop.example".into(), false)],
            methods: "GET,POST".into(),
            headers: "x-user".into(),
            expose: "x-version".into(),
            max_age: "86400".into(),
            credentials: true,
        }
    }

    fn header<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[test]
    fn a_preflight_from_an_allowed_origin_gets_the_policy() {
        let allowed = cors_preflight(&cors(), "https://shop.example");
        let h = allowed.headers();
        assert_eq!(allowed.status(), 200);
        assert_eq!(
            header(h, "access-control-allow-origin"),
            Some("https://shop.example")
        );
        assert_eq!(header(h, "access-control-allow-methods"), Some("GET,POST"));
        assert_eq!(header(h, "access-control-allow-headers"), Some("x-user"));
        assert_eq!(
            header(h, "access-control-expose-headers"),
            Some("x-version")
        );
        assert_eq!(header(h, "access-control-max-age"), Some("86400"));
        assert_eq!(header(h, "access-control-allow-credentials"), Some("true"));

        let refused = cors_preflight(&cors(), "https://evil.example");
        assert_eq!(refused.status(), 200);
        assert_eq!(
            header(refused.headers(), "access-control-allow-origin"),
            None
        );

        let mut response = http::HeaderMap::new();
        cors_allow(&cors(), "https://evil.example", &mut response);
        assert!(response.is_empty());
        cors_allow(&cors(), "https://shop.example", &mut response);
        assert_eq!(
            header(&response, "access-control-allow-origin"),
            Some("https://shop.example")
        );
    }

    #[test]
    fn a_redirect_keeps_what_it_does_not_replace() {
        let to = |host, path, code| {
            let r = redirect(host, path, code, "shop.example:9080", "/old?q=1");
            let location = header(r.headers(), "location").unwrap().to_string();
            (r.status().as_u16(), location)
        };
        assert_eq!(
            to("", "/new", 301),
            (301, "http://shop.example:9080/new".into())
        );
        assert_eq!(
            to("other.example", "", 302),
            (302, "http://other.example/old?q=1".into())
        );
        assert_eq!(
            to("", "", 0),
            (301, "http://shop.example:9080/old?q=1".into())
        );
    }

    #[test]
    fn faults_answer_with_their_status_over_http_or_grpc() {
        assert_eq!(aborted(Abort::Http(418)).status(), 418);
        let grpc = aborted(Abort::Grpc(14));
        assert_eq!(grpc.status(), 200);
        assert_eq!(header(grpc.headers(), "grpc-status"), Some("14"));
        assert_eq!(
            header(grpc.headers(), "content-type"),
            Some("application/grpc")
        );
    }

    #[test]
    fn header_operations_remove_then_add_or_append() {
        let ops = HeaderOps {
            request_add: vec![
                ("x-set".into(), "new".into(), false),
                ("x-list".into(), "two".into(), true),
            ],
            request_remove: vec!["x-gone".into()],
            response_add: vec![("x-version".into(), "v2".into(), false)],
            response_remove: vec!["server".into()],
        };
        let mut request = http::HeaderMap::new();
        for (name, value) in [("x-set", "old"), ("x-list", "one"), ("x-gone", "1")] {
            request.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        apply_request_ops(&ops, &mut request);
        assert_eq!(header(&request, "x-set"), Some("new"));
        let list: Vec<_> = request.get_all("x-list").iter().collect();
        assert_eq!(list, ["one", "two"]);
        assert!(!request.contains_key("x-gone"));

        let mut response = http::HeaderMap::new();
        response.insert(header::SERVER, HeaderValue::from_static("app"));
        apply_response_ops(&ops, &mut response);
        assert!(!response.contains_key(header::SERVER));
        assert_eq!(header(&response, "x-version"), Some("v2"));
    }

    fn parts(uri: &str, headers: &[(&'static str, &'static str)]) -> http::request::Parts {
        let mut request = Request::get(uri);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn a_forwarded_request_carries_the_mesh_headers() {
        // Absolute form, as the proxy used as HTTP_PROXY receives it.
        let mut p = parts(
            "http://reviews.shop:9080/r",
            &[
                ("x-istio-attributes", "from-the-caller"),
                ("x-forwarded-client-cert", "forged"),
            ],
        );
        let ours = HeaderValue::from_static("ours");
        forwarded_headers(
            &mut p,
            None,
            Some(&ours),
            Some("spiffe://cluster.local/ns/shop/sa/pp"),
        );
        assert_eq!(header(&p.headers, "host"), Some("reviews.shop:9080"));
        assert_eq!(header(&p.headers, "x-forwarded-proto"), Some("http"));
        assert_eq!(header(&p.headers, "x-istio-attributes"), Some("ours"));
        assert_eq!(
            header(&p.headers, "x-forwarded-client-cert"),
            Some("URI=spiffe://cluster.local/ns/shop/sa/pp")
        );
        assert_eq!(header(&p.headers, "x-request-id").map(str::len), Some(32));

        // A host rewrite wins; a caller's attributes and unproven identity
        // go; an incoming request id stays.
        let mut p = parts(
            "/r",
            &[
                ("host", "reviews"),
                ("x-istio-attributes", "from-the-caller"),
                ("x-forwarded-client-cert", "forged"),
                ("x-request-id", "abc"),
            ],
        );
        forwarded_headers(&mut p, Some("ratings.shop"), None, None);
        assert_eq!(header(&p.headers, "host"), Some("ratings.shop"));
        assert!(!p.headers.contains_key("x-istio-attributes"));
        assert!(!p.headers.contains_key("x-forwarded-client-cert"));
        assert_eq!(header(&p.headers, "x-request-id"), Some("abc"));
    }

    #[test]
    fn a_mirror_marks_its_host_as_a_shadow() {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("reviews:9080"));
        shadow(&mut headers);
        assert_eq!(header(&headers, "host"), Some("reviews:9080-shadow"));
    }

    #[test]
    fn the_upstream_request_leaves_the_connections_own_headers_behind() {
        let mut headers = http::HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("x-user", "jason"),
        ] {
            headers.insert(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
        }
        let addr: SocketAddr = "10.0.0.1:9080".parse().unwrap();
        let mut request = parts("http://reviews:9080/r?q=1", &[]);
        request.method = http::Method::POST;
        request.headers = headers;
        let request = upstream_request(request, addr, crate::http::full("")).unwrap();
        assert_eq!(request.uri(), "http://10.0.0.1:9080/r?q=1");
        assert_eq!(request.method(), http::Method::POST);
        let names: Vec<_> = request.headers().keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-user"]);
    }
}
