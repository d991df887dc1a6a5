//! An agent written in Python, built into a component with componentize-py
//! (`plugins/python-echo/build.sh`), runs in gatewayd like a Rust one.

use integration_tests::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_py_agent_serves_tasks() -> anyhow::Result<()> {
    // The documented build command (componentize-py from PyPI, cached).
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join("python-echo.wasm");
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("plugins/python-echo/build.sh"))
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "building the Python agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, "python-echo").await?;
    let mut conn = redis.connect().await?;

    for text in ["hello from wasm", "second task, same plugin"] {
        let sent = send_ask(&mut conn, "python-echo", text).await?;
        let events =
            events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
        let contents: Vec<&str> = events.iter().map(delta_content).collect();
        assert_eq!(
            contents,
            ["SHOUTING", &*text.to_uppercase(), "COMPLETED"],
            "{events:#?}"
        );
        assert_eq!(
            events.last().unwrap()["metadata"]["result"],
            json!({"echo": text, "language": "python"})
        );
    }
    daemon.stop().await?;
    Ok(())
}
