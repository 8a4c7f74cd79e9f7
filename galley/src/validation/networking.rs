//! `networking.istio.io`: VirtualService, DestinationRule, Gateway,
//! ServiceEntry, Sidecar and EnvoyFilter.

use std::{
    collections::{BTreeSet, HashSet},
    net::IpAddr,
};

use mesh_api::pb::istio::networking::v1alpha3::{self as net, http_fault_injection, service_entry};

use super::{Check, Field, common::*};

pub(super) fn virtual_service(c: &mut Check, s: &Field, vs: &net::VirtualService) {
    if vs.hosts.is_empty() {
        c.fail(s.at("hosts"), "a virtual service needs at least one host");
    }
    let applies_to_mesh = vs.gateways.is_empty() || vs.gateways.iter().any(|g| g == "mesh");
    for (i, h) in vs.hosts.iter().enumerate() {
        if h == "*" && applies_to_mesh {
            c.fail(
                s.at("hosts").index(i),
                "wildcard host * is not allowed for virtual services bound to the mesh",
            );
        } else {
            host(c, &s.at("hosts").index(i), h);
        }
    }
    let mut seen = BTreeSet::new();
    for (i, h) in vs.hosts.iter().enumerate() {
        if !seen.insert(h) {
            c.fail(s.at("hosts").index(i), format!("duplicate host {h:?}"));
        }
    }
    gateway_names(c, &s.at("gateways"), &vs.gateways);
    if vs.http.is_empty() && vs.tcp.is_empty() && vs.tls.is_empty() {
        c.fail(s, "http, tcp or tls routes must be given");
    }
    for (i, r) in vs.http.iter().enumerate() {
        http_route(c, &s.at("http").index(i), r);
    }
    for (i, r) in vs.tcp.iter().enumerate() {
        let f = &s.at("tcp").index(i);
        for (m, l4) in r.r#match.iter().enumerate() {
            if l4.port != 0 {
                port(c, &f.at("match").index(m).at("port"), l4.port);
            }
        }
        route_destinations(
            c,
            &f.at("route"),
            r.route.iter().map(|d| (&d.destination, d.weight)),
        );
    }
    for (i, r) in vs.tls.iter().enumerate() {
        let f = &s.at("tls").index(i);
        c.require(
            !r.r#match.is_empty(),
            f.at("match"),
            "a TLS route needs at least one match",
        );
        for (m, tls) in r.r#match.iter().enumerate() {
            c.require(
                !tls.sni_hosts.is_empty(),
                f.at("match").index(m).at("sniHosts"),
                "a TLS match needs SNI hosts",
            );
        }
        route_destinations(
            c,
            &f.at("route"),
            r.route.iter().map(|d| (&d.destination, d.weight)),
        );
    }
    export_to(c, &s.at("exportTo"), &vs.export_to);
}

