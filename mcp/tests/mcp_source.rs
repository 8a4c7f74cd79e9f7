//! The source's rules (WIRE.md 1-7), each checked over a real gRPC
//! connection on 127.0.0.1 by a sink driven by hand.

mod common;

use std::{collections::HashMap, sync::Arc};

use common::*;
use component::CancellationToken;
use mcp::{IncrementalPolicy, Store};
use mesh_api::pb::istio::mcp::v1alpha1::Resources;
use tonic::Code;

fn store_with(n: u32) -> Arc<Store> {
    let store = Arc::new(Store::new([GATEWAYS, SERVICE_ENTRIES]));
    for i in 0..n {
        store
            .upsert(GATEWAYS, gateway(&format!("ns/g{i}"), 1))
            .unwrap();
    }
    store
}

/// A sink on a new source of `store` watching gateways and service
/// entries (state of the world), with the first response of each, not
/// yet answered.
async fn watching_both(
    store: &Arc<Store>,
) -> (RawSink, HashMap<String, Resources>, CancellationToken) {
    let (addr, stop) = start_source(store.clone(), IncrementalPolicy::All).await;
    let mut sink = RawSink::connect(addr).await;
    sink.watch(GATEWAYS, false).await;
    sink.watch(SERVICE_ENTRIES, false).await;
    let mut first = HashMap::new();
    for _ in 0..2 {
        let r = sink.next().await.unwrap();
        first.insert(r.collection.clone(), r);
    }
    (sink, first, stop)
}

#[tokio::test]
async fn first_request_gets_the_full_state_with_a_fresh_nonce() {
    let (_sink, seen, _stop) = watching_both(&store_with(3)).await;
    for r in seen.values() {
        assert!(!r.nonce.is_empty());
        assert!(!r.incremental);
    }
    assert_eq!(names(&seen[GATEWAYS]), ["ns/g0", "ns/g1", "ns/g2"]);
    assert!(
        seen[SERVICE_ENTRIES].resources.is_empty(),
        "an empty collection still gets a first response"
    );
    assert_ne!(
        seen[GATEWAYS].nonce, seen[SERVICE_ENTRIES].nonce,
        "nonces are unique on the stream"
    );
}

#[tokio::test]
async fn after_an_ack_the_source_sends_only_when_the_collection_changes() {
    let store = store_with(1);
    let (mut sink, first, _stop) = watching_both(&store).await;
    sink.ack(&first[GATEWAYS], false).await;
    sink.ack(&first[SERVICE_ENTRIES], false).await;

    // A change of service entries is the next thing to arrive: the ACKed
    // gateways are not resent.
    store.upsert(SERVICE_ENTRIES, gateway("ns/se", 1)).unwrap();
    let next = sink.next().await.unwrap();
    assert_eq!(next.collection, SERVICE_ENTRIES);
    sink.ack(&next, false).await;

    store.upsert(GATEWAYS, gateway("ns/g0", 2)).unwrap();
    let next = sink.next().await.unwrap();
    assert_eq!(next.collection, GATEWAYS);
    assert_ne!(next.nonce, first[GATEWAYS].nonce);
    assert_eq!(next.resources[0].metadata.as_ref().unwrap().version, "v2");
}

#[tokio::test]
async fn nothing_is_sent_while_an_answer_is_pending_and_changes_coalesce() {
    let store = store_with(1);
    let (mut sink, first, _stop) = watching_both(&store).await;
    sink.ack(&first[SERVICE_ENTRIES], false).await;

    // Three changes to gateways while its answer is pending, then a marker
    // change in the other collection: only the marker arrives.
    for rev in 2..=4 {
        store.upsert(GATEWAYS, gateway("ns/g0", rev)).unwrap();
    }
    store
        .upsert(SERVICE_ENTRIES, gateway("ns/marker", 1))
        .unwrap();
    let marker = sink.next().await.unwrap();
    assert_eq!(marker.collection, SERVICE_ENTRIES);

    // Answering gateways releases one response with the latest state.
    sink.ack(&first[GATEWAYS], false).await;
    let latest = sink.next().await.unwrap();
    assert_eq!(latest.collection, GATEWAYS);
    assert_eq!(latest.resources[0].metadata.as_ref().unwrap().version, "v4");
}

