//! ADS over HTTP/2, served with hyper directly rather than through tonic's
//! server, for one setting tonic does not expose: how much unsent data a
//! stream may buffer. hyper's default is 400 KiB per stream, pulled from
//! the response body as fast as the peer's window allows. Most of a
//! response is buffers shared by every stream (see `response`), but what is
//! a stream's own is held only a chunk or two ahead of the socket.

use std::{io, pin::pin, time::Duration};

use futures::{Stream, StreamExt};
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
};
use tonic::{
    body::Body,
    codegen::{Service, http},
};

use super::AdsServer;
use crate::xds::ResourceGenerator;
use component::limits::PeerAddr;

/// Unsent response data buffered per stream, beyond which hyper stops
/// pulling from the response body until the peer reads.
const SEND_BUFFER: usize = 16 << 10;

/// The pause after a failed accept (out of file descriptors, say), so that
/// the loop does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

impl<G: ResourceGenerator> AdsServer<G> {
    /// Serves ADS on the connections of `incoming` until shutdown, then
    /// closes each connection once its streams have ended.
    pub async fn serve_connections<IO>(self, incoming: impl Stream<Item = io::Result<IO>>)
    where
        IO: AsyncRead + AsyncWrite + PeerAddr + Send + Unpin + 'static,
    {
        let mut incoming = pin!(incoming);
        let mut connections = JoinSet::new();
        loop {
            let accepted = tokio::select! {
                accepted = incoming.next() => accepted,
                _ = self.shutdown.cancelled() => None,
            };
            match accepted {
                Some(Ok(io)) => {
                    while connections.try_join_next().is_some() {}
                    connections.spawn(self.clone().serve_connection(io));
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "accepting an ADS connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                None => break,
            }
        }
        connections.join_all().await;
    }

    async fn serve_connection<IO>(self, io: IO)
    where
        IO: AsyncRead + AsyncWrite + PeerAddr + Send + Unpin + 'static,
    {
        let shutdown = self.shutdown.clone();
        let limits = self.limits.clone();
        let peer = io.peer_addr();
        let mut builder = http2::Builder::new(TokioExecutor::new());
        builder.adaptive_window(true).max_send_buf_size(SEND_BUFFER);
        limits.http2(&mut builder);
        let service = super::framing::AdsService(self);
        let service = service_fn(move |request: http::Request<Incoming>| {
            let limits = limits.clone();
            let call = service.clone().call(request.map(Body::new));
            async move { call.await.map(|response| limits.counted(peer, response)) }
        });
        let mut connection = pin!(builder.serve_connection(TokioIo::new(io), service));
        let ended = tokio::select! {
            ended = connection.as_mut() => ended,
            _ = shutdown.cancelled() => {
                // Streams end with `Unavailable` on shutdown; the
                // connection then closes with a GOAWAY.
                connection.as_mut().graceful_shutdown();
                connection.await
            }
        };
        if let Err(e) = ended {
            tracing::debug!(error = %e, "ADS connection ended with an error");
        }
    }
}