pub(super) fn http_route(c: &mut Check, f: &Field, r: &net::HttpRoute) {
    if r.redirect.is_some() {
        c.require(
            r.route.is_empty(),
            f,
            "a route cannot have both route and redirect",
        );
        c.require(
            r.fault.is_none(),
            f,
            "a route cannot have both fault and redirect",
        );
        c.require(
            r.rewrite.is_none(),
            f,
            "a route cannot have both rewrite and redirect",
        );
        c.require(
            !r.websocket_upgrade,
            f,
            "websocket upgrade is not allowed on redirects",
        );
        if let Some(redirect) = &r.redirect {
            c.require(
                !redirect.uri.is_empty() || !redirect.authority.is_empty(),
                f.at("redirect"),
                "a redirect needs uri, authority, or both",
            );
        }
    } else if r.route.is_empty() {
        c.fail(f.at("route"), "a route or a redirect is required");
    }
    if let Some(rewrite) = &r.rewrite {
        c.require(
            !rewrite.uri.is_empty() || !rewrite.authority.is_empty(),
            f.at("rewrite"),
            "a rewrite needs uri, authority, or both",
        );
    }
    for (m, hm) in r.r#match.iter().enumerate() {
        let mf = &f.at("match").index(m);
        for (name, sm) in &hm.headers {
            header_name(c, &mf.at("headers"), name);
            string_match(c, &mf.at("headers").key(name), &Some(sm.clone()));
        }
        for (name, sm) in &hm.query_params {
            string_match(c, &mf.at("queryParams").key(name), &Some(sm.clone()));
        }
        string_match(c, &mf.at("uri"), &hm.uri);
        string_match(c, &mf.at("scheme"), &hm.scheme);
        string_match(c, &mf.at("method"), &hm.method);
        string_match(c, &mf.at("authority"), &hm.authority);
        if hm.port != 0 {
            port(c, &mf.at("port"), hm.port);
        }
        labels(c, &mf.at("sourceLabels"), &hm.source_labels);
        gateway_names(c, &mf.at("gateways"), &hm.gateways);
    }
    headers(c, &f.at("headers"), &r.headers);
    route_destinations(
        c,
        &f.at("route"),
        r.route.iter().map(|d| (&d.destination, d.weight)),
    );
    for (d, rd) in r.route.iter().enumerate() {
        headers(c, &f.at("route").index(d).at("headers"), &rd.headers);
    }
    if let Some(mirror) = &r.mirror {
        destination(c, &f.at("mirror"), mirror);
    }
    duration(c, &f.at("timeout"), &r.timeout);
    if let Some(retries) = &r.retries {
        if let Err(reason) = mesh_api::networking::retry_attempts(retries) {
            c.fail(f.at("retries").at("attempts"), reason);
        }
        duration(
            c,
            &f.at("retries").at("perTryTimeout"),
            &retries.per_try_timeout,
        );
        for policy in retries.retry_on.split(',').filter(|p| !p.is_empty()) {
            let known = RETRY_ON.contains(&policy)
                || policy.parse::<u16>().is_ok_and(|s| (100..600).contains(&s));
            c.require(
                known,
                f.at("retries").at("retryOn"),
                &format!("{policy:?} is not a retry condition"),
            );
        }
    }
    if let Some(fault) = &r.fault {
        fault_injection(c, &f.at("fault"), fault);
    }
    if let Some(cors) = &r.cors_policy {
        for (i, m) in cors.allow_methods.iter().enumerate() {
            c.require(
                HTTP_METHODS.contains(&m.as_str()),
                f.at("corsPolicy").at("allowMethods").index(i),
                &format!("{m:?} is not an HTTP method"),
            );
        }
        for (i, h) in cors
            .allow_headers
            .iter()
            .chain(&cors.expose_headers)
            .enumerate()
        {
            header_name(c, &f.at("corsPolicy").at("headers").index(i), h);
        }
        duration(c, &f.at("corsPolicy").at("maxAge"), &cors.max_age);
    }
}

/// The retry conditions Envoy knows (HTTP status codes are allowed too).
pub(super) const RETRY_ON: &[&str] = &[
    "5xx",
    "gateway-error",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "retriable-status-codes",
    "cancelled",
    "deadline-exceeded",
    "internal",
    "resource-exhausted",
    "unavailable",
];

pub(super) const HTTP_METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

pub(super) fn headers(c: &mut Check, f: &Field, h: &Option<net::Headers>) {
    let Some(h) = h else { return };
    for (which, ops) in [("request", &h.request), ("response", &h.response)] {
        let Some(ops) = ops else { continue };
        for name in ops.set.keys().chain(ops.add.keys()).chain(&ops.remove) {
            header_name(c, &f.at(which), name);
        }
    }
}

pub(super) fn route_destinations<'a>(
    c: &mut Check,
    f: &Field,
    routes: impl Iterator<Item = (&'a Option<net::Destination>, i32)>,
) {
    let mut total = 0i64;
    let mut count = 0;
    for (i, (dest, weight)) in routes.enumerate() {
        count += 1;
        match dest {
            Some(d) => destination(c, &f.index(i).at("destination"), d),
            None => c.fail(f.index(i).at("destination"), "a destination is required"),
        }
        percent(c, &f.index(i).at("weight"), weight);
        total += i64::from(weight);
    }
    if count > 1 && total != 100 {
        c.fail(f, format!("destination weights add up to {total}, not 100"));
    }
}

