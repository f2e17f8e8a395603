//! Logs and traces. Logs: text or JSON lines on stderr, filtered by the settings' level or
//! `RUST_LOG`. Traces: when `telemetry.otlp_endpoint` is set, one span per `ShouldRateLimit`
//! call ([`request_span`]), joined to the caller's W3C trace context and exported over
//! OTLP/gRPC in batches from the main runtime.
//!
//! Without an endpoint no OpenTelemetry layer is installed and the request span's callsite is
//! disabled for the log layer, so a call pays one cached interest check for it.

use std::io::IsTerminal;
use std::sync::mpsc;
use std::time::Duration;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    span_processor_with_async_runtime::BatchSpanProcessor, BatchConfigBuilder, Sampler,
    SdkTracerProvider,
};
use opentelemetry_sdk::Resource;
use tonic::metadata::{KeyRef, MetadataMap};
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, LogSettings, TelemetrySettings};

/// The target of [`request_span`]: the only spans exported, and never shown in logs.
pub const SPAN_TARGET: &str = "hivemind::trace";

/// The exported span's name, as OpenTelemetry's RPC conventions spell a gRPC method.
const SPAN_NAME: &str = "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";

/// The longest domain recorded on a span, in bytes (the domain comes from the network).
const MAX_DOMAIN_ATTRIBUTE: usize = 128;

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from `telemetry.otlp_endpoint`.
    #[error("telemetry.otlp_endpoint: cannot build the OTLP exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
}

/// The running trace export, if any. Dropping it flushes the spans still queued (waiting at
/// most `telemetry.export_timeout` plus a second) and stops the exporter; drop it while the
/// runtime it started on is still alive.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// The tracer provider feeding the batch exporter; `None` when no endpoint is set.
    provider: Option<SdkTracerProvider>,
    /// How long the final flush may take.
    flush_timeout: Duration,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        let Some(provider) = self.provider.take() else {
            return;
        };
        // The batch processor's shutdown blocks until its task on the runtime has exported the
        // queue; waiting for it on another thread keeps the exit bounded whatever the collector
        // does.
        let (done_tx, done_rx) = mpsc::channel();
        let flush = std::thread::Builder::new()
            .name("otlp-flush".into())
            .spawn(move || {
                let _ = done_tx.send(provider.shutdown());
            });
        if flush.is_err() {
            return;
        }
        match done_rx.recv_timeout(self.flush_timeout) {
            Ok(Ok(())) => tracing::debug!("trace export flushed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "trace export not flushed at shutdown"),
            Err(_) => tracing::warn!(
                timeout = ?self.flush_timeout,
                "trace export flush timed out at shutdown; queued spans dropped"
            ),
        }
    }
}

/// Installs the global subscriber: the log layer, and the OpenTelemetry layer when
/// `telemetry.otlp_endpoint` is set (then it must be called inside the tokio runtime that
/// will run the batch export). Later calls (as in tests) install nothing and export nothing.
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) -> Result<Telemetry, TelemetryError> {
    let mut filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    // The request span is for traces only: formatting it into every log line would cost each
    // call, and with no exporter this keeps its callsite disabled altogether.
    if let Ok(off) = format!("{SPAN_TARGET}=off").parse() {
        filter = filter.add_directive(off);
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colours only for a person at a terminal, never in files or log collectors.
        .with_ansi(std::io::stderr().is_terminal());
    let fmt = match log.format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    }
    .with_filter(filter);

    let Some(endpoint) = &telemetry.otlp_endpoint else {
        let _ = tracing_subscriber::registry().with(fmt).try_init();
        return Ok(Telemetry::default());
    };
    let provider = tracer_provider(endpoint, telemetry)?;
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("hivemind"))
        // No busy/idle clock reads per poll, no thread or source attributes, and no
        // OpenTelemetry context made current on each poll: nothing inside the call reads it.
        .with_tracked_inactivity(false)
        .with_context_activation(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_filter(Targets::new().with_target(SPAN_TARGET, LevelFilter::INFO));
    if tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init()
        .is_err()
    {
        // Another subscriber is installed: nothing would reach this provider.
        return Ok(Telemetry::default());
    }
    // The endpoint holds no credentials: settings refuse userinfo.
    tracing::info!(
        %endpoint,
        sampling_ratio = telemetry.sampling_ratio,
        service = %telemetry.service_name,
        "exporting traces over otlp"
    );
    Ok(Telemetry {
        provider: Some(provider),
        flush_timeout: telemetry.export_timeout + Duration::from_secs(1),
    })
}

