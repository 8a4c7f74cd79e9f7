//! ADS with Pilot's own framing of responses. tonic's encoder keeps, per
//! stream, a buffer as large as the largest message the stream has sent,
//! for as long as the stream lives: with a megabyte of clusters per proxy,
//! thousands of idle proxies cost gigabytes. Here each response is encoded
//! into a buffer of exactly its size, handed to HTTP/2 and freed once sent.
//! Requests are decoded by tonic.

use std::{
    convert::Infallible,
    future::{Ready, ready},
    pin::Pin,
    task::{Context, Poll},
};

use futures::{Stream, StreamExt};
use http_body::Frame;
use prost::Message;
use tonic::{
    Status,
    body::Body,
    codec::{Codec, Streaming},
    codegen::{Bytes, Service, http},
    server::NamedService,
};

use super::{AdsServer, Flavor, delta::Delta, sotw::Sotw};
use crate::xds::ResourceGenerator;

const SERVICE: &str = "envoy.service.discovery.v3.AggregatedDiscoveryService";
/// The largest request accepted: Envoy's ACKs repeat every name subscribed.
const MAX_REQUEST_BYTES: usize = 64 << 20;

/// The ADS gRPC service, to add to a tonic server.
pub struct AdsService<G>(pub(super) AdsServer<G>);

impl<G> Clone for AdsService<G> {
    fn clone(&self) -> Self {
        Self(self.0.clone())
    }
}

impl<G> NamedService for AdsService<G> {
    const NAME: &'static str = SERVICE;
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
    fn respond<F>(&self, body: Body) -> http::Response<Body>
    where
        F: Flavor<G>,
        F::Request: Message + Default,
        F::Response: Message,
    {
        let mut codec = tonic_prost::ProstCodec::<F::Response, F::Request>::default();
        let requests = Streaming::new_request(codec.decoder(), body, None, Some(MAX_REQUEST_BYTES));
        let framed = Framed {
            responses: self.0.serve::<F>(requests),
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

/// A stream of messages as gRPC's length-prefixed frames, ending with the
/// status in trailers.
struct Framed<S> {
    responses: S,
    done: bool,
}

impl<S, M> http_body::Body for Framed<S>
where
    S: Stream<Item = Result<M, Status>> + Unpin,
    M: Message,
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
        let status = match futures::ready!(self.responses.poll_next_unpin(cx)) {
            Some(Ok(message)) => {
                let len = message.encoded_len();
                let mut buf = Vec::with_capacity(5 + len);
                buf.push(0); // not compressed
                buf.extend_from_slice(&(len as u32).to_be_bytes());
                message.encode_raw(&mut buf);
                return Poll::Ready(Some(Ok(Frame::data(Bytes::from(buf)))));
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
        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
    }
}
