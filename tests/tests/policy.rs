//! Per-plugin policy from `[plugins.<id>]`: memory cap, concurrency limit,
//! configuration values; other plugins keep the daemon-wide defaults.

use byclaw_client::Client;
use gatewayd::config::PluginPolicy;
use integration_tests::*;
use serde_json::{Value, json};
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_plugin_gets_its_own_limits_and_settings() -> anyhow::Result<()> {
    let mut bed = TestBed::start(&["tools", "faults"], "tools", |config| {
        config.plugins.policy.insert(
            "tools".into(),
            PluginPolicy {
                memory_limit_mb: Some(24),
                config: [("api_key".to_owned(), "sekret".to_owned())].into(),
                ..PluginPolicy::default()
            },
        );
        config.plugins.policy.insert(
            "faults".into(),
            PluginPolicy {
                max_concurrency: Some(1),
                ..PluginPolicy::default()
            },
        );
    })
    .await?;
    let client = Client::connect(&bed.redis.url()).await?;
    let mut ask = async |request: Value| -> anyhow::Result<Vec<Value>> {
        let session = format!("sess-{}", suffix());
        let sent = client
            .send("tools", &session, &request.to_string(), json!({}))
            .await?;
        task_events(&mut bed.conn, &session, &sent.message_id, LONG).await
    };

    let events = ask(json!({"config": "api_key"})).await?;
    assert_eq!(task_result(&events).unwrap(), &json!({"value": "sekret"}));
    let events = ask(json!({"config": "unset"})).await?;
    assert_eq!(task_result(&events).unwrap(), &json!({"value": null}));

    let events = ask(json!({"allocate_mb": 8})).await?;
    assert_eq!(task_result(&events).unwrap()["allocated_mb"], 8);
    let events = ask(json!({"allocate_mb": 32})).await?;
    let terminal = states(&events).pop().unwrap();
    assert!(
        terminal.starts_with("FAILED: memory limit of 24 MiB exceeded"),
        "{terminal}"
    );

    // faults may run one task at a time: three slow tasks run one after
    // the other (first tick to COMPLETED never overlap).
    let mut sent = Vec::new();
    for _ in 0..3 {
        sent.push(send_ask(&mut bed.conn, "slow", "300").await?);
    }
    let mut spans = Vec::new();
    for task in &sent {
        let events = events_until_terminal(&mut bed.conn, &task.session_id, LONG).await?;
        assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");
        let start = events.first().unwrap()["timestamp"].as_u64().unwrap();
        let end = events.last().unwrap()["timestamp"].as_u64().unwrap();
        spans.push((start, end));
    }
    spans.sort();
    for pair in spans.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "tasks of faults overlapped: {spans:?}"
        );
    }
    bed.daemon.stop().await?;
    Ok(())
}

#[test]
fn policy_tables_are_checked_key_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[plugins]\nmax_concurrency = 4\n[plugins.planner]\nmemory_limit_mb = 9000\nmax_concurency = 2\n\
         [plugins.planner.config]\nendpoint = \"https://example.test\"\n[plugins.\"Bad Id\"]\ndeadline_s = 5\n\
         [plugins.tools]\ndeadline_s = 0\nmax_concurrency = 3\nallowed_outbound_hosts = [\"ftp://files.test\"]\n",
    )
    .unwrap();
    let errors = gatewayd::config::Config::load_from(Some(&file), Vec::new(), &Default::default())
        .unwrap_err()
        .to_string();
    for expected in [
        "plugins.planner.memory_limit_mb: must be between 1 and 4096",
        "plugins.planner.max_concurency: unknown key",
        "plugins.Bad Id: unknown key; a table here is a plugin's policy",
        "plugins.tools.deadline_s: must be at least 1",
        "plugins.tools.allowed_outbound_hosts: \"ftp://files.test\": the scheme must be http, https or *",
    ] {
        assert!(
            errors.contains(expected),
            "missing {expected:?} in:\n{errors}"
        );
    }

    std::fs::write(
        &file,
        "[plugins.planner]\nmax_concurrency = 2\ndeadline_s = 60\n[plugins.planner.config]\nendpoint = \"https://example.test\"\n",
    )
    .unwrap();
    let config =
        gatewayd::config::Config::load_from(Some(&file), Vec::new(), &Default::default()).unwrap();
    assert_eq!(config.plugins.max_concurrency_of("planner"), Some(2));
    assert_eq!(config.plugins.max_concurrency_of("tools"), None);
    assert_eq!(
        config.plugins.deadline_of("planner"),
        Duration::from_secs(60)
    );
    assert_eq!(
        config.plugins.deadline_of("tools"),
        Duration::from_secs(300)
    );
    assert_eq!(
        config.plugins.policy["planner"].config["endpoint"],
        "https://example.test"
    );
}

