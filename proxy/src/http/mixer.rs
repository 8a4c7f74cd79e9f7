//! The Mixer stage, inbound only: checks each request with the policy
//! Mixer before it goes on (a refusal is answered with Mixer's status),
//! and reports it to the telemetry Mixer when its response body ends, with
//! the bytes it carried and the time to its last byte.

use std::sync::Arc;

use http::{StatusCode, header};
use tower::{Layer, Service};

use super::{Connection, Request, Stage, body, local_reply};
use crate::config::listener::InboundService;

/// What the stage needs of Mixer: [`crate::mixer::MixerFilter`] talks to
/// the real ones.
pub trait Mixer: Send + Sync + 'static {
    /// A request's attributes, kept for its report.
    type Attributes: Send + Sync + Unpin + 'static;

    fn attributes(
        &self,
        request: &Request,
        connection: &Connection,
        service: &InboundService,
    ) -> Self::Attributes;

    /// `Some((status, why))` when Mixer refuses the request.
    fn check(
        &self,
        attributes: &Self::Attributes,
    ) -> impl Future<Output = Option<(StatusCode, String)>> + Send;

    /// Whether requests are checked.
    fn checks(&self) -> bool;

    /// Whether finished requests are reported.
    fn reports(&self) -> bool;

    fn report(
        &self,
        attributes: Self::Attributes,
        status: StatusCode,
        request_size: u64,
        response_size: u64,
    );
}

pub struct MixerStage<M, S> {
    mixer: Arc<M>,
    connection: Arc<Connection>,
    service: Arc<InboundService>,
    inner: S,
}

impl<M, S: Clone> Clone for MixerStage<M, S> {
    fn clone(&self) -> Self {
        Self {
            mixer: self.mixer.clone(),
            connection: self.connection.clone(),
            service: self.service.clone(),
            inner: self.inner.clone(),
        }
    }
}

pub fn layer<M, S>(
    mixer: Arc<M>,
    connection: Arc<Connection>,
    service: InboundService,
) -> impl Layer<S, Service = MixerStage<M, S>> + Clone {
    let service = Arc::new(service);
    tower::layer::layer_fn(move |inner| MixerStage {
        mixer: mixer.clone(),
        connection: connection.clone(),
        service: service.clone(),
        inner,
    })
}

impl<M: Mixer, S: Stage<std::convert::Infallible>> Service<Request> for MixerStage<M, S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, request: Request) -> Self::Future {
        let (checks, reports) = (self.mixer.checks(), self.mixer.reports());
        if !checks && !reports {
            return self.inner.call(request);
        }
        let attributes = self
            .mixer
            .attributes(&request, &self.connection, &self.service);
        let request_size = request
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok())
            .unwrap_or(0);
        let mixer = self.mixer.clone();
        let mut inner = self.inner.clone();
        Box::pin(async move {
            let refused = match checks {
                true => mixer.check(&attributes).await,
                false => None,
            };
            let response = match refused {
                Some((status, why)) => local_reply(status, &why),
                None => inner.call(request).await?,
            };
            if !reports {
                return Ok(response);
            }
            let status = response.status();
            Ok(body::on_end(response, move |sent| {
                mixer.report(attributes, status, request_size, sent)
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::Bytes;
    use http_body::Frame;
    use http_body_util::{BodyExt, StreamBody};
    use tower::{ServiceExt, util::BoxCloneService};

    use super::*;
    use crate::http::Response;
    use crate::http::test_support::{Recorder, request, text};

    /// Records what it is asked; refuses with `refusal` when given.
    #[derive(Default)]
    struct Recording {
        checks: bool,
        refusal: Option<(StatusCode, String)>,
        checked: Mutex<Vec<String>>,
        /// (path, status, request size, response size)
        reported: Mutex<Vec<(String, u16, u64, u64)>>,
    }

    impl Mixer for Recording {
        type Attributes = String;

        fn attributes(&self, request: &Request, _: &Connection, _: &InboundService) -> String {
            request.uri().path().to_string()
        }

        async fn check(&self, path: &String) -> Option<(StatusCode, String)> {
            self.checked.lock().unwrap().push(path.clone());
            self.refusal.clone()
        }

        fn checks(&self) -> bool {
            self.checks
        }

        fn reports(&self) -> bool {
            true
        }

        fn report(&self, path: String, status: StatusCode, request_size: u64, sent: u64) {
            let report = (path, status.as_u16(), request_size, sent);
            self.reported.lock().unwrap().push(report);
        }
    }

    fn stage<S: Stage<std::convert::Infallible>>(
        mixer: &Arc<Recording>,
        app: S,
    ) -> MixerStage<Recording, S> {
        let connection = Arc::new(Connection {
            peer: "10.0.0.9:40000".parse().unwrap(),
            peer_identity: None,
            destination: None,
            tls: false,
        });
        let service = InboundService {
            host: "ratings.shop.svc.cluster.local".into(),
            port: 9080,
        };
        layer(mixer.clone(), connection, service).layer(app)
    }

    /// An app answering in three chunks of a body of unknown length.
    fn chunked() -> BoxCloneService<Request, Response, std::convert::Infallible> {
        BoxCloneService::new(tower::service_fn(|_: Request| async {
            let chunks = ["one ", "two ", "three"]
                .map(|c| Ok::<_, crate::upstream::BoxError>(Frame::data(Bytes::from(c))));
            let body = StreamBody::new(tokio_stream::iter(chunks)).boxed();
            Ok(http::Response::new(body))
        }))
    }

    #[tokio::test]
    async fn a_request_is_reported_when_its_body_ends_with_the_bytes_it_carried() {
        let mixer = Arc::new(Recording {
            checks: true,
            ..Default::default()
        });
        let mut posted = request("/ratings/1");
        posted
            .headers_mut()
            .insert(header::CONTENT_LENGTH, "5".parse().unwrap());
        let response = stage(&mixer, chunked()).oneshot(posted).await.unwrap();
        assert_eq!(*mixer.checked.lock().unwrap(), ["/ratings/1"]);
        assert!(
            mixer.reported.lock().unwrap().is_empty(),
            "not before the body ends"
        );
        assert_eq!(text(response).await, "one two three");
        assert_eq!(
            *mixer.reported.lock().unwrap(),
            [("/ratings/1".to_string(), 200, 5, 13)]
        );
    }

    #[tokio::test]
    async fn a_refused_request_gets_mixers_answer_and_is_reported_with_it() {
        let mixer = Arc::new(Recording {
            checks: true,
            refusal: Some((StatusCode::FORBIDDEN, "PERMISSION_DENIED:denied".into())),
            ..Default::default()
        });
        let app = Recorder::default();
        let response = stage(&mixer, app.answering("app"))
            .oneshot(request("/ratings/1"))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(text(response).await, "PERMISSION_DENIED:denied\n");
        assert_eq!(app.count(), 0);
        let reported = mixer.reported.lock().unwrap();
        assert_eq!(reported[0].1, 403);
    }

    #[tokio::test]
    async fn without_a_policy_mixer_nothing_is_checked() {
        let mixer = Arc::new(Recording::default());
        let response = stage(&mixer, chunked())
            .oneshot(request("/ratings/1"))
            .await
            .unwrap();
        text(response).await;
        assert!(mixer.checked.lock().unwrap().is_empty());
        assert_eq!(mixer.reported.lock().unwrap().len(), 1);
    }
}
