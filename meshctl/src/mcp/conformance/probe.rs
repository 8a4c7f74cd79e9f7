//! One hand-driven MCP stream, in either direction, with bounded waits.

use std::{future::Future, pin::Pin, time::Duration};

use futures::{Stream, StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

use mcp::parse_endpoint;
use mesh_api::pb::istio::mcp::v1alpha1::{
    RequestResources, Resources,
    resource_sink_client::ResourceSinkClient,
    resource_source_client::ResourceSourceClient,
    resource_source_server::{ResourceSource, ResourceSourceServer},
};

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub quiet: Duration,
    pub timeout: Duration,
}

/// A stream on which this tool sends `Out` and receives `In`. What it
/// sends may end with a status, which only a server can send.
pub struct Probe<Out, In> {
    outbound: mpsc::Sender<Result<Out, Status>>,
    inbound: Pin<Box<dyn Stream<Item = Result<In, Status>> + Send>>,
    timing: Timing,
}

pub type SinkProbe = Probe<RequestResources, Resources>;
pub type SourceProbe = Probe<Resources, RequestResources>;

async fn channel(address: &str, timing: Timing) -> Result<Channel, String> {
    let endpoint = parse_endpoint(address)?.connect_timeout(timing.timeout);
    endpoint
        .connect()
        .await
        .map_err(|e| format!("cannot connect to {address}: {:#}", anyhow::Error::from(e)))
}

/// What a client probe sends. A client has no status to send: an error
/// ends its half of the stream.
pub struct ClientHalf<Out>(mpsc::Receiver<Result<Out, Status>>);

impl<Out> Stream for ClientHalf<Out> {
    type Item = Out;

    fn poll_next(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Out>> {
        self.0.poll_recv(cx).map(|next| next.and_then(Result::ok))
    }
}

impl<Out: Send + 'static, In: Send + 'static> Probe<Out, In> {
    /// Connects and opens a stream with `establish`, which calls one of the
    /// two services' `EstablishResourceStream`. The call's response headers
    /// are awaited on the first receive, not here: what is sent before it
    /// goes out with the call, as a grpc-go peer needs (it sends no headers
    /// before its first message).
    async fn open<F, Fut>(address: &str, timing: Timing, establish: F) -> Result<Self, String>
    where
        F: FnOnce(Channel, ClientHalf<Out>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<In>>, Status>> + Send + 'static,
    {
        let (outbound, rx) = mpsc::channel(16);
        let call = establish(channel(address, timing).await?, ClientHalf(rx));
        let inbound = stream::once(call)
            .flat_map(|opened| match opened {
                Ok(response) => response.into_inner().left_stream(),
                Err(status) => stream::iter([Err(status)]).right_stream(),
            })
            .boxed();
        Ok(Self {
            outbound,
            inbound,
            timing,
        })
    }
}

/// A `ResourceSource` served for sinks that dial: each stream a sink opens
/// is handed over as a [`SourceProbe`]. Like a grpc-go source, it sends no
/// response headers before the sink's first request, so a sink that waits
/// for headers before it asks is seen to hang.
pub struct SourceListener {
    streams: mpsc::Receiver<SourceProbe>,
    timing: Timing,
    _server: tokio::task::JoinHandle<()>,
}

impl SourceListener {
    pub async fn bind(address: &str, timing: Timing) -> Result<Self, String> {
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen on {address}: {e}"))?;
        let local = listener.local_addr().map_err(|e| e.to_string())?;
        println!("serving ResourceSource on {local} for the sink to dial");
        let (streams, accepted) = mpsc::channel(4);
        let service = ResourceSourceServer::new(Accept { streams, timing });
        let server = tokio::spawn(async move {
            let incoming = mcp::incoming(listener);
            let served = mcp::grpc_server()
                .add_service(service)
                .serve_with_incoming(incoming)
                .await;
            if let Err(e) = served {
                eprintln!("ResourceSource server failed: {e}");
            }
        });
        Ok(Self {
            streams: accepted,
            timing,
            _server: server,
        })
    }

