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

use super::{Changes, Connection, Flavor, Held, Response, Sent, sotw};
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
        let subscribe = request.resource_names_subscribe;
        let unsubscribe = request.resource_names_unsubscribe;
        if subscribe.iter().any(|n| n == "*") {
            changed |= !watch.wildcard;
            watch.wildcard = true;
        }
        if unsubscribe.iter().any(|n| n == "*") {
            watch.wildcard = false;
        }
        let named = |n: &&String| *n != "*";
        // Resent even when held: a subscribe asks for the resource. An
        // unsubscribed one the proxy drops; it is not reported as removed.
        watch
            .held
            .forget(subscribe.iter().chain(&unsubscribe).filter(named));
        changed |= !subscribe.is_empty() || !unsubscribe.is_empty();
        if watch.names.is_empty() && unsubscribe.is_empty() && !subscribe.is_empty() {
            // A first subscription, most often the one every proxy of a
            // scope makes: found by its fingerprint, built only if new.
            let fingerprint =
                sotw::Fingerprint::of(subscribe.iter().filter(named).map(|n| n.as_str()));
            let list = || Ok(subscribe.into_iter().filter(|n| n != "*").collect());
            watch.names = conn.names.intern_list(fingerprint, list)?;
        } else if changed {
            let mut names = (*watch.names).clone();
            names.extend(subscribe.into_iter().filter(|n| n != "*"));
            for name in &unsubscribe {
                names.remove(name);
            }
            if *watch.names != names {
                watch.names = conn.names.intern(names);
            }
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
