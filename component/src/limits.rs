//! Bounds on what one peer can hold of a server: connections per peer
//! address, concurrent streams per connection, the size of a request's
//! headers and of one message. Every gRPC server of the mesh takes them as
//! flags ([`ServerLimits`]) and counts each time one is reached
//! (`<server>_limit_reached_total{limit}`), so that a limit met in
//! production shows on a dashboard rather than as a mystery.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, ready},
    time::Duration,
};

use futures::{Stream, StreamExt, future::BoxFuture, stream::FuturesUnordered};
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
};
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// The bounds of a component's servers, as flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerLimits {
    /// Most connections one peer address may hold open to one server;
    /// more are closed as they are accepted. Each pod has an address of its
    /// own; a NAT, or every process of a machine on loopback, shares one.
    #[arg(long, default_value_t = 1024)]
    pub max_connections_per_peer: usize,
    /// Most concurrent gRPC streams on one connection, advertised as
    /// HTTP/2's SETTINGS_MAX_CONCURRENT_STREAMS: a client waits for a
    /// stream to end before opening another. Counted when a connection
    /// reaches it.
    #[arg(long, default_value_t = 128)]
    pub max_streams_per_connection: u32,
    /// Largest header list of one request, in bytes (HTTP/2's
    /// SETTINGS_MAX_HEADER_LIST_SIZE); a larger one resets its stream.
    #[arg(long, default_value_t = 16 * 1024)]
    pub max_header_list_bytes: u32,
    /// Largest gRPC message received, in bytes; a larger one ends its
    /// stream with OUT_OF_RANGE. Unset: the server's own default (256 MiB
    /// for MCP, whose full states are single messages; 64 MiB for Pilot's
    /// ADS requests, whose ACKs repeat every name subscribed; 4 MiB for
    /// Mixer and the CA API).
    #[arg(long)]
    pub max_message_bytes: Option<usize>,
    /// How long a client may take to open a connection: to send its first
    /// bytes on a plaintext port, to finish its TLS handshake on a TLS
    /// one. A client that takes longer is closed and counted.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "10s")]
    pub handshake_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            max_connections_per_peer: 1024,
            max_streams_per_connection: 128,
            max_header_list_bytes: 16 * 1024,
            max_message_bytes: None,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// tonic's own bound on a message received, kept where a server has no
/// reason for another.
pub const GRPC_MESSAGE_BYTES: usize = 4 << 20;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabel {
    limit: &'static str,
}

const CONNECTIONS_PER_PEER: &str = "connections_per_peer";
const STREAMS_PER_CONNECTION: &str = "streams_per_connection";
const MESSAGE_BYTES: &str = "message_bytes";
const HANDSHAKE_TIMEOUT: &str = "handshake_timeout";

/// One server's limits and what it holds against them. Cloning shares.
#[derive(Clone)]
pub struct Limits {
    inner: Arc<Inner>,
}

/// The default limits, counted nowhere: for tools and tests.
impl Default for Limits {
    fn default() -> Self {
        Self::unregistered(&ServerLimits::default())
    }
}

struct Inner {
    args: ServerLimits,
    /// Open connections by peer address.
    peers: Mutex<HashMap<IpAddr, usize>>,
    /// Open streams by connection (its peer's address and port).
    streams: Mutex<HashMap<SocketAddr, u32>>,
    reached: Family<LimitLabel, Counter>,
    connections: Gauge,
}

