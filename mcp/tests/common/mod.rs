//! Helpers for the MCP protocol tests: real gRPC servers on 127.0.0.1 with
//! OS-chosen ports, a hand-driven sink and a hand-driven source that speak
//! raw messages so that tests can check each rule exactly.

#![allow(dead_code)]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use component::CancellationToken;
use mcp::{IncrementalPolicy, McpMetrics, SourceServer, Store};
use mesh_api::{
    kinds::{self, Body},
    pb::{
        google::rpc,
        istio::{
            mcp::v1alpha1::{
                Metadata, RequestResources, Resource, Resources,
                resource_sink_client::ResourceSinkClient,
                resource_source_client::ResourceSourceClient,
                resource_source_server::{ResourceSource, ResourceSourceServer},
            },
            networking::v1alpha3::{Gateway, ServiceEntry},
        },
    },
};
use tokio::{net::TcpListener, sync::mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};

pub const GATEWAYS: &str = kinds::GATEWAYS;
pub const SERVICE_ENTRIES: &str = kinds::SERVICE_ENTRIES;

/// Upper bound on any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// A Gateway resource whose content (and so version) depends on `rev`.
pub fn gateway(name: &str, rev: u32) -> Resource {
    resource(
        name,
        rev,
        Body::Gateway(Box::new(Gateway {
            selector: [("rev".to_string(), rev.to_string())].into(),
            ..Default::default()
        })),
    )
}

/// A ServiceEntry resource whose content depends on `rev`.
pub fn service_entry(name: &str, rev: u32) -> Resource {
    resource(
        name,
        rev,
        Body::ServiceEntry(Box::new(ServiceEntry {
            hosts: vec![format!("h{rev}.example.com")],
            ..Default::default()
        })),
    )
}

/// `body` as resource `name`, version `v{rev}`.
fn resource(name: &str, rev: u32, body: Body) -> Resource {
    Resource {
        metadata: Some(Metadata {
            name: name.into(),
            version: format!("v{rev}"),
            ..Default::default()
        }),
        body: Some(body.to_any()),
    }
}

pub fn names(r: &Resources) -> Vec<String> {
    let mut n: Vec<_> = r
        .resources
        .iter()
        .map(|r| r.metadata.as_ref().unwrap().name.clone())
        .collect();
    n.sort();
    n
}

pub async fn listener() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    (l, addr)
}

pub fn endpoint(addr: SocketAddr) -> tonic::transport::Endpoint {
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap()
}

/// Serves a source over `ResourceSource` until the token is cancelled.
pub async fn start_source(
    store: Arc<Store>,
    policy: IncrementalPolicy,
) -> (SocketAddr, CancellationToken) {
    let (l, addr) = listener().await;
    let stop = CancellationToken::new();
    let service =
        SourceServer::new(store, policy, McpMetrics::default(), stop.clone()).into_service();
    let s = stop.clone();
    tokio::spawn(
        mcp::grpc_server()
            .add_service(service)
            .serve_with_incoming_shutdown(mcp::incoming(l), s.cancelled_owned()),
    );
    (addr, stop)
}

/// A sink driven by hand over a real `ResourceSource` stream.
pub struct RawSink {
    pub requests: mpsc::Sender<RequestResources>,
    pub responses: Streaming<Resources>,
}

impl RawSink {
    pub async fn connect(addr: SocketAddr) -> Self {
        let mut client = ResourceSourceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (requests, rx) = mpsc::channel(16);
        let responses = client
            .establish_resource_stream(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Self {
            requests,
            responses,
        }
    }

    pub async fn send(&self, r: RequestResources) {
        self.requests.send(r).await.unwrap();
    }

    pub async fn watch(&self, collection: &str, incremental: bool) {
        self.send(RequestResources {
            collection: collection.into(),
            incremental,
            ..Default::default()
        })
        .await;
    }

    pub async fn ack(&self, r: &Resources, incremental: bool) {
        self.send(RequestResources {
            collection: r.collection.clone(),
            response_nonce: r.nonce.clone(),
            incremental,
            ..Default::default()
        })
        .await;
    }

    pub async fn nack(&self, r: &Resources) {
        self.nack_asking(r, false).await;
    }

    /// NACKs `r`, asking for increments from now on or not.
    pub async fn nack_asking(&self, r: &Resources, incremental: bool) {
        self.send(RequestResources {
            collection: r.collection.clone(),
            response_nonce: r.nonce.clone(),
            incremental,
            error_detail: Some(rpc::Status {
                code: 3,
                message: "cannot apply".into(),
                details: vec![],
            }),
            ..Default::default()
        })
        .await;
    }

    pub async fn next(&mut self) -> Result<Resources, Status> {
        within("a Resources message", self.responses.next())
            .await
            .unwrap_or_else(|| Err(Status::unknown("stream ended")))
    }
}

/// A source driven by hand, served as `ResourceSource`: each connecting
/// sink's stream is handed to the test as a [`RawSourceStream`].
#[derive(Clone)]
pub struct RawSource {
    streams: mpsc::Sender<RawSourceStream>,
}

pub struct RawSourceStream {
    pub requests: Streaming<RequestResources>,
    pub responses: mpsc::Sender<Result<Resources, Status>>,
}

impl RawSourceStream {
    pub async fn next(&mut self) -> RequestResources {
        within("a RequestResources message", self.requests.next())
            .await
            .expect("stream open")
            .expect("no stream error")
    }

