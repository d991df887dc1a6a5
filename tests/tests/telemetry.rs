//! Traces over OTLP, received by a real OTLP/HTTP endpoint in the test
//! (protobuf decoded with the OpenTelemetry protocol's own types): the
//! planner's workflow — a call-agent, a task group of three, a tool call,
//! an ask-user — across two daemons is one trace, in the wire's trace id,
//! with each host call a child of the planner's task span and each called
//! agent's task a child of the call that started it; an outbound HTTP
//! request is a span under its task with method, host and status.
//!
//! The daemons run in this process under the tracing layer `gatewayd` puts
//! beside its log when `[telemetry] enabled`, as the process's subscriber:
//! this is the only test of its binary.

use axum::body::Bytes;
use byclaw_client::Client;
use gatewayd::config::TelemetryConfig;
use integration_tests::*;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::layer::SubscriberExt as _;

const LONG: Duration = Duration::from_secs(60);

/// An OTLP/HTTP traces endpoint on its own thread and runtime (the
/// exporter's last batch is sent while the test's runtime is not running):
/// every span it was sent.
struct Receiver {
    port: u16,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    fn start() -> anyhow::Result<Self> {
        let spans = Arc::new(Mutex::new(Vec::new()));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let kept = spans.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async move {
                let app = axum::Router::new().route(
                    "/v1/traces",
                    axum::routing::post(move |body: Bytes| {
                        let kept = kept.clone();
                        async move {
                            let request = ExportTraceServiceRequest::decode(body)
                                .expect("an OTLP protobuf export request");
                            let mut spans = kept.lock().unwrap();
                            for resource in request.resource_spans {
                                for scope in resource.scope_spans {
                                    spans.extend(scope.spans);
                                }
                            }
                            (
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                        }
                    }),
                );
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                axum::serve(listener, app).await.expect("serving");
            });
        });
        Ok(Receiver { port, spans })
    }
}

fn attribute(span: &Span, key: &str) -> Option<String> {
    let value = span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        AnyValue::StringValue(text) => Some(text.clone()),
        AnyValue::IntValue(number) => Some(number.to_string()),
        AnyValue::BoolValue(flag) => Some(flag.to_string()),
        other => Some(format!("{other:?}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one span named `name` whose attribute `key` is `value`.
fn the<'s>(spans: &'s [Span], name: &str, key: &str, value: &str) -> &'s Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && attribute(s, key).as_deref() == Some(value))
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} spans with {key}={value}: {spans:#?}"
    );
    found[0]
}

/// The one span named `name` whose parent is `parent`.
fn child_of<'s>(spans: &'s [Span], name: &str, parent: &Span) -> &'s Span {
    let found: Vec<&Span> = spans
        .iter()
        .filter(|s| s.name == name && s.parent_span_id == parent.span_id)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "{name} spans under {}: {spans:#?}",
        parent.name
    );
    found[0]
}

