//! Incremental (delta) xDS: the proxy subscribes and unsubscribes names
//! (the first request of a type with no names, or `*`, subscribes to all),
//! may declare what it already holds, and each response carries only the
//! resources that changed and the names removed. A resource's version is a
//! hash of its content, so equal content is never resent, across streams
//! too.

use std::collections::BTreeMap;

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
};
use tonic::Status;

use super::{Connection, Flavor, Sent, content_hash};
use crate::xds::ResourceGenerator;

pub struct Delta;

impl<G: ResourceGenerator> Flavor<G> for Delta {
    const NAME: &'static str = "delta";
    type Request = DeltaDiscoveryRequest;
    type Response = DeltaDiscoveryResponse;

    fn on_request(
        conn: &mut Connection<G>,
        request: DeltaDiscoveryRequest,
    ) -> Result<Vec<DeltaDiscoveryResponse>, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument(
                "a delta ADS request needs a type_url",
            ));
        }
        conn.identify(request.node.as_ref())?;
        let type_url = request.type_url;
        let first = !conn.watches.contains_key(&type_url);
        let watch = conn.watches.entry(type_url.clone()).or_default();
        if first {
            watch.wildcard = request.resource_names_subscribe.is_empty();
            watch.held = request.initial_resource_versions.into_iter().collect();
        }
        let mut changed = first;
        for name in request.resource_names_subscribe {
            if name == "*" {
                changed |= !watch.wildcard;
                watch.wildcard = true;
            } else {
                // Resent even when held: a subscribe asks for the resource.
                watch.held.remove(&name);
                watch.names.insert(name);
                changed = true;
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                watch.wildcard = false;
            } else {
                watch.names.remove(&name);
            }
            // The proxy drops it; it is not reported as removed.
            watch.held.remove(&name);
            changed = true;
        }
        if !request.response_nonce.is_empty() {
            let reason = request.error_detail.map(|e| e.message);
            if watch.answer(&request.response_nonce, reason.clone())
                && let Some(reason) = reason
            {
                conn.record_nack(&type_url, &reason);
            }
        }
        Ok(if changed {
            respond(conn, &type_url, first)
        } else {
            None
        }
        .into_iter()
        .collect())
    }

    fn on_change(conn: &mut Connection<G>, types: &[String]) -> Vec<DeltaDiscoveryResponse> {
        types
            .iter()
            .filter_map(|t| respond(conn, t, false))
            .collect()
    }
}

fn version(bytes: &[u8]) -> String {
    format!(
        "{:016x}",
        content_hash(std::iter::once((&String::new(), bytes)))
    )
}

/// The changes since what the proxy holds; `None` when there are none,
/// unless `always` (a first subscription is always answered).
fn respond<G: ResourceGenerator>(
    conn: &mut Connection<G>,
    type_url: &str,
    always: bool,
) -> Option<DeltaDiscoveryResponse> {
    let resources = conn.generate(type_url);
    let watch = conn.watches.get(type_url)?;
    let current: BTreeMap<&String, String> = resources
        .iter()
        .map(|(n, a)| (n, version(&a.value)))
        .collect();
    let updated: Vec<Resource> = resources
        .iter()
        .filter(|(n, _)| watch.held.get(n) != current.get(n))
        .map(|(n, a)| Resource {
            name: n.clone(),
            version: current[n].clone(),
            resource: Some(a.clone()),
            ..Default::default()
        })
        .collect();
    let removed: Vec<String> = watch
        .held
        .keys()
        .filter(|n| !current.contains_key(n))
        .cloned()
        .collect();
    if updated.is_empty() && removed.is_empty() && !always {
        return None;
    }
    let hash = content_hash(current.iter().map(|(n, v)| (*n, v.as_bytes())));
    let nonce = conn.next_nonce();
    let watch = conn.watches.get_mut(type_url)?;
    watch.held = current.into_iter().map(|(n, v)| (n.clone(), v)).collect();
    watch.sent = Some(Sent {
        nonce: nonce.clone(),
        version: nonce.clone(),
        hash,
    });
    Some(DeltaDiscoveryResponse {
        system_version_info: nonce.clone(),
        resources: updated,
        removed_resources: removed,
        type_url: type_url.to_string(),
        nonce,
        ..Default::default()
    })
}
