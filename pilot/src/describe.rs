//! What applies to a service or a pod, and why: the answers behind
//! `meshctl authn tls-check` (`/debug/authenticationz`, Istio 1.1's page
//! of the same name and fields) and `meshctl describe`
//! (`/debug/describe`). Each answer is worked out by the rule the
//! generator itself follows, so what it says is what the proxies get.

use std::collections::BTreeMap;

use mesh_api::pb::istio::{
    authentication::v1alpha1::{mutual_tls, peer_authentication_method},
    networking::v1alpha3::tls_settings::TlSmode,
    rbac::v1alpha1::rbac_config,
};
use serde_json::{Value, json};

use crate::{
    model::{Model, Port, Service, host},
    proxy::Proxy,
    xds::{
        ads::SyncStatus,
        generate::{
            cluster::{Settings, client_tls},
            security::{self, Mtls},
        },
    },
};

/// Whether `host` is the service the user named: its full host, or a
/// prefix of it ending at a dot (`reviews`, `reviews.bookinfo`).
fn named(host: &str, name: &str) -> bool {
    host == name
        || host
            .strip_prefix(name)
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The services `query["service"]` names (every one when absent).
fn services<'a>(model: &'a Model, query: &BTreeMap<String, String>) -> Vec<&'a Service> {
    let name = query.get("service");
    model
        .services
        .values()
        .map(AsRef::as_ref)
        .filter(|s| name.is_none_or(|n| named(&s.host, n)))
        .collect()
}

/// What a server port accepts, and a client sends, in Istio 1.1's terms.
const HTTP: u8 = 1;
const MTLS: u8 = 2;

fn protocol_name(p: u8) -> &'static str {
    match p {
        HTTP => "HTTP",
        MTLS => "mTLS",
        _ => "HTTP/mTLS",
    }
}

/// One port's mTLS, server side against client side, as Istio 1.1's
/// `/debug/authenticationz` gives it; the client is in `namespace` (the
/// service's own when `None`), which decides the DestinationRule it sees.
fn tls_check(model: &Model, service: &Service, port: &Port, namespace: Option<&str>) -> Value {
    let namespace = namespace.unwrap_or(&service.namespace);
    let policy = security::policy_for(model, service, port);
    let server = match security::inbound_mtls(model, service, port) {
        Mtls::Off => HTTP,
        Mtls::Strict => MTLS,
        Mtls::Permissive => HTTP | MTLS,
    };
    let rule = model.destination_rule(&service.host, namespace);
    let settings = Settings::of(model, service, port, "", namespace);
    let client = match client_tls(model, settings, service).map(|t| t.mode) {
        Some(m) if m == TlSmode::IstioMutual as i32 => MTLS,
        _ => HTTP,
    };
    json!({
        "host": service.host,
        "port": port.number,
        "authentication_policy_name": policy.map_or("-".into(), |(name, _)| name),
        "destination_rule_name": rule.map_or("-".into(), |r| format!("{}/{}", r.name, r.namespace)),
        "server_protocol": protocol_name(server),
        "client_protocol": protocol_name(client),
        "TLS_conflict_status": if server & client == 0 { "CONFLICT" } else { "OK" },
    })
}

/// `/debug/authenticationz[?service=NAME][&namespace=CLIENT_NAMESPACE]`:
/// every port of every (named) service, server and client mTLS side by
/// side, sorted by host and port.
pub fn authenticationz(model: &Model, query: &BTreeMap<String, String>) -> Value {
    let namespace = query.get("namespace").map(String::as_str);
    services(model, query)
        .into_iter()
        .flat_map(|s| {
            s.ports
                .iter()
                .map(move |p| tls_check(model, s, p, namespace))
        })
        .collect()
}

/// `/debug/describe?service=NAME` or `?pod=NAME[.NAMESPACE]`.
pub fn describe(
    model: &Model,
    status: &SyncStatus,
    query: &BTreeMap<String, String>,
) -> Result<Value, String> {
    if let Some(pod) = query.get("pod") {
        return describe_pod(model, status, pod);
    }
    if !query.contains_key("service") {
        return Err("give ?service=NAME or ?pod=NAME[.NAMESPACE]".into());
    }
    let services = services(model, query);
    if services.is_empty() {
        return Err(format!("no service is named {:?}", query["service"]));
    }
    Ok(
        json!({"services": services.iter().map(|s| describe_service(model, s, None)).collect::<Vec<_>>()}),
    )
}

fn describe_pod(model: &Model, status: &SyncStatus, pod: &str) -> Result<Value, String> {
    let proxies = status.proxies();
    let found = proxies
        .iter()
        .find(|p| {
            p.workload
                .as_ref()
                .is_some_and(|w| w.id == pod || named(&w.id, pod))
        })
        .ok_or_else(|| format!("no proxy of a pod named {pod:?} is connected to this Pilot"))?;
    let proxy: &Proxy = found.workload.as_deref().expect("found by its workload");
    let mut instances: Vec<(&Service, Vec<u32>)> = Vec::new();
    for (service, endpoint) in model.instances(proxy) {
        let ports = service.ports.iter().map(|p| endpoint.port(p)).collect();
        if !instances.iter().any(|(s, _)| s.host == service.host) {
            instances.push((service, ports));
        }
    }
    let sidecar = model
        .sidecar(proxy)
        .map(|s| json!({"name": s.name, "namespace": s.namespace}));
    Ok(json!({
        "pod": proxy.id,
        "node": found.node_id,
        "namespace": proxy.namespace,
        "labels": proxy.labels,
        "service_account": proxy.service_account,
        "sidecar": sidecar,
        "sync": crate::debug::sync_of(found),
        "services": instances
            .iter()
            .map(|(s, ports)| {
                let mut d = describe_service(model, s, Some(&proxy.labels));
                d["pod_ports"] = json!(ports);
                d
            })
            .collect::<Vec<_>>(),
    }))
}

