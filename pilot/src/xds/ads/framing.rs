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
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use futures::{Stream, StreamExt};
use http_body::{Body as _, Frame};
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
/// The largest request accepted unless `--max-message-bytes` says
/// otherwise: Envoy's ACKs repeat every name subscribed.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 << 20;

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
        let max = self.0.limits.max_message_bytes(MAX_REQUEST_BYTES);
        let requests = Requests::new(body, F::decoder(&self.0), max);
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

/// Reads one stream's requests as their bytes arrive, so that a request
/// need not be held whole before it is read.
pub(super) trait Decode: Send + 'static {
    type Request: Send;

    /// A request begins.
    fn begin(&mut self);

    /// The next bytes of the request.
    fn take(&mut self, bytes: &[u8]) -> Result<(), Status>;

    /// The request's bytes have all been taken.
    fn finish(&mut self) -> Result<Self::Request, Status>;
}

/// The requests of one stream, deframed from the request body.
pub(super) struct Requests<D> {
    body: Body,
    decoder: D,
    /// The length prefix being read, when the bytes so far hold only part
    /// of it.
    prefix: Vec<u8>,
    /// Bytes of the request being read still to come; `None` between
    /// requests.
    remaining: Option<usize>,
    /// Bytes received and not yet framed.
    data: Bytes,
    ended: bool,
    failed: bool,
    max_bytes: usize,
}

impl<D: Decode> Requests<D> {
    pub(super) fn new(body: Body, decoder: D, max_bytes: usize) -> Self {
        Self {
            max_bytes,
            body,
            decoder,
            prefix: Vec::new(),
            remaining: None,
            data: Bytes::new(),
            ended: false,
            failed: false,
        }
    }

    /// Frames what has arrived: the next request if one is now whole.
    fn frame(&mut self) -> Result<Option<D::Request>, Status> {
        let remaining = match self.remaining {
            Some(remaining) => remaining,
            None => {
                let wanted = (5 - self.prefix.len()).min(self.data.len());
                self.prefix.extend_from_slice(&self.data.split_to(wanted));
                let Ok(prefix) = <[u8; 5]>::try_from(&self.prefix[..]) else {
                    return Ok(None);
                };
                self.prefix.clear();
                let len = request_len(prefix, self.max_bytes)?;
                self.decoder.begin();
                len
            }
        };
        let take = remaining.min(self.data.len());
        self.decoder.take(&self.data.split_to(take))?;
        if take < remaining {
            self.remaining = Some(remaining - take);
            return Ok(None);
        }
        self.remaining = None;
        self.decoder.finish().map(Some)
    }

    /// Whether a request has begun and not ended.
    fn inside_request(&self) -> bool {
        self.remaining.is_some() || !self.prefix.is_empty() || !self.data.is_empty()
    }
}

/// The length of a request from its gRPC prefix.
fn request_len(prefix: [u8; 5], max: usize) -> Result<usize, Status> {
    if prefix[0] != 0 {
        return Err(Status::unimplemented(
            "compressed requests are not supported: send uncompressed messages",
        ));
    }
    let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
    if len > max {
        // Worded as tonic words it, so that the server's limits count it.
        return Err(Status::out_of_range(format!(
            "a request of {len} bytes is too large: the limit is {max} bytes (--max-message-bytes)"
        )));
    }
    Ok(len)
}

impl<D: Decode + Unpin> Stream for Requests<D> {
    type Item = Result<D::Request, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let next = self.as_mut().poll_request(cx);
        if let Poll::Ready(Some(Err(_))) = next {
            // An error ends the stream.
            self.failed = true;
        }
        next
    }
}

impl<D: Decode + Unpin> Requests<D> {
    fn poll_request(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<D::Request, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        loop {
            match self.frame() {
                Ok(Some(request)) => return Poll::Ready(Some(Ok(request))),
                Ok(None) => {}
                Err(status) => return Poll::Ready(Some(Err(status))),
            }
            if self.ended {
                return Poll::Ready(if self.inside_request() {
                    Some(Err(Status::invalid_argument(
                        "the request stream ended inside a message",
                    )))
                } else {
                    None
                });
            }
            match futures::ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        // `frame` leaves nothing unframed when it wants more.
                        debug_assert!(self.data.is_empty());
                        self.data = data;
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

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;

    /// Each request's bytes, as they were framed.
    #[derive(Default)]
    struct Raw(Vec<u8>);

    impl Decode for Raw {
        type Request = Vec<u8>;

        fn begin(&mut self) {}

        fn take(&mut self, bytes: &[u8]) -> Result<(), Status> {
            self.0.extend_from_slice(bytes);
            Ok(())
        }

        fn finish(&mut self) -> Result<Vec<u8>, Status> {
            Ok(std::mem::take(&mut self.0))
        }
    }

    /// A request body that yields the given frames.
    struct Frames(VecDeque<Bytes>);

    impl http_body::Body for Frames {
        type Data = Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
            Poll::Ready(self.0.pop_front().map(|data| Ok(Frame::data(data))))
        }
    }

    fn grpc(body: &[u8]) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&(body.len() as u32).to_be_bytes());
        framed.extend_from_slice(body);
        framed
    }

    fn requests(bytes: &[u8], chunk: usize) -> Vec<Result<Vec<u8>, Status>> {
        let frames = bytes.chunks(chunk).map(Bytes::copy_from_slice).collect();
        let requests = Requests::new(Body::new(Frames(frames)), Raw::default(), MAX_REQUEST_BYTES);
        let collected = futures::FutureExt::now_or_never(requests.collect());
        collected.expect("the body is always ready")
    }

    #[test]
    fn requests_are_framed_however_the_body_cuts_them() {
        let sent = vec![b"a".repeat(40), vec![], b"b".repeat(3)];
        let bytes: Vec<u8> = sent.iter().flat_map(|r| grpc(r)).collect();
        for chunk in [1, 2, 5, 7, 64, bytes.len()] {
            let read: Vec<_> = requests(&bytes, chunk)
                .into_iter()
                .map(Result::unwrap)
                .collect();
            assert_eq!(read, sent, "chunks of {chunk}");
        }
    }

    #[test]
    fn a_body_that_ends_inside_a_request_is_refused() {
        let bytes = grpc(b"t");
        for cut in [2, bytes.len() - 1] {
            let read = requests(&bytes[..cut], 1);
            let status = read.last().unwrap().as_ref().unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().contains("ended inside"), "{status:?}");
        }
    }

    #[test]
    fn compressed_and_oversized_requests_are_refused() {
        let compressed = [1, 0, 0, 0, 0];
        let status = requests(&compressed, 5).remove(0).unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented);
        let mut oversized = vec![0];
        oversized.extend_from_slice(&(MAX_REQUEST_BYTES as u32 + 1).to_be_bytes());
        let status = requests(&oversized, 5).remove(0).unwrap_err();
        assert_eq!(status.code(), tonic::Code::OutOfRange);
    }
}
