//! MCP fuzzed from both ends. A sink given any `Resources` (any bytes, or
//! any well-formed message with any names, bodies and removals) applies it
//! whole or not at all and answers its nonce. A source given any sequence
//! of requests (ACKs, NACKs, stale and unknown nonces, restarted watches)
//! beside any sequence of changes never panics, and a sink that ends by
//! ACKing holds exactly what the store holds.

mod common;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use common::*;
use component::CancellationToken;
use mcp::{IncrementalPolicy, McpMetrics, Sink, SinkOptions, Store, source::serve_stream};
use mesh_api::pb::{
    google::rpc,
    istio::mcp::v1alpha1::{Metadata, RequestResources, Resource, Resources, SinkNode},
};
use pbjson_types::Any;
use proptest::prelude::*;
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

fn sink() -> Sink {
    Sink::new(
        SinkOptions::new("fuzz", [GATEWAYS, SERVICE_ENTRIES]),
        McpMetrics::default(),
    )
}

/// What the sink holds of each collection: name to (version, body).
fn held(sink: &Sink) -> BTreeMap<String, BTreeMap<String, (String, Vec<u8>)>> {
    sink.subscribe()
        .borrow()
        .collections
        .iter()
        .map(|(c, held)| {
            let resources = held
                .resources
                .iter()
                .map(|(name, r)| {
                    (
                        name.clone(),
                        (r.metadata.version.clone(), r.body.value.to_vec()),
                    )
                })
                .collect();
            (c.clone(), resources)
        })
        .collect()
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        prop::sample::select(vec!["", "ns/a", "ns/b", "ns/c"]).prop_map(str::to_string),
        any::<String>(),
    ]
}

/// A resource body: a Gateway or ServiceEntry as a source sends it, or one
/// with any type URL or any bytes, or none.
fn body() -> impl Strategy<Value = Option<Any>> {
    let valid = (any::<bool>(), 0u32..4).prop_map(|(gw, rev)| {
        let resource = if gw {
            gateway("x", rev)
        } else {
            service_entry("x", rev)
        };
        resource.body
    });
    let any_bytes = (
        prop::sample::select(vec![
            "type.googleapis.com/istio.networking.v1alpha3.Gateway",
            "type.googleapis.com/istio.networking.v1alpha3.ServiceEntry",
            "istio.networking.v1alpha3.Gateway",
            "",
        ]),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(url, value)| {
            Some(Any {
                type_url: url.into(),
                value: value.into(),
            })
        });
    prop_oneof![4 => valid, 2 => any_bytes, 1 => Just(None)]
}

fn resources() -> impl Strategy<Value = Resources> {
    (
        prop::sample::select(vec![GATEWAYS, SERVICE_ENTRIES, "", "istio/other"]),
        proptest::collection::vec((name(), "v[0-9]", body()), 0..5),
        proptest::collection::vec(name(), 0..3),
        any::<bool>(),
        any::<String>(),
    )
        .prop_map(
            |(collection, items, removed, incremental, nonce)| Resources {
                collection: collection.into(),
                system_version_info: nonce.clone(),
                nonce,
                incremental,
                removed_resources: removed,
                resources: items
                    .into_iter()
                    .map(|(name, version, body)| Resource {
                        metadata: Some(Metadata {
                            name,
                            version,
                            ..Default::default()
                        }),
                        body,
                    })
                    .collect(),
            },
        )
}

/// What applying `msg` whole would leave in `before` (the sink decides
/// whether it may; this says what it must then hold).
fn applied(
    before: &BTreeMap<String, (String, Vec<u8>)>,
    msg: &Resources,
) -> BTreeMap<String, (String, Vec<u8>)> {
    let mut next = if msg.incremental {
        before.clone()
    } else {
        BTreeMap::new()
    };
    if msg.incremental {
        for name in &msg.removed_resources {
            next.remove(name);
        }
    }
    for r in &msg.resources {
        let m = r.metadata.as_ref().unwrap();
        let body = r.body.as_ref().unwrap();
        next.insert(m.name.clone(), (m.version.clone(), body.value.to_vec()));
    }
    next
}

/// Applies `msg` and checks the answer: its nonce, and a state either
/// unchanged (NACK) or exactly `msg` applied (ACK).
fn apply_and_check(sink: &Sink, msg: Resources) -> Result<(), TestCaseError> {
    let before = held(sink);
    let answer = sink.apply(msg.clone());
    let after = held(sink);
    prop_assert_eq!(&answer.response_nonce, &msg.nonce);
    match (&answer.error_detail, before.get(&msg.collection)) {
        (None, Some(was)) => {
            prop_assert_eq!(&after[&msg.collection], &applied(was, &msg));
            let others = |m: &BTreeMap<_, _>| {
                let mut m = m.clone();
                m.remove(&msg.collection);
                m
            };
            prop_assert_eq!(others(&after), others(&before));
        }
        (None, None) => prop_assert!(false, "ACKed a collection never asked for"),
        (Some(_), _) => prop_assert_eq!(after, before, "a NACK keeps the last good state"),
    }
    Ok(())
}

/// One step of a sink's side of a stream, or a change at the source.
#[derive(Debug, Clone)]
enum Step {
    /// Answer the oldest unanswered response: ACK or NACK.
    Answer { ack: bool, incremental: bool },
    /// A request with a nonce the source never sent.
    Stale(String),
    /// Start the watch over on the same stream (empty nonce), asking for
    /// the whole state.
    Rewatch,
    /// Upsert (rev) or remove one of a few names at the store.
    Change { name: u8, rev: Option<u32> },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (any::<bool>(), any::<bool>()).prop_map(|(ack, incremental)| Step::Answer { ack, incremental }),
        1 => any::<String>().prop_map(Step::Stale),
        1 => Just(Step::Rewatch),
        3 => (0u8..4, proptest::option::of(0u32..3)).prop_map(|(name, rev)| Step::Change { name, rev }),
    ]
}

