//! The four ways an MCP stream is carried over gRPC: a source or a sink,
//! each as server or client. They only move messages; the protocol lives in
//! [`crate::source`] and [`crate::sink`].

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use component::{Backoff, CancellationToken};
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{
    Request, Response, Status, Streaming,
    transport::{Channel, Endpoint},
};

use crate::{
    McpMetrics,
    sink::{Sink, is_trigger, run_stream},
    source::{IncrementalPolicy, serve_stream},
    store::Store,
};
use mesh_api::pb::istio::mcp::v1alpha1::{
    RequestResources, Resources,
    resource_sink_client::ResourceSinkClient,
    resource_sink_server::{ResourceSink, ResourceSinkServer},
    resource_source_client::ResourceSourceClient,
    resource_source_server::{ResourceSource, ResourceSourceServer},
};

/// Largest message accepted, either direction: a full state of a large
/// collection is one message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Buffered messages per stream and direction. The protocol allows one
/// outstanding response per collection, so this only absorbs bursts.
const STREAM_BUFFER: usize = 64;

/// A gRPC server builder tuned for MCP: a full state can be megabytes, so
/// HTTP/2 flow-control windows grow with the connection's bandwidth-delay
/// product instead of stalling at the 64 KiB default.
pub fn grpc_server() -> tonic::transport::Server {
    tonic::transport::Server::builder().http2_adaptive_window(Some(true))
}

/// Connections from `listener` with Nagle's algorithm off: MCP messages
/// are small and latency-bound, and Nagle plus delayed ACKs costs 40 ms a
/// round trip.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// The client side of [`grpc_server`]'s tuning.
fn tuned(endpoint: &Endpoint) -> Endpoint {
    endpoint
        .clone()
        .http2_adaptive_window(true)
        .tcp_nodelay(true)
}

