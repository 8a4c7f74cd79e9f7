//! Incremental (delta) xDS: the proxy subscribes and unsubscribes names
//! (the first request of a type with no names, or `*`, subscribes to all),
//! may declare what it already holds, and each response carries only the
//! resources that changed and the names removed. A resource's version is a
//! hash of its content, so equal content is never resent, across streams
//! too.

use std::sync::Arc;

use envoy_types::pb::{
    envoy::{config::core::v3::Node, service::discovery::v3::DeltaDiscoveryResponse},
    google::rpc,
};
use prost::Message;
use tonic::Status;

use super::{
    AdsServer, Changes, Connection, Flavor, Held, Response,
    fields::{FieldReader, Fields, malformed, merge, text},
    framing::Decode,
    names::{Matching, NameList, NameSets},
};
use crate::xds::ResourceGenerator;

pub struct Delta;

/// A `DeltaDiscoveryRequest` as Pilot reads it; fields Pilot does not read
/// are skipped.
#[derive(Debug, Default)]
pub struct DeltaRequest {
    pub node: Option<Node>,
    pub type_url: String,
    /// Names subscribed; `*` among them subscribes to all.
    pub subscribe: Arc<NameList>,
    pub unsubscribe: Vec<String>,
    /// What the proxy holds as it connects: each name and its version.
    pub initial_resource_versions: Vec<(String, String)>,
    pub response_nonce: String,
    pub error_detail: Option<rpc::Status>,
}

/// One entry of `initial_resource_versions`, a map on the wire.
#[derive(Clone, PartialEq, Message)]
struct VersionEntry {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(string, tag = "2")]
    version: String,
}

/// Reads a stream's requests field by field as their bytes arrive. A
/// proxy's first subscription names thousands of resources, most often the
/// very list the proxies of its scope sent before it: its names are
/// matched against the lists interned last and become strings only when
/// the list is new.
pub(super) struct Reader {
    interned: NameSets,
    fields: FieldReader,
    request: RequestFields,
}

/// The fields of the request being read.
#[derive(Default)]
struct RequestFields {
    request: DeltaRequest,
    subscribe: Matching,
}

impl Fields for RequestFields {
    fn reads(tag: u32) -> bool {
        (1..=7).contains(&tag)
    }

    fn field(&mut self, tag: u32, value: &[u8]) -> Result<(), Status> {
        let request = &mut self.request;
        match tag {
            1 => merge(&mut request.node, value, "the node")?,
            2 => request.type_url = text(value)?,
            3 => self.subscribe.push(value),
            4 => request.unsubscribe.push(text(value)?),
            5 => {
                let entry = VersionEntry::decode(value)
                    .map_err(|e| malformed(&format!("an initial resource version: {e}")))?;
                request
                    .initial_resource_versions
                    .push((entry.name, entry.version));
            }
            6 => request.response_nonce = text(value)?,
            _ => merge(&mut request.error_detail, value, "the error detail")?,
        }
        Ok(())
    }
}

impl Decode for Reader {
    type Request = DeltaRequest;

    fn begin(&mut self) {
        self.fields.begin();
        self.request = RequestFields {
            request: DeltaRequest::default(),
            subscribe: Matching::new(self.interned.recent()),
        };
    }

    fn take(&mut self, bytes: &[u8]) -> Result<(), Status> {
        self.fields.take(&mut self.request, bytes)
    }

    fn finish(&mut self) -> Result<DeltaRequest, Status> {
        self.fields.finish()?;
        let RequestFields {
            mut request,
            subscribe,
        } = std::mem::take(&mut self.request);
        request.subscribe = subscribe.finish(&self.interned)?;
        Ok(request)
    }
}

impl<G: ResourceGenerator> Flavor<G> for Delta {
    const NAME: &'static str = "delta";
    type Decoder = Reader;

    fn decoder(server: &AdsServer<G>) -> Reader {
        Reader {
            interned: server.names.clone(),
            fields: FieldReader::default(),
            request: RequestFields::default(),
        }
    }