pub(super) fn destination(c: &mut Check, f: &Field, d: &net::Destination) {
    if d.host == "*" {
        c.fail(f.at("host"), "a destination cannot be the wildcard host");
    } else {
        host(c, &f.at("host"), &d.host);
    }
    if !d.subset.is_empty() {
        c.require(
            is_dns1123_label(&d.subset),
            f.at("subset"),
            "subset names are DNS-1123 labels",
        );
    }
    if let Some(net::PortSelector {
        port: Some(net::port_selector::Port::Number(n)),
    }) = &d.port
    {
        port(c, &f.at("port").at("number"), *n);
    }
}

pub(super) fn fault_injection(c: &mut Check, f: &Field, fault: &net::HttpFaultInjection) {
    c.require(
        fault.abort.is_some() || fault.delay.is_some(),
        f,
        "a fault needs an abort, a delay, or both",
    );
    let fraction = |c: &mut Check, field: &Field, p: &Option<net::Percent>, legacy: i32| match p {
        Some(p) => {
            let ok = (0.0..=100.0).contains(&p.value) && !(p.value > 0.0 && p.value < 0.0001);
            c.require(ok, field, "percentage must be 0 or in 0.0001..100");
        }
        None => percent(c, field, legacy),
    };
    if let Some(abort) = &fault.abort {
        #[allow(deprecated)]
        fraction(
            c,
            &f.at("abort").at("percentage"),
            &abort.percentage,
            abort.percent,
        );
        match &abort.error_type {
            Some(http_fault_injection::abort::ErrorType::HttpStatus(s)) => c.require(
                (200..600).contains(s),
                f.at("abort").at("httpStatus"),
                "HTTP status must be in 200..599",
            ),
            Some(_) => c.fail(f.at("abort"), "only httpStatus aborts are supported"),
            None => c.fail(f.at("abort"), "an abort needs an httpStatus"),
        }
    }
    if let Some(delay) = &fault.delay {
        #[allow(deprecated)]
        fraction(
            c,
            &f.at("delay").at("percentage"),
            &delay.percentage,
            delay.percent,
        );
        match &delay.http_delay_type {
            Some(http_fault_injection::delay::HttpDelayType::FixedDelay(d)) => {
                duration(c, &f.at("delay").at("fixedDelay"), &Some(*d))
            }
            Some(_) => c.fail(f.at("delay"), "exponentialDelay is not supported"),
            None => c.fail(f.at("delay"), "a delay needs a fixedDelay"),
        }
    }
}

pub(super) fn destination_rule(c: &mut Check, s: &Field, dr: &net::DestinationRule) {
    host(c, &s.at("host"), &dr.host);
    if let Some(p) = &dr.traffic_policy {
        traffic_policy(c, &s.at("trafficPolicy"), p);
    }
    let mut names = HashSet::new();
    for (i, subset) in dr.subsets.iter().enumerate() {
        let f = &s.at("subsets").index(i);
        c.require(
            is_dns1123_label(&subset.name),
            f.at("name"),
            "subset names are DNS-1123 labels",
        );
        c.require(
            names.insert(&subset.name),
            f.at("name"),
            &format!("duplicate subset name {:?}", subset.name),
        );
        labels(c, &f.at("labels"), &subset.labels);
        if let Some(p) = &subset.traffic_policy {
            traffic_policy(c, &f.at("trafficPolicy"), p);
        }
    }
    export_to(c, &s.at("exportTo"), &dr.export_to);
}

pub(super) fn traffic_policy(c: &mut Check, f: &Field, p: &net::TrafficPolicy) {
    let empty = p.load_balancer.is_none()
        && p.connection_pool.is_none()
        && p.outlier_detection.is_none()
        && p.tls.is_none()
        && p.port_level_settings.is_empty();
    c.require(!empty, f, "a traffic policy needs at least one setting");
    policy_parts(
        c,
        f,
        &p.load_balancer,
        &p.connection_pool,
        &p.outlier_detection,
        &p.tls,
    );
    for (i, pl) in p.port_level_settings.iter().enumerate() {
        let pf = &f.at("portLevelSettings").index(i);
        match &pl.port {
            Some(net::PortSelector {
                port: Some(net::port_selector::Port::Number(n)),
            }) => port(c, &pf.at("port").at("number"), *n),
            Some(net::PortSelector {
                port: Some(net::port_selector::Port::Name(_)),
            }) => {}
            _ => c.fail(pf.at("port"), "a port-level policy needs a port"),
        }
        policy_parts(
            c,
            pf,
            &pl.load_balancer,
            &pl.connection_pool,
            &pl.outlier_detection,
            &pl.tls,
        );
    }
}

