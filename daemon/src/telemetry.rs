//! Traces over OTLP: the tracing layer that turns the daemon's spans into
//! OpenTelemetry spans and exports them, and how a task's span joins the
//! trace its caller started.
//!
//! A task's span (`task`, opened by dispatch) takes the wire's `trace_id` —
//! 32 hex digits, a W3C trace id — so one user request is one trace across
//! clients, daemons and Python workers. Its parent is the caller's span when
//! the command's `header.metadata.traceparent` names one in the same trace
//! (we set it on every call-agent and task group we send, so a child task's
//! span hangs under the call that started it); otherwise a span id derived
//! from the trace id stands for "the request", the same for every task of
//! it, so they show as siblings of one (unexported) root. The host calls
//! that leave the sandbox open child spans of the task's in the sandbox
//! crate (`call-agent`, `dispatch-group`, `ask-user`, `call-tool`,
//! `http-request`).
//!
//! Nothing here runs unless `[telemetry] enabled`: without the layer, the
//! parent set on a span goes nowhere and no traceparent is written.

use crate::config::TelemetryConfig;
use opentelemetry::trace::{
    Link, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig as _};
use opentelemetry_sdk::trace::{
    Sampler, SamplingDecision, SamplingResult, SdkTracerProvider, ShouldSample,
};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;

/// The metadata key of a command that carries its caller's span, in the
/// W3C `traceparent` format (`00-<trace id>-<span id>-<flags>`).
pub const TRACEPARENT: &str = "traceparent";

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built (an endpoint that is no URL, a
    /// bad `OTEL_EXPORTER_OTLP_*` variable).
    #[error("telemetry: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The exporter behind the layer: spans are sent in batches from a thread
/// of its own; [`Telemetry::shutdown`] sends what is left.
#[derive(Debug)]
pub struct Telemetry {
    /// Owns the batch processor and its exporter.
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Sends what is still buffered and stops the exporter (at shutdown).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("gatewayd: telemetry: the last spans were not exported: {error}");
        }
    }
}

/// The spans exported: the daemon's and the sandbox's at `info` (tasks and
/// host calls), whatever `log.level` says, and not the per-import spans of
/// wasmtime's bindings, which would stand between a host call and its
/// task.
const EXPORTED: &str = "warn,gatewayd=info,byclaw_sandbox=info";

/// A [`layer`]: OpenTelemetry's, seeing only the daemon's and the sandbox's spans at `info`.
pub type TraceLayer<S> = tracing_subscriber::filter::Filtered<
    tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::Tracer>,
    tracing_subscriber::EnvFilter,
    S,
>;

/// The tracing layer exporting spans as `config` says, and the exporter to
/// shut down at the end. Build it outside an async runtime (the OTLP HTTP
/// client is a blocking one, run on the exporter's thread).
pub fn layer<S>(config: &TelemetryConfig) -> Result<(TraceLayer<S>, Telemetry), TelemetryError>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(endpoint) = &config.endpoint {
        exporter = exporter.with_endpoint(endpoint.clone());
    }
    let exporter = exporter.build()?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|name| !name.trim().is_empty())
        .unwrap_or_else(|| config.service_name.clone());
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .build();
    // A caller's sampled traceparent is followed; a task without one (its
    // parent stands in for the request, marked not sampled) is kept at
    // the configured ratio, decided by its trace id — the same answer for
    // every task of one request, on every daemon.
    let sampler = TaskSampler {
        ratio: Sampler::TraceIdRatioBased(config.sample_ratio),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(sampler)
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("gatewayd");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(tracing_subscriber::EnvFilter::new(EXPORTED));
    Ok((layer, Telemetry { provider }))
}

/// Parent-based sampling, but a task whose parent is the request's
/// stand-in (no caller span known) is kept at the configured ratio.
#[derive(Debug, Clone)]
struct TaskSampler {
    /// Decides by trace id: the same answer for every task of a request.
    ratio: Sampler,
}