#[test]
fn a_workflow_is_one_trace_with_each_call_under_the_task_that_made_it() -> anyhow::Result<()> {
    let receiver = Receiver::start()?;
    let config = TelemetryConfig {
        enabled: true,
        endpoint: Some(format!("http://127.0.0.1:{}/v1/traces", receiver.port)),
        ..TelemetryConfig::default()
    };
    // Built outside the runtime: the exporter's HTTP client is a blocking one.
    let (layer, telemetry) = gatewayd::telemetry::layer(&config)?;
    // The process's subscriber (this test is alone in its binary): guests
    // run on the sandbox's own runtime threads.
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let (sent, fetching) = runtime.block_on(async {
        let redis = RedisServer::start().await?;
        let mut conn = redis.connect().await?;
        let workspace = tempfile::tempdir()?;
        let (_helpers_dir, mut helpers) =
            start_planner_helpers(&redis, workspace.path(), |_| {}).await?;
        let planner_dir = plugin_dir(&["planner", "tools"]);
        let config = test_config(&redis, planner_dir.path(), workspace.path());
        let mut planner = Daemon::start(config, &redis, "planner").await?;

        let client = Client::connect(&redis.url()).await?;
        let session = format!("sess-{}", suffix());
        let sent = client
            .send("planner", &session, "traced tasks", json!({}))
            .await?;
        let task = &sent.message_id;
        prompt_event(&conn, &session, task, 1, LONG).await?;
        client
            .answer_user("planner", &session, task, "risks")
            .await?;
        let events = task_events(&mut conn, &session, task, LONG).await?;
        assert_eq!(task_result(&events).expect("a result")["focus"], "risks");
        planner.stop().await?;
        helpers.stop().await?;

        // A task that fetches a URL (the faults fixture's `fetch-ask`).
        let (port, served) = counting_http_server().await?;
        let allowed = format!("http://127.0.0.1:{port}");
        let faults_dir = plugin_dir(&["faults"]);
        let mut config = test_config(&redis, faults_dir.path(), workspace.path());
        allow_faults_to_reach(&mut config, &allowed);
        let mut faults = Daemon::start(config, &redis, "fetch-ask").await?;
        let fetching = client
            .send("fetch-ask", &session, &format!("{allowed}/once"), json!({}))
            .await?;
        prompt_event(&conn, &session, &fetching.message_id, 1, LONG).await?;
        client
            .answer_user("fetch-ask", &session, &fetching.message_id, "done")
            .await?;
        let events = task_events(&mut conn, &session, &fetching.message_id, LONG).await?;
        fetched_once(&events, &served);
        faults.stop().await?;
        anyhow::Ok((sent, fetching))
    })?;
    drop(runtime);
    // Sends the spans still buffered, and waits for the receiver's answer.
    telemetry.shutdown();

    let spans = receiver.spans.lock().unwrap().clone();
    // Two requests, two traces, each in its wire trace id.
    let (workflow, fetch): (Vec<Span>, Vec<Span>) = spans
        .into_iter()
        .partition(|span| hex(&span.trace_id) == sent.trace_id);
    assert!(
        fetch
            .iter()
            .all(|span| hex(&span.trace_id) == fetching.trace_id),
        "spans of neither trace: {fetch:#?}"
    );
    let spans = workflow;
    let task = &sent.message_id;
    let planner = the(&spans, "task", "message_id", task);
    assert_eq!(attribute(planner, "agent_type").as_deref(), Some("planner"));
    assert_eq!(attribute(planner, "plugin.id").as_deref(), Some("planner"));
    let version = attribute(planner, "plugin.version").expect("the plugin's version");
    assert_eq!(
        attribute(planner, "plugin"),
        Some(format!("planner@{version}"))
    );
    // No caller span known: its parent stands for the request, the low
    // half of the trace id.
    assert_eq!(hex(&planner.parent_span_id), sent.trace_id[16..]);

    // The translator's task under the call-agent that started it.
    let call = child_of(&spans, "call-agent", planner);
    let translator_id = format!("{task}:c1");
    assert_eq!(
        attribute(call, "child_message_id"),
        Some(translator_id.clone())
    );
    assert_eq!(
        attribute(call, "target_agent_type").as_deref(),
        Some("translator")
    );
    let translator = the(&spans, "task", "message_id", &translator_id);
    assert_eq!(translator.parent_span_id, call.span_id);

    // The three researchers under the task group.
    let group = child_of(&spans, "dispatch-group", planner);
    assert_eq!(attribute(group, "tasks").as_deref(), Some("3"));
    for n in 1..=3 {
        let researcher = the(&spans, "task", "message_id", &format!("{task}:g2.{n}"));
        assert_eq!(researcher.parent_span_id, group.span_id, "{researcher:#?}");
    }

    // The tool call and the wait for the user, under the planner's task.
    let tool = child_of(&spans, "call-tool", planner);
    assert_eq!(attribute(tool, "tool").as_deref(), Some("word_stats"));
    let asked = child_of(&spans, "ask-user", planner);
    assert!(asked.end_time_unix_nano > asked.start_time_unix_nano);
    assert!(asked.start_time_unix_nano >= planner.start_time_unix_nano);
    assert!(asked.end_time_unix_nano <= planner.end_time_unix_nano);

    // The outbound request under the task that made it, with what it was.
    let fetcher = the(&fetch, "task", "message_id", &fetching.message_id);
    let request = child_of(&fetch, "http-request", fetcher);
    assert_eq!(
        attribute(request, "http.request.method").as_deref(),
        Some("GET")
    );
    assert_eq!(
        attribute(request, "server.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        attribute(request, "http.response.status_code").as_deref(),
        Some("200")
    );
    Ok(())
}
