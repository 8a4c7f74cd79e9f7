//! Responses as Pilot encodes them. A response's own fields are encoded
//! per response; its resources come in sets the generator shares between
//! proxies ([`ResourceSet`]), and each set is encoded as response fields
//! once, by the first response that carries it. Two thousand proxies of a
//! scope are sent the same bytes, not two thousand copies of them: a
//! response is a head, a shared buffer per set, and a tail, handed to
//! HTTP/2 as they are.
//!
//! The bytes are what prost would encode for a `DiscoveryResponse` or a
//! `DeltaDiscoveryResponse`, fields in number order.

use std::{fmt::Write, sync::Arc};

use bytes::{BufMut, Bytes, BytesMut};
use envoy_types::pb::envoy::service::discovery::v3::{DeltaDiscoveryResponse, DiscoveryResponse};
use prost::{
    Message,
    encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len},
};

use crate::xds::{Resource, ResourceSet};

/// `resources` is field 2 in both response messages, and in the delta
/// `Resource` the encoded `Any` is field 2 as well.
const RESOURCES: u32 = 2;
/// Fields of the delta `Resource` wrapper.
const VERSION: u32 = 1;
const NAME: u32 = 3;
/// A delta resource's version: its content hash in hex.
const VERSION_LEN: usize = 16;

/// One response, ready to be framed.
pub struct Response {
    /// The fields numbered below `resources` (the version).
    head: Bytes,
    /// The resources, in sets shared with the generator and other streams.
    resources: Vec<Arc<ResourceSet>>,
    /// The fields numbered above `resources`.
    tail: Bytes,
    delta: bool,
}

impl Response {
    /// A state-of-the-world response; `message.resources` is ignored.
    pub fn sotw(message: DiscoveryResponse, resources: Vec<Arc<ResourceSet>>) -> Self {
        let head = DiscoveryResponse {
            version_info: message.version_info.clone(),
            ..Default::default()
        };
        let tail = DiscoveryResponse {
            version_info: String::new(),
            resources: Vec::new(),
            ..message
        };
        Self::new(head.encode_to_vec(), resources, tail.encode_to_vec(), false)
    }

    /// A delta response; `message.resources` is ignored. Each resource goes
    /// with its name and its content hash as its version.
    pub fn delta(message: DeltaDiscoveryResponse, resources: Vec<Arc<ResourceSet>>) -> Self {
        let head = DeltaDiscoveryResponse {
            system_version_info: message.system_version_info.clone(),
            ..Default::default()
        };
        let tail = DeltaDiscoveryResponse {
            system_version_info: String::new(),
            resources: Vec::new(),
            ..message
        };
        Self::new(head.encode_to_vec(), resources, tail.encode_to_vec(), true)
    }

    fn new(head: Vec<u8>, resources: Vec<Arc<ResourceSet>>, tail: Vec<u8>, delta: bool) -> Self {
        Self {
            head: head.into(),
            resources,
            tail: tail.into(),
            delta,
        }
    }

    /// The message as a gRPC length-prefixed message, in chunks: the prefix
    /// and head, each set's shared bytes, the tail.
    pub fn into_grpc_chunks(self) -> GrpcChunks {
        let delta = self.delta;
        let sets: Vec<Bytes> = self
            .resources
            .iter()
            .filter(|set| !set.is_empty())
            .map(|set| set.encoded(delta, |resources| encode(resources, delta)))
            .collect();
        let len = self.head.len() + sets.iter().map(Bytes::len).sum::<usize>() + self.tail.len();
        let mut first = BytesMut::with_capacity(5 + self.head.len());
        first.put_u8(0); // not compressed
        first.put_u32(len as u32);
        first.put_slice(&self.head);
        let mut chunks = Vec::with_capacity(sets.len() + 2);
        chunks.push(first.freeze());
        chunks.extend(sets);
        if !self.tail.is_empty() {
            chunks.push(self.tail);
        }
        GrpcChunks(chunks.into_iter())
    }
}

/// The delta wrapper's length without its own key and length.
fn wrapped_len(r: &Resource) -> usize {
    key_len(VERSION)
        + 1
        + VERSION_LEN
        + key_len(RESOURCES)
        + encoded_len_varint(r.any.len() as u64)
        + r.any.len()
        + key_len(NAME)
        + encoded_len_varint(r.name.len() as u64)
        + r.name.len()
}

/// One resource as a field of the response, with its key and length.
fn field_len(r: &Resource, delta: bool) -> usize {
    let inner = if delta { wrapped_len(r) } else { r.any.len() };
    key_len(RESOURCES) + encoded_len_varint(inner as u64) + inner
}

