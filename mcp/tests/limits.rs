//! A source served with the server limits every component applies, over
//! real gRPC on 127.0.0.1: a peer over its connection limit is refused at
//! accept, a connection that reaches its stream limit is counted (and its
//! next stream waits, as HTTP/2 says), a message over the size limit ends
//! its stream with OUT_OF_RANGE and is counted.

mod common;

use std::{net::SocketAddr, sync::Arc};

use common::*;
use component::{
    CancellationToken,
    limits::{Limits, ServerLimits},
};
use mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store};
use mesh_api::pb::istio::mcp::v1alpha1::{
    RequestResources, resource_source_client::ResourceSourceClient,
};
use tokio::{io::AsyncReadExt, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// A source of gateways served with `args`; its limits, to read.
async fn start(args: ServerLimits) -> (SocketAddr, Limits, CancellationToken) {
    let (listener, addr) = listener().await;
    let limits = Limits::unregistered(&args);
    let stop = CancellationToken::new();
    let store = Arc::new(Store::new([GATEWAYS]));
    store.upsert(GATEWAYS, gateway("ns/g0", 1)).unwrap();
    let service = SourceServer::new(
        store,
        IncrementalPolicy::All,
        McpMetrics::default(),
        stop.clone(),
    )
    .into_service()
    .max_decoding_message_size(limits.max_message_bytes(mcp::MAX_MESSAGE_BYTES));
    tokio::spawn(
        limits
            .grpc(mcp::grpc_server())
            .add_service(service)
            .serve_with_incoming_shutdown(
                limits.incoming(listener),
                stop.clone().cancelled_owned(),
            ),
    );
    (addr, limits, stop)
}

/// Opens a stream on `client` watching gateways, and waits for its first
/// response: the stream is open at the server.
async fn open_stream(
    client: &mut ResourceSourceClient<tonic::transport::Channel>,
    request: RequestResources,
) -> (
    mpsc::Sender<RequestResources>,
    tonic::Streaming<mesh_api::pb::istio::mcp::v1alpha1::Resources>,
) {
    let (tx, rx) = mpsc::channel(4);
    tx.send(request).await.unwrap();
    let mut responses = client
        .establish_resource_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    within("the first response", responses.message())
        .await
        .unwrap()
        .unwrap();
    (tx, responses)
}

fn watch() -> RequestResources {
    RequestResources {
        collection: GATEWAYS.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_peer_over_its_connection_limit_is_refused_at_accept() {
    let (addr, limits, _stop) = start(ServerLimits {
        max_connections_per_peer: 2,
        ..Default::default()
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = ResourceSourceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let stream = open_stream(&mut client, watch()).await;
        held.push((client, stream));
    }
    // The third connection is closed as soon as it is accepted.
    let mut third = tokio::net::TcpStream::connect(addr).await.unwrap();
    let read = within(
        "the refused connection to close",
        third.read(&mut [0u8; 16]),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(limits.reached("connections_per_peer"), 1);
    // One closed: a new one is taken.
    held.pop();
    let taken = within("a connection under the limit", async {
        loop {
            let mut client = ResourceSourceClient::connect(format!("http://{addr}"))
                .await
                .unwrap();
            let (tx, rx) = mpsc::channel(4);
            tx.send(watch()).await.unwrap();
            // The closed connection's place frees once the server sees it
            // go; until then a new one is refused and retried.
            if let Ok(response) = client
                .establish_resource_stream(ReceiverStream::new(rx))
                .await
            {
                let mut responses = response.into_inner();
                if let Ok(Some(_)) = responses.message().await {
                    return;
                }
            }
        }
    });
    taken.await;
}

#[tokio::test]
async fn a_connection_at_its_stream_limit_is_counted_and_its_next_stream_waits() {
    let (addr, limits, _stop) = start(ServerLimits {
        max_streams_per_connection: 2,
        ..Default::default()
    })
    .await;
    let channel = endpoint(addr).connect().await.unwrap();
    let mut client = ResourceSourceClient::new(channel);
    let first = open_stream(&mut client, watch()).await;
    assert_eq!(limits.reached("streams_per_connection"), 0);
    let second = open_stream(&mut client, watch()).await;
    assert_eq!(limits.reached("streams_per_connection"), 1);
    // A third waits for a free stream: it opens once one ends.
    let mut waiting = client.clone();
    let third = tokio::spawn(async move { open_stream(&mut waiting, watch()).await });
    // A whole stream opened on another connection meanwhile; the third
    // is still waiting.
    let mut other = ResourceSourceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let _other = open_stream(&mut other, watch()).await;
    assert!(!third.is_finished(), "a third stream opened over the limit");
    drop(first);
    within("the third stream", third).await.unwrap();
    drop(second);
}

#[tokio::test]
async fn a_message_over_the_size_limit_ends_its_stream_and_is_counted() {
    let (addr, limits, _stop) = start(ServerLimits {
        max_message_bytes: Some(1024),
        ..Default::default()
    })
    .await;
    let mut client = ResourceSourceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut big = watch();
    big.initial_resource_versions = (0..100)
        .map(|i| (format!("ns/gateway-{i}"), "v1".to_string()))
        .collect();
    big.incremental = true;
    let (tx, rx) = mpsc::channel(4);
    tx.send(big).await.unwrap();
    let status = match client
        .establish_resource_stream(ReceiverStream::new(rx))
        .await
    {
        Err(status) => status,
        Ok(response) => within("the stream's end", response.into_inner().message())
            .await
            .unwrap_err(),
    };
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert_eq!(limits.reached("message_bytes"), 1);
    // The connection serves on.
    open_stream(&mut client, watch()).await;
}

#[tokio::test]
async fn a_silent_client_is_closed_and_holds_up_no_other() {
    let (addr, limits, _stop) = start(ServerLimits {
        handshake_timeout: std::time::Duration::from_millis(300),
        ..Default::default()
    })
    .await;
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Another client is served while the silent one is waited on.
    let mut client = ResourceSourceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    open_stream(&mut client, watch()).await;
    let read = within(
        "the silent client to be closed",
        silent.read(&mut [0u8; 16]),
    )
    .await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    assert_eq!(limits.reached("handshake_timeout"), 1);
}