    pub async fn send(&self, r: Resources) {
        self.responses.send(Ok(r)).await.unwrap();
    }
}

#[tonic::async_trait]
impl ResourceSource for RawSource {
    type EstablishResourceStreamStream = ReceiverStream<Result<Resources, Status>>;

    async fn establish_resource_stream(
        &self,
        request: Request<Streaming<RequestResources>>,
    ) -> Result<Response<Self::EstablishResourceStreamStream>, Status> {
        let (tx, rx) = mpsc::channel(16);
        let _ = self
            .streams
            .send(RawSourceStream {
                requests: request.into_inner(),
                responses: tx,
            })
            .await;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

/// Starts a hand-driven source; returns its address and its streams.
pub async fn start_raw_source() -> (
    SocketAddr,
    mpsc::Receiver<RawSourceStream>,
    CancellationToken,
) {
    let (l, addr) = listener().await;
    let (tx, rx) = mpsc::channel(4);
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(
        mcp::grpc_server()
            .add_service(ResourceSourceServer::new(RawSource { streams: tx }))
            .serve_with_incoming_shutdown(mcp::incoming(l), s.cancelled_owned()),
    );
    (addr, rx, stop)
}

/// Opens a `ResourceSink` stream to `addr` as a hand-driven source.
pub async fn dial_sink(addr: SocketAddr) -> (mpsc::Sender<Resources>, Streaming<RequestResources>) {
    let mut client = ResourceSinkClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(16);
    let requests = client
        .establish_resource_stream(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    (tx, requests)
}

/// Sends raw bytes as gRPC messages, so tests can send what a well-behaved
/// encoder never would (truncated or garbled protobuf).
pub mod raw {
    use std::marker::PhantomData;

    use prost::bytes::BufMut;
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};

    use super::*;

    pub struct RawCodec<D>(PhantomData<D>);

    pub struct RawEncoder;

    pub struct ProstDecoder<D>(PhantomData<D>);

    impl Encoder for RawEncoder {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
            buf.put_slice(&item);
            Ok(())
        }
    }

    impl<D: prost::Message + Default> Decoder for ProstDecoder<D> {
        type Item = D;
        type Error = Status;
        fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<D>, Status> {
            D::decode(buf)
                .map(Some)
                .map_err(|e| Status::internal(e.to_string()))
        }
    }

    impl<D: prost::Message + Default + Send + 'static> Codec for RawCodec<D> {
        type Encode = Vec<u8>;
        type Decode = D;
        type Encoder = RawEncoder;
        type Decoder = ProstDecoder<D>;
        fn encoder(&mut self) -> RawEncoder {
            RawEncoder
        }
        fn decoder(&mut self) -> ProstDecoder<D> {
            ProstDecoder(PhantomData)
        }
    }

    /// Opens a bidirectional stream on `path` and sends `frames` as they are.
    pub async fn stream<D: prost::Message + Default + Send + 'static>(
        addr: SocketAddr,
        path: &'static str,
        frames: Vec<Vec<u8>>,
    ) -> (mpsc::Sender<Vec<u8>>, Streaming<D>) {
        let channel = endpoint(addr).connect().await.unwrap();
        let mut grpc = tonic::client::Grpc::new(channel);
        grpc.ready().await.unwrap();
        let (tx, rx) = mpsc::channel(16);
        for frame in frames {
            tx.send(frame).await.unwrap();
        }
        let response = grpc
            .streaming(
                Request::new(ReceiverStream::new(rx)),
                tonic::codegen::http::uri::PathAndQuery::from_static(path),
                RawCodec::<D>(PhantomData),
            )
            .await
            .unwrap();
        (tx, response.into_inner())
    }

    /// Reads the stream until it ends; returns its final status.
    pub async fn final_status<D>(mut s: Streaming<D>) -> Option<Status> {
        within("the stream to end", async {
            loop {
                match s.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(status)) => return Some(status),
                    None => return None,
                }
            }
        })
        .await
    }
}
