//! Property tests of the configuration loader: whatever a file, the
//! environment or the flags hold, `Config::load_from` answers with a
//! configuration or with errors that each name a key, and never panics; a
//! configuration it accepts also validates. Bounded (a few hundred cases),
//! so they run with the rest of the suite; `PROPTEST_CASES` raises it.

use gatewayd::config::{Config, Overrides};
use proptest::prelude::*;

/// Tables and keys the file may hold, known ones and typos.
const KEYS: &[(&str, &str)] = &[
    ("redis", "url"),
    ("redis", "port"),
    ("redis", "tls"),
    ("redis", "tls_ca_file"),
    ("worker", "max_concurrency"),
    ("worker", "fetch_count"),
    ("worker", "lock_ttl_s"),
    ("worker", "max_call_depth"),
    ("plugins", "memory_limit_mb"),
    ("plugins", "max_event_bytes"),
    ("plugins", "allowed_outbound_hosts"),
    ("plugins.echo", "deadline_s"),
    ("plugins.echo", "sha256"),
    ("plugins.echo", "tool_callers"),
    ("streams", "writer_queue_bytes"),
    ("history", "backend"),
    ("history", "max_entry_bytes"),
    ("bridge", "listen"),
    ("bridge", "allowed_origins"),
    ("bridge", "tenant_messages_per_s"),
    ("log", "level"),
    ("wokrer", "id"),
    ("plugins", "colour"),
];

/// A TOML value of any type, sometimes the right one.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (0u64..100_000).prop_map(|n| n.to_string()),
        any::<bool>().prop_map(|b| b.to_string()),
        "[ -~]{0,30}".prop_map(|s| format!("{s:?}")),
        prop::collection::vec("[ -~]{0,20}", 0..4).prop_map(|v| format!("{v:?}")),
        Just("{ a = 1 }".to_owned()),
        Just("1.5".to_owned()),
    ]
}

/// A file of `[table]` sections with keys from [`KEYS`].
fn toml_file() -> impl Strategy<Value = String> {
    prop::collection::vec((prop::sample::select(KEYS), toml_value()), 0..12).prop_map(|entries| {
        let mut text = String::new();
        for ((table, key), value) in entries {
            text.push_str(&format!("[{table}]\n{key} = {value}\n"));
        }
        text
    })
}

/// Environment variables the loader reads, with any value.
fn environment() -> impl Strategy<Value = Vec<(String, String)>> {
    let names = prop::sample::select(
        &[
            "GATEWAYD_WORKER__MAX_CONCURRENCY",
            "GATEWAYD_PLUGINS__DEADLINE_S",
            "GATEWAYD_REDIS__TLS",
            "GATEWAYD_BRIDGE__LISTEN",
            "GATEWAYD_NOPE__X",
            "REDIS_PORT",
            "REDIS_PASSWORD",
            "BYAI_WORKER_CONCURRENCY",
            "LOG_LEVEL",
            "LOG_USE_JSON",
        ][..],
    );
    prop::collection::vec((names.prop_map(str::to_owned), "[ -~]{0,20}"), 0..5)
}

fn check(file_text: &str, env: Vec<(String, String)>) -> Result<(), TestCaseError> {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    std::io::Write::write_all(&mut file, file_text.as_bytes()).unwrap();
    match Config::load_from(Some(file.path()), env, &Overrides::default()) {
        Ok(config) => prop_assert!(config.validate().is_ok(), "loaded but invalid"),
        Err(errors) => {
            prop_assert!(!errors.errors.is_empty());
            for error in &errors.errors {
                prop_assert!(
                    !error.key.is_empty() && !error.message.is_empty(),
                    "{error}"
                );
            }
        }
    }
    Ok(())
}

proptest! {
    // Failures are reported, not saved into the source tree.
    #![proptest_config(ProptestConfig {
        cases: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_file_and_environment_load_or_say_which_key_is_wrong(
        text in toml_file(),
        env in environment(),
    ) {
        check(&text, env)?;
    }

    #[test]
    fn any_text_as_a_file_loads_or_says_why(text in "[ -~\n]{0,200}") {
        check(&text, Vec::new())?;
    }
}
