//! The operator commands of the `gatewayd` binary.

use std::process::Command;

fn gatewayd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(args)
        .output()
        .expect("gatewayd runs")
}

#[test]
fn cancel_answers_like_the_reference_client() {
    // The machine's Redis (the CI script starts one); ids nobody uses.
    let session = format!("cli-test-{:08x}", fastrand::u32(..));
    let out = gatewayd(&[
        "--redis-url",
        "redis://127.0.0.1:6379/0",
        "cancel",
        "msg-00000000",
        "--session",
        &session,
    ]);
    assert_eq!(out.status.code(), Some(1));
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(answer["status"], "NOT_FOUND");
    assert!(String::from_utf8_lossy(&out.stderr).contains("not cancelled: NOT_FOUND"));
}

#[test]
fn plugins_check_and_list_report_files_that_would_not_load() {
    let dir = tempfile::tempdir().unwrap();
    let cache = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.wasm");
    std::fs::write(&bad, b"\0asm\x01\0\0\0 truncated").unwrap();
    let dir_arg = dir.path().to_str().unwrap();
    let env_cache = ("GATEWAYD_PLUGINS__COMPILE_CACHE_DIR", cache.path());

    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .env(env_cache.0, env_cache.1)
        .args(["plugins", "check", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.wasm: not a valid component"),
        "{stderr}"
    );

    let out = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .env(env_cache.0, env_cache.1)
        .args(["--plugin-dir", dir_arg, "plugins", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("rejected: ") && stderr.contains("1 file(s) would not load"),
        "{stderr}"
    );

    std::fs::remove_file(&bad).unwrap();
    let out = gatewayd(&["--plugin-dir", dir_arg, "plugins", "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn workers_lists_the_registry() {
    // A worker registered by hand in the machine's Redis, removed after.
    let id = format!("cli-worker-{:08x}", fastrand::u32(..));
    let redis = |args: &[&str]| {
        let status = Command::new("redis-cli")
            .args(["-p", "6379"])
            .args(args)
            .output()
            .expect("redis-cli runs");
        assert!(status.status.success());
    };
    redis(&[
        "ZADD",
        "byai_gateway:registry:active_workers",
        "4102444800000",
        &id,
    ]);
    redis(&[
        "SADD",
        &format!("byai_gateway:registry:worker:capabilities:{id}"),
        "b-agent",
        "a-agent",
    ]);
    let out = gatewayd(&["--redis-url", "redis://127.0.0.1:6379/0", "workers"]);
    redis(&["ZREM", "byai_gateway:registry:active_workers", &id]);
    redis(&[
        "DEL",
        &format!("byai_gateway:registry:worker:capabilities:{id}"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mine = listed
        .iter()
        .find(|w| w["worker_id"] == id.as_str())
        .expect("listed");
    assert_eq!(
        mine["capabilities"],
        serde_json::json!(["a-agent", "b-agent"])
    );
    assert_eq!(mine["last_seen"], 4102444800000u64);
}
