//! State of the world: every response carries all of a type's resources
//! the proxy subscribed to; an empty name list subscribes to all.

use std::sync::Arc;

use envoy_types::pb::{
    envoy::{config::core::v3::Node, service::discovery::v3::DiscoveryResponse},
    google::rpc,
};
use tonic::Status;

use super::{
    AdsServer, Connection, Flavor, Held, Response,
    fields::{FieldReader, Fields, merge, text},
    framing::Decode,
    names::{Matching, NameList, NameSets},
};
use crate::xds::{CLUSTER, LISTENER, ResourceGenerator};

pub struct Sotw;

/// A `DiscoveryRequest` as Pilot reads it; fields Pilot does not read are
/// skipped.
#[derive(Debug, Default)]
pub struct SotwRequest {
    pub version_info: String,
    pub node: Option<Node>,
    pub names: Arc<NameList>,
    pub type_url: String,
    pub response_nonce: String,
    pub error_detail: Option<rpc::Status>,
}

/// Reads a stream's requests field by field as their bytes arrive. Envoy's
/// every ACK repeats the thousands of names it subscribes to, in the order
/// it last listed them: each name is compared with that list (or, on a
/// stream's first request, with the lists other streams sent last) and
/// kept only once it differs from every one, so an ACK costs neither a
/// buffer of its size nor a string per name.
pub(super) struct Reader {
    interned: NameSets,
    /// The names this stream last sent, by type.
    lists: Vec<(String, Arc<NameList>)>,
    fields: FieldReader,
    request: RequestFields,
}

/// The fields of the request being read.
#[derive(Default)]
struct RequestFields {
    request: SotwRequest,
    names: Matching,
}

impl Fields for RequestFields {
    fn reads(tag: u32) -> bool {
        (1..=6).contains(&tag)
    }

    fn field(&mut self, tag: u32, value: &[u8]) -> Result<(), Status> {
        let request = &mut self.request;
        match tag {
            1 => request.version_info = text(value)?,
            2 => merge(&mut request.node, value, "the node")?,
            3 => self.names.push(value),
            4 => request.type_url = text(value)?,
            5 => request.response_nonce = text(value)?,
            _ => merge(&mut request.error_detail, value, "the error detail")?,
        }
        Ok(())
    }
}

impl Reader {
    pub(super) fn new(interned: NameSets) -> Self {
        Self {
            interned,
            lists: Vec::new(),
            fields: FieldReader::default(),
            request: RequestFields::default(),
        }
    }
}

impl Decode for Reader {
    type Request = SotwRequest;

    fn begin(&mut self) {
        self.fields.begin();
        let own = self.lists.iter().map(|(_, list)| list.clone());
        self.request = RequestFields {
            request: SotwRequest::default(),
            names: Matching::new(own.chain(self.interned.recent())),
        };
    }

    fn take(&mut self, bytes: &[u8]) -> Result<(), Status> {
        self.fields.take(&mut self.request, bytes)
    }

    fn finish(&mut self) -> Result<SotwRequest, Status> {
        self.fields.finish()?;
        let RequestFields { mut request, names } = std::mem::take(&mut self.request);
        request.names = names.finish(&self.interned)?;
        match self.lists.iter_mut().find(|(t, _)| *t == request.type_url) {
            Some((_, list)) => *list = request.names.clone(),
            None => self
                .lists
                .push((request.type_url.clone(), request.names.clone())),
        }
        Ok(request)
    }
}

impl<G: ResourceGenerator> Flavor<G> for Sotw {
    const NAME: &'static str = "sotw";
    type Decoder = Reader;

    fn decoder(server: &AdsServer<G>) -> Reader {
        Reader::new(server.names.clone())
    }

