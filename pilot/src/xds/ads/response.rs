//! Responses as Pilot encodes them. A response's own fields are encoded
//! once; its resources are the generator's encoded bytes, shared with
//! every proxy they go to, and copied into the outgoing message only chunk
//! by chunk as HTTP/2 asks for data. A proxy that reads slowly holds a
//! chunk, not a copy of its configuration: with thousands of proxies and a
//! megabyte of clusters each, that is the difference between megabytes and
//! gigabytes.
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

/// Chunks of copied resources handed to HTTP/2 are at most this large.
const CHUNK: usize = 16 << 10;
/// Resources this large are not copied: a route configuration naming every
/// service is a megabyte, and goes to every proxy at once.
const SHARED: usize = CHUNK / 2;

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
    /// The resources, in parts shared with the generator and other streams.
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
    fn field_len(&self, r: &Resource) -> usize {
        let inner = if self.delta {
            Self::wrapped_len(r)
        } else {
            r.any.len()
        };
        key_len(RESOURCES) + encoded_len_varint(inner as u64) + inner
    }

    /// Every resource, part after part.
    fn all(&self) -> impl Iterator<Item = &Arc<Resource>> {
        self.resources.iter().flat_map(|part| part.resources())
    }

    /// The `i`th resource, counting part after part.
    fn get(&self, mut i: usize) -> Option<&Arc<Resource>> {
        for part in &self.resources {
            match part.resources().get(i) {
                Some(r) => return Some(r),
                None => i -= part.len(),
            }
        }
        None
    }

    /// The encoded message's length.
    pub fn encoded_len(&self) -> usize {
        self.head.len() + self.all().map(|r| self.field_len(r)).sum::<usize>() + self.tail.len()
    }

    /// What goes before a resource's bytes: its key and length, and for a
    /// delta resource the wrapper's start.
    fn encode_before(&self, r: &Resource, buf: &mut BytesMut) {
        encode_key(RESOURCES, WireType::LengthDelimited, buf);
        if self.delta {
            encode_varint(Self::wrapped_len(r) as u64, buf);
            encode_key(VERSION, WireType::LengthDelimited, buf);
            encode_varint(VERSION_LEN as u64, buf);
            // Writing to a `BytesMut` cannot fail.
            let _ = write!(buf, "{:016x}", r.hash);
            encode_key(RESOURCES, WireType::LengthDelimited, buf);
        }
        encode_varint(r.any.len() as u64, buf);
    }

    /// What follows a resource's bytes: a delta resource's name.
    fn encode_after(&self, r: &Resource, buf: &mut BytesMut) {
        if self.delta {
            encode_key(NAME, WireType::LengthDelimited, buf);
            encode_varint(r.name.len() as u64, buf);
            buf.put_slice(r.name.as_bytes());
        }
    }

    /// The message as a gRPC length-prefixed message, in chunks.
    pub fn into_grpc_chunks(self) -> GrpcChunks {
        GrpcChunks {
            len: self.encoded_len(),
            response: self,
            started: false,
            next: 0,
            shared: None,
            after: None,
            done: false,
        }
    }
}

/// A response's gRPC message, chunk by chunk: small resources copied
/// together into chunks, each large one handed over as its own chunk, the
/// very bytes every proxy shares.
pub struct GrpcChunks {
    response: Response,
    len: usize,
    started: bool,
    /// The next resource to encode.
    next: usize,
    /// A large resource's bytes, the next chunk.
    shared: Option<Bytes>,
    /// The resource whose end opens the chunk after `shared`.
    after: Option<usize>,
    done: bool,
}

impl Iterator for GrpcChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        if let Some(shared) = self.shared.take() {
            return Some(shared);
        }
        if self.done {
            return None;
        }
        let response = &self.response;
        let mut buf = BytesMut::with_capacity(CHUNK);
        if !self.started {
            self.started = true;
            buf.put_u8(0); // not compressed
            buf.put_u32(self.len as u32);
            buf.put_slice(&response.head);
        }
        if let Some(r) = self.after.take().and_then(|i| response.get(i)) {
            response.encode_after(r, &mut buf);
        }
        while let Some(r) = response.get(self.next) {
            if r.any.len() >= SHARED {
                response.encode_before(r, &mut buf);
                self.shared = Some(r.any.clone());
                self.after = Some(self.next);
                self.next += 1;
                return Some(buf.freeze());
            }
            let len = response.field_len(r);
            if buf.len() + len > CHUNK && !buf.is_empty() {
                return Some(buf.freeze());
            }
            buf.reserve(len);
            response.encode_before(r, &mut buf);
            buf.put_slice(&r.any);
            response.encode_after(r, &mut buf);
            self.next += 1;
        }
        buf.put_slice(&response.tail);
        self.done = true;
        Some(buf.freeze())
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
        let expected_len = response.encoded_len();
        let framed: Vec<u8> = response.into_grpc_chunks().flatten().collect();
        assert_eq!(framed[0], 0, "not compressed");
        let len = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
        assert_eq!(len, expected_len);
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
    fn small_resources_are_copied_into_chunks_large_ones_shared() {
        let resources = resources();
        let chunks: Vec<Bytes> =
            Response::delta(DeltaDiscoveryResponse::default(), parts(&resources))
                .into_grpc_chunks()
                .collect();
        let (large, small): (Vec<_>, Vec<_>) =
            resources.iter().partition(|r| r.any.len() >= SHARED);
        assert!(!large.is_empty() && !small.is_empty());
        // Each large resource is a chunk of its own, the resource's memory.
        for r in &large {
            let shared = chunks.iter().filter(|c| c.as_ptr() == r.any.as_ptr());
            assert_eq!(shared.count(), 1, "{}", r.name);
        }
        // Everything else is in chunks of at most the chunk size.
        let copied = chunks
            .iter()
            .filter(|c| !large.iter().any(|r| c.as_ptr() == r.any.as_ptr()));
        assert!(copied.clone().all(|c| c.len() <= CHUNK));
        let copied_bytes: usize = copied.map(|c| c.len()).sum();
        let small_bytes: usize = small.iter().map(|r| r.any.len()).sum();
        assert!(copied_bytes >= small_bytes && copied_bytes < small_bytes + 40 * 64);
    }
}
