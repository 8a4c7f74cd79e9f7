//! State of the world: every response carries all of a type's resources
//! the proxy subscribed to; an empty name list subscribes to all.

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use super::{Connection, Flavor, Held, Response, Sent, content_hash, fingerprint};
use crate::xds::{CLUSTER, LISTENER, ResourceGenerator};

pub struct Sotw;

impl<G: ResourceGenerator> Flavor<G> for Sotw {
    const NAME: &'static str = "sotw";
    type Request = DiscoveryRequest;

    fn on_request(
        conn: &mut Connection<G>,
        request: DiscoveryRequest,
    ) -> Result<Vec<Response>, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("an ADS request needs a type_url"));
        }
        conn.identify(request.node.as_ref())?;
        let type_url = request.type_url;
        let fingerprint = fingerprint(&request.resource_names);
        let known = conn
            .watches
            .get(&type_url)
            .is_some_and(|w| w.names_fingerprint == fingerprint);
        let names_changed = !known && {
            let names = conn
                .names
                .intern(request.resource_names.into_iter().collect());
            let watch = conn.watches.entry(type_url.clone()).or_default();
            let changed = *watch.names != *names;
            watch.wildcard = names.is_empty();
            watch.names = names;
            watch.names_fingerprint = fingerprint;
            changed
        };
        // A (re)subscription or a change of names is always answered.
        let respond = request.response_nonce.is_empty() || names_changed;
        let error = request.error_detail.map(|e| e.message);
        let nonce = &request.response_nonce;
        Ok(Self::after_request(
            conn,
            &type_url,
            nonce,
            error,
            respond.then_some(true),
        ))
    }

    fn respond(conn: &mut Connection<G>, type_url: &str, forced: bool) -> Option<Response> {
        generate(conn, type_url, forced)
    }
}

/// The response for `type_url`, unless (when not forced) it would repeat
/// what was sent. Clusters and listeners always go as the whole state; for
/// the other types a client subscribes by name and keeps each resource until
/// it unsubscribes, so a push carries only the resources that changed (an
/// endpoint change is one load assignment, not all of them).
fn generate<G: ResourceGenerator>(
    conn: &mut Connection<G>,
    type_url: &str,
    force: bool,
) -> Option<Response> {
    let resources = conn.generate(type_url);
    let hash = content_hash(&resources);
    let watch = conn.watches.get(type_url)?;
    if !force && watch.sent.as_ref().is_some_and(|s| s.hash == hash) {
        return None;
    }
    let by_name = !watch.wildcard && type_url != CLUSTER && type_url != LISTENER;
    let send = if by_name && !force {
        watch.held.diff(&resources).changed
    } else {
        resources.clone()
    };
    let empty = send.is_empty();
    let watch = conn.watches.get_mut(type_url)?;
    watch.held = Held::sent(if by_name { resources } else { Vec::new() });
    if empty && !force {
        // Only removals: a client drops those when it unsubscribes.
        return None;
    }
    let nonce = conn.next_nonce();
    let watch = conn.watches.get_mut(type_url)?;
    watch.pending = true;
    watch.sent = Some(Sent {
        nonce: nonce.clone(),
        version: nonce.clone(),
        hash,
    });
    Some(Response::sotw(
        DiscoveryResponse {
            version_info: nonce.clone(),
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        },
        send,
    ))
}
