//! State of the world: every response carries all of a type's resources
//! the proxy subscribed to; an empty name list subscribes to all.

use std::collections::BTreeSet;

use bytes::Buf;
use envoy_types::pb::{
    envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryResponse},
    google::rpc,
};
use prost::{
    DecodeError,
    encoding::{DecodeContext, WireType},
};
use tonic::Status;

use super::{Connection, Flavor, Held, Response, Sent};
use crate::xds::{CLUSTER, LISTENER, ResourceGenerator};

pub struct Sotw;

/// A `DiscoveryRequest` as Pilot reads it. Envoy's every ACK repeats the
/// thousands of names it subscribes to; here they are read into one buffer
/// and a fingerprint as the request is decoded, and become strings only
/// when they differ from what the stream subscribed to. Fields Pilot does
/// not read are skipped.
#[derive(Debug, Default)]
pub struct SotwRequest {
    pub version_info: String,
    pub node: Option<Node>,
    /// Each name, its length (a varint) then its bytes.
    names: Vec<u8>,
    /// The name being read.
    name: Vec<u8>,
    fingerprint: Fingerprint,
    pub type_url: String,
    pub response_nonce: String,
    pub error_detail: Option<rpc::Status>,
}

/// An order-independent fingerprint of a list of names: their number and
/// the sum of their hashes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) struct Fingerprint {
    count: usize,
    sum: u64,
}

impl Fingerprint {
    /// The fingerprint of a list of names.
    pub(super) fn of<'a>(names: impl IntoIterator<Item = &'a str>) -> Self {
        let mut fingerprint = Self::default();
        for name in names {
            fingerprint.add(name.as_bytes());
        }
        fingerprint
    }

    fn add(&mut self, name: &[u8]) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(name_hash(name));
    }
}

/// A quick hash of a name, eight bytes at a time. Not keyed: a proxy that
/// made its own names collide would only confuse its own subscription.
fn name_hash(name: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut words = name.chunks_exact(8);
    let mut h = (name.len() as u64).wrapping_mul(K);
    for w in &mut words {
        let w = u64::from_le_bytes(w.try_into().expect("eight bytes"));
        h = (h.rotate_left(5) ^ w).wrapping_mul(K);
    }
    let mut tail = [0u8; 8];
    tail[..words.remainder().len()].copy_from_slice(words.remainder());
    h = (h.rotate_left(5) ^ u64::from_le_bytes(tail)).wrapping_mul(K);
    h ^ (h >> 29)
}

impl SotwRequest {
    /// The names, as strings.
    fn names(&self) -> Result<BTreeSet<String>, Status> {
        self.name_slices()
            .map(|name| {
                std::str::from_utf8(name)
                    .map(str::to_string)
                    .map_err(|_| Status::invalid_argument("a resource name is not valid UTF-8"))
            })
            .collect()
    }

    /// The names' bytes, in the order they came.
    fn name_slices(&self) -> impl Iterator<Item = &[u8]> {
        let mut buf = &self.names[..];
        std::iter::from_fn(move || {
            if buf.is_empty() {
                return None;
            }
            // Each length was written by `merge_field` before its name.
            let len = prost::encoding::decode_varint(&mut buf).ok()? as usize;
            let (name, rest) = buf.split_at(len);
            buf = rest;
            Some(name)
        })
    }
}

impl prost::Message for SotwRequest {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        use prost::encoding::{bytes, message, string};
        if !self.version_info.is_empty() {
            string::encode(1, &self.version_info, buf);
        }
        if let Some(node) = &self.node {
            message::encode(2, node, buf);
        }
        for name in self.name_slices() {
            bytes::encode(3, &name.to_vec(), buf);
        }
        if !self.type_url.is_empty() {
            string::encode(4, &self.type_url, buf);
        }
        if !self.response_nonce.is_empty() {
            string::encode(5, &self.response_nonce, buf);
        }
        if let Some(error) = &self.error_detail {
            message::encode(6, error, buf);
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), DecodeError> {
        use prost::encoding::{encode_varint, message, string};
        match tag {
            1 => string::merge(wire_type, &mut self.version_info, buf, ctx),
            2 => message::merge(
                wire_type,
                self.node.get_or_insert_with(Node::default),
                buf,
                ctx,
            ),
            3 => {
                // Read in place when the name is whole in the buffer's
                // first chunk (the request's own buffer is one), else
                // through a buffer reused from name to name, which also
                // tells a short read.
                let mut peek = buf.chunk();
                let whole = wire_type == WireType::LengthDelimited
                    && prost::encoding::decode_varint(&mut peek)
                        .is_ok_and(|len| len as usize <= peek.len());
                if whole {
                    let len = prost::encoding::decode_varint(buf)? as usize;
                    let name = &buf.chunk()[..len];
                    encode_varint(len as u64, &mut self.names);
                    self.names.extend_from_slice(name);
                    self.fingerprint.add(name);
                    buf.advance(len);
                    return Ok(());
                }
                prost::encoding::bytes::merge(wire_type, &mut self.name, buf, ctx)?;
                encode_varint(self.name.len() as u64, &mut self.names);
                self.names.extend_from_slice(&self.name);
                self.fingerprint.add(&self.name);
                Ok(())
            }
            4 => string::merge(wire_type, &mut self.type_url, buf, ctx),
            5 => string::merge(wire_type, &mut self.response_nonce, buf, ctx),
            6 => message::merge(
                wire_type,
                self.error_detail.get_or_insert_with(Default::default),
                buf,
                ctx,
            ),
            _ => prost::encoding::skip_field(wire_type, tag, buf, ctx),
        }
    }

