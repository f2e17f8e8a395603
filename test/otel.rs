//! OpenTelemetry traces on real processes: the `hivemind` binary exports its spans over
//! OTLP/gRPC to a collector run by the test (an `opentelemetry.proto.collector.trace.v1`
//! TraceService on loopback, from `opentelemetry-proto`'s generated server), and
//!
//! - a call carrying a W3C `traceparent` gives a span of that trace, child of that span, with
//!   the call's domain, descriptor count, outcome and strategy;
//! - `sampling_ratio: 0` traces no call without a parent while a sampled parent still wins,
//!   and the spans queued at SIGTERM are flushed before the process exits;
//! - behind a real Envoy whose OpenTelemetry tracer exports to the same collector, hivemind's
//!   span sits inside Envoy's trace, child of the span Envoy made for the rate limit call.
//!
//! Every wait polls the collector, bounded by [`SPAN_WAIT`].

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hivemind::proto::{
    DescriptorEntry, RateLimitDescriptor, RateLimitRequest, RateLimitResponse,
    RateLimitServiceClient,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use support::{example_envoy_config, free_port, http_request, Envoy, Server};

/// How long a span may take to reach the collector: hivemind's batch delay is 5 s, Envoy's
/// flush interval is set to 200 ms below.
const SPAN_WAIT: Duration = Duration::from_secs(20);

const RULES: &str = r#"
domain: otel
descriptors:
  - key: user
    rate_limit: { unit: minute, requests_per_unit: 1 }
"#;

/// One exported span and the `service.name` of the resource it came with.
#[derive(Debug, Clone)]
struct Received {
    /// `service.name` of the exporting process.
    service: String,
    /// The span as exported.
    span: Span,
}

impl Received {
    fn trace_id(&self) -> String {
        hex(&self.span.trace_id)
    }

    fn span_id(&self) -> String {
        hex(&self.span.span_id)
    }

    fn parent_span_id(&self) -> String {
        hex(&self.span.parent_span_id)
    }

    /// A string or integer attribute, as text.
    fn attribute(&self, key: &str) -> Option<String> {
        value_of(&self.span.attributes, key)
    }
}

fn value_of(attributes: &[KeyValue], key: &str) -> Option<String> {
    let value = attributes.iter().find(|kv| kv.key == key)?.value.as_ref()?;
    match value.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/gRPC trace collector on 127.0.0.1, keeping every span it is sent.
struct Collector {
    /// Where exporters send (`http://ADDR`).
    addr: SocketAddr,
    /// Every span received so far, in arrival order.
    spans: Arc<Mutex<Vec<Received>>>,
    /// The serving task; aborted on drop.
    task: tokio::task::JoinHandle<()>,
}

/// The TraceService half of [`Collector`].
struct Sink(Arc<Mutex<Vec<Received>>>);

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.0.lock().unwrap();
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .as_ref()
                .and_then(|r| value_of(&r.attributes, "service.name"))
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    spans.push(Received {
                        service: service.clone(),
                        span,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl Collector {
    /// Binds 127.0.0.1:0 and serves on the current runtime.
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the collector");
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let server = tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Sink(spans.clone())))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
        let task = tokio::spawn(async move {
            server.await.expect("collector serving");
        });
        Collector { addr, spans, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn received(&self) -> Vec<Received> {
        self.spans.lock().unwrap().clone()
    }

    /// Polls until `done` holds for the spans received, at most [`SPAN_WAIT`]; panics with
    /// what arrived and `context()` (the processes' logs) otherwise.
    async fn wait_until(
        &self,
        what: &str,
        done: impl Fn(&[Received]) -> bool,
        context: impl Fn() -> String,
    ) -> Vec<Received> {
        let deadline = Instant::now() + SPAN_WAIT;
        loop {
            let spans = self.received();
            if done(&spans) {
                return spans;
            }
            if Instant::now() > deadline {
                panic!(
                    "{what}: not received within {SPAN_WAIT:?}\nspans: {spans:#?}\n{}",
                    context()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// hivemind (standalone, [`RULES`]) with `telemetry` settings `yaml` pointed at `collector`.
fn hivemind(collector: &Collector, rules: &str, telemetry: &str) -> (Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let settings = dir.path().join("hivemind.yaml");
    let yaml = format!(
        "telemetry:\n  otlp_endpoint: {}\n{telemetry}",
        collector.endpoint()
    );
    std::fs::write(&settings, yaml).expect("write settings");
    let server = Server::with_rules(
        rules,
        &[
            "--strategy",
            "standalone",
            "--settings",
            settings.to_str().expect("utf-8 temp path"),
        ],
    );
    (server, dir)
}

fn call(user: &str) -> RateLimitRequest {
    RateLimitRequest {
        domain: "otel".into(),
        descriptors: vec![RateLimitDescriptor {
            entries: vec![DescriptorEntry {
                key: "user".into(),
                value: user.into(),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One ShouldRateLimit call with the given `traceparent` metadata, if any.
async fn ask(
    server: &Server,
    request: RateLimitRequest,
    traceparent: Option<&str>,
) -> Result<RateLimitResponse, tonic::Status> {
    let mut client = RateLimitServiceClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .expect("connect to hivemind");
    let mut request = tonic::Request::new(request);
    if let Some(traceparent) = traceparent {
        request
            .metadata_mut()
            .insert("traceparent", traceparent.parse().unwrap());
    }
    client
        .should_rate_limit(request)
        .await
        .map(tonic::Response::into_inner)
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn traceparent(trace: &str, parent: &str, sampled: bool) -> String {
    format!("00-{trace}-{parent}-{}", if sampled { "01" } else { "00" })
}

/// Spans exported by hivemind (the server spans of the rate limit service).
fn hivemind_spans(spans: &[Received]) -> Vec<&Received> {
    spans
        .iter()
        .filter(|s| s.attribute("rpc.method").as_deref() == Some("ShouldRateLimit"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_with_a_traceparent_is_a_child_of_that_span_with_its_attributes() {
    let collector = Collector::start().await;
    let (server, _settings) = hivemind(&collector, RULES, "");
    let parents = ["00f067aa0ba902b7", "00f067aa0ba902b8", "00f067aa0ba902b9"];
    let first = ask(
        &server,
        call("alice"),
        Some(&traceparent(TRACE, parents[0], true)),
    )
    .await
    .expect("first call");
    assert_eq!(first.overall_code, hivemind::proto::Code::Ok as i32);
    let second = ask(
        &server,
        call("alice"),
        Some(&traceparent(TRACE, parents[1], true)),
    )
    .await
    .expect("second call");
    assert_eq!(second.overall_code, hivemind::proto::Code::OverLimit as i32);
    let invalid = RateLimitRequest {
        domain: "otel".into(),
        ..Default::default()
    };
    let refused = ask(
        &server,
        invalid,
        Some(&traceparent(TRACE, parents[2], true)),
    )
    .await
    .expect_err("a call without descriptors is refused");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);

    let spans = collector
        .wait_until(
            "hivemind's three spans",
            |spans| hivemind_spans(spans).len() >= 3,
            || server.stderr(),
        )
        .await;
    let spans = hivemind_spans(&spans);
    assert_eq!(spans.len(), 3, "one span per call: {spans:#?}");
    for (parent, outcome, descriptors) in [
        (parents[0], "ok", "1"),
        (parents[1], "over_limit", "1"),
        (parents[2], "invalid_request", "0"),
    ] {
        let span = spans
            .iter()
            .find(|s| s.parent_span_id() == parent)
            .unwrap_or_else(|| panic!("no span with parent {parent}: {spans:#?}"));
        assert_eq!(span.trace_id(), TRACE, "{span:#?}");
        assert_ne!(span.span_id(), parent, "a span of its own: {span:#?}");
        assert_eq!(span.service, "hivemind");
        assert_eq!(
            span.span.name,
            "envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
        );
        assert_eq!(span.span.kind, SpanKind::Server as i32);
        assert_eq!(span.attribute("ratelimit.domain").as_deref(), Some("otel"));
        assert_eq!(
            span.attribute("ratelimit.descriptors").as_deref(),
            Some(descriptors)
        );
        assert_eq!(
            span.attribute("ratelimit.strategy").as_deref(),
            Some("standalone")
        );
        assert_eq!(
            span.attribute("ratelimit.outcome").as_deref(),
            Some(outcome),
            "{span:#?}"
        );
        let status = span.span.status.as_ref().map_or(0, |s| s.code);
        if outcome == "invalid_request" {
            assert_eq!(status, StatusCode::Error as i32, "{span:#?}");
        } else {
            assert_ne!(status, StatusCode::Error as i32, "{span:#?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ratio_zero_traces_no_root_call_while_a_sampled_parent_wins_and_shutdown_flushes() {
    let collector = Collector::start().await;
    let (server, _settings) = hivemind(
        &collector,
        RULES,
        "  sampling_ratio: 0\n  service_name: rls-under-test\n",
    );
    let unsampled_parent = "1111111111111111";
    let sampled_parent = "2222222222222222";
    // No parent, a malformed one, an unsampled parent: none is traced.
    ask(&server, call("root"), None).await.expect("root call");
    ask(&server, call("garbled"), Some("00-not-a-trace-context"))
        .await
        .expect("a malformed traceparent is no error");
    ask(
        &server,
        call("unsampled"),
        Some(&traceparent(TRACE, unsampled_parent, false)),
    )
    .await
    .expect("unsampled call");
    // Last: a sampled parent, traced whatever the ratio.
    ask(
        &server,
        call("sampled"),
        Some(&traceparent(TRACE, sampled_parent, true)),
    )
    .await
    .expect("sampled call");
    // SIGTERM before the batch delay: the span is exported by the flush at shutdown.
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(terminated.success());

    let spans = collector
        .wait_until(
            "the sampled call's span, flushed at shutdown",
            |spans| {
                hivemind_spans(spans)
                    .iter()
                    .any(|s| s.parent_span_id() == sampled_parent)
            },
            || server.stderr(),
        )
        .await;
    // Spans leave in the order they ended: the earlier calls would be in the same export.
    let spans = hivemind_spans(&spans);
    assert_eq!(spans.len(), 1, "only the sampled call: {spans:#?}");
    assert_eq!(spans[0].trace_id(), TRACE);
    assert_eq!(spans[0].service, "rls-under-test");
    assert_eq!(
        spans[0].attribute("ratelimit.outcome").as_deref(),
        Some("ok")
    );
}

/// Envoy's tracing for the ingress listener: the OpenTelemetry tracer, every request sampled,
/// exported to the `otlp` cluster.
fn envoy_tracing() -> &'static str {
    r#"                tracing:
                  random_sampling: { value: 100 }
                  provider:
                    name: envoy.tracers.opentelemetry
                    typed_config:
                      "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                      service_name: envoy-ingress
                      grpc_service:
                        envoy_grpc: { cluster_name: otlp }
                        timeout: 1s
"#
}

/// `config/envoy.yaml` in front of `rls`, traced into the collector at `otlp`.
fn traced_envoy_config(rls: SocketAddr, otlp: SocketAddr) -> String {
    let config = example_envoy_config(rls, free_port());
    let hcm = "                stat_prefix: ingress\n";
    assert!(config.contains(hcm), "config/envoy.yaml's ingress changed");
    let mut config = config.replacen(hcm, &format!("{hcm}{}", envoy_tracing()), 1);
    assert!(
        config.trim_end().ends_with('}'),
        "config/envoy.yaml no longer ends with its clusters"
    );
    config.push_str(&format!(
        r#"
    - name: otlp
      type: STATIC
      connect_timeout: 1s
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {{}}
      load_assignment:
        cluster_name: otlp
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address: {{ address: {}, port_value: {} }}

# Flush spans as soon as there is one, instead of every 5 s.
layered_runtime:
  layers:
    - name: static
      static_layer:
        tracing.opentelemetry.flush_interval_ms: 200
        tracing.opentelemetry.min_flush_spans: 1
"#,
        otlp.ip(),
        otlp.port()
    ));
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_envoy_hivemind_s_span_joins_envoy_s_trace() {
    let collector = Collector::start().await;
    let rules = "domain: hivemind\ndescriptors:\n  - key: api_key\n    rate_limit: { unit: minute, requests_per_unit: 100 }\n";
    // Ratio 0: only Envoy's sampled flag can make hivemind trace these calls.
    let (server, _settings) = hivemind(&collector, rules, "  sampling_ratio: 0\n");
    let envoy = Envoy::start(&traced_envoy_config(server.grpc_addr, collector.addr));
    let ingress = envoy.listener_addr("ingress");
    // Envoy connects to hivemind lazily: retry (bounded) until a request went through it.
    let mut through = false;
    for _ in 0..10 {
        let response = http_request(ingress, "GET", "/keyed", &[("x-api-key", "traced")], b"")
            .expect("request through envoy");
        if response.status == 200 && response.header("x-ratelimit-limit").is_some() {
            through = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let logs = || {
        format!(
            "--- envoy ---\n{}\n--- hivemind ---\n{}",
            envoy.log(),
            server.stderr()
        )
    };
    assert!(through, "no request went through hivemind\n{}", logs());

    let spans = collector
        .wait_until(
            "a hivemind span whose parent Envoy exported, in the trace of Envoy's ingress span",
            |spans| joined(spans).is_some(),
            logs,
        )
        .await;
    let (span, parent, ingress_span) = joined(&spans).expect("found above");
    assert_eq!(span.trace_id(), parent.trace_id(), "{span:#?}\n{parent:#?}");
    assert_eq!(span.trace_id(), ingress_span.trace_id());
    assert_eq!(span.service, "hivemind");
    assert_eq!(
        span.attribute("ratelimit.domain").as_deref(),
        Some("hivemind")
    );
    assert_eq!(span.attribute("ratelimit.outcome").as_deref(), Some("ok"));
    assert_eq!(span.span.kind, SpanKind::Server as i32);
}

/// hivemind's span, the Envoy span it is the child of (the client side of the rate limit
/// call), and Envoy's ingress (server) span of the same trace, once all three have arrived.
fn joined(spans: &[Received]) -> Option<(&Received, &Received, &Received)> {
    let envoy = |s: &&Received| s.service == "envoy-ingress";
    hivemind_spans(spans).into_iter().find_map(|ours| {
        let parent = spans.iter().filter(envoy).find(|e| {
            e.span_id() == ours.parent_span_id() && e.span.kind == SpanKind::Client as i32
        })?;
        let ingress = spans
            .iter()
            .filter(envoy)
            .find(|e| e.trace_id() == ours.trace_id() && e.span.kind == SpanKind::Server as i32)?;
        Some((ours, parent, ingress))
    })
}
