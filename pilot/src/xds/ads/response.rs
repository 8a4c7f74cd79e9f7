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

use crate::xds::Resource;

/// Chunks handed to HTTP/2 are about this large.
const CHUNK: usize = 64 << 10;

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
    resources: Vec<Arc<Resource>>,
    /// The fields numbered above `resources`.
    tail: Bytes,
    delta: bool,
}

impl Response {
    /// A state-of-the-world response; `message.resources` is ignored.
    pub fn sotw(message: DiscoveryResponse, resources: Vec<Arc<Resource>>) -> Self {
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
    pub fn delta(message: DeltaDiscoveryResponse, resources: Vec<Arc<Resource>>) -> Self {
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

    fn new(head: Vec<u8>, resources: Vec<Arc<Resource>>, tail: Vec<u8>, delta: bool) -> Self {
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

    /// The encoded message's length.
    pub fn encoded_len(&self) -> usize {
        self.head.len()
            + self
                .resources
                .iter()
                .map(|r| self.field_len(r))
                .sum::<usize>()
            + self.tail.len()
    }

    fn encode_resource(&self, r: &Resource, buf: &mut BytesMut) {
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
        buf.put_slice(&r.any);
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
            next: None,
        }
    }
}

/// A response's gRPC message, chunk by chunk.
pub struct GrpcChunks {
    response: Response,
    len: usize,
    /// The next resource to encode; `None` before the first chunk.
    next: Option<usize>,
}

impl Iterator for GrpcChunks {
    type Item = Bytes;

    fn next(&mut self) -> Option<Bytes> {
        let resources = &self.response.resources;
        let mut buf = BytesMut::with_capacity(CHUNK);
        let mut i = match self.next {
            None => {
                buf.put_u8(0); // not compressed
                buf.put_u32(self.len as u32);
                buf.put_slice(&self.response.head);
                0
            }
            Some(i) if i > resources.len() => return None,
            Some(i) => i,
        };
        // Whole resources, up to the chunk's size unless the first alone
        // is larger.
        while let Some(r) = resources.get(i) {
            let len = self.response.field_len(r);
            if buf.len() + len > CHUNK && !buf.is_empty() {
                break;
            }
            buf.reserve(len);
            self.response.encode_resource(r, &mut buf);
            i += 1;
        }
        if i == resources.len() {
            buf.put_slice(&self.response.tail);
            i += 1;
        }
        self.next = Some(i);
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
            .map(|i| cluster(&format!("c{i}"), i * 1_000))
            .collect()
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
        let bytes = message(Response::sotw(fields, resources));
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
        let bytes = message(Response::delta(fields, resources));
        assert_eq!(bytes, expected.encode_to_vec());
    }

    #[test]
    fn an_empty_response_is_one_chunk() {
        let response = Response::sotw(DiscoveryResponse::default(), Vec::new());
        let chunks: Vec<Bytes> = response.into_grpc_chunks().collect();
        assert_eq!(chunks, [Bytes::from_static(&[0, 0, 0, 0, 0])]);
    }

    #[test]
    fn chunks_stay_near_their_size() {
        let chunks: Vec<Bytes> = Response::sotw(DiscoveryResponse::default(), resources())
            .into_grpc_chunks()
            .collect();
        assert!(chunks.len() > 5, "{} chunks", chunks.len());
        // Only a resource larger than a chunk makes a larger chunk.
        let largest = resources().iter().map(|r| r.any.len()).max().unwrap();
        assert!(largest < CHUNK);
        assert!(chunks.iter().all(|c| c.len() <= CHUNK));
    }
}
