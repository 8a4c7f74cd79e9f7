//! The sink's rules, and both connection directions end to end, each over a
//! real gRPC connection on 127.0.0.1.

mod common;

use std::sync::Arc;

use common::*;
use component::CancellationToken;
use mcp::{
    IncrementalPolicy, McpMetrics, Payload, Sink, SinkOptions, SinkServer, SinkSnapshot, Store,
    run_sink_client, run_source_client,
};
use mesh_api::{
    kinds::{self, Body},
    pb::istio::mcp::v1alpha1::Resources,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::StreamExt;
use tonic::Code;

fn sink(incremental: bool) -> Arc<Sink> {
    let mut options = SinkOptions::new("test-sink", [GATEWAYS, SERVICE_ENTRIES]);
    options.incremental = incremental;
    Arc::new(Sink::new(options, McpMetrics::default()))
}

fn resources(
    collection: &str,
    nonce: &str,
    incremental: bool,
    items: Vec<mesh_api::pb::istio::mcp::v1alpha1::Resource>,
) -> Resources {
    Resources {
        collection: collection.into(),
        nonce: nonce.into(),
        incremental,
        system_version_info: nonce.into(),
        resources: items,
        ..Default::default()
    }
}

/// A sink client (incremental or not) dialing a new hand-driven source:
/// its snapshots, the source's streams, the first of them, and what stops
/// the source.
async fn dialing(
    incremental: bool,
) -> (
    watch::Receiver<Arc<SinkSnapshot>>,
    mpsc::Receiver<RawSourceStream>,
    RawSourceStream,
    CancellationToken,
) {
    let (addr, mut streams, stop) = start_raw_source().await;
    let sink = sink(incremental);
    let snapshots = sink.subscribe();
    tokio::spawn(run_sink_client(sink, endpoint(addr), stop.clone()));
    let stream = within("the sink to connect", streams.recv()).await.unwrap();
    (snapshots, streams, stream, stop)
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<SinkSnapshot>>,
    what: &str,
    f: impl Fn(&SinkSnapshot) -> bool,
) -> Arc<SinkSnapshot> {
    within(what, async {
        loop {
            let snapshot = rx.borrow_and_update().clone();
            if f(&snapshot) {
                return snapshot;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
}

fn held_names(s: &SinkSnapshot, collection: &str) -> Vec<String> {
    s.collections[collection]
        .resources
        .keys()
        .cloned()
        .collect()
}

fn version(s: &SinkSnapshot, collection: &str, name: &str) -> String {
    s.collections[collection].resources[name]
        .metadata
        .version
        .clone()
}

#[tokio::test]
async fn sink_client_requests_every_collection_acks_and_publishes_snapshots() {
    let (mut snapshots, _streams, mut stream, _stop) = dialing(false).await;

    let mut asked = [stream.next().await, stream.next().await];
    asked.sort_by(|a, b| a.collection.cmp(&b.collection));
    assert_eq!(asked[0].collection, GATEWAYS);
    assert_eq!(asked[1].collection, SERVICE_ENTRIES);
    assert!(asked.iter().all(|r| r.response_nonce.is_empty() && r.sink_node.as_ref().unwrap().id == "test-sink"));

    stream
        .send(resources(
            GATEWAYS,
            "n1",
            false,
            vec![gateway("ns/a", 1), gateway("ns/b", 1)],
        ))
        .await;
    let ack = stream.next().await;
    assert_eq!(
        (ack.collection.as_str(), ack.response_nonce.as_str()),
        (GATEWAYS, "n1")
    );
    assert!(ack.error_detail.is_none());
    let s = wait_for(&mut snapshots, "gateways", |s| {
        s.collections[GATEWAYS].synced
    })
    .await;
    assert_eq!(held_names(&s, GATEWAYS), ["ns/a", "ns/b"]);
    assert!(!s.synced(), "service entries have not arrived yet");
    let Payload::Decoded(Body::Gateway(g)) = &s.collections[GATEWAYS].resources["ns/a"].payload
    else {
        panic!("bodies are decoded to the collection's type");
    };
    assert_eq!(g.selector["rev"], "1");

    stream
        .send(resources(SERVICE_ENTRIES, "n2", false, vec![]))
        .await;
    assert!(stream.next().await.error_detail.is_none());
    wait_for(&mut snapshots, "all synced", SinkSnapshot::synced).await;

    // A full-state response replaces everything held.
    stream
        .send(resources(GATEWAYS, "n3", false, vec![gateway("ns/c", 1)]))
        .await;
    stream.next().await;
    let s = wait_for(&mut snapshots, "replacement", |s| {
        s.collections[GATEWAYS].version == "n3"
    })
    .await;
    assert_eq!(held_names(&s, GATEWAYS), ["ns/c"]);
}

#[tokio::test]
async fn bad_updates_are_nacked_and_the_last_good_state_kept() {
    let (mut snapshots, _streams, mut stream, _stop) = dialing(false).await;
    stream.next().await;
    stream.next().await;
    stream
        .send(resources(GATEWAYS, "good", false, vec![gateway("ns/a", 1)]))
        .await;
    assert!(stream.next().await.error_detail.is_none());

    let mut malformed = gateway("ns/a", 2);
    malformed.body.as_mut().unwrap().value = vec![0x0a, 0xff, 0x01].into();
    let mut wrong_type = gateway("ns/a", 3);
    wrong_type.body.as_mut().unwrap().type_url =
        "type.googleapis.com/istio.networking.v1alpha3.VirtualService".into();
    let mut truncated = gateway("ns/a", 4);
    let bytes = truncated.body.as_ref().unwrap().value.clone();
    truncated.body.as_mut().unwrap().value = bytes.slice(..bytes.len() - 1);
    let mut unnamed = gateway("", 5);
    unnamed.metadata.as_mut().unwrap().name.clear();

    for (nonce, bad, expect) in [
        ("malformed", vec![malformed], "cannot decode"),
        (
            "wrong-type",
            vec![wrong_type],
            "want \"type.googleapis.com/istio.networking.v1alpha3.Gateway\"",
        ),
        ("truncated", vec![truncated], "cannot decode"),
        ("unnamed", vec![unnamed], "no metadata.name"),
        (
            "twice",
            vec![gateway("ns/x", 1), gateway("ns/x", 1)],
            "appears twice",
        ),
        // Half good, half bad: nothing of it is applied.
        (
            "partial",
            vec![gateway("ns/new", 1), {
                let mut m = gateway("ns/a", 9);
                m.body = None;
                m
            }],
            "no body",
        ),
    ] {
        stream.send(resources(GATEWAYS, nonce, false, bad)).await;
        let nack = stream.next().await;
        assert_eq!(nack.response_nonce, nonce);
        let detail = nack
            .error_detail
            .unwrap_or_else(|| panic!("{nonce} must be NACKed"));
        assert_eq!(detail.code, Code::InvalidArgument as i32);
        assert!(
            detail.message.contains(expect),
            "{nonce}: {}",
            detail.message
        );
    }
    // A collection not asked for is NACKed UNIMPLEMENTED, as Istio 1.1's
    // sinks do.
    let unknown = resources("istio/unrequested", "unrequested", false, vec![]);
    stream.send(unknown).await;
    let detail = stream.next().await.error_detail.unwrap();
    assert_eq!(detail.code, Code::Unimplemented as i32);
    assert!(detail.message.contains("was not requested"), "{detail:?}");

    let s = snapshots.borrow_and_update().clone();
    assert_eq!(s.collections[GATEWAYS].version, "good");
    assert_eq!(held_names(&s, GATEWAYS), ["ns/a"]);
    assert_eq!(version(&s, GATEWAYS, "ns/a"), "v1");
}

#[tokio::test]
async fn incremental_updates_apply_on_top_of_what_is_held() {
    let (mut snapshots, _streams, mut stream, _stop) = dialing(true).await;
    assert!(
        stream.next().await.incremental,
        "the sink asks for incremental updates"
    );
    stream.next().await;
    stream
        .send(resources(
            GATEWAYS,
            "1",
            true,
            vec![gateway("ns/a", 1), gateway("ns/b", 1), gateway("ns/c", 1)],
        ))
        .await;
    stream.next().await;
    let mut update = resources(
        GATEWAYS,
        "2",
        true,
        vec![gateway("ns/b", 2), gateway("ns/d", 1)],
    );
    update.removed_resources = vec!["ns/c".into()];
    stream.send(update).await;
    assert!(stream.next().await.error_detail.is_none());
    let s = wait_for(&mut snapshots, "incremental update", |s| {
        s.collections[GATEWAYS].version == "2"
    })
    .await;
    assert_eq!(held_names(&s, GATEWAYS), ["ns/a", "ns/b", "ns/d"]);
    assert_eq!(version(&s, GATEWAYS, "ns/b"), "v2");
}

#[tokio::test]
async fn a_reconnecting_sink_sends_the_versions_it_holds() {
    let (mut snapshots, mut streams, mut stream, _stop) = dialing(true).await;
    stream.next().await;
    stream.next().await;
    stream
        .send(resources(
            GATEWAYS,
            "1",
            true,
            vec![gateway("ns/a", 1), gateway("ns/b", 3)],
        ))
        .await;
    stream.next().await;
    wait_for(&mut snapshots, "first state", |s| {
        s.collections[GATEWAYS].synced
    })
    .await;

    // The source ends the stream; the sink comes back on a new one and
    // declares what it holds, so that it can be sent only a diff.
    stream
        .responses
        .send(Err(tonic::Status::unavailable("restarting")))
        .await
        .unwrap();
    drop(stream);
    let mut again = within("the sink to reconnect", streams.recv())
        .await
        .unwrap();
    let mut asked = [again.next().await, again.next().await];
    asked.sort_by(|a, b| a.collection.cmp(&b.collection));
    assert_eq!(asked[0].collection, GATEWAYS);
    assert_eq!(
        asked[0].initial_resource_versions,
        [
            ("ns/a".to_string(), "v1".to_string()),
            ("ns/b".to_string(), "v3".to_string())
        ]
        .into()
    );
    assert!(asked[1].initial_resource_versions.is_empty());

    // While disconnected it kept serving its last good state.
    assert_eq!(held_names(&snapshots.borrow(), GATEWAYS), ["ns/a", "ns/b"]);
}

#[tokio::test]
async fn sink_server_answers_a_dialing_source() {
    let sink = sink(false);
    let mut snapshots = sink.subscribe();
    let addr = serve_sink(sink.clone()).await;
    let (tx, mut requests) = dial_sink(addr).await;
    let mut opening = Vec::new();
    for _ in 0..2 {
        opening.push(
            within("opening request", requests.next())
                .await
                .unwrap()
                .unwrap()
                .collection,
        );
    }
    opening.sort();
    assert_eq!(opening, [GATEWAYS, SERVICE_ENTRIES]);
    tx.send(resources(GATEWAYS, "n1", false, vec![gateway("ns/a", 1)]))
        .await
        .unwrap();
    let ack = within("ack", requests.next()).await.unwrap().unwrap();
    assert_eq!(ack.response_nonce, "n1");
    assert!(ack.error_detail.is_none());
    let s = wait_for(&mut snapshots, "state", |s| s.collections[GATEWAYS].synced).await;
    assert_eq!(held_names(&s, GATEWAYS), ["ns/a"]);
}

/// The engine against itself in both directions: the sink converges on the
/// source's state through adds, changes and removals.
async fn converge(source: &Store, sink: &Sink) {
    let mut snapshots = sink.subscribe();
    for step in 0..3u32 {
        match step {
            0 => {}
            1 => {
                source.upsert(GATEWAYS, gateway("ns/g1", 2)).unwrap();
                source
                    .upsert(SERVICE_ENTRIES, service_entry("ns/se", 1))
                    .unwrap();
            }
            _ => {
                source.remove(GATEWAYS, "ns/g0").unwrap();
            }
        }
        let want: Vec<(String, String)> = source
            .full(GATEWAYS)
            .unwrap()
            .1
            .iter()
            .map(|r| {
                let m = r.metadata.as_ref().unwrap();
                (m.name.clone(), m.version.clone())
            })
            .collect();
        wait_for(&mut snapshots, &format!("step {step}"), |s| {
            s.synced()
                && s.collections[GATEWAYS]
                    .resources
                    .iter()
                    .map(|(n, r)| (n.clone(), r.metadata.version.clone()))
                    .collect::<Vec<_>>()
                    == want
                && s.collections[SERVICE_ENTRIES].resources.len() == source.len(SERVICE_ENTRIES)
        })
        .await;
    }
}

/// Serves `sink` as `ResourceSink` on 127.0.0.1; returns the address.
async fn serve_sink(sink: Arc<Sink>) -> std::net::SocketAddr {
    let (l, addr) = listener().await;
    tokio::spawn(
        mcp::grpc_server()
            .add_service(SinkServer::new(sink, CancellationToken::new()).into_service())
            .serve_with_incoming(mcp::incoming(l)),
    );
    addr
}

fn seeded_store() -> Arc<Store> {
    let store = Arc::new(Store::new([GATEWAYS, SERVICE_ENTRIES]));
    store.upsert(GATEWAYS, gateway("ns/g0", 1)).unwrap();
    store.upsert(GATEWAYS, gateway("ns/g1", 1)).unwrap();
    store
}

#[tokio::test]
async fn sink_dials_source() {
    let store = seeded_store();
    let (addr, _stop) = start_source(store.clone(), IncrementalPolicy::All).await;
    let sink = sink(true);
    let stop = CancellationToken::new();
    tokio::spawn(run_sink_client(sink.clone(), endpoint(addr), stop.clone()));
    converge(&store, &sink).await;
    stop.cancel();
}

#[tokio::test]
async fn source_dials_sink() {
    let sink = sink(false);
    let addr = serve_sink(sink.clone()).await;
    let store = seeded_store();
    let stop = CancellationToken::new();
    tokio::spawn(run_source_client(
        store.clone(),
        IncrementalPolicy::All,
        McpMetrics::default(),
        endpoint(addr),
        stop.clone(),
    ));
    converge(&store, &sink).await;
    stop.cancel();
}

#[tokio::test]
async fn sink_keeps_state_and_resyncs_across_a_source_restart() {
    let store = seeded_store();
    let (l, addr) = listener().await;
    let sink = sink(true);
    let mut snapshots = sink.subscribe();
    let first = CancellationToken::new();
    let serve = |l, stop: CancellationToken| {
        mcp::grpc_server()
            .add_service(
                mcp::SourceServer::new(
                    store.clone(),
                    IncrementalPolicy::All,
                    McpMetrics::default(),
                    stop.clone(),
                )
                .into_service(),
            )
            .serve_with_incoming_shutdown(mcp::incoming(l), stop.cancelled_owned())
    };
    let server = tokio::spawn(serve(l, first.clone()));
    tokio::spawn(run_sink_client(
        sink.clone(),
        endpoint(addr),
        CancellationToken::new(),
    ));
    wait_for(&mut snapshots, "first sync", SinkSnapshot::synced).await;

    first.cancel();
    server.await.unwrap().unwrap();
    store.remove(GATEWAYS, "ns/g0").unwrap();
    store.upsert(GATEWAYS, gateway("ns/g2", 1)).unwrap();
    assert_eq!(
        held_names(&snapshots.borrow(), GATEWAYS),
        ["ns/g0", "ns/g1"],
        "last good state while away"
    );

    let l = tokio::net::TcpListener::bind(addr).await.unwrap();
    tokio::spawn(serve(l, CancellationToken::new()));
    let s = wait_for(&mut snapshots, "resync", |s| {
        held_names(s, GATEWAYS) == ["ns/g1", "ns/g2"]
    })
    .await;
    assert_eq!(version(&s, GATEWAYS, "ns/g1"), "v1");
}

#[tokio::test]
async fn a_response_that_does_not_decode_gets_a_grpc_status() {
    use mesh_api::pb::istio::mcp::v1alpha1::RequestResources;
    use prost::Message;

    let sink = sink(false);
    let mut snapshots = sink.subscribe();
    let addr = serve_sink(sink.clone()).await;
    let good = resources(GATEWAYS, "1", false, vec![gateway("ns/a", 1)]).encode_to_vec();
    let truncated = good[..good.len() - 2].to_vec();
    let (_tx, requests) = raw::stream::<RequestResources>(
        addr,
        "/istio.mcp.v1alpha1.ResourceSink/EstablishResourceStream",
        vec![good, truncated],
    )
    .await;
    let status = raw::final_status(requests)
        .await
        .expect("an error status, not a clean end");
    assert!(status.message().contains("decode"), "{status:?}");
    // What decoded before the bad message was applied; nothing after it.
    let s = wait_for(&mut snapshots, "the good update", |s| {
        s.collections[GATEWAYS].synced
    })
    .await;
    assert_eq!(held_names(&s, GATEWAYS), ["ns/a"]);
}

#[tokio::test]
async fn a_source_dialling_with_istios_trigger_gets_its_nack_first() {
    // What Istio 1.1's Galley does with `--sinkAddress`: it opens with a
    // Resources of no collection and drops the stream unless the sink's
    // first message NACKs it UNIMPLEMENTED. It also ends a stream that
    // asks for a collection it does not serve, without saying which.
    let mut options = SinkOptions::new("relay", [GATEWAYS, kinds::MESH_CONFIG]);
    options.incremental = false;
    let sink = Arc::new(Sink::new(options, McpMetrics::default()));
    let addr = serve_sink(sink.clone()).await;
    let (tx, mut requests) = dial_sink(addr).await;
    tx.send(Resources {
        nonce: "trigger".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let first = within("the trigger's NACK", requests.next())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(first.response_nonce, "trigger");
    assert_eq!(first.error_detail.unwrap().code, Code::Unimplemented as i32);
    // Then its requests, for what Istio 1.1's Galley serves only.
    let asked = within("a request", requests.next()).await.unwrap().unwrap();
    assert_eq!(asked.collection, GATEWAYS);
    assert!(sink.subscribe().borrow().absent(kinds::MESH_CONFIG));
    tx.send(resources(GATEWAYS, "n1", false, vec![gateway("ns/a", 1)]))
        .await
        .unwrap();
    let ack = within("the ACK", requests.next()).await.unwrap().unwrap();
    assert_eq!(
        (ack.collection.as_str(), ack.response_nonce.as_str()),
        (GATEWAYS, "n1")
    );
    assert!(ack.error_detail.is_none());
    assert!(sink.subscribe().borrow().synced());

    // A source that sends no trigger is asked for everything, after a
    // short wait for one.
    let (_tx, mut requests) = dial_sink(addr).await;
    let mut asked = Vec::new();
    for _ in 0..2 {
        let r = within("a request", requests.next()).await.unwrap().unwrap();
        asked.push(r.collection);
    }
    asked.sort();
    assert_eq!(asked, [kinds::MESH_CONFIG, GATEWAYS]);
}