impl Limits {
    /// The limits of the server `name` (a metric prefix: `pilot_xds`),
    /// its metrics registered in `registry`.
    pub fn new(args: &ServerLimits, name: &str, registry: &mut Registry) -> Self {
        let inner = Inner {
            args: args.clone(),
            peers: Mutex::default(),
            streams: Mutex::default(),
            reached: Family::default(),
            connections: Gauge::default(),
        };
        let registry = registry.sub_registry_with_prefix(name);
        registry.register(
            "limit_reached",
            "Times a bound of this server was reached: a connection refused, a connection at its stream limit, a message over the size limit",
            inner.reached.clone(),
        );
        registry.register(
            "connections",
            "Connections open to this server",
            inner.connections.clone(),
        );
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Limits of `args` counted nowhere: for tools and tests.
    pub fn unregistered(args: &ServerLimits) -> Self {
        Self::new(args, "unregistered", &mut Registry::default())
    }

    /// The largest message received: the flag, or `default`.
    pub fn max_message_bytes(&self, default: usize) -> usize {
        self.inner.args.max_message_bytes.unwrap_or(default)
    }

    /// How often `limit` was reached, for tests and status pages.
    pub fn reached(&self, limit: &'static str) -> u64 {
        self.inner
            .reached
            .get_or_create(&LimitLabel { limit })
            .get()
    }

    fn count(&self, limit: &'static str) {
        self.inner
            .reached
            .get_or_create(&LimitLabel { limit })
            .inc();
    }

    /// Takes a connection from `peer`, or refuses it when the peer holds
    /// as many as it may.
    fn admit(&self, peer: IpAddr) -> Option<PeerGuard> {
        let mut peers = lock(&self.inner.peers);
        let open = peers.entry(peer).or_default();
        if *open >= self.inner.args.max_connections_per_peer {
            drop(peers);
            self.count(CONNECTIONS_PER_PEER);
            tracing::warn!(%peer, limit = self.inner.args.max_connections_per_peer,
                "connection refused: the peer holds as many as --max-connections-per-peer allows");
            return None;
        }
        *open += 1;
        self.inner.connections.inc();
        Some(PeerGuard {
            limits: self.clone(),
            peer,
        })
    }

    /// Accepted connections of `listener`, each [`admitted`] and handed on
    /// once its client has said something (a client silent for
    /// `--handshake-timeout` is closed and counted). Clients are waited on
    /// side by side: a silent one holds up no other.
    pub fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = io::Result<Tracked<TcpStream>>> + Send + 'static {
        let limits = self.clone();
        let waiting: FuturesUnordered<BoxFuture<'static, Option<Tracked<TcpStream>>>> =
            FuturesUnordered::new();
        futures::stream::unfold((listener, waiting), move |(listener, mut waiting)| {
            let limits = limits.clone();
            async move {
                loop {
                    tokio::select! {
                        accepted = listener.accept() => match accepted {
                            Ok((stream, peer)) => {
                                if let Some(stream) = admitted(Some(&limits), stream, peer) {
                                    waiting.push(Box::pin(limits.clone().first_bytes(stream)));
                                }
                            }
                            // Out of file descriptors and the like: say so,
                            // and let the server pause before it accepts again.
                            Err(e) => return Some((Err(e), (listener, waiting))),
                        },
                        Some(spoke) = waiting.next(), if !waiting.is_empty() => {
                            if let Some(stream) = spoke {
                                return Some((Ok(stream), (listener, waiting)));
                            }
                        }
                    }
                }
            }
        })
        .boxed()
    }

    /// `stream`, once its client has sent something within the handshake
    /// timeout; `None` when it closed first or said nothing in time.
    async fn first_bytes(self, stream: Tracked<TcpStream>) -> Option<Tracked<TcpStream>> {
        let timeout = self.inner.args.handshake_timeout;
        match tokio::time::timeout(timeout, stream.io.peek(&mut [0u8; 1])).await {
            Ok(Ok(n)) if n > 0 => Some(stream),
            Ok(_) => None,
            Err(_) => {
                self.count(HANDSHAKE_TIMEOUT);
                tracing::debug!(peer = ?stream.io.peer_addr().ok(), "closed a client silent for --handshake-timeout");
                None
            }
        }
    }

    /// How long a client may take to open a connection: its first bytes on
    /// a plaintext port, its TLS handshake on a TLS one.
    pub(crate) fn handshake_timeout(&self) -> Duration {
        self.inner.args.handshake_timeout
    }

    /// Counts a client closed for taking longer than the handshake timeout.
    pub(crate) fn handshake_timed_out(&self) {
        self.count(HANDSHAKE_TIMEOUT);
    }

    /// A stream opened on the connection from `connection`; counted when
    /// it brings the connection to its limit.
    fn stream_opened(&self, connection: Option<SocketAddr>) -> Option<StreamGuard> {
        let connection = connection?;
        let mut streams = lock(&self.inner.streams);
        let open = streams.entry(connection).or_default();
        *open += 1;
        if *open >= self.inner.args.max_streams_per_connection {
            self.count(STREAMS_PER_CONNECTION);
        }
        Some(StreamGuard {
            limits: self.clone(),
            connection,
        })
    }

    /// Counts a gRPC status that says a message was over the size limit.
    fn check_status(&self, headers: &http::HeaderMap) {
        let out_of_range = headers
            .get("grpc-status")
            .is_some_and(|s| s == (tonic::Code::OutOfRange as i32).to_string().as_str());
        let too_large = || {
            headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .is_some_and(|m| m.contains("too%20large") || m.contains("too large"))
        };
        if out_of_range && too_large() {
            self.count(MESSAGE_BYTES);
        }
    }

    /// Applies the stream and header limits to a tonic server, and counts
    /// what reaches them.
    pub fn grpc(
        &self,
        server: tonic::transport::Server,
    ) -> tonic::transport::Server<tower::layer::util::Stack<Self, tower::layer::util::Identity>>
    {
        server
            .max_concurrent_streams(self.inner.args.max_streams_per_connection)
            .http2_max_header_list_size(self.inner.args.max_header_list_bytes)
            .layer(self.clone())
    }

