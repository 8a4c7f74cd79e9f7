//! Response bodies that know when they end, for what is measured to the
//! last byte: Mixer reports, the access log.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use bytes::Bytes;
use http::Response;
use http_body::{Frame, SizeHint};
use http_body_util::BodyExt;

use crate::upstream::{Body, BoxError};

/// `response`, whose body calls `done` once with the bytes it carried:
/// when it ends, when it fails, or when it is dropped unfinished (the
/// client went away).
pub fn on_end(
    response: Response<Body>,
    done: impl FnOnce(u64) + Send + Sync + Unpin + 'static,
) -> Response<Body> {
    response.map(|body| {
        OnEnd {
            body,
            done: Some(done),
            sent: 0,
        }
        .boxed()
    })
}

struct OnEnd<F: FnOnce(u64)> {
    body: Body,
    done: Option<F>,
    sent: u64,
}

impl<F: FnOnce(u64)> OnEnd<F> {
    fn finish(&mut self) {
        if let Some(done) = self.done.take() {
            done(self.sent);
        }
    }
}

impl<F: FnOnce(u64) + Unpin> http_body::Body for OnEnd<F> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
                if self.body.is_end_stream() {
                    self.finish();
                }
            }
            Poll::Ready(_) => self.finish(),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl<F: FnOnce(u64)> Drop for OnEnd<F> {
    fn drop(&mut self) {
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A response of `chunks`, and what its `done` was told.
    fn watched(chunks: &[&'static str]) -> (Response<Body>, Arc<Mutex<Vec<u64>>>) {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
            .collect();
        let body = http_body_util::StreamBody::new(tokio_stream::iter(frames)).boxed();
        let told = Arc::new(Mutex::new(Vec::new()));
        let record = told.clone();
        let response = on_end(Response::new(body), move |n| record.lock().unwrap().push(n));
        (response, told)
    }

    #[tokio::test]
    async fn a_body_read_to_its_end_says_so_once_with_its_size() {
        let (response, told) = watched(&["abc", "de", "f"]);
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(bytes.len(), 6);
        assert_eq!(*told.lock().unwrap(), [6]);
    }

    #[tokio::test]
    async fn a_body_dropped_unfinished_says_what_it_carried() {
        let (response, told) = watched(&["abc", "de", "f"]);
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap();
        assert_eq!(first.data_ref().map(|d| d.len()), Some(3));
        assert!(told.lock().unwrap().is_empty());
        drop(body);
        assert_eq!(*told.lock().unwrap(), [3]);
    }
}