/// Everything that applies to `service`; with a pod's `labels`, which
/// subsets the pod is in.
fn describe_service(
    model: &Model,
    service: &Service,
    labels: Option<&BTreeMap<String, String>>,
) -> Value {
    let virtual_services: Vec<Value> = model
        .config
        .virtual_services
        .iter()
        .filter_map(|vs| {
            let by = vs
                .spec
                .hosts
                .iter()
                .find(|h| host::covers(h, &service.host))?;
            let gateways = if vs.spec.gateways.is_empty() {
                vec!["mesh".to_string()]
            } else {
                vs.spec.gateways.clone()
            };
            Some(json!({
                "name": vs.name,
                "namespace": vs.namespace,
                "gateways": gateways,
                "why": format!("its host {by:?} covers {}", service.host),
            }))
        })
        .collect();
    let rule = model
        .destination_rule(&service.host, &service.namespace)
        .map(|r| {
            let subsets: Vec<Value> = r
                .spec
                .subsets
                .iter()
                .map(|s| {
                    let holds = labels.map(|l| s.labels.iter().all(|(k, v)| l.get(k) == Some(v)));
                    json!({"name": s.name, "labels": s.labels, "pod_matches": holds})
                })
                .collect();
            let tls = r
                .spec
                .traffic_policy
                .as_ref()
                .and_then(|p| p.tls.as_ref())
                .and_then(|t| TlSmode::try_from(t.mode).ok())
                .map(|m| m.as_str_name());
            json!({
                "name": r.name,
                "namespace": r.namespace,
                "subsets": subsets,
                "tls_mode": tls,
                "why": format!(
                    "its host {:?} is the most specific to cover {} seen from {}",
                    r.spec.host, service.host, service.namespace
                ),
            })
        });
    let ports: Vec<Value> = service
        .ports
        .iter()
        .map(|p| {
            let mut check = tls_check(model, service, p, None);
            check["name"] = json!(p.name);
            check["protocol"] = json!(format!("{:?}", p.protocol).to_uppercase());
            check["server_mode"] = json!(server_mode(model, service, p));
            check
        })
        .collect();
    json!({
        "host": service.host,
        "namespace": service.namespace,
        "ports": ports,
        "virtual_services": virtual_services,
        "destination_rule": rule,
        "rbac": rbac(model, service),
    })
}

/// The mTLS mode the port's policy names, as written in it.
fn server_mode(model: &Model, service: &Service, port: &Port) -> &'static str {
    let Some((_, policy)) = security::policy_for(model, service, port) else {
        return "DISABLE (no policy)";
    };
    let mtls = policy.peers.iter().find_map(|p| match &p.params {
        Some(peer_authentication_method::Params::Mtls(m)) => Some(m),
        _ => None,
    });
    match security::inbound_mtls(model, service, port) {
        Mtls::Off => "DISABLE",
        Mtls::Strict => "STRICT",
        Mtls::Permissive if mtls.is_some_and(|m| m.mode == mutual_tls::Mode::Permissive as i32) => {
            "PERMISSIVE"
        }
        Mtls::Permissive => "PERMISSIVE (allowTls)",
    }
}

/// Whether RBAC applies to `service`, and the roles (with their bindings)
/// whose rules name it.
fn rbac(model: &Model, service: &Service) -> Value {
    let Some(config) = model.config.rbac_config.as_ref() else {
        return json!({"enabled": false, "why": "no ClusterRbacConfig named default"});
    };
    let mode = rbac_config::Mode::try_from(config.mode)
        .map(|m| m.as_str_name())
        .unwrap_or("unknown");
    if !security::rbac_enabled(config, service) {
        return json!({
            "enabled": false,
            "why": format!("the ClusterRbacConfig's mode {mode} leaves {} out", service.host),
        });
    }
    let roles: Vec<Value> = model
        .config
        .service_roles
        .iter()
        .filter(|r| r.namespace == service.namespace)
        .filter_map(|r| {
            let rules: Vec<&Vec<String>> = security::rules_naming(&r.spec, service)
                .map(|rule| &rule.services)
                .collect();
            let first = rules.first()?;
            let bindings: Vec<&str> = security::bindings_of(model, &r.namespace, &r.name)
                .map(|b| b.name.as_str())
                .collect();
            Some(json!({
                "name": r.name,
                "bindings": bindings,
                "why": format!("a rule names services {first:?}"),
            }))
        })
        .collect();
    json!({
        "enabled": true,
        "why": format!("the ClusterRbacConfig's mode {mode} covers {}", service.host),
        "roles": roles,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_is_named_by_its_host_or_a_prefix_of_it() {
        let host = "reviews.bookinfo.svc.cluster.local";
        assert!(named(host, "reviews"));
        assert!(named(host, "reviews.bookinfo"));
        assert!(named(host, host));
        assert!(!named(host, "review"));
        assert!(!named(host, "reviews.shop"));
    }
}
