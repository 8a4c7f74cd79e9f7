//! Traces from the control plane over OTLP. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, [`init`] makes the process's tracer
//! provider, batching spans to that endpoint over gRPC, sampled as
//! `OTEL_TRACES_SAMPLER` says (every trace by default: control-plane work
//! is rare next to requests); without it, spans are never made.
//!
//! MCP and xDS have no headers per message, so a trace crosses MCP in the
//! one string the source chooses and the sink hands back: the nonce. A
//! traced response's nonce is `N/traceparent` (W3C): a sink that knows
//! continues the trace, any other echoes it, and the ACK comes back
//! carrying the push it answers.

use std::{collections::HashMap, sync::OnceLock, time::SystemTime};

use opentelemetry::{
    Context, KeyValue, global,
    propagation::TextMapPropagator,
    trace::{SpanContext, SpanKind, Status, TraceContextExt, Tracer, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource, propagation::TraceContextPropagator, trace::Sampler, trace::SdkTracerProvider,
};

/// The OTLP endpoint variable, as OpenTelemetry names it.
pub const ENDPOINT: &str = "OTEL_EXPORTER_OTLP_ENDPOINT";

static PROVIDER: OnceLock<Option<SdkTracerProvider>> = OnceLock::new();

/// A provider exporting to the endpoint of the environment, spans named as
/// `service`'s; `None` when no endpoint is set. `sampler` replaces the
/// environment's.
pub fn provider(
    service: &str,
    sampler: Option<Sampler>,
) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(endpoint) = std::env::var(ENDPOINT).ok().filter(|e| !e.is_empty()) else {
        return Ok(None);
    };
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint.clone())
        .build()
        .map_err(|e| anyhow::anyhow!("{ENDPOINT} {endpoint}: {e}"))?;
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            Resource::builder()
                .with_service_name(service.to_string())
                .build(),
        );
    if let Some(sampler) = sampler {
        builder = builder.with_sampler(sampler);
    }
    tracing::info!(%endpoint, service, "exporting spans over OTLP");
    Ok(Some(builder.build()))
}

/// Makes the process's tracer provider, once: the first caller names the
/// service (the monolith names itself before its components do).
pub fn init(service: &str) -> anyhow::Result<()> {
    if PROVIDER.get().is_some() {
        return Ok(());
    }
    let made = provider(service, None)?;
    if let Some(p) = &made {
        global::set_tracer_provider(p.clone());
    }
    let _ = PROVIDER.set(made);
    Ok(())
}

/// Sends the spans still batched (at exit).
pub fn flush() {
    if let Some(Some(p)) = PROVIDER.get()
        && let Err(e) = p.force_flush()
    {
        tracing::warn!("spans not flushed: {e}");
    }
}

/// Whether spans are made at all.
pub fn is_on() -> bool {
    matches!(PROVIDER.get(), Some(Some(_)))
}

/// A span of `component`'s work, the child of `parent` (a new trace when
/// `None`), started at `start` (now when `None`). Not recording when
/// tracing is off.
pub fn span(
    component: &'static str,
    name: impl Into<std::borrow::Cow<'static, str>>,
    parent: Option<&SpanContext>,
    start: Option<SystemTime>,
    attributes: Vec<KeyValue>,
) -> Context {
    if !is_on() {
        return Context::new();
    }
    let tracer = global::tracer_provider().tracer(component);
    let parent = match parent {
        Some(p) => Context::new().with_remote_span_context(p.clone()),
        None => Context::new(),
    };
    let span = tracer
        .span_builder(name)
        .with_kind(SpanKind::Internal)
        .with_start_time(start.unwrap_or_else(SystemTime::now))
        .with_attributes(attributes)
        .start_with_context(&tracer, &parent);
    parent.with_span(span)
}

/// Ends the span of `cx`, failed with `error` if there is one.
pub fn end(cx: &Context, error: Option<String>) {
    let span = cx.span();
    if let Some(e) = error {
        span.set_status(Status::error(e));
    }
    span.end();
}

/// The span of `cx`, when it names a valid one.
pub fn context_of(cx: &Context) -> Option<SpanContext> {
    let sc = cx.span().span_context().clone();
    sc.is_valid().then_some(sc)
}

/// The span the calling code runs in (see [`Context::attach`]), if any.
pub fn current() -> Option<SpanContext> {
    context_of(&Context::current())
}

/// The caller's span, from a gRPC call's `traceparent` metadata.
pub fn of_metadata(metadata: &tonic::metadata::MetadataMap) -> Option<SpanContext> {
    let parent = metadata.get("traceparent")?.to_str().ok()?;
    let fields = HashMap::from([("traceparent".to_string(), parent.to_string())]);
    context_of(&TraceContextPropagator::new().extract(&fields))
}

/// The `n`th nonce of a stream, carrying `span` when there is one.
pub fn nonce(n: u64, span: Option<&SpanContext>) -> String {
    let Some(span) = span else {
        return n.to_string();
    };
    let mut fields = HashMap::new();
    let cx = Context::new().with_remote_span_context(span.clone());
    TraceContextPropagator::new().inject_context(&cx, &mut fields);
    match fields.get("traceparent") {
        Some(parent) => format!("{n}/{parent}"),
        None => n.to_string(),
    }
}

/// The span a nonce carries (see [`nonce`]).
pub fn of_nonce(nonce: &str) -> Option<SpanContext> {
    let (_, parent) = nonce.split_once('/')?;
    let fields = HashMap::from([("traceparent".to_string(), parent.to_string())]);
    context_of(&TraceContextPropagator::new().extract(&fields))
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn a_nonce_carries_its_span_and_stays_unique() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let traced = nonce(7, Some(&span));
        assert_eq!(
            traced,
            "7/00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let read = of_nonce(&traced).unwrap();
        assert_eq!(
            (read.trace_id(), read.span_id()),
            (span.trace_id(), span.span_id())
        );
        assert_ne!(nonce(8, Some(&span)), traced);
        // Untraced, and anyone else's nonces: no span.
        assert_eq!(nonce(7, None), "7");
        for other in ["7", "", "abc/def", "1/00-zz-yy-01"] {
            assert!(of_nonce(other).is_none(), "{other}");
        }
    }
}
