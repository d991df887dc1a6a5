//! An agent written in C, built into a component with wit-bindgen's C
//! generator, Debian's clang + wasi-libc and `wasm-tools component new`
//! (`plugins/c-echo/build.sh`), runs in gatewayd like a Rust one.

use integration_tests::*;
use serde_json::json;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_c_agent_serves_tasks() -> anyhow::Result<()> {
    // The documented build command (clang from Debian, wit-bindgen and
    // wasm-tools from crates.io, all cached after the first run).
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join("c-echo.wasm");
    let out = tokio::process::Command::new("bash")
        .arg(repo_root().join("plugins/c-echo/build.sh"))
        .arg(&wasm)
        .output()
        .await?;
    anyhow::ensure!(
        out.status.success(),
        "building the C agent failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, "c-echo").await?;
    let mut conn = redis.connect().await?;

    // The second text needs every kind of JSON escape on the way in (the
    // plugin decodes the JSON string `content`) and on the way out (it
    // writes its result JSON by hand): a quote, a backslash, a newline, a
    // tab, a control character (\u0001), and non-ASCII UTF-8, which the
    // ASCII upper-casing must leave alone.
    for text in [
        "hello from c",
        "say \"hi\" \\ back\\slash\nnew line\ttab \u{1} é 你好 🦀",
    ] {
        let sent = send_ask(&mut conn, "c-echo", text).await?;
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
            json!({"echo": text, "language": "c"})
        );
        assert_eq!(events[0]["metadata"]["plugin_id"], "c-echo");
    }
    daemon.stop().await?;
    Ok(())
}