impl ShouldSample for TaskSampler {
    fn should_sample(
        &self,
        parent_context: Option<&Context>,
        trace_id: TraceId,
        name: &str,
        span_kind: &SpanKind,
        attributes: &[KeyValue],
        links: &[Link],
    ) -> SamplingResult {
        let parent = parent_context
            .map(|context| context.span().span_context().clone())
            .filter(|parent| parent.is_valid() && *parent != request_span(parent.trace_id()));
        match parent {
            Some(parent) => SamplingResult {
                decision: if parent.is_sampled() {
                    SamplingDecision::RecordAndSample
                } else {
                    SamplingDecision::Drop
                },
                attributes: Vec::new(),
                trace_state: parent.trace_state().clone(),
            },
            None => self.ratio.should_sample(
                parent_context,
                trace_id,
                name,
                span_kind,
                attributes,
                links,
            ),
        }
    }
}

/// Makes `span` (a task's, not entered yet) a child of its caller's span:
/// the `traceparent` of its metadata when it is in `trace_id`'s trace,
/// else the request's stand-in span in `trace_id`. Nothing when `trace_id`
/// is not 32 hex digits (the task's span then starts a trace of its own).
pub fn join_trace(span: &tracing::Span, trace_id: &str, traceparent: Option<&str>) {
    let Ok(trace) = TraceId::from_hex(trace_id) else {
        return;
    };
    if trace == TraceId::INVALID || trace_id.len() != 32 {
        return;
    }
    let caller = traceparent
        .and_then(parse_traceparent)
        .filter(|caller| caller.trace_id() == trace);
    let parent = caller.unwrap_or_else(|| request_span(trace));
    let _ = span.set_parent(Context::new().with_remote_span_context(parent));
}

/// The current span as a `traceparent` for a command sent from it, when
/// traces are exported and the span is in one.
pub fn current_traceparent() -> Option<String> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span = span.span_context();
    span.is_valid().then(|| {
        format!(
            "00-{}-{}-{:02x}",
            span.trace_id(),
            span.span_id(),
            span.trace_flags().to_u8()
        )
    })
}

/// The stand-in for the span of the request that started a trace: its
/// span id is the low half of the trace id (any nonzero value would do; this
/// one is the same on every daemon), not sampled so the ratio decides.
fn request_span(trace: TraceId) -> SpanContext {
    let low = u64::from_be_bytes(trace.to_bytes()[8..].try_into().expect("8 bytes"));
    let span = SpanId::from_bytes(low.max(1).to_be_bytes());
    SpanContext::new(
        trace,
        span,
        TraceFlags::default(),
        true,
        TraceState::default(),
    )
}

/// A W3C `traceparent` (version 00), or nothing when it is not one.
fn parse_traceparent(value: &str) -> Option<SpanContext> {
    let mut parts = value.trim().split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let trace = TraceId::from_hex(trace).ok()?;
    let span = SpanId::from_hex(span).ok()?;
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let context = SpanContext::new(
        trace,
        span,
        TraceFlags::new(flags & TraceFlags::SAMPLED.to_u8()),
        true,
        TraceState::default(),
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_is_read_only_when_well_formed() {
        let parsed =
            parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        assert_eq!(
            parsed.trace_id(),
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap()
        );
        assert_eq!(
            parsed.span_id(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap()
        );
        assert!(parsed.is_sampled() && parsed.is_remote());
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-xyz92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn the_request_stand_in_is_the_same_for_every_task_of_a_trace() {
        let trace = TraceId::from_hex("0123456789abcdef0011223344556677").unwrap();
        let one = request_span(trace);
        assert_eq!(one.span_id(), SpanId::from_hex("0011223344556677").unwrap());
        assert_eq!(one, request_span(trace));
        assert!(one.is_valid() && !one.is_sampled());
        let low_zero = TraceId::from_hex("0123456789abcdef0000000000000000").unwrap();
        assert!(request_span(low_zero).is_valid());
    }
}
