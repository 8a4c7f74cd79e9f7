//! State of the world: every response carries all of a type's resources
//! the proxy subscribed to; an empty name list subscribes to all.

use envoy_types::pb::envoy::service::discovery::v3::{DiscoveryRequest, DiscoveryResponse};
use tonic::Status;

use super::{Connection, Flavor, Sent, content_hash};
use crate::xds::ResourceGenerator;

pub struct Sotw;

impl<G: ResourceGenerator> Flavor<G> for Sotw {
    const NAME: &'static str = "sotw";
    type Request = DiscoveryRequest;
    type Response = DiscoveryResponse;

    fn on_request(
        conn: &mut Connection<G>,
        request: DiscoveryRequest,
    ) -> Result<Vec<DiscoveryResponse>, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("an ADS request needs a type_url"));
        }
        conn.identify(request.node.as_ref())?;
        let type_url = request.type_url;
        let watch = conn.watches.entry(type_url.clone()).or_default();
        let names: std::collections::BTreeSet<String> =
            request.resource_names.into_iter().collect();
        let names_changed =
            watch.names != names || watch.sent.is_none() && !watch.wildcard && names.is_empty();
        watch.wildcard = names.is_empty();
        watch.names = names;
        let respond = if request.response_nonce.is_empty() {
            // A (re)subscription: always answered.
            true
        } else {
            let reason = request.error_detail.map(|e| e.message);
            if watch.answer(&request.response_nonce, reason.clone())
                && let Some(reason) = reason
            {
                conn.record_nack(&type_url, &reason);
            }
            names_changed
        };
        Ok(if respond {
            generate(conn, &type_url, true)
        } else {
            None
        }
        .into_iter()
        .collect())
    }

    fn on_change(conn: &mut Connection<G>, types: &[String]) -> Vec<DiscoveryResponse> {
        types
            .iter()
            .filter_map(|t| generate(conn, t, false))
            .collect()
    }
}

/// The response for `type_url`, unless it would repeat what was sent.
fn generate<G: ResourceGenerator>(
    conn: &mut Connection<G>,
    type_url: &str,
    force: bool,
) -> Option<DiscoveryResponse> {
    let resources = conn.generate(type_url);
    let hash = content_hash(resources.iter().map(|(n, a)| (n, &a.value[..])));
    let watch = conn.watches.get(type_url)?;
    if !force && watch.sent.as_ref().is_some_and(|s| s.hash == hash) {
        return None;
    }
    let nonce = conn.next_nonce();
    let watch = conn.watches.get_mut(type_url)?;
    watch.sent = Some(Sent {
        nonce: nonce.clone(),
        version: nonce.clone(),
        hash,
    });
    Some(DiscoveryResponse {
        version_info: nonce.clone(),
        resources: resources.into_iter().map(|(_, any)| any).collect(),
        type_url: type_url.to_string(),
        nonce,
        ..Default::default()
    })
}