    /// Applies the stream and header limits to a hyper HTTP/2 server (one
    /// connection's), for a server that counts its streams itself with
    /// [`Limits::counted`].
    pub fn http2<E>(&self, builder: &mut hyper::server::conn::http2::Builder<E>) {
        builder
            .max_concurrent_streams(self.inner.args.max_streams_per_connection)
            .max_header_list_size(self.inner.args.max_header_list_bytes);
    }

    /// Counts `response` as a stream of `connection` until its body ends,
    /// and its status if it says a message was too large.
    pub fn counted(
        &self,
        connection: Option<SocketAddr>,
        response: http::Response<tonic::body::Body>,
    ) -> http::Response<tonic::body::Body> {
        let guard = self.stream_opened(connection);
        self.check_status(response.headers());
        response.map(|body| {
            tonic::body::Body::new(Counted {
                body,
                _guard: guard,
                limits: self.clone(),
            })
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A connection accepted from `peer`, admitted against the peer limit of
/// `limits` when there are limits (`None` when refused), with Nagle's
/// algorithm off: requests and responses are small and latency-bound, and
/// Nagle with delayed ACKs costs 40 ms a round trip.
pub(crate) fn admitted(
    limits: Option<&Limits>,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<Tracked<TcpStream>> {
    let guard = match limits {
        Some(limits) => Some(limits.admit(peer.ip())?),
        None => None,
    };
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
    }
    Some(Tracked {
        io: stream,
        _guard: guard,
    })
}

/// A connection's place in its peer's count.
struct PeerGuard {
    limits: Limits,
    peer: IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut peers = lock(&self.limits.inner.peers);
        if let Some(open) = peers.get_mut(&self.peer) {
            *open -= 1;
            if *open == 0 {
                peers.remove(&self.peer);
            }
        }
        self.limits.inner.connections.dec();
    }
}

/// A stream's place in its connection's count.
struct StreamGuard {
    limits: Limits,
    connection: SocketAddr,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut streams = lock(&self.limits.inner.streams);
        if let Some(open) = streams.get_mut(&self.connection) {
            *open -= 1;
            if *open == 0 {
                streams.remove(&self.connection);
            }
        }
    }
}

/// An accepted connection, counted against its peer until it closes.
pub struct Tracked<IO> {
    io: IO,
    _guard: Option<PeerGuard>,
}

impl<IO: Connected> Connected for Tracked<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Tracked<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Tracked<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A response body that holds its stream's place until it ends, and
/// checks the status in its trailers.
struct Counted {
    body: tonic::body::Body,
    _guard: Option<StreamGuard>,
    limits: Limits,
}

impl Body for Counted {
    type Data = bytes::Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if let Some(Ok(trailers)) = frame.as_ref().map(|f| f.as_ref().map(Frame::trailers_ref))
            && let Some(trailers) = trailers
        {
            this.limits.check_status(trailers);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The peer of an accepted connection: its address and port.
pub trait PeerAddr {
    fn peer_addr(&self) -> Option<SocketAddr>;
}

impl PeerAddr for Tracked<TcpStream> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.io.peer_addr().ok()
    }
}

impl<IO: PeerAddr> PeerAddr for tokio_rustls::server::TlsStream<IO> {
    fn peer_addr(&self) -> Option<SocketAddr> {
        self.get_ref().0.peer_addr()
    }
}

/// The connection a request came on: its peer's address and port.
fn connection_of<B>(request: &http::Request<B>) -> Option<SocketAddr> {
    let extensions = request.extensions();
    extensions
        .get::<TcpConnectInfo>()
        .and_then(TcpConnectInfo::remote_addr)
        .or_else(|| {
            extensions
                .get::<TlsConnectInfo<TcpConnectInfo>>()
                .and_then(|tls| tls.get_ref().remote_addr())
        })
}

impl<S> tower::Layer<S> for Limits {
    type Service = LimitedService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        LimitedService {
            inner,
            limits: self.clone(),
        }
    }
}

/// A tonic server's routes, each call counted against its connection.
#[derive(Clone)]
pub struct LimitedService<S> {
    inner: S,
    limits: Limits,
}

impl<S> tower::Service<http::Request<tonic::body::Body>> for LimitedService<S>
where
    S: tower::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
        > + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let connection = connection_of(&request);
        let limits = self.limits.clone();
        let call = self.inner.call(request);
        Box::pin(async move { Ok(limits.counted(connection, call.await?)) })
    }
}