    /// The next stream a sink opens, once it has sent its first request;
    /// an error if none does in time.
    pub async fn accept(&mut self) -> Result<SourceProbe, String> {
        let wait = self.timing.timeout * 3;
        match tokio::time::timeout(wait, self.streams.recv()).await {
            Ok(Some(probe)) => Ok(probe),
            Ok(None) => Err("the listener stopped".into()),
            Err(_) => Err(format!(
                "no sink opened a stream and sent a request within {wait:?} \
                 (a sink must not wait for the source's headers before asking)"
            )),
        }
    }
}

struct Accept {
    streams: mpsc::Sender<SourceProbe>,
    timing: Timing,
}

#[tonic::async_trait]
impl ResourceSource for Accept {
    type EstablishResourceStreamStream = ReceiverStream<Result<Resources, Status>>;

    async fn establish_resource_stream(
        &self,
        request: tonic::Request<Streaming<RequestResources>>,
    ) -> Result<tonic::Response<Self::EstablishResourceStreamStream>, Status> {
        let mut requests = request.into_inner();
        // Headers go out when this returns: not before a first request.
        let first = match requests.next().await {
            Some(Ok(first)) => first,
            Some(Err(status)) => return Err(status),
            None => return Err(Status::cancelled("the sink closed before asking")),
        };
        let (outbound, responses) = mpsc::channel(16);
        let inbound = stream::once(async { Ok(first) }).chain(requests).boxed();
        let probe = Probe {
            outbound,
            inbound,
            timing: self.timing,
        };
        self.streams
            .send(probe)
            .await
            .map_err(|_| Status::unavailable("the conformance run is over"))?;
        Ok(tonic::Response::new(ReceiverStream::new(responses)))
    }
}

impl SinkProbe {
    /// Opens a `ResourceSource` stream, playing the sink.
    pub async fn to_source(address: &str, timing: Timing) -> Result<Self, String> {
        Self::open(address, timing, |channel, requests| async move {
            ResourceSourceClient::new(channel)
                .establish_resource_stream(requests)
                .await
        })
        .await
    }
}

impl SourceProbe {
    /// Opens a `ResourceSink` stream, playing the source.
    pub async fn to_sink(address: &str, timing: Timing) -> Result<Self, String> {
        Self::open(address, timing, |channel, resources| async move {
            ResourceSinkClient::new(channel)
                .establish_resource_stream(resources)
                .await
        })
        .await
    }
}

impl<Out, In: std::fmt::Debug> Probe<Out, In> {
    pub async fn send(&self, message: Out) -> Result<(), String> {
        self.outbound
            .send(Ok(message))
            .await
            .map_err(|_| "the stream is closed".to_string())
    }

    /// Ends the stream with `status` (a server's way; a client's stream
    /// just ends).
    pub async fn end_with(&self, status: Status) -> Result<(), String> {
        self.outbound
            .send(Err(status))
            .await
            .map_err(|_| "the stream is closed".to_string())
    }

    /// The next message; an error if the stream ends or nothing comes in time.
    pub async fn recv(&mut self) -> Result<In, String> {
        match tokio::time::timeout(self.timing.timeout, self.inbound.next()).await {
            Err(_) => Err(format!("nothing received within {:?}", self.timing.timeout)),
            Ok(None) => Err("the peer ended the stream".into()),
            Ok(Some(Err(status))) => Err(format!("the peer ended the stream: {status}")),
            Ok(Some(Ok(message))) => Ok(message),
        }
    }

    /// How the stream ends: the status the peer sent, or `Ok` for a clean end.
    pub async fn end(&mut self) -> Result<Result<(), Status>, String> {
        match tokio::time::timeout(self.timing.timeout, self.inbound.next()).await {
            Err(_) => Err(format!(
                "the stream did not end within {:?}",
                self.timing.timeout
            )),
            Ok(None) => Ok(Ok(())),
            Ok(Some(Err(status))) => Ok(Err(status)),
            Ok(Some(Ok(message))) => Err(format!("got a message instead of the end: {message:?}")),
        }
    }

    /// Succeeds if nothing arrives for the quiet period.
    pub async fn quiet(&mut self) -> Result<(), String> {
        match tokio::time::timeout(self.timing.quiet, self.inbound.next()).await {
            Err(_) => Ok(()),
            Ok(None) => Err("the peer ended the stream".into()),
            Ok(Some(Err(status))) => Err(format!("the peer ended the stream: {status}")),
            Ok(Some(Ok(message))) => Err(format!("unexpected message: {}", short(&message))),
        }
    }
}

/// A one-line description of a message for the report.
pub fn short(message: &impl std::fmt::Debug) -> String {
    let mut s = format!("{message:?}");
    if s.len() > 160 {
        s.truncate(160);
        s.push('…');
    }
    s
}
