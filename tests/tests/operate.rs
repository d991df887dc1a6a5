//! The operator's HTTP listener: metrics reflect the tasks just run,
//! `/readyz` follows Redis, `/healthz` answers.

use integration_tests::*;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The value of the series `name{labels}` in an exposition, if present.
fn series(text: &str, name_and_labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}

/// The operator listener's address, once it is bound (the daemon binds it
/// after it registered, which is what `TestBed::start` waits for).
async fn http_addr(bed: &TestBed) -> anyhow::Result<std::net::SocketAddr> {
    wait_for("the operator listener", Duration::from_secs(30), || {
        let bound = bed.daemon.stats.http_addr.get().copied();
        async move { Ok(bound) }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_the_tasks_just_run() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo", "faults"], "echo", |_| {}).await?;
    let addr = http_addr(&bed).await?;
    let http = reqwest::Client::new();
    let mut conn = bed.conn.clone();

    for text in ["one", "two", "three"] {
        let sent = send_ask(&mut conn, "echo", text).await?;
        events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;
    }
    let failing = send_ask(&mut conn, "fault-error", "x").await?;
    events_until_terminal(&mut conn, &failing.session_id, WAIT).await?;

    let response = http.get(format!("http://{addr}/metrics")).send().await?;
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"].to_str()?.to_owned();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = response.text().await?;
    let value = |series_name: &str| {
        series(&text, series_name).unwrap_or_else(|| panic!("{series_name} missing in:\n{text}"))
    };
    assert_eq!(
        value(r#"gatewayd_tasks_started_total{agent_type="echo",plugin="echo@0.1.0"}"#),
        3.0
    );
    assert_eq!(
        value(
            r#"gatewayd_tasks_finished_total{agent_type="echo",plugin="echo@0.1.0",outcome="completed"}"#
        ),
        3.0
    );
    assert_eq!(
        value(
            r#"gatewayd_tasks_finished_total{agent_type="fault-error",plugin="faults@0.1.0",outcome="failed"}"#
        ),
        1.0
    );
    assert_eq!(
        value(r#"gatewayd_task_duration_seconds_count{agent_type="echo",outcome="completed"}"#),
        3.0
    );
    assert_eq!(value("gatewayd_tasks_in_flight"), 0.0);
    // echo streams three chunks per task.
    assert_eq!(
        value(r#"gatewayd_host_calls_total{import="emit.emit-chunk"}"#),
        9.0
    );
    assert_eq!(
        value(r#"gatewayd_plugin_loads_total{result="loaded"}"#),
        2.0
    );
    // Everything read was acknowledged.
    let echo_stream = r#"{stream="byai_gateway:ctrl:capability:echo"}"#;
    assert_eq!(value(&format!("gatewayd_stream_pending{echo_stream}")), 0.0);
    assert_eq!(value(&format!("gatewayd_stream_lag{echo_stream}")), 0.0);
    assert!(!text.contains("msg-"), "no message ids as labels");
    assert!(text.trim_end().ends_with("# EOF"));

    let health = http.get(format!("http://{addr}/healthz")).send().await?;
    assert_eq!(health.status(), 200);
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_redis_and_draining() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo", "faults"], "echo", |_| {}).await?;
    let addr = http_addr(&bed).await?;
    let http = reqwest::Client::new();
    let ready = async |http: &reqwest::Client| -> anyhow::Result<(u16, serde_json::Value)> {
        let response = http.get(format!("http://{addr}/readyz")).send().await?;
        Ok((response.status().as_u16(), response.json().await?))
    };
    assert_eq!(ready(&http).await?.0, 200);

    bed.redis.kill();
    let reasons = wait_for("/readyz to say not ready", WAIT, || async {
        let (status, body) = ready(&http).await?;
        Ok((status == 503).then_some(body))
    })
    .await?;
    assert_eq!(reasons["ready"], false);
    assert!(
        reasons["reasons"][0]
            .as_str()
            .unwrap_or_default()
            .contains("redis"),
        "{reasons}"
    );
    // /healthz only says the process answers.
    let health = http.get(format!("http://{addr}/healthz")).send().await?;
    assert_eq!(health.status(), 200);

    bed.redis.start_again().await?;
    wait_for("/readyz to say ready again", WAIT, || async {
        Ok((ready(&http).await?.0 == 200).then_some(()))
    })
    .await?;
    // After the restart the daemon serves again.
    let mut conn = bed.redis.connect().await?;
    let sent = send_ask(&mut conn, "echo", "back").await?;
    events_until_terminal(&mut conn, &sent.session_id, WAIT).await?;

    // Draining: a slow task keeps the daemon in its grace period.
    let slow = send_ask(&mut conn, "slow", "3000").await?;
    wait_for("the slow task to run", WAIT, || {
        let mut conn = conn.clone();
        let session = slow.session_id.clone();
        async move { Ok((!all_events(&mut conn, &session).await?.is_empty()).then_some(())) }
    })
    .await?;
    bed.daemon.begin_stop();
    let body = wait_for("/readyz to say draining", WAIT, || async {
        let (status, body) = ready(&http).await?;
        Ok((status == 503).then_some(body))
    })
    .await?;
    assert!(
        body["reasons"][0]
            .as_str()
            .unwrap_or_default()
            .starts_with("draining"),
        "{body}"
    );
    bed.daemon.stop().await?;
    let events = all_events(&mut conn, &slow.session_id).await?;
    assert_eq!(
        delta_content(events.last().unwrap()),
        "COMPLETED",
        "finished while draining"
    );
    Ok(())
}