    fn on_request(
        conn: &mut Connection<G>,
        request: DeltaRequest,
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
            watch.wildcard = request.subscribe.set().is_empty();
            watch.held = Held::declared(request.initial_resource_versions.into_iter().filter_map(
                |(name, version)| Some((name, u64::from_str_radix(&version, 16).ok()?)),
            ));
        }
        let mut changed = first;
        let subscribe = request.subscribe.set();
        let unsubscribe = request.unsubscribe;
        if subscribe.contains("*") {
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
        if watch.names.is_empty() && unsubscribe.is_empty() && !subscribe.contains("*") {
            // A first subscription, most often the one every proxy of a
            // scope makes: the set the reader found or built for it.
            watch.names = subscribe.clone();
        } else if changed {
            let mut names = (*watch.names).clone();
            names.extend(subscribe.iter().filter(named).cloned());
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
    let sent = conn.next_sent(hash);
    let (nonce, version) = (sent.nonce.clone(), sent.version.clone());
    let watch = conn.watches.get_mut(type_url)?;
    watch.pending = true;
    watch.sent = Some(sent);
    Some(Response::delta(
        DeltaDiscoveryResponse {
            system_version_info: version,
            removed_resources: removed,
            type_url: type_url.to_string(),
            nonce,
            ..Default::default()
        },
        changed,
    ))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::service::discovery::v3::DeltaDiscoveryRequest;

    use super::*;

    fn reader(interned: &NameSets) -> Reader {
        Reader {
            interned: interned.clone(),
            fields: FieldReader::default(),
            request: RequestFields::default(),
        }
    }

    fn read_in(reader: &mut Reader, bytes: &[u8], chunk: usize) -> DeltaRequest {
        reader.begin();
        for piece in bytes.chunks(chunk) {
            reader.take(piece).unwrap();
        }
        reader.finish().unwrap()
    }

    use proptest::prelude::*;

    proptest! {
        /// The reader agrees with prost on every request, however its bytes
        /// are cut.
        #[test]
        fn any_request_reads_as_prost_decodes_it(
            subscribe in proptest::collection::vec(any::<String>(), 0..6),
            unsubscribe in proptest::collection::vec(any::<String>(), 0..3),
            versions in proptest::collection::hash_map(any::<String>(), any::<String>(), 0..3),
            type_url in any::<String>(),
            nonce in any::<String>(),
            chunk in 1usize..40,
        ) {
            let sent = DeltaDiscoveryRequest {
                type_url,
                resource_names_subscribe: subscribe,
                resource_names_unsubscribe: unsubscribe,
                initial_resource_versions: versions,
                response_nonce: nonce,
                ..Default::default()
            };
            let read = read_in(&mut reader(&NameSets::default()), &sent.encode_to_vec(), chunk);
            prop_assert_eq!(&read.type_url, &sent.type_url);
            prop_assert_eq!(&read.response_nonce, &sent.response_nonce);
            prop_assert_eq!(&read.unsubscribe, &sent.resource_names_unsubscribe);
            let subscribed: std::collections::BTreeSet<&String> = sent.resource_names_subscribe.iter().collect();
            prop_assert_eq!(read.subscribe.set().iter().collect::<std::collections::BTreeSet<_>>(), subscribed);
            let mut versions = read.initial_resource_versions.clone();
            versions.sort();
            let mut expected: Vec<(String, String)> = sent.initial_resource_versions.into_iter().collect();
            expected.sort();
            prop_assert_eq!(versions, expected);
        }

        /// Any bytes are a request or a refusal, never a panic.
        #[test]
        fn any_bytes_read_or_are_refused(
            bytes in proptest::collection::vec(any::<u8>(), 0..256),
            chunk in 1usize..40,
        ) {
            let mut reader = reader(&NameSets::default());
            reader.begin();
            let taken = bytes.chunks(chunk).try_for_each(|piece| reader.take(piece));
            if taken.is_ok() {
                let _ = reader.finish();
            }
        }
    }

    #[test]
    fn the_request_reads_as_envoys_message_however_its_bytes_are_cut() {
        let sent = DeltaDiscoveryRequest {
            node: Some(Node {
                id: "sidecar~10.0.0.1~a.ns~ns.svc.cluster.local".into(),
                ..Default::default()
            }),
            type_url: crate::xds::ENDPOINT.into(),
            resource_names_subscribe: vec!["b".into(), "a".into()],
            resource_names_unsubscribe: vec!["c".into()],
            initial_resource_versions: [("d".to_string(), "1f".to_string())].into(),
            response_nonce: "4".into(),
            error_detail: Some(rpc::Status {
                code: 3,
                message: "bad".into(),
                details: vec![],
            }),
            ..Default::default()
        };
        let bytes = sent.encode_to_vec();
        for chunk in [1, 3, 16, usize::MAX] {
            let read = read_in(&mut reader(&NameSets::default()), &bytes, chunk);
            assert_eq!(read.node, sent.node);
            assert_eq!(read.type_url, sent.type_url);
            let subscribed: Vec<&str> = read.subscribe.set().iter().map(|n| n.as_str()).collect();
            assert_eq!(subscribed, ["a", "b"]);
            assert_eq!(read.unsubscribe, ["c"]);
            assert_eq!(read.initial_resource_versions, [("d".into(), "1f".into())]);
            assert_eq!(read.response_nonce, "4");
            assert_eq!(read.error_detail, sent.error_detail);
        }
    }

    #[test]
    fn a_first_subscription_another_stream_made_is_its_list() {
        let request = DeltaDiscoveryRequest {
            type_url: crate::xds::ENDPOINT.into(),
            resource_names_subscribe: (0..100).map(|i| format!("outbound|80||s{i}")).collect(),
            ..Default::default()
        };
        let interned = NameSets::default();
        let first = read_in(&mut reader(&interned), &request.encode_to_vec(), 7);
        let second = read_in(&mut reader(&interned), &request.encode_to_vec(), 7);
        assert!(Arc::ptr_eq(&first.subscribe, &second.subscribe));
        assert_eq!(first.subscribe.set().len(), 100);
    }
}
