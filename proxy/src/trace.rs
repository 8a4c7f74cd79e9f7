//! Distributed tracing. Every request's trace context is carried on:
//! W3C `traceparent` (and `tracestate`), or Zipkin's B3 headers, which
//! Istio 1.1's proxies spoke. When `OTEL_EXPORTER_OTLP_ENDPOINT` is set,
//! the proxy also makes a span per request (a child of the caller's, the
//! parent of the next hop's: the forwarded headers name it) and exports
//! spans over OTLP gRPC in batches. New traces are sampled at
//! `--trace-sampling` percent; a caller's sampling decision is kept.

use std::time::SystemTime;

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context, KeyValue,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{
        SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId, TraceState,
        Tracer as _,
    },
};
use opentelemetry_sdk::{
    propagation::TraceContextPropagator,
    trace::{Sampler, SdkTracer, SdkTracerProvider},
};

/// Span making and export; inert without an endpoint (and by default).
#[derive(Default)]
pub struct Tracing {
    exporting: Option<(SdkTracerProvider, SdkTracer)>,
}

impl Tracing {
    /// From the environment; `sampling` is the percentage of new traces
    /// kept.
    pub fn from_env(service: &str, sampling: f64) -> anyhow::Result<Self> {
        let ratio = (sampling / 100.0).clamp(0.0, 1.0);
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(ratio)));
        let Some(provider) = component::trace::provider(service, Some(sampler))? else {
            return Ok(Tracing::default());
        };
        use opentelemetry::trace::TracerProvider as _;
        let tracer = provider.tracer("proxy");
        Ok(Tracing {
            exporting: Some((provider, tracer)),
        })
    }

    pub fn is_on(&self) -> bool {
        self.exporting.is_some()
    }

    /// The span of a request whose headers are `headers`, rewriting them
    /// to name it as the next hop's parent. `None` when not exporting.
    pub fn start(
        &self,
        headers: &mut HeaderMap,
        name: String,
        inbound: bool,
    ) -> Option<RequestSpan> {
        let (_, tracer) = self.exporting.as_ref()?;
        let b3 = headers.contains_key("x-b3-traceid") && !headers.contains_key("traceparent");
        let parent = if b3 {
            b3_context(headers)
        } else {
            TraceContextPropagator::new().extract(&Headers(headers))
        };
        let span = tracer
            .span_builder(name)
            .with_kind(if inbound {
                SpanKind::Server
            } else {
                SpanKind::Client
            })
            .with_start_time(SystemTime::now())
            .start_with_context(tracer, &parent);
        let cx = parent.with_span(span);
        if b3 {
            inject_b3(&cx, headers);
        } else {
            TraceContextPropagator::new().inject_context(&cx, &mut HeadersMut(headers));
        }
        Some(RequestSpan { cx })
    }

    /// A span of the proxy's own work in `parent`'s trace (a config
    /// update Pilot traced); `None` when not exporting.
    pub fn child(&self, name: String, parent: &SpanContext) -> Option<WorkSpan> {
        let (_, tracer) = self.exporting.as_ref()?;
        let parent = Context::new().with_remote_span_context(parent.clone());
        let span = tracer
            .span_builder(name)
            .with_kind(SpanKind::Internal)
            .start_with_context(tracer, &parent);
        Some(WorkSpan {
            cx: parent.with_span(span),
        })
    }

    /// Sends what is batched (at shutdown).
    pub fn flush(&self) {
        if let Some((provider, _)) = &self.exporting
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!("spans not flushed: {e}");
        }
    }
}

/// A span of the proxy's own work.
pub struct WorkSpan {
    cx: Context,
}

impl WorkSpan {
    /// Ends it, having taken config `version` or refused it for `error`.
    pub fn end(self, version: &str, error: Option<String>) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("xds.version", version.to_string()));
        if let Some(e) = error {
            span.set_status(Status::error(format!("NACK: {e}")));
        }
        span.end();
    }
}

/// One request's span, ended with its response.
pub struct RequestSpan {
    cx: Context,
}

impl RequestSpan {
    pub fn finish(self, method: &str, authority: &str, path: &str, status: u16) {
        let span = self.cx.span();
        span.set_attribute(KeyValue::new("http.method", method.to_string()));
        span.set_attribute(KeyValue::new("http.host", authority.to_string()));
        span.set_attribute(KeyValue::new("http.target", path.to_string()));
        span.set_attribute(KeyValue::new("http.status_code", i64::from(status)));
        if status >= 500 {
            span.set_status(Status::error(format!("status {status}")));
        }
        span.end();
    }
}

struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

struct HeadersMut<'a>(&'a mut HeaderMap);

impl Injector for HeadersMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (HeaderName::try_from(key), HeaderValue::from_str(&value)) {
            self.0.insert(name, value);
        }
    }
}

/// A caller's B3 context (`x-b3-traceid`, `x-b3-spanid`, `x-b3-sampled`).
fn b3_context(headers: &HeaderMap) -> Context {
    let get = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let trace = get("x-b3-traceid").and_then(|t| TraceId::from_hex(t).ok());
    let span = get("x-b3-spanid").and_then(|s| SpanId::from_hex(s).ok());
    let (Some(trace), Some(span)) = (trace, span) else {
        return Context::new();
    };
    let sampled =
        matches!(get("x-b3-sampled"), Some("1" | "true")) || get("x-b3-flags") == Some("1");
    let flags = if sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    Context::new().with_remote_span_context(SpanContext::new(
        trace,
        span,
        flags,
        true,
        TraceState::default(),
    ))
}

/// B3 headers naming `cx`'s span, the incoming span as its parent.
fn inject_b3(cx: &Context, headers: &mut HeaderMap) {
    let span = cx.span();
    let sc = span.span_context();
    let parent = headers.get("x-b3-spanid").cloned();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    set("x-b3-traceid", sc.trace_id().to_string());
    set("x-b3-spanid", sc.span_id().to_string());
    set(
        "x-b3-sampled",
        if sc.is_sampled() { "1" } else { "0" }.to_string(),
    );
    if let Some(parent) = parent {
        headers.insert("x-b3-parentspanid", parent);
    }
}