/// A one-route HTTP server on loopback: answers every request with `body`.
async fn loopback_server(body: &'static str) -> anyhow::Result<u16> {
    Ok(loopback_http_server(move |_| body.to_owned()).await?.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_http_reaches_allowed_hosts_only() -> anyhow::Result<()> {
    let port = loopback_server("hello from loopback").await?;
    let other = loopback_server("you should not see this").await?;
    let mut bed = TestBed::start(&["faults", "tools"], "fetch", |config| {
        config.plugins.policy.insert(
            "faults".into(),
            PluginPolicy {
                allowed_outbound_hosts: Some(vec![format!("http://127.0.0.1:{port}")]),
                ..PluginPolicy::default()
            },
        );
    })
    .await?;
    let mut fetch = async |url: String| -> anyhow::Result<Value> {
        let sent = send_ask(&mut bed.conn, "fetch", &url).await?;
        let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
        Ok(events.last().unwrap()["metadata"]["result"].clone())
    };

    let allowed = fetch(format!("http://127.0.0.1:{port}/hello")).await?;
    assert_eq!(
        allowed,
        json!({"status": 200, "body": "hello from loopback"})
    );
    for denied in [
        format!("http://127.0.0.1:{other}/"),
        format!("http://localhost:{port}/"),
        format!("https://127.0.0.1:{port}/"),
    ] {
        let result = fetch(denied.clone()).await?;
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains("HttpRequestDenied"), "{denied}: {result}");
    }
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_never_reaches_inside_the_host() -> anyhow::Result<()> {
    let port = loopback_server("internal secret").await?;
    // Allowed anywhere by a wildcard: still not loopback, the metadata
    // service or the private network, by address or by a name for them.
    let mut bed = TestBed::start(&["faults"], "fetch", |config| {
        config.plugins.policy.insert(
            "faults".into(),
            PluginPolicy {
                allowed_outbound_hosts: Some(vec!["http://*:*".into()]),
                ..PluginPolicy::default()
            },
        );
    })
    .await?;
    for url in [
        format!("http://127.0.0.1:{port}/"),
        format!("http://localhost:{port}/"),
        format!("http://[::ffff:127.0.0.1]:{port}/"),
        "http://169.254.169.254/latest/meta-data/".to_owned(),
        "http://10.0.0.1/".to_owned(),
    ] {
        let sent = send_ask(&mut bed.conn, "fetch", &url).await?;
        let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
        let result = &events.last().unwrap()["metadata"]["result"];
        let error = result["error"].as_str().unwrap_or_default();
        assert!(error.contains("DestinationIpProhibited"), "{url}: {result}");
    }
    bed.daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_directories_can_be_read_not_written() -> anyhow::Result<()> {
    let models = tempfile::tempdir()?;
    std::fs::write(models.path().join("weights.txt"), "42")?;
    let mut bed = TestBed::start(&["faults"], "peek", |config| {
        config.plugins.policy.insert(
            "faults".into(),
            PluginPolicy {
                read_only_dirs: Some([("/models".to_owned(), models.path().to_owned())].into()),
                ..PluginPolicy::default()
            },
        );
    })
    .await?;
    let sent = send_ask(&mut bed.conn, "peek", "/models/weights.txt").await?;
    let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
    let result = &events.last().unwrap()["metadata"]["result"];
    assert_eq!(result["read"], "42", "{result}");
    assert!(
        result["write"].as_str().unwrap().starts_with("error"),
        "{result}"
    );
    assert!(!models.path().join("weights.txt.new").exists());
    assert_eq!(
        std::fs::read_to_string(models.path().join("weights.txt"))?,
        "42"
    );
    bed.daemon.stop().await?;

    // A directory that does not exist is a configuration error naming it.
    let mut config = gatewayd::config::Config::default();
    config
        .plugins
        .read_only_dirs
        .insert("/data".into(), "/no/such/dir".into());
    config
        .plugins
        .read_only_dirs
        .insert("/workspace/x".into(), models.path().to_owned());
    let errors = config.validate().unwrap_err().to_string();
    assert!(
        errors.contains("plugins.read_only_dirs.\"/data\": /no/such/dir is not a directory"),
        "{errors}"
    );
    assert!(
        errors.contains("plugins.read_only_dirs.\"/workspace/x\": the guest path must be absolute"),
        "{errors}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_changes_in_the_file_apply_without_a_restart() -> anyhow::Result<()> {
    use gatewayd::config::Source;
    let redis = RedisServer::start().await?;
    let plugins = plugin_dir(&["tools"]);
    let workspace = tempfile::tempdir()?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    let base = format!(
        "[redis]\nurl = \"{}\"\n[worker]\nid = \"reload-{}\"\nblock_ms = 200\nheartbeat_interval_s = 1\n\
         shutdown_grace_s = 5\n[plugins]\ndir = \"{}\"\nreload_debounce_ms = 50\n[workspace]\ndir = \"{}\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n",
        redis.url(),
        suffix(),
        plugins.path().display(),
        workspace.path().display(),
    );
    let write = |tools: &str| {
        // Written beside, then renamed over: as editors and deploy tools do.
        let next = dir.path().join("gateway.toml.next");
        std::fs::write(&next, format!("{base}{tools}")).unwrap();
        std::fs::rename(&next, &file).unwrap();
    };
    write("[plugins.tools]\nmemory_limit_mb = 24\n[plugins.tools.config]\napi_key = \"one\"\n");
    let source = Source {
        file: file.clone(),
        overrides: Default::default(),
    };
    let config = source.load().map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut daemon = Daemon::start_from(config, Some(source), &redis, "tools").await?;
    let client = Client::connect(&redis.url()).await?;
    let conn = redis.connect().await?;
    let ask = async |request: Value| -> anyhow::Result<Value> {
        let session = format!("sess-{}", suffix());
        let sent = client
            .send("tools", &session, &request.to_string(), json!({}))
            .await?;
        let events = task_events(&mut conn.clone(), &session, &sent.message_id, LONG).await?;
        let state = states(&events).pop().unwrap_or_default();
        Ok(match state.as_str() {
            "COMPLETED" => task_result(&events).cloned().unwrap_or_default(),
            _ => json!({ "state": state }),
        })
    };
    assert_eq!(
        ask(json!({"config": "api_key"})).await?,
        json!({"value": "one"})
    );
    let over_cap = ask(json!({"allocate_mb": 32})).await?;
    assert!(
        over_cap["state"]
            .as_str()
            .unwrap_or_default()
            .starts_with("FAILED: memory limit of 24 MiB exceeded"),
        "{over_cap}"
    );

    // A new value and a larger cap: new tasks get both, no restart.
    write("[plugins.tools]\nmemory_limit_mb = 64\n[plugins.tools.config]\napi_key = \"two\"\n");
    wait_for("the reloaded api_key", LONG, || async {
        let value = ask(json!({"config": "api_key"})).await?;
        Ok((value == json!({"value": "two"})).then_some(()))
    })
    .await?;
    assert_eq!(ask(json!({"allocate_mb": 32})).await?["allocated_mb"], 32);

    // An invalid file is rejected as a whole: nothing of it applies.
    let stats = daemon.stats.clone();
    write("[plugins.tools]\nmemory_limit_mb = 0\n[plugins.tools.config]\napi_key = \"three\"\n");
    wait_for("the invalid file to be rejected", LONG, || async {
        let metrics = stats.metrics.render();
        Ok(metrics
            .contains("gatewayd_config_reloads_total{result=\"rejected\"} 1")
            .then_some(()))
    })
    .await?;
    assert_eq!(
        ask(json!({"config": "api_key"})).await?,
        json!({"value": "two"})
    );
    assert_eq!(ask(json!({"allocate_mb": 32})).await?["allocated_mb"], 32);
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_says_which_plugins_may_call_its_tools() -> anyhow::Result<()> {
    for (callers, allowed) in [(vec![], false), (vec!["faults".to_owned()], true)] {
        let mut bed = TestBed::start(&["faults", "tools"], "use-tool", |config| {
            config.plugins.policy.insert(
                "tools".into(),
                PluginPolicy {
                    tool_callers: Some(callers.clone()),
                    ..PluginPolicy::default()
                },
            );
        })
        .await?;
        let sent = send_ask(&mut bed.conn, "use-tool", r#"tools/add {"a": 1, "b": 2}"#).await?;
        let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
        let result = &events.last().unwrap()["metadata"]["result"];
        if allowed {
            assert_eq!(result, &json!({"ok": {"sum": 3.0}}), "{callers:?}");
        } else {
            let error = result["error"].as_str().unwrap_or_default();
            assert!(
                error.contains(
                    "plugin \"tools\" does not let plugin \"faults\" call its tools (plugins.tools.tool_callers)"
                ),
                "{result}"
            );
        }
        // Its own tools stay its own to call.
        let sent = send_ask(&mut bed.conn, "use-tool", r#"sink {"padding": "abc"}"#).await?;
        let events = events_until_terminal(&mut bed.conn, &sent.session_id, LONG).await?;
        assert_eq!(
            events.last().unwrap()["metadata"]["result"],
            json!({"ok": {"took": 3}})
        );
        let metrics = &bed.daemon.stats.metrics;
        assert_eq!(metrics.tool_calls_total("faults", "tools", allowed), 1);
        assert_eq!(metrics.tool_calls_total("faults", "tools", !allowed), 0);
        assert_eq!(metrics.tool_calls_total("faults", "faults", true), 1);
        bed.daemon.stop().await?;
    }
    Ok(())
}
