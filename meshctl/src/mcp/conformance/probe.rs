//! One hand-driven MCP stream, in either direction, with bounded waits.

use std::{future::Future, pin::Pin, time::Duration};

use futures::{Stream, StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

use mcp_proto::{
    mcp::parse_endpoint,
    pb::istio::mcp::v1alpha1::{
        RequestResources, Resources, resource_sink_client::ResourceSinkClient,
        resource_source_client::ResourceSourceClient,
    },
};

#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub quiet: Duration,
    pub timeout: Duration,
}

/// A stream on which this tool sends `Out` and receives `In`.
pub struct Probe<Out, In> {
    outbound: mpsc::Sender<Out>,
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

impl<Out: Send + 'static, In: Send + 'static> Probe<Out, In> {
    /// Connects and opens a stream with `establish`, which calls one of the
    /// two services' `EstablishResourceStream`. The call's response headers
    /// are awaited on the first receive, not here: what is sent before it
    /// goes out with the call, as a grpc-go peer needs (it sends no headers
    /// before its first message).
    async fn open<F, Fut>(address: &str, timing: Timing, establish: F) -> Result<Self, String>
    where
        F: FnOnce(Channel, ReceiverStream<Out>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Streaming<In>>, Status>> + Send + 'static,
    {
        let (outbound, rx) = mpsc::channel(16);
        let call = establish(channel(address, timing).await?, ReceiverStream::new(rx));
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
            .send(message)
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
