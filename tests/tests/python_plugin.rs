//! An agent written in Python, built into a component with componentize-py,
//! runs in gatewayd like a Rust one.

use integration_tests::*;
use serde_json::json;
use std::path::Path;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_componentize_py_agent_serves_tasks() -> anyhow::Result<()> {
    let python = python_venv().await?;
    let componentize = Path::new(&python).with_file_name("componentize-py");
    // Build in a scratch directory so nothing is written into the repository.
    let build = tempfile::tempdir()?;
    std::fs::copy(
        repo_root().join("plugins/python-echo/app.py"),
        build.path().join("app.py"),
    )?;
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join("python-echo.wasm");
    let out = tokio::process::Command::new(&componentize)
        .current_dir(build.path())
        .arg("-d")
        .arg(repo_root().join("wit"))
        .args(["-w", "agent", "componentize", "app", "-o"])
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "componentize-py failed: {}",
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
