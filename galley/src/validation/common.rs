//! Rules more than one kind applies: names, hosts, ports, durations, string
//! matches, labels, `exportTo`, gateway names.

use std::net::IpAddr;

use mesh_api::{pb::istio::networking::v1alpha3 as net, wkt};

use super::{Check, Field};

pub fn is_dns1123_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// A host name, possibly with a leading wildcard label (`*.example.com`,
/// `*`, `*-svc.ns`), or an IP address.
pub(super) fn host(c: &mut Check, field: &Field, host: &str) {
    if host.parse::<IpAddr>().is_ok() {
        return;
    }
    if host.is_empty() || host.len() > 255 {
        return c.fail(field, format!("host {host:?} must be 1 to 255 characters"));
    }
    let (first, rest) = host
        .split_once('.')
        .map_or((host, None), |(f, r)| (f, Some(r)));
    let first_ok = first == "*" || is_dns1123_label(first.strip_prefix('*').unwrap_or(first));
    let rest_ok = rest.is_none_or(|r| r.split('.').all(is_dns1123_label));
    if !first_ok || !rest_ok {
        c.fail(field, format!("host {host:?} is not a valid domain name (DNS-1123 labels, optionally a leading wildcard)"));
    }
}

pub(super) fn port(c: &mut Check, field: &Field, port: u32) {
    c.require(
        (1..=65535).contains(&port),
        field,
        "port must be in 1..65535",
    );
}

pub(super) fn percent(c: &mut Check, field: &Field, value: i32) {
    c.require(
        (0..=100).contains(&value),
        field,
        "percentage must be in 0..100",
    );
}

/// Durations are at least 1ms and whole milliseconds, as Envoy takes them.
pub(super) fn duration(c: &mut Check, field: &Field, d: &Option<wkt::Duration>) {
    let Some(d) = d else { return };
    let nanos = i128::from(d.seconds) * 1_000_000_000 + i128::from(d.nanos);
    if nanos < 1_000_000 {
        c.fail(field, "duration must be at least 1ms");
    } else if nanos % 1_000_000 != 0 {
        c.fail(field, "only whole milliseconds are supported");
    }
}

pub(super) fn header_name(c: &mut Check, field: &Field, name: &str) {
    c.require(!name.is_empty(), field, "header name cannot be empty");
}

pub(super) fn string_match(c: &mut Check, field: &Field, m: &Option<net::StringMatch>) {
    use net::string_match::MatchType;
    match m.as_ref().and_then(|m| m.match_type.as_ref()) {
        Some(MatchType::Regex(re)) => {
            if let Err(e) = mesh_api::safe_regex::whole_value(re) {
                c.fail(field.at("regex"), format!("invalid regex: {e}"));
            }
        }
        Some(MatchType::Exact(_) | MatchType::Prefix(_)) => {}
        None if m.is_some() => c.fail(field, "a string match needs exact, prefix or regex"),
        None => {}
    }
}

pub(super) fn labels(
    c: &mut Check,
    field: &Field,
    labels: &std::collections::BTreeMap<String, String>,
) {
    for key in labels.keys() {
        if key.is_empty() {
            c.fail(field, "label keys cannot be empty");
        }
    }
}

pub(super) fn export_to(c: &mut Check, field: &Field, export_to: &[String]) {
    match export_to {
        [] => {}
        [one] if one == "." || one == "*" => {}
        [_] => c.fail(field, "only \".\" or \"*\" is allowed in exportTo"),
        _ => c.fail(field, "exportTo takes one entry (\".\" or \"*\")"),
    }
}

/// `gateway` or `namespace/gateway`; `mesh` is the sidecars.
pub(super) fn gateway_names(c: &mut Check, field: &Field, gateways: &[String]) {
    for (i, g) in gateways.iter().enumerate() {
        let ok = match g.split_once('/') {
            Some((ns, name)) => is_dns1123_label(ns) && is_dns1123_label(name),
            None => g.split('.').all(is_dns1123_label),
        };
        c.require(
            ok,
            field.index(i),
            "gateway names are `name` or `namespace/name` (DNS-1123)",
        );
    }
}
