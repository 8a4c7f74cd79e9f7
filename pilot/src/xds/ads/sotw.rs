//! State of the world: every response carries all of a type's resources
//! the proxy subscribed to; an empty name list subscribes to all.

use bytes::Bytes;
use envoy_types::pb::{
    envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryResponse},
    google::rpc,
};
use tonic::Status;

use super::{Connection, Flavor, Held, Response, Sent};
use crate::xds::{CLUSTER, LISTENER, ResourceGenerator};

pub struct Sotw;

/// A `DiscoveryRequest` as Pilot reads it. Envoy's every ACK repeats the
/// thousands of names it subscribes to; here they stay slices of the
/// request's bytes, recognised by a fingerprint, and become strings only
/// when they differ from what the stream subscribed to. `string` and
/// `bytes` are alike on the wire; fields Pilot does not read are skipped.
#[derive(Clone, PartialEq, prost::Message)]
pub struct SotwRequest {
    #[prost(string, tag = "1")]
    pub version_info: String,
    #[prost(message, optional, tag = "2")]
    pub node: Option<Node>,
    #[prost(bytes = "bytes", repeated, tag = "3")]
    pub resource_names: Vec<Bytes>,
    #[prost(string, tag = "4")]
    pub type_url: String,
    #[prost(string, tag = "5")]
    pub response_nonce: String,
    #[prost(message, optional, tag = "6")]
    pub error_detail: Option<rpc::Status>,
}

/// An order-independent fingerprint of a list of names: their number and
/// the sum of their hashes.
pub(super) fn fingerprint(names: &[Bytes]) -> (usize, u64) {
    use std::hash::Hasher;
    names.iter().fold((0, 0), |(n, sum), name| {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        hasher.write(name);
        (n + 1, sum.wrapping_add(hasher.finish()))
    })
}

impl<G: ResourceGenerator> Flavor<G> for Sotw {
    const NAME: &'static str = "sotw";
    type Request = SotwRequest;

    fn on_request(conn: &mut Connection<G>, request: SotwRequest) -> Result<Vec<Response>, Status> {
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
            let names = request
                .resource_names
                .into_iter()
                .map(|name| {
                    String::from_utf8(name.into())
                        .map_err(|_| Status::invalid_argument("a resource name is not valid UTF-8"))
                })
                .collect::<Result<_, _>>()?;
            let names = conn.names.intern(names);
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
    let now = conn.generate(type_url)?;
    let hash = now.hash();
    let watch = conn.watches.get_mut(type_url)?;
    if !force && watch.sent.as_ref().is_some_and(|s| s.hash == hash) {
        return None;
    }
    let by_name = !watch.wildcard && type_url != CLUSTER && type_url != LISTENER;
    let send = if by_name && !force {
        watch.held.diff(&now).changed
    } else {
        vec![now.shared.clone(), now.own.clone()]
    };
    watch.held = if by_name {
        Held::Sent(now)
    } else {
        Held::default()
    };
    if send.iter().all(|s| s.is_empty()) && !force {
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

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
    use prost::Message;

    use super::*;

    #[test]
    fn the_request_decodes_as_envoys_message_with_names_as_slices() {
        let request = DiscoveryRequest {
            version_info: "3".into(),
            node: Some(Node {
                id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
                ..Default::default()
            }),
            resource_names: vec!["outbound|80||a".into(), "outbound|80||b".into()],
            type_url: crate::xds::ENDPOINT.into(),
            response_nonce: "3".into(),
            error_detail: Some(rpc::Status {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        let bytes = Bytes::from(request.encode_to_vec());
        let read = SotwRequest::decode(bytes.clone()).unwrap();
        assert_eq!(read.version_info, "3");
        assert_eq!(read.node, request.node);
        assert_eq!(read.type_url, request.type_url);
        assert_eq!(read.response_nonce, "3");
        assert_eq!(read.error_detail.unwrap().message, "bad");
        assert_eq!(read.resource_names, ["outbound|80||a", "outbound|80||b"]);
        // The names point into the request's own bytes.
        let inside = bytes.as_ptr_range();
        assert!(
            read.resource_names
                .iter()
                .all(|n| inside.contains(&n.as_ptr()))
        );
    }

    #[test]
    fn the_fingerprint_ignores_order_and_tells_sets_apart() {
        let names = |n: &[&'static str]| {
            n.iter()
                .map(|s| Bytes::from_static(s.as_bytes()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            fingerprint(&names(&["a", "b"])),
            fingerprint(&names(&["b", "a"]))
        );
        assert_ne!(
            fingerprint(&names(&["a", "b"])),
            fingerprint(&names(&["a", "c"]))
        );
        assert_ne!(
            fingerprint(&names(&["a"])),
            fingerprint(&names(&["a", "a"]))
        );
    }
}