fn request(collection: &str, nonce: &str, incremental: bool, ack: bool) -> RequestResources {
    RequestResources {
        sink_node: Some(SinkNode {
            id: "fuzz".into(),
            ..Default::default()
        }),
        collection: collection.into(),
        response_nonce: nonce.into(),
        incremental,
        error_detail: (!ack).then(|| rpc::Status {
            code: tonic::Code::InvalidArgument as i32,
            message: "refused by the property".into(),
            details: Vec::new(),
        }),
        ..Default::default()
    }
}

/// Runs `steps` against a source of gateways, with a sink that applies
/// every response it ACKs, then makes one more change and ACKs until the
/// source has nothing more to send, and returns what the sink holds against what the store holds.
async fn converge(steps: Vec<Step>, start_incremental: bool) -> (Vec<Resource>, Vec<Resource>) {
    let store = Arc::new(Store::new([GATEWAYS]));
    let (req_tx, req_rx) = mpsc::channel(64);
    let (resp_tx, mut resp_rx) = mpsc::channel(64);
    let stop = CancellationToken::new();
    let served = tokio::spawn(serve_stream(
        store.clone(),
        IncrementalPolicy::All,
        McpMetrics::default(),
        ReceiverStream::new(req_rx),
        resp_tx,
        stop.clone(),
    ));
    let sink = sink();
    let send = |r| {
        let tx = req_tx.clone();
        async move { tx.send(Ok(r)).await.expect("source alive") }
    };
    send(request(GATEWAYS, "", start_incremental, true)).await;
    let mut pending = std::collections::VecDeque::new();
    // Everything the source has sent so far, without waiting for more.
    let drain = |pending: &mut std::collections::VecDeque<Resources>,
                 rx: &mut mpsc::Receiver<Result<Resources, tonic::Status>>| {
        while let Ok(r) = rx.try_recv() {
            pending.push_back(r.expect("source keeps the stream"));
        }
    };
    for step in steps {
        tokio::task::yield_now().await;
        drain(&mut pending, &mut resp_rx);
        match step {
            Step::Answer { ack, incremental } => {
                if let Some(r) = pending.pop_front() {
                    let nonce = r.nonce.clone();
                    if ack {
                        let answer = sink.apply(r);
                        assert!(
                            answer.error_detail.is_none(),
                            "a source's own response applies"
                        );
                    }
                    send(request(GATEWAYS, &nonce, incremental, ack)).await;
                }
            }
            Step::Stale(nonce) if !nonce.is_empty() => {
                send(request(GATEWAYS, &nonce, false, true)).await
            }
            Step::Stale(_) => {}
            // The source forgets what it sent: responses in flight still
            // arrive and are applied, and their answers are stale; the
            // new watch's first response is whole.
            Step::Rewatch => send(request(GATEWAYS, "", false, true)).await,
            Step::Change { name, rev } => {
                let name = format!("ns/g{name}");
                match rev {
                    Some(rev) => store.upsert(GATEWAYS, gateway(&name, rev)).map(drop),
                    None => store.remove(GATEWAYS, &name).map(drop),
                }
                .unwrap();
            }
        }
    }
    // One more change, since after a NACK a source waits for one; then ACK
    // until the source is quiet: with time paused, a timeout fires only
    // once every task is idle, so it says nothing more is coming.
    store.upsert(GATEWAYS, gateway("ns/last", 0)).unwrap();
    loop {
        let next = match pending.pop_front() {
            Some(r) => r,
            None => match tokio::time::timeout(Duration::from_secs(60), resp_rx.recv()).await {
                Ok(Some(r)) => r.expect("source keeps the stream"),
                Ok(None) => panic!("source ended the stream"),
                Err(_) => break,
            },
        };
        let nonce = next.nonce.clone();
        assert!(sink.apply(next).error_detail.is_none());
        send(request(GATEWAYS, &nonce, true, true)).await;
    }
    stop.cancel();
    served.await.unwrap();
    let mut held: Vec<Resource> = sink.subscribe().borrow().collections[GATEWAYS]
        .resources
        .values()
        .map(|r| Resource {
            metadata: Some(r.metadata.clone()),
            body: Some(r.body.clone()),
        })
        .collect();
    let mut want: Vec<Resource> = store
        .full(GATEWAYS)
        .unwrap()
        .1
        .iter()
        .map(|r| Resource::clone(r))
        .collect();
    let key = |r: &Resource| r.metadata.as_ref().unwrap().name.clone();
    held.sort_by_key(key);
    want.sort_by_key(key);
    (held, want)
}

proptest! {
    #[test]
    fn any_bytes_as_an_update_apply_whole_or_are_refused(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
    ) {
        if let Ok(msg) = Resources::decode(bytes.as_slice()) {
            apply_and_check(&sink(), msg)?;
        }
    }

    #[test]
    fn any_sequence_of_updates_applies_whole_or_not_at_all(
        updates in proptest::collection::vec(resources(), 1..12),
    ) {
        let sink = sink();
        for msg in updates {
            apply_and_check(&sink, msg)?;
        }
    }

    #[test]
    fn a_sink_that_acks_after_any_exchange_holds_what_the_store_holds(
        steps in proptest::collection::vec(step(), 0..40),
        start_incremental in any::<bool>(),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        let (held, want) = runtime.block_on(converge(steps, start_incremental));
        prop_assert_eq!(held, want);
    }
}