#[tokio::test]
async fn after_a_nack_nothing_is_resent_until_a_change() {
    let store = store_with(1);
    let (mut sink, first, _stop) = watching_both(&store).await;
    sink.nack(&first[GATEWAYS]).await;
    sink.ack(&first[SERVICE_ENTRIES], false).await;

    // Markers in the other collection arrive; the NACKed one is not resent.
    for i in 0..2 {
        store
            .upsert(SERVICE_ENTRIES, gateway(&format!("ns/m{i}"), 1))
            .unwrap();
        let r = sink.next().await.unwrap();
        assert_eq!(r.collection, SERVICE_ENTRIES);
        sink.ack(&r, false).await;
    }
    store.upsert(GATEWAYS, gateway("ns/g1", 1)).unwrap();
    let r = sink.next().await.unwrap();
    assert_eq!(r.collection, GATEWAYS);
    assert_eq!(names(&r), ["ns/g0", "ns/g1"]);
}

/// Found by `fuzz_mcp`: a watch that asked for the whole state declared
/// nothing about what the sink holds, so if the sink NACKs that state and
/// then asks for increments, there is no base to diff against and the
/// next response must be whole (a diff against "nothing" would leave the
/// sink holding what the store has since removed).
#[tokio::test]
async fn increments_asked_after_a_nacked_whole_state_start_whole() {
    let store = store_with(1);
    let (mut sink, first, _stop) = watching_both(&store).await;
    sink.ack(&first[GATEWAYS], false).await;
    store.remove(GATEWAYS, "ns/g0").unwrap();
    let emptied = sink.next().await.unwrap();
    sink.nack(&emptied).await;
    // The sink still holds ns/g0; it starts the watch over, asking for the
    // whole state, NACKs that too, and asks for increments from now on.
    sink.watch(GATEWAYS, false).await;
    let whole = sink.next().await.unwrap();
    sink.nack_asking(&whole, true).await;
    store.upsert(GATEWAYS, gateway("ns/g1", 1)).unwrap();
    let next = sink.next().await.unwrap();
    assert!(!next.incremental, "no base to diff against: {next:?}");
    assert_eq!(names(&next), ["ns/g1"]);
}

#[tokio::test]
async fn stale_nonces_are_ignored() {
    let store = store_with(1);
    let (mut sink, first, _stop) = watching_both(&store).await;
    sink.ack(&first[SERVICE_ENTRIES], false).await;

    // An answer with a nonce never sent (or an old one) is no answer: the
    // gateways response stays pending, so a change does not go out...
    let mut stale = first[GATEWAYS].clone();
    stale.nonce = "not-a-nonce-we-sent".into();
    sink.ack(&stale, false).await;
    store.upsert(GATEWAYS, gateway("ns/g0", 2)).unwrap();
    store
        .upsert(SERVICE_ENTRIES, gateway("ns/marker", 1))
        .unwrap();
    let marker = sink.next().await.unwrap();
    assert_eq!(marker.collection, SERVICE_ENTRIES);
    sink.ack(&marker, false).await;

    // ...until the real nonce is answered.
    sink.ack(&first[GATEWAYS], false).await;
    let r = sink.next().await.unwrap();
    assert_eq!(r.collection, GATEWAYS);
    assert_eq!(r.resources[0].metadata.as_ref().unwrap().version, "v2");

    // The old nonce, answered again, is stale too: nothing is sent for it.
    sink.ack(&first[GATEWAYS], false).await;
    store
        .upsert(SERVICE_ENTRIES, gateway("ns/marker", 2))
        .unwrap();
    assert_eq!(sink.next().await.unwrap().collection, SERVICE_ENTRIES);
}

#[tokio::test]
async fn incremental_updates_carry_only_adds_changes_and_removals() {
    let store = store_with(3);
    let (addr, _stop) = start_source(store.clone(), IncrementalPolicy::All).await;
    let mut sink = RawSink::connect(addr).await;
    sink.watch(GATEWAYS, true).await;
    let first = sink.next().await.unwrap();
    assert!(
        first.incremental,
        "first response is a diff against no initial versions"
    );
    assert_eq!(names(&first), ["ns/g0", "ns/g1", "ns/g2"]);
    sink.ack(&first, true).await;

    store.upsert(GATEWAYS, gateway("ns/g1", 2)).unwrap();
    store.upsert(GATEWAYS, gateway("ns/g3", 1)).unwrap();
    store.remove(GATEWAYS, "ns/g2").unwrap();
    // The three changes may arrive as one response or several; collect
    // until all are seen.
    let (mut changed, mut removed) = (Vec::new(), Vec::new());
    while changed.len() < 2 || removed.is_empty() {
        let r = sink.next().await.unwrap();
        assert!(r.incremental);
        changed.extend(names(&r));
        removed.extend(r.removed_resources.clone());
        sink.ack(&r, true).await;
    }
    changed.sort();
    assert_eq!(changed, ["ns/g1", "ns/g3"]);
    assert_eq!(removed, ["ns/g2"]);
}