/// The provider: ParentBased(TraceIdRatioBased) sampling, a batch processor on the current
/// tokio runtime, and an OTLP/gRPC exporter to `endpoint`.
fn tracer_provider(
    endpoint: &str,
    telemetry: &TelemetrySettings,
) -> Result<SdkTracerProvider, TelemetryError> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(telemetry.export_timeout);
    if endpoint.starts_with("https://") {
        // The system's CA certificates, as any other client on the host.
        exporter =
            exporter.with_tls_config(tonic::transport::ClientTlsConfig::new().with_native_roots());
    }
    let exporter = exporter.build()?;
    let batches = BatchConfigBuilder::default()
        .with_max_export_timeout(telemetry.export_timeout)
        .build();
    let processor = BatchSpanProcessor::builder(exporter, opentelemetry_sdk::runtime::Tokio)
        .with_batch_config(batches)
        .build();
    let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
        telemetry.sampling_ratio,
    )));
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_sampler(sampler)
        .with_resource(
            Resource::builder()
                .with_service_name(telemetry.service_name.clone())
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build())
}

/// The span of one `ShouldRateLimit` call, child of the W3C trace context (`traceparent`,
/// `tracestate`) in its gRPC metadata; a missing or malformed context makes it a root span.
/// Disabled (and nothing is read) when no exporter is installed, and when the caller's context
/// says "not sampled" (parent-based sampling would drop the span anyway, so it is never built:
/// Envoy sampling 1% of requests costs the other 99% one header parse). Record the outcome with
/// [`record_outcome`].
pub fn request_span(
    metadata: &MetadataMap,
    domain: &str,
    descriptors: usize,
    strategy: &'static str,
) -> Span {
    if !tracing::span_enabled!(target: SPAN_TARGET, tracing::Level::INFO) {
        return Span::none();
    }
    let parent = TraceContextPropagator::new().extract(&MetadataExtractor(metadata));
    {
        let context = parent.span();
        let context = context.span_context();
        if context.is_valid() && !context.is_sampled() {
            return Span::none();
        }
    }
    // Field values are evaluated only when the span is enabled.
    let span = tracing::info_span!(
        target: SPAN_TARGET,
        "should_rate_limit",
        otel.name = SPAN_NAME,
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = "envoy.service.ratelimit.v3.RateLimitService",
        rpc.method = "ShouldRateLimit",
        ratelimit.domain = bounded(domain, MAX_DOMAIN_ATTRIBUTE),
        ratelimit.descriptors = descriptors,
        ratelimit.strategy = strategy,
        ratelimit.outcome = tracing::field::Empty,
    );
    // Fails only when the span is disabled or already started, neither of which holds.
    let _ = span.set_parent(parent);
    span
}

/// Records how a call ended on its [`request_span`]: `ok`, `over_limit`, or an error kind
/// (which also marks the span's status as an error).
pub fn record_outcome(span: &Span, outcome: &'static str, error: bool) {
    span.record("ratelimit.outcome", outcome);
    if error {
        span.record("otel.status_code", "error");
    }
}

/// `text` cut to at most `max` bytes at a character boundary.
fn bounded(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Reads W3C trace context keys from gRPC request metadata (ASCII values only).
struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                KeyRef::Ascii(key) => Some(key.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn extracted(traceparent: &str) -> opentelemetry::trace::SpanContext {
        let mut metadata = MetadataMap::new();
        if let Ok(value) = traceparent.parse() {
            metadata.insert("traceparent", value);
        }
        TraceContextPropagator::new()
            .extract(&MetadataExtractor(&metadata))
            .span()
            .span_context()
            .clone()
    }

    #[test]
    fn a_valid_traceparent_is_the_parent_and_a_malformed_one_is_absent() {
        let good = extracted("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01");
        assert!(good.is_valid() && good.is_remote() && good.is_sampled());
        assert_eq!(
            good.trace_id().to_string(),
            "0af7651916cd43dd8448eb211c80319c"
        );
        assert_eq!(good.span_id().to_string(), "b7ad6b7169203331");
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031zz-b7ad6b7169203331-01",
            "00-ÿÿ-b7ad6b7169203331-01",
        ] {
            assert!(!extracted(bad).is_valid(), "{bad:?} was taken as a parent");
        }
    }

    #[test]
    fn a_long_domain_is_cut_at_a_character_boundary() {
        assert_eq!(bounded("short", 128), "short");
        let long = "é".repeat(100);
        let cut = bounded(&long, 7);
        assert_eq!(cut, "ééé");
    }
}
