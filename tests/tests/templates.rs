//! `gatewayd plugins new`: each template (Rust, Python, JavaScript), written
//! by the built `gatewayd` binary and built by its own `build.sh`, is a
//! working agent — it declares its `word_count` tool with a JSON Schema,
//! calls it, streams its answer word by word and completes — and the command
//! refuses a non-empty directory and a name that is not an agent type.

use integration_tests::*;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The cargo target directory this test was built in (marked by
/// `CACHEDIR.TAG`); the test binary is `<target>/<profile>/deps/<test>`.
fn target_dir() -> PathBuf {
    std::env::current_exe()
        .expect("test binary path")
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        .expect("test binary inside a cargo target directory")
        .to_owned()
}

/// Clears what cargo sets for a test process about the test's own package
/// (`CARGO_PKG_NAME`, `CARGO_MANIFEST_DIR`, ...) from the environment of a
/// cargo run from the test. Build scripts (ring's, cc's) ask to be rerun
/// when those change, so a build inheriting them would rebuild half the
/// workspace each time it alternates with a build from a shell.
fn clean_cargo_env(command: &mut std::process::Command) -> &mut std::process::Command {
    let package_vars = [
        "CARGO_PKG_",
        "CARGO_BIN_EXE_",
        "CARGO_CFG_",
        "CARGO_FEATURE_",
    ];
    let test_vars = [
        "CARGO_MANIFEST_DIR",
        "CARGO_MANIFEST_PATH",
        "CARGO_MANIFEST_LINKS",
        "CARGO_CRATE_NAME",
        "CARGO_BIN_NAME",
        "CARGO_PRIMARY_PACKAGE",
        "CARGO_TARGET_TMPDIR",
        "CARGO_RUSTC_CURRENT_DIR",
        "OUT_DIR",
    ];
    for (name, _) in std::env::vars_os() {
        let name = name.to_string_lossy();
        if package_vars.iter().any(|prefix| name.starts_with(prefix)) || test_vars.contains(&&*name)
        {
            command.env_remove(&*name);
        }
    }
    command
}

/// The `gatewayd` binary of this source tree, built first if it is not up
/// to date: `<target>/<profile>/gatewayd` beside this test's own
/// `<target>/<profile>/deps/templates-*`. Cargo builds a package's binaries
/// only for that package's tests, so `cargo test --test templates` alone
/// would leave it stale; the build shares this test's features and
/// artifacts, so in a full `cargo test` run it finds everything built.
fn gatewayd_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let exe = std::env::current_exe().expect("test binary path");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("<target>/<profile>/deps/<test>");
        let mut cargo =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        clean_cargo_env(&mut cargo)
            .current_dir(repo_root())
            .env("CARGO_TARGET_DIR", target_dir())
            .args(["build", "--bin", "gatewayd"]);
        match profile_dir.file_name().and_then(|name| name.to_str()) {
            Some("debug") => {}
            Some("release") => {
                cargo.arg("--release");
            }
            Some(profile) => {
                cargo.args(["--profile", profile]);
            }
            None => panic!("no profile directory in {}", exe.display()),
        }
        let status = cargo.status().expect("running cargo to build gatewayd");
        assert!(status.success(), "building gatewayd failed");
        let bin = profile_dir.join("gatewayd");
        assert!(bin.is_file(), "{} was not built", bin.display());
        bin
    })
}

/// Runs `gatewayd ARGS` in `cwd`, without a plugin SDK named in the
/// environment (the built-in default is what is tested), and with a compile
/// cache of its own.
async fn gatewayd(cwd: &Path, args: &[&str], cache: &Path) -> anyhow::Result<Output> {
    Ok(tokio::process::Command::new(gatewayd_bin())
        .current_dir(cwd)
        .env_remove("BYCLAW_PLUGIN_SDK")
        .env("GATEWAYD_PLUGINS__COMPILE_CACHE_DIR", cache)
        .args(args)
        .output()
        .await?)
}

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
    let cache = tempfile::tempdir()?;
    let project = scratch.path().join("project");
    let written = gatewayd(
        scratch.path(),
        &[
            "plugins",
            "new",
            &name,
            "--lang",
            lang,
            "--dir",
            project.to_str().unwrap(),
        ],
        cache.path(),
    )
    .await?;
    let summary = String::from_utf8(written.stdout)?;
    anyhow::ensure!(
        written.status.success(),
        "plugins new failed: {}",
        String::from_utf8_lossy(&written.stderr)
    );
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
        clean_cargo_env(&mut build).env("CARGO_TARGET_DIR", target_dir().join("templates"));
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
    let checked = gatewayd(
        scratch.path(),
        &["plugins", "check", wasm.to_str().unwrap()],
        cache.path(),
    )
    .await?;
    anyhow::ensure!(
        checked.status.success(),
        "plugins check failed: {}",
        String::from_utf8_lossy(&checked.stderr)
    );
    let manifest: Value = serde_json::from_slice(&checked.stdout)?;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_new_refuses_a_non_empty_dir_and_a_bad_name() -> anyhow::Result<()> {
    let root = tempfile::tempdir()?;
    let cache = tempfile::tempdir()?;
    let entries = |dir: &Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    };

    // A directory with something in it is left alone.
    let taken = root.path().join("taken");
    std::fs::create_dir(&taken)?;
    std::fs::write(taken.join("notes.txt"), "mine")?;
    let out = gatewayd(
        root.path(),
        &[
            "plugins", "new", "fine", "--lang", "python", "--dir", "taken",
        ],
        cache.path(),
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("taken exists and is not empty") && stderr.contains("--dir"),
        "{stderr}"
    );
    assert_eq!(entries(&taken), ["notes.txt"]);

    // A name that is not an agent type: nothing is written (the default
    // directory is ./NAME).
    for (name, why) in [
        ("My-Agent", "'M' is not allowed"),
        ("my_agent", "'_' is not allowed"),
        ("1st", "it does not start with a letter"),
        ("", "it is empty"),
    ] {
        let out = gatewayd(
            root.path(),
            &["plugins", "new", name, "--lang", "js"],
            cache.path(),
        )
        .await?;
        assert_eq!(out.status.code(), Some(2), "{name:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains(&format!("invalid plugin name {name:?}: {why}"))
                && stderr.contains("lowercase letters (a-z), digits and '-'"),
            "{stderr}"
        );
    }
    assert_eq!(entries(root.path()), ["taken"]);

    // --sdk must be the SDK itself, not the source tree around it.
    let out = gatewayd(
        root.path(),
        &[
            "plugins",
            "new",
            "fine",
            "--lang",
            "rust",
            "--sdk",
            repo_root().to_str().unwrap(),
        ],
        cache.path(),
    )
    .await?;
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("is not the plugin SDK") && stderr.contains("--sdk PATH"),
        "{stderr}"
    );
    assert_eq!(entries(root.path()), ["taken"]);
    Ok(())
}