    fn on_request(conn: &mut Connection<G>, request: SotwRequest) -> Result<Vec<Response>, Status> {
        if request.type_url.is_empty() {
            return Err(Status::invalid_argument("an ADS request needs a type_url"));
        }
        conn.identify(request.node.as_ref())?;
        let type_url = request.type_url;
        let watch = conn.watches.entry(type_url.clone()).or_default();
        let known = watch
            .list
            .as_ref()
            .is_some_and(|l| Arc::ptr_eq(l, &request.names));
        let names_changed = !known && {
            let names = request.names.set().clone();
            let changed = !Arc::ptr_eq(&watch.names, &names) && *watch.names != *names;
            watch.wildcard = names.is_empty();
            watch.names = names;
            watch.list = Some(request.names);
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
    let sent = conn.next_sent(hash);
    let (nonce, version) = (sent.nonce.clone(), sent.version.clone());
    let watch = conn.watches.get_mut(type_url)?;
    watch.pending = true;
    watch.sent = Some(sent);
    Some(Response::sotw(
        DiscoveryResponse {
            version_info: version,
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

    /// Reads `bytes` as one request, given to the reader `chunk` bytes at
    /// a time.
    fn read_in(reader: &mut Reader, bytes: &[u8], chunk: usize) -> Result<SotwRequest, Status> {
        reader.begin();
        for piece in bytes.chunks(chunk) {
            reader.take(piece)?;
        }
        reader.finish()
    }

    fn read(reader: &mut Reader, request: &DiscoveryRequest) -> SotwRequest {
        read_in(reader, &request.encode_to_vec(), usize::MAX).unwrap()
    }

    fn names(request: &SotwRequest) -> Vec<&str> {
        request.names.set().iter().map(String::as_str).collect()
    }

    use proptest::prelude::*;

    /// Requests as Envoy could send them, names reused across requests so
    /// that the lists the reader matches against come into play.
    fn any_request() -> impl Strategy<Value = DiscoveryRequest> {
        let name = prop_oneof![
            prop::sample::select(vec!["", "a", "b", "outbound|80||a", "é"])
                .prop_map(str::to_string),
            any::<String>(),
        ];
        (
            any::<String>(),
            proptest::collection::vec(name, 0..8),
            any::<String>(),
            any::<String>(),
            proptest::option::of((any::<i32>(), any::<String>())),
        )
            .prop_map(|(version_info, names, type_url, response_nonce, error)| {
                DiscoveryRequest {
                    version_info,
                    resource_names: names,
                    type_url,
                    response_nonce,
                    error_detail: error.map(|(code, message)| rpc::Status {
                        code,
                        message,
                        details: vec![],
                    }),
                    ..Default::default()
                }
            })
    }

    proptest! {
        /// The reader agrees with prost on every request, however its bytes
        /// are cut, one request after another on one stream.
        #[test]
        fn any_request_reads_as_prost_decodes_it(
            requests in proptest::collection::vec(any_request(), 1..4),
            chunk in 1usize..40,
        ) {
            let mut reader = Reader::new(NameSets::default());
            for sent in requests {
                let read = read_in(&mut reader, &sent.encode_to_vec(), chunk).unwrap();
                prop_assert_eq!(&read.version_info, &sent.version_info);
                prop_assert_eq!(&read.type_url, &sent.type_url);
                prop_assert_eq!(&read.response_nonce, &sent.response_nonce);
                prop_assert_eq!(&read.error_detail, &sent.error_detail);
                let mut expected: Vec<&str> = sent.resource_names.iter().map(String::as_str).collect();
                expected.sort();
                expected.dedup();
                prop_assert_eq!(names(&read), expected);
            }
        }

        /// Any bytes are a request or a refusal, never a panic, and the
        /// reader is fit for the next request either way.
        #[test]
        fn any_bytes_read_or_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            chunk in 1usize..40,
        ) {
            let mut reader = Reader::new(NameSets::default());
            let _ = read_in(&mut reader, &bytes, chunk);
            let next = read(&mut reader, &request(&["a"]));
            prop_assert_eq!(names(&next), ["a"]);
        }
    }

    #[test]
    fn the_request_reads_as_envoys_message_however_its_bytes_are_cut() {
        let sent = request(&["outbound|80||b", "outbound|80||a", ""]);
        let mut bytes = sent.encode_to_vec();
        // Fields Pilot skips, of each wire type, the last one long.
        prost::encoding::uint64::encode(20, &7, &mut bytes);
        prost::encoding::fixed64::encode(21, &7, &mut bytes);
        prost::encoding::fixed32::encode(22, &7, &mut bytes);
        prost::encoding::bytes::encode(23, &vec![0xff; 300], &mut bytes);
        for chunk in [1, 2, 3, 5, 16, 64, usize::MAX] {
            let mut reader = Reader::new(NameSets::default());
            let read = read_in(&mut reader, &bytes, chunk).unwrap();
            assert_eq!(read.version_info, "3");
            assert_eq!(read.node, sent.node);
            assert_eq!(read.type_url, sent.type_url);
            assert_eq!(read.response_nonce, "3");
            assert_eq!(read.error_detail.as_ref().unwrap().message, "bad");
            assert_eq!(names(&read), ["", "outbound|80||a", "outbound|80||b"]);
            // Held only while a field is cut: nothing once the request ends.
            assert!(reader.fields.is_empty(), "chunks of {chunk}");
        }
    }

    #[test]
    fn a_repeated_list_is_the_list_already_held_on_this_stream_and_others() {
        let interned = NameSets::default();
        let mut first = Reader::new(interned.clone());
        let list = read(&mut first, &request(&["c", "a", "b"])).names;
        for chunk in [1, 4, usize::MAX] {
            let again = read_in(
                &mut first,
                &request(&["c", "a", "b"]).encode_to_vec(),
                chunk,
            );
            assert!(Arc::ptr_eq(&list, &again.unwrap().names));
        }
        let mut second = Reader::new(interned);
        assert!(Arc::ptr_eq(
            &list,
            &read(&mut second, &request(&["c", "a", "b"])).names
        ));
    }

    #[test]
    fn a_list_that_departs_from_the_last_reads_as_itself() {
        let mut reader = Reader::new(NameSets::default());
        read(&mut reader, &request(&["a", "b", "c"]));
        for (sent, want) in [
            (&["a", "b"][..], &["a", "b"][..]),
            (&["a", "b", "c", "d"], &["a", "b", "c", "d"]),
            (&["a", "x", "c"], &["a", "c", "x"]),
            (&["b"], &["b"]),
            (&[], &[]),
        ] {
            let read = read(&mut reader, &request(sent));
            assert_eq!(names(&read), want);
            let mut bytes = Vec::new();
            for name in sent {
                NameList::push(&mut bytes, name.as_bytes());
            }
            assert_eq!(read.names.bytes(), bytes);
        }
    }

    #[test]
    fn a_request_cut_inside_a_field_is_refused() {
        // Field 3, length 10, three bytes.
        const CUT: [u8; 5] = [0x1a, 10, b'a', b'b', b'c'];
        let mut reader = Reader::new(NameSets::default());
        let status = read_in(&mut reader, &CUT, 2).unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("inside a field"), "{status:?}");
        // The next request reads whole.
        let read = read(&mut reader, &request(&["a"]));
        assert_eq!(names(&read), ["a"]);
    }

    #[test]
    fn malformed_fields_are_refused_with_what_was_wrong() {
        let mut not_utf8 = Vec::new();
        prost::encoding::bytes::encode(3, &vec![0xff, 0xfe], &mut not_utf8);
        let mut varint_name = Vec::new();
        prost::encoding::uint64::encode(3, &1, &mut varint_name);
        let group = [0x0b];
        let long_varint = [
            0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ];
        for (bytes, want) in [
            (&not_utf8[..], "not valid UTF-8"),
            (&varint_name, "wrong wire type"),
            (&group, "groups"),
            (&long_varint, "too long"),
        ] {
            let status = read_in(&mut Reader::new(NameSets::default()), bytes, 1).unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains(want), "{status:?}");
        }
    }
}