/// A channel to `endpoint`: over TCP, or over a pipe for a `mem://`
/// server of this process.
pub async fn connect(endpoint: &Endpoint) -> Result<Channel, tonic::transport::Error> {
    if endpoint.uri().scheme_str() == Some(crate::memory::SCHEME) {
        return endpoint
            .clone()
            .connect_with_connector(crate::memory::MemoryConnector)
            .await;
    }
    tuned(endpoint).connect().await
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// A source served as `ResourceSource`: sinks dial it.
#[derive(Clone)]
pub struct SourceServer {
    store: Arc<Store>,
    policy: IncrementalPolicy,
    metrics: McpMetrics,
    shutdown: CancellationToken,
}

impl SourceServer {
    /// Streams end with `Unavailable` when `shutdown` fires, so that a
    /// graceful server shutdown does not wait on sinks that never leave.
    pub fn new(
        store: Arc<Store>,
        policy: IncrementalPolicy,
        metrics: McpMetrics,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            store,
            policy,
            metrics,
            shutdown,
        }
    }

    pub fn into_service(self) -> ResourceSourceServer<Self> {
        ResourceSourceServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    /// Serves on `listener` in a task of its own until the shutdown token
    /// fires.
    pub fn spawn(
        self,
        listener: tokio::net::TcpListener,
    ) -> tokio::task::JoinHandle<Result<(), tonic::transport::Error>> {
        let shutdown = self.shutdown.clone();
        tokio::spawn(
            grpc_server()
                .add_service(self.into_service())
                .serve_with_incoming_shutdown(incoming(listener), shutdown.cancelled_owned()),
        )
    }
}

#[tonic::async_trait]
impl ResourceSource for SourceServer {
    type EstablishResourceStreamStream = BoxStream<Resources>;

    async fn establish_resource_stream(
        &self,
        request: Request<Streaming<RequestResources>>,
    ) -> Result<Response<Self::EstablishResourceStreamStream>, Status> {
        let peer = request.remote_addr();
        tracing::debug!(?peer, "MCP sink connected");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        tokio::spawn(serve_stream(
            self.store.clone(),
            self.policy.clone(),
            self.metrics.clone(),
            request.into_inner(),
            tx,
            self.shutdown.clone(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// A sink served as `ResourceSink`: sources dial it.
#[derive(Clone)]
pub struct SinkServer {
    sink: Arc<Sink>,
    shutdown: CancellationToken,
}

impl SinkServer {
    /// Streams end when `shutdown` fires (see [`SourceServer::new`]).
    pub fn new(sink: Arc<Sink>, shutdown: CancellationToken) -> Self {
        Self { sink, shutdown }
    }

    pub fn into_service(self) -> ResourceSinkServer<Self> {
        ResourceSinkServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }
}

#[tonic::async_trait]
impl ResourceSink for SinkServer {
    type EstablishResourceStreamStream = BoxStream<RequestResources>;

    async fn establish_resource_stream(
        &self,
        request: Request<Streaming<Resources>>,
    ) -> Result<Response<Self::EstablishResourceStreamStream>, Status> {
        tracing::debug!(peer = ?request.remote_addr(), "MCP source connected");
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let sink = self.sink.clone();
        let inbound = request.into_inner();
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            let serve = async {
                let (inbound, istio_1_1) = answer_trigger(&sink, inbound, &tx).await?;
                // A source that dials cannot say which collection it
                // refuses (it has no status to send), so every one is
                // asked; but Istio 1.1's Galley, which ends the stream on
                // the first it does not serve, only for what it serves.
                if istio_1_1 {
                    for collection in mesh_api::kinds::NOT_IN_ISTIO_1_1 {
                        sink.refusal(&Status::invalid_argument(format!(
                            "{collection:?}: Istio 1.1's Galley, which dialled with its trigger, does not serve it"
                        )));
                    }
                }
                let inbound = std::future::ready(Ok(inbound));
                let (result, _) = run_stream(&sink, inbound, tx.clone(), !istio_1_1).await;
                result
            };
            tokio::select! {
                result = serve => {
                    if let Err(status) = result {
                        tracing::debug!(%status, "MCP source stream ended");
                    }
                }
                _ = shutdown.cancelled() => {
                    let _ = tx.send(Err(Status::unavailable("MCP sink is shutting down"))).await;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// How long a dialled sink waits for a source's trigger ([`is_trigger`])
/// before it sends its requests anyway: Istio 1.1's Galley sends one at
/// once, and a source that sends none waits this long once per stream.
const TRIGGER_WAIT: Duration = Duration::from_millis(200);

/// The stream of a source that dialled, its opening handled: a trigger is
/// answered before anything else is sent, as Istio 1.1's Galley requires;
/// any other first message is kept for the stream. Also says whether the
/// source sent the trigger; `Err` when the stream ends first.
async fn answer_trigger(
    sink: &Sink,
    mut inbound: Streaming<Resources>,
    requests: &mpsc::Sender<Result<RequestResources, Status>>,
) -> Result<(impl Stream<Item = Result<Resources, Status>> + Unpin, bool), Status> {
    use futures::StreamExt;
    let (kept, triggered) = match tokio::time::timeout(TRIGGER_WAIT, inbound.next()).await {
        Err(_elapsed) => (None, false),
        Ok(None) => return Err(Status::cancelled("the source closed the stream")),
        Ok(Some(Err(status))) => return Err(status),
        Ok(Some(Ok(first))) if is_trigger(&first) => {
            let answer = sink.apply(first);
            requests
                .send(Ok(answer))
                .await
                .map_err(|_| Status::cancelled("the source closed the stream"))?;
            (None, true)
        }
        Ok(Some(Ok(first))) => (Some(Ok(first)), false),
    };
    Ok((futures::stream::iter(kept).chain(inbound), triggered))
}

/// What a dialled stream's end calls for.
enum Then {
    /// Open the next stream at once.
    Reconnect,
    /// Wait first; the wait starts over after a stream that got somewhere.
    Backoff { reset: bool },
}

/// Dials `endpoint` and runs `stream` on each connection until `shutdown`,
/// waiting with jittered backoff between attempts as the stream's end
/// says. `peer` names the other end in logs.
async fn keep_dialing<F, Fut>(
    endpoint: &Endpoint,
    peer: &str,
    shutdown: &CancellationToken,
    mut stream: F,
) where
    F: FnMut(Channel) -> Fut,
    Fut: Future<Output = Then>,
{
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let attempt = async {
            match connect(endpoint).await {
                Ok(channel) => stream(channel).await,
                Err(e) => {
                    tracing::debug!(uri = %endpoint.uri(), error = %e, "cannot reach {peer}");
                    Then::Backoff { reset: false }
                }
            }
        };
        let then = tokio::select! {
            then = attempt => then,
            _ = shutdown.cancelled() => return,
        };
        match then {
            Then::Reconnect => continue,
            Then::Backoff { reset: true } => backoff.reset(),
            Then::Backoff { reset: false } => {}
        }
        tokio::select! {
            _ = backoff.wait() => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

/// The sending half of a client's stream, and what to hand the call. A
/// client cannot send a status: an error ends its half of the stream.
fn client_half<T: Send + 'static>() -> (
    mpsc::Sender<Result<T, Status>>,
    impl Stream<Item = T> + Send + 'static,
) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    let outbound = tokio_stream::StreamExt::map_while(ReceiverStream::new(rx), Result::ok);
    (tx, outbound)
}

/// Keeps a sink connected to a `ResourceSource` at `endpoint`, reconnecting
/// with backoff, until `shutdown`. Each new stream sends the versions held.
/// A collection the source refuses is left out of the next stream, which
/// opens at once; after any other end, the next stream asks for every
/// collection again, since the source may have changed.
pub async fn run_sink_client(sink: Arc<Sink>, endpoint: Endpoint, shutdown: CancellationToken) {
    let ask_refused = AtomicBool::new(true);
    keep_dialing(&endpoint, "MCP source", &shutdown, |channel| async {
        let mut client = ResourceSourceClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, outbound) = client_half();
        let inbound = async {
            let response = client.establish_resource_stream(outbound).await?;
            Ok(response.into_inner())
        };
        let asked = ask_refused.swap(true, Ordering::Relaxed);
        let (result, received) = run_stream(&sink, inbound, tx, asked).await;
        match result {
            Err(status) if sink.refusal(&status).is_some() => {
                ask_refused.store(false, Ordering::Relaxed);
                return Then::Reconnect;
            }
            Ok(()) => tracing::info!(uri = %endpoint.uri(), "MCP source closed the stream"),
            Err(status) if received => {
                tracing::warn!(uri = %endpoint.uri(), %status, "MCP stream failed")
            }
            // Nothing came: the source is not there, or not yet.
            Err(status) => tracing::debug!(uri = %endpoint.uri(), %status, "MCP stream failed"),
        }
        Then::Backoff { reset: received }
    })
    .await
}

/// Keeps a source connected to a `ResourceSink` at `endpoint` (the source
/// dials), reconnecting with backoff, until `shutdown`.
pub async fn run_source_client(
    store: Arc<Store>,
    policy: IncrementalPolicy,
    metrics: McpMetrics,
    endpoint: Endpoint,
    shutdown: CancellationToken,
) {
    keep_dialing(&endpoint, "MCP sink", &shutdown, |channel| async {
        let mut client = ResourceSinkClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let (tx, outbound) = client_half();
        match client.establish_resource_stream(outbound).await {
            Ok(inbound) => {
                let (store, policy) = (store.clone(), policy.clone());
                serve_stream(
                    store,
                    policy,
                    metrics.clone(),
                    inbound.into_inner(),
                    tx,
                    shutdown.clone(),
                )
                .await;
                tracing::info!(uri = %endpoint.uri(), "MCP sink stream ended");
                Then::Backoff { reset: true }
            }
            Err(status) => {
                tracing::debug!(uri = %endpoint.uri(), %status, "cannot reach MCP sink");
                Then::Backoff { reset: false }
            }
        }
    })
    .await
}
