//! `[telemetry]`: traces exported over OTLP (off by default).

use super::*;

/// `[telemetry]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Export traces: a span per task (in the wire's `trace_id`) and one
    /// per host call that leaves the sandbox.
    pub enabled: bool,
    /// The OTLP/HTTP traces endpoint, e.g.
    /// `http://collector:4318/v1/traces`. Unset: the standard variables
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, then `OTEL_EXPORTER_OTLP_ENDPOINT`
    /// (with `/v1/traces` added), then `http://localhost:4318/v1/traces`.
    /// Headers and timeout come from `OTEL_EXPORTER_OTLP_(TRACES_)HEADERS`
    /// and `..._TIMEOUT`.
    pub endpoint: Option<String>,
    /// `service.name` of the spans; `OTEL_SERVICE_NAME` wins when set.
    pub service_name: String,
    /// Share of traces kept, 0.0 to 1.0; a task whose caller sent a sampled
    /// `traceparent` is kept whatever this says (parent-based).
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            enabled: false,
            endpoint: None,
            service_name: "gatewayd".into(),
            sample_ratio: 1.0,
        }
    }
}