pub(super) fn policy_parts(
    c: &mut Check,
    f: &Field,
    lb: &Option<net::LoadBalancerSettings>,
    pool: &Option<net::ConnectionPoolSettings>,
    outlier: &Option<net::OutlierDetection>,
    tls: &Option<net::TlsSettings>,
) {
    use net::load_balancer_settings::{LbPolicy, consistent_hash_lb::HashKey};
    if let Some(LbPolicy::ConsistentHash(hash)) = lb.as_ref().and_then(|lb| lb.lb_policy.as_ref()) {
        match &hash.hash_key {
            Some(HashKey::HttpCookie(cookie)) => {
                c.require(
                    !cookie.name.is_empty(),
                    f.at("loadBalancer")
                        .at("consistentHash")
                        .at("httpCookie")
                        .at("name"),
                    "a cookie hash needs the cookie's name",
                );
                c.require(
                    cookie.ttl.is_some(),
                    f.at("loadBalancer")
                        .at("consistentHash")
                        .at("httpCookie")
                        .at("ttl"),
                    "a cookie hash needs a ttl",
                );
            }
            Some(HashKey::HttpHeaderName(h)) => header_name(
                c,
                &f.at("loadBalancer")
                    .at("consistentHash")
                    .at("httpHeaderName"),
                h,
            ),
            Some(HashKey::UseSourceIp(_)) => {}
            None => c.fail(
                f.at("loadBalancer").at("consistentHash"),
                "a consistent hash needs a hash key",
            ),
        }
    }
    if let Some(pool) = pool {
        c.require(
            pool.tcp.is_some() || pool.http.is_some(),
            f.at("connectionPool"),
            "a connection pool needs tcp or http settings",
        );
        if let Some(tcp) = &pool.tcp {
            c.require(
                tcp.max_connections >= 0,
                f.at("connectionPool").at("tcp").at("maxConnections"),
                "must not be negative",
            );
            duration(
                c,
                &f.at("connectionPool").at("tcp").at("connectTimeout"),
                &tcp.connect_timeout,
            );
        }
        if let Some(http) = &pool.http {
            for (name, value) in [
                ("http1MaxPendingRequests", http.http1_max_pending_requests),
                ("http2MaxRequests", http.http2_max_requests),
                ("maxRequestsPerConnection", http.max_requests_per_connection),
                ("maxRetries", http.max_retries),
            ] {
                c.require(
                    value >= 0,
                    f.at("connectionPool").at("http").at(name),
                    "must not be negative",
                );
            }
            duration(
                c,
                &f.at("connectionPool").at("http").at("idleTimeout"),
                &http.idle_timeout,
            );
        }
    }
    if let Some(o) = outlier {
        c.require(
            o.consecutive_errors >= 0,
            f.at("outlierDetection").at("consecutiveErrors"),
            "must not be negative",
        );
        duration(c, &f.at("outlierDetection").at("interval"), &o.interval);
        duration(
            c,
            &f.at("outlierDetection").at("baseEjectionTime"),
            &o.base_ejection_time,
        );
        percent(
            c,
            &f.at("outlierDetection").at("maxEjectionPercent"),
            o.max_ejection_percent,
        );
        percent(
            c,
            &f.at("outlierDetection").at("minHealthPercent"),
            o.min_health_percent,
        );
    }
    if let Some(tls) = tls
        && tls.mode == net::tls_settings::TlSmode::Mutual as i32
    {
        c.require(
            !tls.client_certificate.is_empty(),
            f.at("tls").at("clientCertificate"),
            "MUTUAL TLS needs a client certificate",
        );
        c.require(
            !tls.private_key.is_empty(),
            f.at("tls").at("privateKey"),
            "MUTUAL TLS needs a private key",
        );
    }
}

