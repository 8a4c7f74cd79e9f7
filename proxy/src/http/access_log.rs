//! The outermost stage: a trace span per request (when spans are
//! exported), and the access log line (target `access`), written when the
//! response body ends, with its size and the time to its last byte.

use std::sync::Arc;

use tower::{Layer, Service};

use super::{Connection, Request, Stage, body};
use crate::{
    config::{listener::HttpApp, route::RequestParts},
    listeners::Shared,
    trace::Tracing,
};

/// What the stage writes with.
pub struct Observing {
    pub tracing: Arc<Tracing>,
    pub access_log: bool,
    /// The listener's stat prefix, as the log names it.
    pub listener: String,
    pub inbound: bool,
    pub connection: Arc<Connection>,
}

impl Observing {
    /// For `app`'s requests on `connection`.
    pub fn of(app: &HttpApp, shared: &Shared, connection: &Arc<Connection>) -> Self {
        Self {
            tracing: shared.tracing.clone(),
            access_log: shared.access_log,
            listener: app.stat_prefix.clone(),
            inbound: app.direction.inbound().is_some(),
            connection: connection.clone(),
        }
    }
}

#[derive(Clone)]
pub struct AccessLog<S> {
    observing: Arc<Observing>,
    inner: S,
}

pub fn layer<S>(observing: Observing) -> impl Layer<S, Service = AccessLog<S>> + Clone {
    let observing = Arc::new(observing);
    tower::layer::layer_fn(move |inner| AccessLog {
        observing: observing.clone(),
        inner,
    })
}

impl<S: Stage<std::convert::Infallible>> Service<Request> for AccessLog<S> {
    super::stage_service!(std::convert::Infallible);

    fn call(&mut self, mut request: Request) -> Self::Future {
        let observing = self.observing.clone();
        let traced = observing.tracing.is_on();
        if !observing.access_log && !traced {
            return self.inner.call(request);
        }
        let started = std::time::Instant::now();
        let method = request.method().clone();
        let uri = request.uri().clone();
        let authority = RequestParts::of(&request).authority.to_string();
        let span = observing.tracing.start(
            request.headers_mut(),
            format!("{authority}{}", uri.path()),
            observing.inbound,
        );
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let status = response.status().as_u16();
            if let Some(span) = span {
                span.finish(method.as_str(), &authority, uri.path(), status);
            }
            if !observing.access_log {
                return Ok(response);
            }
            Ok(body::on_end(response, move |bytes| {
                let connection = &observing.connection;
                tracing::info!(
                    target: "access",
                    %method,
                    %uri,
                    %authority,
                    status,
                    bytes,
                    duration_ms = started.elapsed().as_secs_f64() * 1e3,
                    peer = %connection.peer,
                    peer_identity = connection.peer_identity.as_deref().unwrap_or_default(),
                    listener = %observing.listener,
                );
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tower::ServiceExt;

    use super::*;
    use crate::http::test_support::{Recorder, request, text};

    /// Where the test's log lines go.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[tokio::test]
    async fn a_request_is_logged_when_its_response_body_ends() {
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let _logging = tracing::subscriber::set_default(subscriber);
        let observing = Observing {
            tracing: Arc::new(Tracing::default()),
            access_log: true,
            listener: "0.0.0.0_9080".into(),
            inbound: false,
            connection: Arc::new(Connection {
                peer: "10.0.0.9:40000".parse().unwrap(),
                peer_identity: None,
                destination: None,
                tls: false,
            }),
        };
        let app = Recorder::default();
        let response = layer(observing)
            .layer(app.answering("four"))
            .oneshot(request("http://ratings:9080/ratings/1"))
            .await
            .unwrap();
        assert!(!lines.text().contains("access"), "{}", lines.text());
        text(response).await;
        let logged = lines.text();
        for field in [
            "access",
            "status=200",
            "bytes=4",
            "authority=ratings:9080",
            "peer=10.0.0.9:40000",
            "listener=0.0.0.0_9080",
        ] {
            assert!(logged.contains(field), "{field} in {logged}");
        }
    }
}