    fn encoded_len(&self) -> usize {
        use prost::encoding::{encoded_len_varint, key_len, message, string};
        let names: usize = self
            .name_slices()
            .map(|n| key_len(3) + encoded_len_varint(n.len() as u64) + n.len())
            .sum();
        let string = |tag, s: &String| {
            if s.is_empty() {
                0
            } else {
                string::encoded_len(tag, s)
            }
        };
        string(1, &self.version_info)
            + self.node.as_ref().map_or(0, |n| message::encoded_len(2, n))
            + names
            + string(4, &self.type_url)
            + string(5, &self.response_nonce)
            + self
                .error_detail
                .as_ref()
                .map_or(0, |e| message::encoded_len(6, e))
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

impl<G: ResourceGenerator> Flavor<G> for Sotw {
    const NAME: &'static str = "sotw";
    type Request = SotwRequest;

    fn on_request(conn: &mut Connection<G>, request: SotwRequest) -> Result<Vec<Response>, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("an ADS request needs a type_url"));
        }
        conn.identify(request.node.as_ref())?;
        let type_url = request.type_url.clone();
        let fingerprint = request.fingerprint;
        let known = conn
            .watches
            .get(&type_url)
            .is_some_and(|w| w.names_fingerprint == fingerprint);
        let names_changed = !known && {
            let names = conn.names.intern_list(fingerprint, || request.names())?;
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

    fn request(names: &[&str]) -> DiscoveryRequest {
        DiscoveryRequest {
            version_info: "3".into(),
            node: Some(Node {
                id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
                ..Default::default()
            }),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            type_url: crate::xds::ENDPOINT.into(),
            response_nonce: "3".into(),
            error_detail: Some(rpc::Status {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        }
    }

    fn read(request: &DiscoveryRequest) -> SotwRequest {
        SotwRequest::decode(request.encode_to_vec().as_slice()).unwrap()
    }

    #[test]
    fn the_request_decodes_as_envoys_message() {
        let sent = request(&["outbound|80||b", "outbound|80||a", ""]);
        let read = read(&sent);
        assert_eq!(read.version_info, "3");
        assert_eq!(read.node, sent.node);
        assert_eq!(read.type_url, sent.type_url);
        assert_eq!(read.response_nonce, "3");
        assert_eq!(read.error_detail.as_ref().unwrap().message, "bad");
        let names: Vec<String> = read.names().unwrap().into_iter().collect();
        assert_eq!(names, ["", "outbound|80||a", "outbound|80||b"]);
    }

    #[test]
    fn the_request_encodes_back_to_the_fields_it_read() {
        let sent = request(&["outbound|80||b", "outbound|80||a"]);
        let read = read(&sent);
        let bytes = read.encode_to_vec();
        assert_eq!(bytes.len(), read.encoded_len());
        assert_eq!(DiscoveryRequest::decode(bytes.as_slice()).unwrap(), sent);
    }

    #[test]
    fn the_fingerprint_ignores_order_and_tells_lists_apart() {
        let fingerprint = |names: &[&str]| read(&request(names)).fingerprint;
        assert_eq!(fingerprint(&["a", "b"]), fingerprint(&["b", "a"]));
        assert_ne!(fingerprint(&["a", "b"]), fingerprint(&["a", "c"]));
        assert_ne!(fingerprint(&["a"]), fingerprint(&["a", "a"]));
        let long = "outbound|9080|v1|svc-1.bench-1.svc.cluster.local";
        let other = "outbound|9080|v2|svc-1.bench-1.svc.cluster.local";
        assert_ne!(fingerprint(&[long]), fingerprint(&[other]));
    }

    #[test]
    fn a_name_cut_short_is_a_decode_error() {
        // Field 3, length 10, three bytes.
        const CUT: [u8; 5] = [0x1a, 10, b'a', b'b', b'c'];
        assert!(SotwRequest::decode(&CUT[..]).is_err());
        assert!(SotwRequest::decode(bytes::Bytes::from_static(&CUT)).is_err());
    }

    #[test]
    fn a_name_that_is_not_utf8_is_refused() {
        let mut bytes = Vec::new();
        prost::encoding::bytes::encode(3, &vec![0xff, 0xfe], &mut bytes);
        let read = SotwRequest::decode(bytes.as_slice()).unwrap();
        let status = read.names().unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
    }
}