#[tokio::test]
async fn a_new_stream_with_initial_versions_gets_only_the_diff() {
    let store = store_with(4);
    let (addr, _stop) = start_source(store.clone(), IncrementalPolicy::All).await;
    let mut sink = RawSink::connect(addr).await;
    let held: std::collections::BTreeMap<String, String> = [
        ("ns/g0", "v1"),  // current
        ("ns/g1", "v0"),  // outdated
        ("ns/old", "v1"), // gone from the source
    ]
    .into_iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    sink.send(mesh_api::pb::istio::mcp::v1alpha1::RequestResources {
        collection: GATEWAYS.into(),
        incremental: true,
        initial_resource_versions: held,
        ..Default::default()
    })
    .await;
    let r = sink.next().await.unwrap();
    assert!(r.incremental);
    assert_eq!(names(&r), ["ns/g1", "ns/g2", "ns/g3"]);
    assert_eq!(r.removed_resources, ["ns/old"]);
}

#[tokio::test]
async fn full_state_when_incremental_is_not_allowed_for_the_collection() {
    let store = store_with(2);
    let (addr, _stop) = start_source(store.clone(), IncrementalPolicy::None).await;
    let mut sink = RawSink::connect(addr).await;
    sink.watch(GATEWAYS, true).await;
    let first = sink.next().await.unwrap();
    assert!(!first.incremental);
    sink.ack(&first, true).await;
    store.upsert(GATEWAYS, gateway("ns/g0", 2)).unwrap();
    let r = sink.next().await.unwrap();
    assert!(!r.incremental);
    assert_eq!(
        names(&r),
        ["ns/g0", "ns/g1"],
        "full state replaces everything the sink held"
    );
}

#[tokio::test]
async fn an_unknown_collection_ends_the_stream_with_invalid_argument() {
    let (addr, _stop) = start_source(store_with(0), IncrementalPolicy::All).await;
    let mut sink = RawSink::connect(addr).await;
    sink.watch("istio/not/a/collection", false).await;
    let status = sink.next().await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("istio/not/a/collection"));
}

#[tokio::test]
async fn a_sink_that_never_acks_does_not_block_other_sinks() {
    let store = store_with(1);
    let (addr, _stop) = start_source(store.clone(), IncrementalPolicy::All).await;
    let mut silent = RawSink::connect(addr).await;
    silent.watch(GATEWAYS, false).await;
    silent.next().await.unwrap(); // never answered

    let mut active = RawSink::connect(addr).await;
    active.watch(GATEWAYS, false).await;
    let mut r = active.next().await.unwrap();
    for rev in 2..=5 {
        active.ack(&r, false).await;
        store.upsert(GATEWAYS, gateway("ns/g0", rev)).unwrap();
        r = active.next().await.unwrap();
        assert_eq!(
            r.resources[0].metadata.as_ref().unwrap().version,
            format!("v{rev}")
        );
    }
}

#[tokio::test]
async fn a_request_that_does_not_decode_gets_a_grpc_status() {
    use mesh_api::pb::istio::mcp::v1alpha1::RequestResources;
    use prost::Message;

    let (addr, _stop) = start_source(store_with(1), IncrementalPolicy::All).await;
    let full = RequestResources {
        collection: GATEWAYS.into(),
        response_nonce: "1".into(),
        ..Default::default()
    }
    .encode_to_vec();
    for bad in [
        full[..full.len() - 1].to_vec(),
        vec![0x12, 0xff, 0xff, 0xff, 0xff, 0x0f],
    ] {
        let (_tx, responses) = raw::stream::<Resources>(
            addr,
            "/istio.mcp.v1alpha1.ResourceSource/EstablishResourceStream",
            vec![bad],
        )
        .await;
        let status = raw::final_status(responses)
            .await
            .expect("an error status, not a clean end");
        assert_ne!(status.code(), Code::Ok);
        assert!(status.message().contains("decode"), "{status:?}");
    }
}
