//! ADS with Pilot's own gRPC framing. tonic's codec keeps, per stream, a
//! buffer as large as the largest message the stream has carried, for as
//! long as the stream lives: with Envoy's ACKs naming thousands of
//! resources and megabytes of clusters per proxy, thousands of idle
//! proxies cost gigabytes. Here a request's buffer is released once the
//! request is decoded, and a response is encoded chunk by chunk as HTTP/2
//! takes it (see [`Response`]).

use std::{
    convert::Infallible,
    future::{Ready, ready},
    marker::PhantomData,
    pin::Pin,
    task::{Context, Poll},
};

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use http_body::{Body as _, Frame};
use prost::Message;
use tonic::{
    Status,
    body::Body,
    codegen::{Service, http},
};

use super::{
    AdsServer, Flavor,
    delta::Delta,
    response::{GrpcChunks, Response},
    sotw::Sotw,
};
use crate::xds::ResourceGenerator;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
/// The largest request accepted: Envoy's ACKs repeat every name subscribed.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The ADS gRPC service.
pub(super) struct AdsService<G>(pub(super) AdsServer<G>);

impl<G> Clone for AdsService<G> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<G: ResourceGenerator> Service<http::Request<Body>> for AdsService<G> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let method = request.uri().path().strip_prefix(&format!("/{SERVICE}/"));
        let response = match method {
            Some("StreamAggregatedResources") => self.respond::<Sotw>(request.into_body()),
            Some("DeltaAggregatedResources") => self.respond::<Delta>(request.into_body()),
            _ => Status::unimplemented(format!("no method {}", request.uri().path())).into_http(),
        };
        ready(Ok(response))
    }
}

impl<G: ResourceGenerator> AdsService<G> {
    fn respond<F: Flavor<G>>(&self, body: Body) -> http::Response<Body> {
        let requests = Requests::<F::Request>::new(body);
        let framed = Framed {
            responses: self.0.serve::<F>(requests),
            chunks: None,
            done: false,
        };
        let mut response = http::Response::new(Body::new(framed));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/grpc"),
        );
        response
    }
}

/// The requests of one stream, deframed from the request body.
pub(super) struct Requests<M> {
    body: Body,
    /// What has arrived of the next request; released whenever it holds no
    /// partial request.
    buf: BytesMut,
    ended: bool,
    message: PhantomData<fn() -> M>,
}

impl<M: Message + Default> Requests<M> {
    fn new(body: Body) -> Self {
        Self {
            body,
            buf: BytesMut::new(),
            ended: false,
            message: PhantomData,
        }
    }

    /// The next whole request in the buffer, if one is there.
    fn decode(&mut self) -> Result<Option<M>, Status> {
        let Some(prefix) = self.buf.get(..5) else {
            return Ok(None);
        };
        if prefix[0] != 0 {
            return Err(Status::unimplemented(
                "compressed requests are not supported: send uncompressed messages",
            ));
        }
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
        if len > MAX_REQUEST_BYTES {
            return Err(Status::resource_exhausted(format!(
                "a request of {len} bytes is over the limit of {MAX_REQUEST_BYTES}"
            )));
        }
        if self.buf.len() < 5 + len {
            self.buf.reserve(5 + len - self.buf.len());
            return Ok(None);
        }
        let mut frame = self.buf.split_to(5 + len);
        frame.advance(5);
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
        M::decode(frame)
            .map(Some)
            .map_err(|e| Status::invalid_argument(format!("malformed request: {e}")))
    }
}

impl<M: Message + Default> Stream for Requests<M> {
    type Item = Result<M, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            match self.decode() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            if self.ended {
                return Poll::Ready(if self.buf.is_empty() {
                    None
                } else {
                    Some(Err(Status::invalid_argument(
                        "the request stream ended inside a message",
                    )))
                });
            }
            match futures::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
                Some(Err(status)) => return Poll::Ready(Some(Err(status))),
                None => self.ended = true,
            }
        }
    }
}

/// Responses as gRPC messages, ending with the status in trailers.
struct Framed<S> {
    responses: S,
    /// What is left of the response being sent.
    chunks: Option<GrpcChunks>,
    done: bool,
}

impl<S> http_body::Body for Framed<S>
where
    S: Stream<Item = Result<Response, Status>> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        loop {
            if let Some(chunk) = self.chunks.as_mut().and_then(Iterator::next) {
                return Poll::Ready(Some(Ok(Frame::data(chunk))));
            }
            self.chunks = None;
            let status = match futures::ready!(self.responses.poll_next_unpin(cx)) {
                Some(Ok(response)) => {
                    self.chunks = Some(response.into_grpc_chunks());
                    continue;
                }
                Some(Err(status)) => status,
                None => Status::ok(""),
            };
            self.done = true;
            let mut trailers = http::HeaderMap::new();
            // A status whose message cannot be a header still ends the stream.
            if status.add_header(&mut trailers).is_err() {
                trailers.insert("grpc-status", http::HeaderValue::from_static("13"));
            }
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        }
    }
}
