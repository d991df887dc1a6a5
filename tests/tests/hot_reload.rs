//! Hot reload: plugins replaced, removed and added while the daemon serves,
//! with nothing lost; broken files never replace a working version.

use integration_tests::*;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(60);

/// Replaces `dest` the way a careful deploy does: write aside, rename over.
fn install(plugin: &str, dest: &Path) -> anyhow::Result<()> {
    let tmp = dest.with_extension("wasm.tmp");
    std::fs::copy(built_plugins().join(format!("{plugin}.wasm")), &tmp)?;
    std::fs::rename(&tmp, dest)?;
    Ok(())
}

/// The plugin version stamped on a task's events, checked to be the same
/// on all of them, and the streamed text.
fn version_and_text(events: &[Value]) -> (String, String) {
    let versions: std::collections::BTreeSet<&str> = events
        .iter()
        .map(|e| e["metadata"]["plugin_version"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(versions.len(), 1, "one version per task: {events:#?}");
    let text = events
        .iter()
        .filter(|e| e["event_type"] == "answerDelta")
        .map(delta_content)
        .collect();
    (versions.into_iter().next().unwrap().to_owned(), text)
}

async fn is_served_by(
    conn: &mut redis::aio::MultiplexedConnection,
    capability: &str,
    worker_id: &str,
) -> anyhow::Result<bool> {
    Ok(redis::cmd("SISMEMBER")
        .arg(format!(
            "byai_gateway:registry:capability:workers:{capability}"
        ))
        .arg(worker_id)
        .query_async(conn)
        .await?)
}

async fn wait_served(bed: &TestBed, capability: &str, served: bool) -> anyhow::Result<()> {
    wait_for(
        &format!("{capability} served = {served}"),
        LONG,
        || {
            let mut conn = bed.conn.clone();
            let worker = bed.daemon.worker_id.clone();
            async move { Ok((is_served_by(&mut conn, capability, &worker).await? == served).then_some(())) }
        },
    )
    .await
}

/// Sends one echo task and returns (version, text) once it completed.
async fn echo_once(bed: &mut TestBed, text: &str) -> anyhow::Result<(String, String)> {
    let sent = send_ask(&mut bed.conn, "echo", text).await?;
    let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    Ok(version_and_text(&events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_replaced_under_load_loses_no_task() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |c| c.plugins.reload_debounce_ms = 50).await?;
    let echo_path = bed.plugins.path().join("echo.wasm");

    // Before the swap: the old version.
    for i in 0..20 {
        let (version, text) = echo_once(&mut bed, &format!("before {i}")).await?;
        assert_eq!((version.as_str(), text), ("0.1.0", format!("before {i}")));
    }

    // A steady stream of tasks while the new version is swapped in.
    let sent_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = sent_so_far.clone();
    let sender_conn = bed.conn.clone();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let sender = tokio::spawn(async move {
        let mut conn = sender_conn;
        let mut sent = Vec::new();
        let mut ticker = tokio::time::interval(Duration::from_millis(3));
        while !*stop_rx.borrow_and_update() {
            ticker.tick().await;
            sent.push(send_ask(&mut conn, "echo", &format!("during {}", sent.len())).await?);
            counter.store(sent.len(), std::sync::atomic::Ordering::SeqCst);
        }
        anyhow::Ok(sent)
    });
    let count = || sent_so_far.load(std::sync::atomic::Ordering::SeqCst);
    wait_for("the stream under way", LONG, || async {
        Ok((count() >= 40).then_some(()))
    })
    .await?;
    install("echo-v2", &echo_path)?;
    // Once a task sent now reports the new version, the swap has happened:
    // every task the stream sends after that must run on it.
    wait_for("the new version serving", LONG, || {
        let mut conn = bed.conn.clone();
        async move {
            let sent = send_ask(&mut conn, "echo", "probe").await?;
            let events = events_until_terminal(&mut conn, &sent.session_id, LONG).await?;
            Ok((version_and_text(&events).0 == "0.2.0").then_some(()))
        }
    })
    .await?;
    let swapped_before = count();
    wait_for("more tasks after the swap", LONG, || async {
        Ok((count() >= swapped_before + 30).then_some(()))
    })
    .await?;
    stop_tx.send(true)?;
    let sent = sender.await??;

    let mut versions = std::collections::BTreeMap::<String, usize>::new();
    for (index, task) in sent.iter().enumerate() {
        let events = events_until_terminal(&mut bed.conn, &task.session_id, LONG).await?;
        assert_eq!(
            delta_content(events.last().unwrap()),
            "COMPLETED",
            "task {index}"
        );
        let (version, text) = version_and_text(&events);
        let expected = match version.as_str() {
            "0.1.0" => format!("during {index}"),
            "0.2.0" => format!("v2: during {index}"),
            other => panic!("unknown version {other}"),
        };
        assert_eq!(text, expected, "task {index} ran one version throughout");
        if index >= swapped_before {
            assert_eq!(version, "0.2.0", "task {index} was sent after the swap");
        }
        *versions.entry(version).or_default() += 1;
    }
    assert!(versions["0.2.0"] >= 30, "{versions:?}");
    wait_all_acked(&bed.conn, "byai_gateway:ctrl:capability:echo", LONG).await?;
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_plugin_leaves_the_registry_and_comes_back() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo", "tools"], "echo", |c| {
        c.plugins.reload_debounce_ms = 50
    })
    .await?;
    let echo_path = bed.plugins.path().join("echo.wasm");
    std::fs::remove_file(&echo_path)?;
    wait_served(&bed, "echo", false).await?;
    let capabilities: Vec<String> = redis::cmd("SMEMBERS")
        .arg(format!(
            "byai_gateway:registry:worker:capabilities:{}",
            bed.daemon.worker_id
        ))
        .query_async(&mut bed.conn)
        .await?;
    assert_eq!(capabilities, ["tools"]);

    // Queued while nobody serves echo; served once it is back.
    let sent = send_ask(&mut bed.conn, "echo", "are you back?").await?;
    install("echo", &echo_path)?;
    wait_served(&bed, "echo", true).await?;
    let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
    assert_eq!(
        version_and_text(&events),
        ("0.1.0".into(), "are you back?".into())
    );
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_file_never_replaces_a_working_version() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["echo"], "echo", |c| c.plugins.reload_debounce_ms = 50).await?;
    let dir = bed.plugins.path().to_owned();

    // A copy cut short, written in place: it does not compile.
    let v2 = std::fs::read(built_plugins().join("echo-v2.wasm"))?;
    std::fs::write(dir.join("echo.wasm"), &v2[..v2.len() / 2])?;
    // Adding another plugin afterwards proves the directory was scanned
    // with the truncated file in it.
    install("tools", &dir.join("tools.wasm"))?;
    wait_served(&bed, "tools", true).await?;
    assert_eq!(
        echo_once(&mut bed, "still here").await?,
        ("0.1.0".into(), "still here".into())
    );

    // A file that is not a component at all.
    std::fs::write(dir.join("junk.wasm"), b"this is not WebAssembly")?;
    install("researcher", &dir.join("researcher.wasm"))?;
    wait_served(&bed, "researcher", true).await?;
    assert_eq!(
        echo_once(&mut bed, "and here").await?,
        ("0.1.0".into(), "and here".into())
    );

    // The copy completes: now the new version takes over.
    std::fs::write(dir.join("echo.wasm"), &v2)?;
    wait_for("echo 0.2.0 serving", LONG, || {
        let mut conn = bed.conn.clone();
        async move {
            let sent = send_ask(&mut conn, "echo", "new").await?;
            let events = events_until_terminal(&mut conn, &sent.session_id, LONG).await?;
            Ok((version_and_text(&events).0 == "0.2.0").then_some(()))
        }
    })
    .await?;
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compiled_plugins_are_cached_across_restarts() -> anyhow::Result<()> {
    let cache = tempfile::tempdir()?;
    let limits = byclaw_sandbox::Limits {
        memory_bytes: 64 << 20,
        deadline: Duration::from_secs(5),
        max_event_bytes: 1 << 20,
        max_tool_bytes: 1 << 20,
        guest_log: Default::default(),
        memory_budget_bytes: 0,
        guest_threads: 0,
    };
    let path = built_plugins().join("planner.wasm");
    let bytes = std::fs::read(&path)?;
    let load = || async {
        // A new engine each time, as after a restart.
        let sandbox =
            byclaw_sandbox::Sandbox::with_compile_cache(limits.clone(), 2, Some(cache.path()))?;
        anyhow::Ok(sandbox.load(path.clone(), &bytes).await?)
    };
    let first = load().await?;
    assert!(!first.from_cache);
    let artifacts: Vec<_> = std::fs::read_dir(cache.path())?.collect::<Result<_, _>>()?;
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    let second = load().await?;
    assert!(second.from_cache);
    assert_eq!(second.manifest.id, "planner");

    // A damaged artifact is not trusted: compiled again and replaced.
    std::fs::write(artifacts[0].path(), b"garbage")?;
    let third = load().await?;
    assert!(!third.from_cache);
    assert!(load().await?.from_cache);

    // A directory other users may write to is not used at all.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(0o777))?;
    let fixed = load().await?;
    assert!(
        fixed.from_cache,
        "the mode was tightened to 0700 and the cache kept"
    );
    let mode = std::fs::metadata(cache.path())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700);
    Ok(())
}