/// Resources as the `resources` fields of a response.
fn encode(resources: &[Arc<Resource>], delta: bool) -> Bytes {
    let mut buf = BytesMut::with_capacity(resources.iter().map(|r| field_len(r, delta)).sum());
    for r in resources {
        encode_key(RESOURCES, WireType::LengthDelimited, &mut buf);
        if delta {
            encode_varint(wrapped_len(r) as u64, &mut buf);
            encode_key(VERSION, WireType::LengthDelimited, &mut buf);
            encode_varint(VERSION_LEN as u64, &mut buf);
            // Writing to a `BytesMut` cannot fail.
            let _ = write!(buf, "{:016x}", r.hash);
            encode_key(RESOURCES, WireType::LengthDelimited, &mut buf);
        }
        encode_varint(r.any.len() as u64, &mut buf);
        buf.put_slice(&r.any);
        if delta {
            encode_key(NAME, WireType::LengthDelimited, &mut buf);
            encode_varint(r.name.len() as u64, &mut buf);
            buf.put_slice(r.name.as_bytes());
        }
    }
    buf.freeze()
}

/// A response's gRPC message, chunk by chunk.
pub struct GrpcChunks(std::vec::IntoIter<Bytes>);

impl Iterator for GrpcChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        self.0.next()
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::{
        envoy::{
            config::cluster::v3::Cluster,
            service::discovery::v3::{self, DiscoveryResponse},
        },
        google::protobuf::Any,
    };

    use super::*;

    fn cluster(name: &str, padding: usize) -> Arc<Resource> {
        Resource::new(
            name,
            &Cluster {
                name: name.to_string(),
                alt_stat_name: "x".repeat(padding),
                ..Default::default()
            },
        )
    }

    fn resources() -> Vec<Arc<Resource>> {
        // Enough, and large enough, to span several chunks.
        (0..40)
            .map(|i| cluster(&format!("c{i:02}"), i * 1_000))
            .collect()
    }

    /// The resources in two parts, as a proxy's shared and own ones go.
    fn parts(resources: &[Arc<Resource>]) -> Vec<Arc<ResourceSet>> {
        let (a, b) = resources.split_at(resources.len() / 3);
        vec![ResourceSet::new(a.to_vec()), ResourceSet::new(b.to_vec())]
    }

    fn message(response: Response) -> Bytes {
        let framed: Vec<u8> = response.into_grpc_chunks().flatten().collect();
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(framed.len(), 5 + len, "one whole message");
        Bytes::copy_from_slice(&framed[5..])
    }

    fn any(r: &Resource) -> Any {
        Any::decode(r.any.clone()).unwrap()
    }

    #[test]
    fn sotw_bytes_are_what_prost_encodes() {
        let resources = resources();
        let fields = DiscoveryResponse {
            version_info: "v1".into(),
            type_url: "t".into(),
            nonce: "n1".into(),
            ..Default::default()
        };
        let expected = DiscoveryResponse {
            resources: resources.iter().map(|r| any(r)).collect(),
            ..fields.clone()
        };
        let bytes = message(Response::sotw(fields, parts(&resources)));
        assert_eq!(bytes, expected.encode_to_vec());
    }

    #[test]
    fn delta_bytes_are_what_prost_encodes() {
        let resources = resources();
        let fields = DeltaDiscoveryResponse {
            system_version_info: "v1".into(),
            type_url: "t".into(),
            removed_resources: vec!["gone".into()],
            nonce: "n1".into(),
            ..Default::default()
        };
        let expected = DeltaDiscoveryResponse {
            resources: resources
                .iter()
                .map(|r| v3::Resource {
                    name: r.name.to_string(),
                    version: format!("{:016x}", r.hash),
                    resource: Some(any(r)),
                    ..Default::default()
                })
                .collect(),
            ..fields.clone()
        };
        let bytes = message(Response::delta(fields, parts(&resources)));
        assert_eq!(bytes, expected.encode_to_vec());
    }

    #[test]
    fn an_empty_response_is_one_chunk() {
        let response = Response::sotw(DiscoveryResponse::default(), Vec::new());
        let chunks: Vec<Bytes> = response.into_grpc_chunks().collect();
        assert_eq!(chunks, [Bytes::from_static(&[0, 0, 0, 0, 0])]);
    }

    #[test]
    fn a_set_is_encoded_once_and_its_bytes_shared_by_every_response() {
        let sets = parts(&resources());
        let chunks = |sets: &[Arc<ResourceSet>]| -> Vec<Bytes> {
            Response::sotw(DiscoveryResponse::default(), sets.to_vec())
                .into_grpc_chunks()
                .collect()
        };
        let (a, b) = (chunks(&sets), chunks(&sets));
        // Prefix and head, then one chunk per set: the same memory.
        assert_eq!(a.len(), 1 + sets.len());
        for (x, y) in a[1..].iter().zip(&b[1..]) {
            assert_eq!(x.as_ptr(), y.as_ptr());
        }
    }
}