pub(super) fn gateway(c: &mut Check, s: &Field, gw: &net::Gateway) {
    if gw.servers.is_empty() {
        c.fail(s.at("servers"), "a gateway needs at least one server");
    }
    let mut port_names = HashSet::new();
    for (i, server) in gw.servers.iter().enumerate() {
        let f = &s.at("servers").index(i);
        if server.hosts.is_empty() {
            c.fail(f.at("hosts"), "a server needs at least one host");
        }
        for (h, name) in server.hosts.iter().enumerate() {
            let name = name.split_once('/').map_or(name.as_str(), |(_, host)| host);
            host(c, &f.at("hosts").index(h), name);
        }
        let Some(p) = &server.port else {
            c.fail(f.at("port"), "a server needs a port");
            continue;
        };
        port(c, &f.at("port").at("number"), p.number);
        c.require(
            !p.name.is_empty(),
            f.at("port").at("name"),
            "a server port needs a name",
        );
        c.require(
            port_names.insert(&p.name),
            f.at("port").at("name"),
            &format!("port names must be unique; {:?} is used twice", p.name),
        );
        let protocol = p.protocol.to_ascii_uppercase();
        if !PROTOCOLS.contains(&protocol.as_str()) {
            c.fail(
                f.at("port").at("protocol"),
                format!("unknown protocol {:?}", p.protocol),
            );
        }
        let tls_protocol = protocol == "HTTPS" || protocol == "TLS";
        match &server.tls {
            None if tls_protocol => c.fail(f.at("tls"), "HTTPS and TLS servers need TLS settings"),
            Some(tls) if !(tls_protocol || protocol == "HTTP" && tls.https_redirect) => c.fail(
                f.at("tls"),
                "only HTTPS and TLS servers take TLS settings (HTTP: httpsRedirect)",
            ),
            Some(tls) => server_tls(c, &f.at("tls"), tls),
            None => {}
        }
    }
}

pub(super) const PROTOCOLS: &[&str] = &[
    "HTTP", "HTTPS", "GRPC", "HTTP2", "MONGO", "MYSQL", "REDIS", "TCP", "TLS", "UDP",
];

pub(super) fn server_tls(c: &mut Check, f: &Field, tls: &net::server::TlsOptions) {
    use net::server::tls_options::TlSmode;
    let mode = TlSmode::try_from(tls.mode).unwrap_or(TlSmode::Passthrough);
    if matches!(mode, TlSmode::Simple | TlSmode::Mutual) && tls.credential_name.is_empty() {
        c.require(
            !tls.server_certificate.is_empty(),
            f.at("serverCertificate"),
            "SIMPLE and MUTUAL TLS need a server certificate",
        );
        c.require(
            !tls.private_key.is_empty(),
            f.at("privateKey"),
            "SIMPLE and MUTUAL TLS need a private key",
        );
        if mode == TlSmode::Mutual {
            c.require(
                !tls.ca_certificates.is_empty(),
                f.at("caCertificates"),
                "MUTUAL TLS needs a client CA bundle",
            );
        }
    }
}

