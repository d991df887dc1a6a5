//! An agent written in JavaScript, built into a component with jco +
//! componentize-js (`plugins/js-echo/build.sh`), runs in gatewayd like a
//! Rust one.

use integration_tests::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_js_agent_serves_tasks() -> anyhow::Result<()> {
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join("js-echo.wasm");
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("plugins/js-echo/build.sh"))
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "building the JavaScript agent failed (needs node and npm): {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, "js-echo").await?;
    let mut conn = redis.connect().await?;
    for text in ["hello from javascript", "second task, 你好"] {
        let sent = send_ask(&mut conn, "js-echo", text).await?;
        let events =
            events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
        assert_eq!(states(&events), ["ECHOING", "COMPLETED"], "{events:#?}");
        let streamed: String = events
            .iter()
            .filter(|e| e["event_type"] == "answerDelta")
            .map(delta_content)
            .collect();
        assert_eq!(streamed, text);
        assert_eq!(
            events.last().unwrap()["metadata"]["result"],
            json!({"echo": text, "language": "javascript"})
        );
        assert_eq!(events[0]["metadata"]["plugin_id"], "js-echo");
    }
    daemon.stop().await?;
    Ok(())
}
