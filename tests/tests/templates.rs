//! `gatewayd plugins new`: each template (Rust, Python, JavaScript), written
//! by the command's library function and built by its own `build.sh`, is a
//! working agent — it declares its `word_count` tool with a JSON Schema,
//! calls it, streams its answer word by word and completes. What the binary
//! refuses (a non-empty directory, a name that is not an agent type) is
//! tested in `daemon/tests/cli.rs`, where the binary is at hand.

use integration_tests::*;
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Where the Rust template's cargo builds go: kept between runs, beside
/// the test targets (as the `dev` test's), so only the first run compiles
/// the SDK's dependencies for wasm32.
const TEMPLATE_TARGET_DIR: &str = concat!(env!("CARGO_TARGET_TMPDIR"), "/plugin-templates");

/// What every template declares for its tool's arguments.
fn word_count_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "text": { "type": "string", "description": "The text to count the words of" }
        },
        "required": ["text"],
        "additionalProperties": false
    })
}

/// Writes the `lang` template under a random name, builds it with its
/// `build.sh`, checks its manifest, serves it with the `tools` plugin beside
/// it and sends it a task and tool calls.
async fn template_serves_tasks(lang: &str, files: &[&str]) -> anyhow::Result<()> {
    let name = format!("tpl-{lang}-{}", suffix());
    let scratch = tempfile::tempdir()?;
    let project = scratch.path().join("project");
    // What `gatewayd plugins new NAME --lang LANG --dir DIR` runs, and the
    // summary it prints (the binary's exit codes: daemon/tests/cli.rs).
    let lang_enum = match lang {
        "rust" => gatewayd::scaffold::Lang::Rust,
        "python" => gatewayd::scaffold::Lang::Python,
        "js" => gatewayd::scaffold::Lang::Js,
        other => anyhow::bail!("no template {other}"),
    };
    let written = gatewayd::scaffold::new_plugin(&gatewayd::scaffold::NewPlugin {
        name: name.clone(),
        lang: lang_enum,
        dir: Some(project.clone()),
        sdk: None,
    })?;
    let summary = written.summary();
    for file in files {
        assert!(project.join(file).is_file(), "{file} not written");
        assert!(summary.contains(&format!("\n  {file}\n")), "{summary}");
    }
    assert!(
        summary.contains(&format!("./build.sh plugins/{name}.wasm"))
            && summary.contains(&format!("gatewayd chat --agent {name}")),
        "{summary}"
    );
    if lang == "rust" {
        let sdk = repo_root().join("plugin-sdk").canonicalize()?;
        assert!(
            summary.contains(&format!("plugin SDK in {}.", sdk.display())),
            "{summary}"
        );
    } else {
        assert_eq!(
            std::fs::read_to_string(project.join("wit/gateway.wit"))?,
            std::fs::read_to_string(repo_root().join("wit/gateway.wit"))?
        );
    }

    // The build, as `gatewayd dev` runs it: `build.sh OUT.wasm`, which
    // prints OUT's path. Rust builds into a target directory kept between
    // runs.
    let plugins = tempfile::tempdir()?;
    let wasm = plugins.path().join(format!("{name}.wasm"));
    let mut build = std::process::Command::new(project.join("build.sh"));
    build.arg(&wasm);
    if lang == "rust" {
        build.env("CARGO_TARGET_DIR", TEMPLATE_TARGET_DIR);
    }
    let started = Instant::now();
    let built = tokio::process::Command::from(build).output().await?;
    anyhow::ensure!(
        built.status.success(),
        "building the {lang} template failed: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    eprintln!(
        "templates: the {lang} template built in {:.1?}",
        started.elapsed()
    );
    assert_eq!(
        String::from_utf8(built.stdout)?.trim(),
        wasm.to_str().unwrap()
    );

    // Its manifest, as `plugins check` reads it from the component.
    let plugins_config = gatewayd::config::PluginsConfig::default();
    let sandbox = byclaw_sandbox::Sandbox::with_options(
        plugins_config.limits(),
        2,
        None,
        byclaw_sandbox::Policies::from_config(&plugins_config),
        Default::default(),
    )?;
    let plugin = sandbox.load(wasm.clone(), &std::fs::read(&wasm)?).await?;
    let manifest = serde_json::to_value(&plugin.manifest)?;
    assert_eq!(manifest["id"], name.as_str(), "{manifest:#}");
    assert_eq!(manifest["version"], "0.1.0");
    assert_eq!(manifest["capabilities"], json!([name]));
    assert!(
        manifest["description"]
            .as_str()
            .is_some_and(|d| d.contains("word by word")),
        "{manifest:#}"
    );
    assert_eq!(
        manifest["tools"],
        json!([{
            "name": "word_count",
            "description": "Counts the words of a text",
            "input_schema": word_count_schema(),
        }]),
        "{manifest:#}"
    );

    // Served: the answer streams word by word, after the tool counted them.
    std::fs::copy(
        built_plugins().join("tools.wasm"),
        plugins.path().join("tools.wasm"),
    )?;
    let redis = RedisServer::start().await?;
    let workspace = tempfile::tempdir()?;
    let config = test_config(&redis, plugins.path(), workspace.path());
    let mut daemon = Daemon::start(config, &redis, &name).await?;
    let mut conn = redis.connect().await?;
    let text = format!("a {lang} agent, made  from its template");
    let sent = send_ask(&mut conn, &name, &text).await?;
    let events =
        events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
    let answer = format!("You said: {text}");
    let streamed = chunks(&events);
    assert!(streamed.len() > 1, "{streamed:?}");
    assert_eq!(streamed.concat(), answer, "{events:#?}");
    assert_eq!(states(&events), ["COUNTING", "COMPLETED"], "{events:#?}");
    let words = text.split_whitespace().count();
    assert_eq!(
        task_result(&events),
        Some(&json!({ "answer": answer, "words": words }))
    );
    assert_eq!(events[0]["metadata"]["plugin_id"], name.as_str());

    // Another agent calls the tool; the host holds it to the schema.
    for (args, expected) in [
        (
            json!({ "text": text }),
            Some(json!({ "ok": { "words": words } })),
        ),
        (json!({ "text": 7 }), None),
        (json!({ "text": "a b", "extra": true }), None),
    ] {
        let request = json!({ "call": format!("{name}/word_count"), "args": args });
        let sent = send_ask(&mut conn, "tools", &request.to_string()).await?;
        let events =
            events_until_terminal(&mut conn, &sent.session_id, Duration::from_secs(60)).await?;
        let result = task_result(&events).cloned().unwrap_or(Value::Null);
        match expected {
            Some(expected) => assert_eq!(result, expected, "{request}"),
            None => assert_eq!(result["error"]["kind"], "invalid-input", "{result:#}"),
        }
    }
    daemon.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_template_builds_and_serves() -> anyhow::Result<()> {
    template_serves_tasks(
        "rust",
        &[
            "README.md",
            ".gitignore",
            "Cargo.toml",
            "src/lib.rs",
            "build.sh",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_template_builds_and_serves() -> anyhow::Result<()> {
    template_serves_tasks(
        "python",
        &[
            "README.md",
            ".gitignore",
            "app.py",
            "build.sh",
            "wit/gateway.wit",
        ],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_js_template_builds_and_serves() -> anyhow::Result<()> {
    template_serves_tasks(
        "js",
        &[
            "README.md",
            ".gitignore",
            "app.js",
            "package.json",
            "package-lock.json",
            "build.sh",
            "wit/gateway.wit",
        ],
    )
    .await
}