pub(super) fn service_entry(c: &mut Check, s: &Field, se: &net::ServiceEntry) {
    use service_entry::Resolution;
    if se.hosts.is_empty() {
        c.fail(s.at("hosts"), "a service entry needs at least one host");
    }
    for (i, h) in se.hosts.iter().enumerate() {
        if h == "*" {
            c.fail(
                s.at("hosts").index(i),
                "a service entry cannot be the wildcard host",
            );
        } else {
            host(c, &s.at("hosts").index(i), h);
        }
    }
    let resolution = Resolution::try_from(se.resolution).unwrap_or(Resolution::None);
    for (i, a) in se.addresses.iter().enumerate() {
        let (ip, prefix) = a
            .split_once('/')
            .map_or((a.as_str(), None), |(ip, p)| (ip, Some(p)));
        let ok = ip.parse::<std::net::Ipv4Addr>().is_ok()
            && prefix.is_none_or(|p| p.parse::<u8>().is_ok_and(|p| p <= 32));
        c.require(
            ok,
            s.at("addresses").index(i),
            "addresses are IPv4 addresses or CIDR ranges",
        );
        if prefix.is_some() && resolution == Resolution::Dns {
            c.fail(
                s.at("addresses").index(i),
                "CIDR addresses are allowed only with resolution NONE or STATIC",
            );
        }
    }
    let mut names = HashSet::new();
    let mut numbers = HashSet::new();
    for (i, p) in se.ports.iter().enumerate() {
        let f = &s.at("ports").index(i);
        port(c, &f.at("number"), p.number);
        c.require(!p.name.is_empty(), f.at("name"), "ports need a name");
        c.require(
            names.insert(p.name.as_str()),
            f.at("name"),
            &format!("port name {:?} is used twice", p.name),
        );
        c.require(
            numbers.insert(p.number),
            f.at("number"),
            &format!("port {} is defined twice", p.number),
        );
        c.require(
            PROTOCOLS.contains(&p.protocol.to_ascii_uppercase().as_str()),
            f.at("protocol"),
            &format!("unknown protocol {:?}", p.protocol),
        );
    }
    match resolution {
        Resolution::None => c.require(
            se.endpoints.is_empty(),
            s.at("endpoints"),
            "resolution NONE takes no endpoints",
        ),
        Resolution::Static => c.require(
            !se.endpoints.is_empty(),
            s.at("endpoints"),
            "resolution STATIC needs endpoints",
        ),
        Resolution::Dns => {}
    }
    for (i, e) in se.endpoints.iter().enumerate() {
        let f = &s.at("endpoints").index(i);
        let unix = e.address.starts_with("unix://");
        match resolution {
            Resolution::Static if !unix => c.require(
                e.address.parse::<IpAddr>().is_ok(),
                f.at("address"),
                "STATIC endpoints are IP addresses (or unix:// paths)",
            ),
            Resolution::Dns if e.address.parse::<IpAddr>().is_err() => {
                host(c, &f.at("address"), &e.address)
            }
            _ => {}
        }
        for (name, number) in &e.ports {
            c.require(
                names.contains(name.as_str()),
                f.at("ports").key(name),
                "the service entry defines no port of that name",
            );
            port(c, &f.at("ports").key(name), *number);
        }
        labels(c, &f.at("labels"), &e.labels);
    }
    export_to(c, &s.at("exportTo"), &se.export_to);
}

pub(super) fn sidecar(c: &mut Check, s: &Field, sc: &net::Sidecar) {
    if sc.egress.is_empty() {
        c.fail(
            s.at("egress"),
            "a sidecar needs at least one egress listener",
        );
    }
    for (i, e) in sc.egress.iter().enumerate() {
        let f = &s.at("egress").index(i);
        if e.hosts.is_empty() {
            c.fail(f.at("hosts"), "an egress listener needs at least one host");
        }
        for (h, entry) in e.hosts.iter().enumerate() {
            match entry.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() => {
                    if name != "*" {
                        host(c, &f.at("hosts").index(h), name);
                    }
                }
                _ => c.fail(
                    f.at("hosts").index(h),
                    "egress hosts are `namespace/host` (`*` and `.` allowed)",
                ),
            }
        }
        if let Some(p) = &e.port {
            port(c, &f.at("port").at("number"), p.number);
        }
    }
    for (i, l) in sc.ingress.iter().enumerate() {
        let f = &s.at("ingress").index(i);
        match &l.port {
            Some(p) => port(c, &f.at("port").at("number"), p.number),
            None => c.fail(f.at("port"), "an ingress listener needs a port"),
        }
        c.require(
            !l.default_endpoint.is_empty(),
            f.at("defaultEndpoint"),
            "an ingress listener needs a defaultEndpoint",
        );
    }
}

pub(super) fn envoy_filter(c: &mut Check, s: &Field, ef: &net::EnvoyFilter) {
    c.ignored(
        s,
        "this mesh's Pilot does not apply EnvoyFilters: no proxy gets these filters",
    );
    if ef.filters.is_empty() {
        c.fail(s.at("filters"), "an envoy filter needs at least one filter");
    }
    for (i, filter) in ef.filters.iter().enumerate() {
        let f = &s.at("filters").index(i);
        c.require(
            !filter.filter_name.is_empty(),
            f.at("filterName"),
            "a filter needs a name",
        );
        c.require(
            filter.filter_type != net::envoy_filter::filter::FilterType::Invalid as i32,
            f.at("filterType"),
            "filterType must be HTTP or NETWORK",
        );
        c.require(
            filter.filter_config.is_some(),
            f.at("filterConfig"),
            "a filter needs its config",
        );
    }
}
