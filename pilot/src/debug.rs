//! Pilot's `/debug` pages: what each proxy was sent and answered
//! (`syncz`), the config the model holds (`configz`) and every service's
//! endpoints (`endpointz`).

use serde::Serialize;
use serde_json::{Value, json};

use crate::{
    model::{Model, Named},
    xds::ads::{ProxyStatus, SyncStatus},
};

/// `/debug/syncz`: per connected proxy, per type, what was sent and answered.
pub fn syncz(status: &SyncStatus) -> Value {
    status.proxies().iter().map(sync_of).collect()
}

/// One proxy's entry of `/debug/syncz`.
pub fn sync_of(p: &ProxyStatus) -> Value {
    let types: serde_json::Map<String, Value> = p
        .types
        .iter()
        .map(|(t, s)| {
            let status = json!({
                "sent_version": s.sent_version,
                "sent_nonce": s.sent_nonce,
                "acked_version": s.acked_version,
                "last_nack": s.last_nack,
            });
            (t.clone(), status)
        })
        .collect();
    let since = p
        .connected_since
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    json!({
        "node": p.node_id,
        "version": p.version,
        "protocol": p.protocol,
        "connected_since_unix": since,
        "types": types,
    })
}

fn objects<T: Serialize>(
    items: impl IntoIterator<Item = impl std::borrow::Borrow<Named<T>>>,
) -> Value {
    items
        .into_iter()
        .map(|item| {
            let n = item.borrow();
            json!({"namespace": n.namespace, "name": n.name, "spec": serde_json::to_value(&n.spec).unwrap_or(Value::Null)})
        })
        .collect()
}

/// `/debug/configz`: every config object in the model, by kind, with hosts
/// as Pilot resolved them, and the services.
pub fn configz(model: &Model) -> Value {
    let c = &model.config;
    let services: Vec<Value> = model
        .services
        .values()
        .map(|s| {
            json!({
                "host": s.host,
                "namespace": s.namespace,
                "addresses": s.addresses,
                "ports": s.ports.iter().map(|p| json!({"number": p.number, "name": p.name, "protocol": format!("{:?}", p.protocol)})).collect::<Vec<_>>(),
                "resolution": format!("{:?}", s.resolution),
                "mesh_external": s.mesh_external,
            })
        })
        .collect();
    json!({
        "services": services,
        "virtual_services": objects(c.virtual_services.iter()),
        "destination_rules": objects(c.destination_rules.iter()),
        "gateways": objects(c.gateways.iter()),
        "sidecars": objects(c.sidecars.iter()),
        "policies": objects(c.policies.iter()),
        "mesh_policy": c.mesh_policy.as_ref().map(|p| serde_json::to_value(p).unwrap_or(Value::Null)),
        "service_roles": objects(c.service_roles.iter()),
        "service_role_bindings": objects(c.service_role_bindings.iter()),
        "rbac_config": c.rbac_config.as_ref().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
        "mesh_config": serde_json::to_value(&model.mesh).unwrap_or(Value::Null),
    })
}

/// `/debug/endpointz`: per service host, its endpoints.
pub fn endpointz(model: &Model) -> Value {
    model
        .endpoints
        .iter()
        .map(|(host, endpoints)| {
            let list: Vec<Value> = endpoints
                .iter()
                .map(|e| json!({"address": e.address, "ports": e.ports, "labels": e.labels, "locality": e.locality, "weight": e.weight}))
                .collect();
            (host.clone(), Value::Array(list))
        })
        .collect::<serde_json::Map<String, Value>>()
        .into()
}
