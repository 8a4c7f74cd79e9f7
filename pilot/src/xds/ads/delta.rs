//! Incremental (delta) xDS: the proxy subscribes and unsubscribes names
//! (the first request of a type with no names, or `*`, subscribes to all),
//! may declare what it already holds, and each response carries only the
//! resources that changed and the names removed. A resource's version is a
//! hash of its content, so equal content is never resent, across streams
//! too.

use envoy_types::pb::envoy::service::discovery::v3::{
    DeltaDiscoveryRequest, DeltaDiscoveryResponse,
};
use tonic::Status;

use super::{Changes, Connection, Flavor, Held, Response, Sent};
use crate::xds::ResourceGenerator;

pub struct Delta;

impl<G: ResourceGenerator> Flavor<G> for Delta {
    const NAME: &'static str = "delta";
    type Request = DeltaDiscoveryRequest;

    fn on_request(
        conn: &mut Connection<G>,
        request: DeltaDiscoveryRequest,
    ) -> Result<Vec<Response>, Status> {
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
            watch.held = Held::declared(request.initial_resource_versions.into_iter().filter_map(
                |(name, version)| Some((name, u64::from_str_radix(&version, 16).ok()?)),
            ));
        }
        let mut changed = first;
        // An ACK names nothing: the subscription is left as it is.
        let resubscribes = !request.resource_names_subscribe.is_empty()
            || !request.resource_names_unsubscribe.is_empty();
        let mut names = if resubscribes {
            (*watch.names).clone()
        } else {
            std::collections::BTreeSet::new()
        };
        let mut forget = std::collections::BTreeSet::new();
        for name in request.resource_names_subscribe {
            if name == "*" {
                changed |= !watch.wildcard;
                watch.wildcard = true;
            } else {
                // Resent even when held: a subscribe asks for the resource.
                forget.insert(name.clone());
                names.insert(name);
                changed = true;
            }
        }
        for name in request.resource_names_unsubscribe {
            if name == "*" {
                watch.wildcard = false;
            } else {
                names.remove(&name);
            }
            // The proxy drops it; it is not reported as removed.
            forget.insert(name);
            changed = true;
        }
        watch.held.forget(&forget);
        if resubscribes && *watch.names != names {
            watch.names = conn.names.intern(names);
        }
        let error = request.error_detail.map(|e| e.message);
        let nonce = &request.response_nonce;
        Ok(Self::after_request(
            conn,
            &type_url,
            nonce,
            error,
            changed.then_some(first),
        ))
    }

    fn respond(conn: &mut Connection<G>, type_url: &str, forced: bool) -> Option<Response> {
        changes(conn, type_url, forced)
    }
}

/// The changes since what the proxy holds; `None` when there are none,
/// unless `always` (a first subscription is always answered).
fn changes<G: ResourceGenerator>(
    conn: &mut Connection<G>,
    type_url: &str,
    always: bool,
) -> Option<Response> {
    let now = conn.generate(type_url)?;
    let watch = conn.watches.get_mut(type_url)?;
    let Changes { changed, removed } = watch.held.diff(&now);
    if changed.is_empty() && removed.is_empty() && !always {
        return None;
    }
    let hash = now.hash();
    watch.held = Held::Sent(now);
    let nonce = conn.next_nonce();
    let watch = conn.watches.get_mut(type_url)?;
    watch.pending = true;
    watch.sent = Some(Sent {
        nonce: nonce.clone(),
        version: nonce.clone(),
        hash,
    });
    Some(Response::delta(
        DeltaDiscoveryResponse {
            system_version_info: nonce.clone(),
            removed_resources: removed,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        },
        changed,
    ))
}
