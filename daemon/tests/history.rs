//! Session history against real services: Redis at 127.0.0.1:6379 and
//! PostgreSQL at 127.0.0.1:5432, database `test`, user `postgres` (trust
//! auth); `HISTORY_TEST_REDIS_URL` / `HISTORY_TEST_PG_DSN` point elsewhere.
//! Every test uses sessions of its own and deletes what it wrote; writes are
//! awaited by polling a condition or by `History::flush`, never by sleeping.

use anyhow::{Context as _, Result, bail, ensure};
use gatewayd::config::{Config, HistoryBackend, HistoryConfig, Overrides};
use gatewayd::history::{History, HistoryEntry, HistoryStats, Role, history_key};
use redis::AsyncCommands as _;
use serde_json::{Value, json};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const FLUSH: Duration = Duration::from_secs(10);

fn redis_url() -> String {
    std::env::var("HISTORY_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

fn pg_dsn() -> String {
    std::env::var("HISTORY_TEST_PG_DSN")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn session(test: &str) -> String {
    format!("hist-test-{test}-{:016x}", fastrand::u64(..))
}

fn redis_config() -> HistoryConfig {
    HistoryConfig::default()
}

fn pg_config() -> HistoryConfig {
    HistoryConfig {
        backend: HistoryBackend::Postgres,
        postgres_dsn: Some(pg_dsn()),
        postgres_pool: 2,
        ..HistoryConfig::default()
    }
}

fn entry(role: Role, content: &str) -> HistoryEntry {
    HistoryEntry::new(role, content)
}

/// Polls `probe` until it holds, failing after 10 s.
async fn eventually<F, Fut>(what: &str, mut probe: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !probe().await {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn redis() -> Result<redis::aio::MultiplexedConnection> {
    let client = redis::Client::open(redis_url())?;
    client
        .get_multiplexed_async_connection()
        .await
        .with_context(|| format!("Redis is required at {}", redis_url()))
}

async fn postgres() -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(&pg_dsn(), tokio_postgres::NoTls)
        .await
        .with_context(|| format!("PostgreSQL is required at {}", pg_dsn()))?;
    tokio::spawn(connection);
    Ok(client)
}

/// Deletes a session's rows when dropped, so a failing test cleans up too.
struct PgRows(Vec<String>);

impl Drop for PgRows {
    fn drop(&mut self) {
        let sessions = std::mem::take(&mut self.0);
        // A runtime of its own: the test's may be shutting down.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtime.block_on(async {
                let client = postgres().await?;
                client
                    .execute(
                        "DELETE FROM gateway_session_messages WHERE session_id = ANY($1)",
                        &[&sessions],
                    )
                    .await?;
                anyhow::Ok(())
            })
        });
        if let Ok(Err(error)) = cleanup.join() {
            eprintln!("cleaning up history rows: {error:#}");
        }
    }
}

/// Deletes Redis keys when dropped.
struct RedisKeys(Vec<String>);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let keys = std::mem::take(&mut self.0);
        if let Ok(client) = redis::Client::open(redis_url())
            && let Ok(mut connection) = client.get_connection()
        {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&keys).query(&mut connection);
        }
    }
}

/// Log output kept in memory.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        let bytes = self.0.lock().map(|b| b.clone()).unwrap_or_default();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Ok(mut bytes) = self.0.lock() {
            bytes.extend_from_slice(buf);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn contents(entries: &[HistoryEntry]) -> Vec<&str> {
    entries.iter().map(|e| e.content.as_str()).collect()
}

// ------------------------------------------------------------ settings

fn load(env: &[(&str, &str)]) -> Result<Config, gatewayd::config::ConfigErrors> {
    let env = env.iter().map(|(k, v)| (k.to_string(), v.to_string()));
    Config::load_from(None, env, &Overrides::default())
}

#[test]
fn history_settings_come_from_the_environment_like_the_others() -> Result<()> {
    let config = load(&[])?;
    assert_eq!(config.history, HistoryConfig::default());
    assert_eq!(config.history.backend, HistoryBackend::Redis);
    assert_eq!(
        (
            config.history.max_entries,
            config.history.inject_limit,
            config.history.queue
        ),
        (200, 10, 10_000)
    );
    assert_eq!(config.history.read_timeout(), Duration::from_secs(2));

    let dsn = "postgres://app@db:5432/gateway";
    let config = load(&[
        ("GATEWAYD_HISTORY__BACKEND", "postgres"),
        ("BYAI_HISTORY_PG_DSN", dsn),
        ("GATEWAYD_HISTORY__MAX_ENTRIES", "50"),
    ])?;
    assert_eq!(config.history.backend, HistoryBackend::Postgres);
    assert_eq!(config.history.postgres_dsn.as_deref(), Some(dsn));
    assert_eq!(config.history.max_entries, 50);
    // Ours beats the reference's name, as for REDIS_HOST.
    let config = load(&[
        ("BYAI_HISTORY_PG_DSN", dsn),
        ("GATEWAYD_HISTORY__POSTGRES_DSN", "host=other user=app"),
    ])?;
    assert_eq!(
        config.history.postgres_dsn.as_deref(),
        Some("host=other user=app")
    );
    Ok(())
}

#[test]
fn history_settings_are_checked_with_their_keys() {
    // The reference reads an empty BYAI_HISTORY_PG_DSN as none.
    let text = load(&[
        ("GATEWAYD_HISTORY__BACKEND", "postgres"),
        ("BYAI_HISTORY_PG_DSN", ""),
    ])
    .unwrap_err()
    .to_string();
    assert!(
        text.contains("history.postgres_dsn: must be set when history.backend is postgres"),
        "{text}"
    );
    let errors = load(&[
        ("GATEWAYD_HISTORY__BACKEND", "mysql"),
        ("GATEWAYD_HISTORY__WRITE_ATTEMPTS", "0"),
        ("GATEWAYD_HISTORY__QUEUE", "0"),
        ("GATEWAYD_HISTORY__INJECT_LIMIT", "300"),
        ("BYAI_HISTORY_PG_DSN", "postgres://u:secret@h:notaport/db"),
    ])
    .unwrap_err();
    let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "history.backend",
            "history.inject_limit",
            "history.queue",
            "history.write_attempts",
            "history.postgres_dsn"
        ],
        "{errors}"
    );
    let text = errors.to_string();
    assert!(text.contains("unknown variant `mysql`"), "{text}");
    assert!(
        text.contains("(from environment variable BYAI_HISTORY_PG_DSN)"),
        "{text}"
    );
    assert!(!text.contains("secret"), "no password in errors: {text}");
}

// ---------------------------------------------------------------- Redis

#[tokio::test]
async fn redis_reads_back_oldest_first_with_a_limit() -> Result<()> {
    let s = session("order");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let history = History::start(&redis_config(), &redis_url()).await?;
    history.record(&s, entry(Role::User, "question 1"));
    history.record(
        &s,
        entry(Role::Assistant, "answer 1")
            .with_metadata(json!({"trace_id": "t1", "agent_id": "echo"})),
    );
    history.record(&s, entry(Role::User, "question 2"));
    eventually("three entries", || async {
        history.recent(&s, 10).await.len() == 3
    })
    .await?;

    let all = history.recent(&s, 10).await;
    assert_eq!(contents(&all), ["question 1", "answer 1", "question 2"]);
    assert_eq!(all[0].role, Role::User);
    assert_eq!(all[0].metadata, json!({}));
    assert_eq!(all[1].role, Role::Assistant);
    assert_eq!(
        all[1].metadata,
        json!({"trace_id": "t1", "agent_id": "echo"})
    );
    assert_eq!(
        contents(&history.recent(&s, 2).await),
        ["answer 1", "question 2"]
    );
    assert!(history.recent(&s, 0).await.is_empty());

    // The stored form is the reference's entry shape.
    let raw: Vec<String> = redis().await?.lrange(history_key(&s), 0, 0).await?;
    assert_eq!(
        raw,
        [r#"{"role":"user","content":"question 1","metadata":{}}"#]
    );
    let stats = history.stats();
    assert_eq!((stats.recorded, stats.written, stats.dropped), (3, 3, 0));
    Ok(())
}

#[tokio::test]
async fn redis_keeps_only_the_newest_max_entries_and_sets_the_ttl() -> Result<()> {
    let s = session("cap");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let config = HistoryConfig {
        max_entries: 5,
        ttl_s: 1000,
        ..redis_config()
    };
    let history = History::start(&config, &redis_url()).await?;
    for i in 0..12 {
        history.record(&s, entry(Role::User, &format!("m{i}")));
    }
    eventually("twelve writes", || async { history.stats().written == 12 }).await?;
    let mut redis = redis().await?;
    let len: usize = redis.llen(history_key(&s)).await?;
    assert_eq!(len, 5);
    assert_eq!(
        contents(&history.recent(&s, 100).await),
        ["m7", "m8", "m9", "m10", "m11"]
    );
    let ttl: i64 = redis.ttl(history_key(&s)).await?;
    assert!((1..=1000).contains(&ttl), "TTL {ttl}");
    Ok(())
}

#[tokio::test]
async fn empty_content_is_never_saved() -> Result<()> {
    let s = session("empty");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let history = History::start(&redis_config(), &redis_url()).await?;
    history.record(&s, entry(Role::Assistant, ""));
    history.record(&s, entry(Role::User, "kept"));
    history.flush(FLUSH).await?;
    assert_eq!(contents(&history.recent(&s, 10).await), ["kept"]);
    let len: usize = redis().await?.llen(history_key(&s)).await?;
    assert_eq!(len, 1);
    assert_eq!(history.stats().recorded, 1);
    Ok(())
}

#[tokio::test]
async fn two_daemons_share_the_history_in_redis() -> Result<()> {
    let s = session("shared");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let first = History::start(&redis_config(), &redis_url()).await?;
    let second = History::start(&redis_config(), &redis_url()).await?;
    first.record(&s, entry(Role::User, "asked on the first"));
    first.flush(FLUSH).await?;
    assert_eq!(
        contents(&second.recent(&s, 10).await),
        ["asked on the first"]
    );
    second.record(&s, entry(Role::Assistant, "answered on the second"));
    eventually("the second's write", || async {
        first.recent(&s, 10).await.len() == 2
    })
    .await?;
    assert_eq!(
        contents(&first.recent(&s, 10).await),
        ["asked on the first", "answered on the second"]
    );
    Ok(())
}

#[tokio::test]
async fn a_key_redis_refuses_loses_only_its_own_entries() -> Result<()> {
    let bad = session("wrongtype");
    let good = session("neighbour");
    let _keys = RedisKeys(vec![history_key(&bad), history_key(&good)]);
    let _: () = redis().await?.set(history_key(&bad), "not a list").await?;
    let history = History::start(&redis_config(), &redis_url()).await?;
    // Recorded without yielding, so both go into one pipeline.
    history.record(&bad, entry(Role::User, "lost"));
    history.record(&good, entry(Role::User, "kept"));
    history.flush(FLUSH).await?;
    assert_eq!(contents(&history.recent(&good, 10).await), ["kept"]);
    let stats = history.stats();
    assert_eq!(
        (stats.written, stats.dropped, stats.write_failures),
        (1, 1, 1),
        "{stats:?}"
    );
    // Reading a key of another type fails, and says so without failing.
    assert!(history.recent(&bad, 10).await.is_empty());
    assert_eq!(history.stats().read_failures, 1);
    Ok(())
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() -> Result<()> {
    let s = session("full");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let config = HistoryConfig {
        queue: 2,
        ..redis_config()
    };
    let history = History::start(&config, &redis_url()).await?;
    // A current-thread runtime: the writer cannot run before we yield.
    let started = Instant::now();
    for i in 0..5 {
        history.record(&s, entry(Role::User, &format!("m{i}")));
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    let stats = history.stats();
    assert_eq!((stats.recorded, stats.dropped), (2, 3), "{stats:?}");
    history.flush(FLUSH).await?;
    assert_eq!(contents(&history.recent(&s, 10).await), ["m0", "m1"]);
    Ok(())
}

#[tokio::test]
async fn close_writes_what_is_queued_then_stops_every_clone() -> Result<()> {
    let s = session("close");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let history = History::start(&redis_config(), &redis_url()).await?;
    let clone = history.clone();
    for i in 0..50 {
        history.record(&s, entry(Role::User, &format!("m{i}")));
    }
    history.close(FLUSH).await?;
    let len: usize = redis().await?.llen(history_key(&s)).await?;
    assert_eq!(len, 50);
    clone.record(&s, entry(Role::User, "too late"));
    let stats = clone.stats();
    assert_eq!((stats.written, stats.dropped), (50, 1), "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn dropping_every_handle_still_writes_what_is_queued() -> Result<()> {
    let s = session("drop");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let history = History::start(&redis_config(), &redis_url()).await?;
    for i in 0..20 {
        history.record(&s, entry(Role::User, &format!("m{i}")));
    }
    drop(history);
    let mut redis = redis().await?;
    eventually("the queue to drain", || {
        let mut redis = redis.clone();
        let key = history_key(&s);
        async move { redis.llen::<_, usize>(key).await.is_ok_and(|len| len == 20) }
    })
    .await?;
    let last: Vec<String> = redis.lrange(history_key(&s), -1, -1).await?;
    assert_eq!(last, [r#"{"role":"user","content":"m19","metadata":{}}"#]);
    Ok(())
}

#[tokio::test]
async fn the_command_line_prints_a_history() -> Result<()> {
    let s = session("cli");
    let _keys = RedisKeys(vec![history_key(&s)]);
    let history = History::start(&redis_config(), &redis_url()).await?;
    history.record(&s, entry(Role::User, "what time is it?"));
    history.record(
        &s,
        entry(Role::Assistant, "noon").with_metadata(json!({"agent_id": "clock"})),
    );
    history.flush(FLUSH).await?;

    let human = gatewayd_cli(&["history", &s, "--redis-url", &redis_url()], &[])?;
    assert_eq!(human, "user: what time is it?\nassistant: noon\n");
    // Global flags before the command too; --limit keeps the newest.
    let json = gatewayd_cli(
        &[
            "--redis-url",
            &redis_url(),
            "history",
            &s,
            "--json",
            "--limit",
            "1",
        ],
        &[],
    )?;
    let lines: Vec<Value> = json
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(
        lines,
        [json!({"role": "assistant", "content": "noon", "metadata": {"agent_id": "clock"}})]
    );
    Ok(())
}

/// Runs the `gatewayd` binary; its stdout, or an error with its stderr.
fn gatewayd_cli(args: &[&str], env: &[(&str, &str)]) -> Result<String> {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_gatewayd"));
    command.args(args).envs(env.iter().copied());
    for name in [
        "BYAI_HISTORY_PG_DSN",
        "GATEWAYD_HISTORY__BACKEND",
        "GATEWAYD_HISTORY__POSTGRES_DSN",
    ] {
        if !env.iter().any(|(n, _)| *n == name) {
            command.env_remove(name);
        }
    }
    let output = command.output()?;
    ensure!(
        output.status.success(),
        "gatewayd {args:?}: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}

// ----------------------------------------------------------- PostgreSQL

#[tokio::test]
async fn postgres_rows_have_the_reference_columns() -> Result<()> {
    let s = session("pg-rows");
    let _rows = PgRows(vec![s.clone()]);
    let history = History::start(&pg_config(), &redis_url()).await?;
    history.record(
        &s,
        entry(Role::User, "hello").with_metadata(json!({"message_id": "msg-1", "trace_id": "t"})),
    );
    history.record(&s, entry(Role::Assistant, "hi!"));
    history.record(&s, entry(Role::Tool, "{\"ok\":true}"));
    eventually("three rows", || async { history.stats().written == 3 }).await?;

    let client = postgres().await?;
    let rows = client
        .query(
            "SELECT id, session_id, role, content, metadata, created_at IS NOT NULL AS dated
             FROM gateway_session_messages WHERE session_id = $1 ORDER BY id",
            &[&s],
        )
        .await?;
    let got: Vec<(String, String, String, Value, bool)> = rows
        .iter()
        .map(|row| {
            let metadata: tokio_postgres::types::Json<Value> = row.get("metadata");
            (
                row.get("session_id"),
                row.get("role"),
                row.get("content"),
                metadata.0,
                row.get("dated"),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (
                s.clone(),
                "user".into(),
                "hello".into(),
                json!({"message_id": "msg-1", "trace_id": "t"}),
                true
            ),
            (s.clone(), "assistant".into(), "hi!".into(), json!({}), true),
            (
                s.clone(),
                "tool".into(),
                "{\"ok\":true}".into(),
                json!({}),
                true
            ),
        ]
    );

    // The reference's schema: column types, the role check, the index.
    let columns = client
        .query(
            "SELECT column_name::text, data_type::text, character_maximum_length::int4
             FROM information_schema.columns
             WHERE table_name = 'gateway_session_messages' AND table_schema = current_schema()
             ORDER BY ordinal_position",
            &[],
        )
        .await?;
    let columns: Vec<(String, String, Option<i32>)> = columns
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    let expected = [
        ("id", "bigint", None),
        ("session_id", "character varying", Some(128)),
        ("role", "character varying", Some(32)),
        ("content", "text", None),
        ("metadata", "jsonb", None),
        ("created_at", "timestamp with time zone", None),
    ];
    let expected: Vec<(String, String, Option<i32>)> = expected
        .iter()
        .map(|(n, t, l)| (n.to_string(), t.to_string(), *l))
        .collect();
    assert_eq!(columns, expected);
    let index: String = client
        .query_one(
            "SELECT indexdef FROM pg_indexes
             WHERE indexname = 'idx_gateway_session_messages_session_created_at'
               AND schemaname = current_schema()",
            &[],
        )
        .await?
        .get(0);
    assert!(
        index.ends_with("(session_id, created_at DESC, id DESC)"),
        "{index}"
    );
    let refused = client
        .execute(
            "INSERT INTO gateway_session_messages (session_id, role, content) VALUES ($1, 'bot', 'x')",
            &[&s],
        )
        .await;
    assert!(refused.is_err(), "the role check is in place");
    Ok(())
}

#[tokio::test]
async fn postgres_reads_the_newest_oldest_first() -> Result<()> {
    let s = session("pg-order");
    let _rows = PgRows(vec![s.clone()]);
    let history = History::start(&pg_config(), &redis_url()).await?;
    for i in 0..5 {
        history.record(&s, entry(Role::User, &format!("m{i}")));
    }
    history.flush(FLUSH).await?;
    assert_eq!(contents(&history.recent(&s, 3).await), ["m2", "m3", "m4"]);
    assert_eq!(contents(&history.recent(&s, 10).await).len(), 5);

    // created_at orders before id (rows from several writers).
    let client = postgres().await?;
    client
        .execute(
            "INSERT INTO gateway_session_messages (session_id, role, content, created_at)
             VALUES ($1, 'user', 'dated later, inserted first', NOW() + interval '1 hour'),
                    ($1, 'user', 'dated earlier', NOW() - interval '1 hour')",
            &[&s],
        )
        .await?;
    assert_eq!(
        contents(&history.recent(&s, 10).await),
        [
            "dated earlier",
            "m0",
            "m1",
            "m2",
            "m3",
            "m4",
            "dated later, inserted first"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn postgres_refused_entries_do_not_sink_their_batch() -> Result<()> {
    let s = session("pg-refused");
    let long = "x".repeat(129);
    let _rows = PgRows(vec![s.clone(), long.clone()]);
    let history = History::start(&pg_config(), &redis_url()).await?;
    // Recorded without yielding, so all go into one batch.
    history.record(&s, entry(Role::User, "before"));
    history.record(&s, entry(Role::User, "a NUL \0 byte"));
    history.record(&long, entry(Role::User, "session id too long"));
    history.record(&s, entry(Role::User, "after"));
    history.flush(FLUSH).await?;
    assert_eq!(contents(&history.recent(&s, 10).await), ["before", "after"]);
    let stats = history.stats();
    assert_eq!((stats.written, stats.dropped), (2, 2), "{stats:?}");
    Ok(())
}

#[tokio::test]
async fn postgres_schema_is_created_once_by_racing_daemons() -> Result<()> {
    // A schema of its own, so the table really is missing at start.
    let schema = format!("hist_test_{:016x}", fastrand::u64(..));
    let client = postgres().await?;
    client
        .batch_execute(&format!("CREATE SCHEMA {schema}"))
        .await?;
    struct DropSchema(String);
    impl Drop for DropSchema {
        fn drop(&mut self) {
            let schema = self.0.clone();
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                runtime.block_on(async {
                    postgres()
                        .await?
                        .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                        .await?;
                    anyhow::Ok(())
                })
            })
            .join();
        }
    }
    let _cleanup = DropSchema(schema.clone());
    let separator = if pg_dsn().contains('?') { '&' } else { '?' };
    let dsn = format!("{}{separator}options=-c%20search_path%3D{schema}", pg_dsn());
    let config = HistoryConfig {
        postgres_dsn: Some(dsn),
        ..pg_config()
    };
    // Every start must create or find the table itself: the warning of a
    // failed creation is caught (a current-thread runtime, so the
    // thread's subscriber sees everything).
    let logs = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_ansi(false)
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .finish();
    let guard = tracing::subscriber::set_default(subscriber);
    let starts = (0..6).map(|_| History::start(&config, "redis://unused"));
    let histories = futures::future::try_join_all(starts).await?;
    drop(guard);
    let logged = logs.text();
    assert!(logged.is_empty(), "{logged}");
    let s = session("pg-race");
    for (i, history) in histories.iter().enumerate() {
        history.record(&s, entry(Role::User, &format!("from {i}")));
        history.flush(FLUSH).await?;
    }
    assert_eq!(histories[0].recent(&s, 10).await.len(), 6);
    let failures: u64 = histories
        .iter()
        .map(|h| h.stats().write_failures + h.stats().read_failures)
        .sum();
    assert_eq!(failures, 0);
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = $1 AND tablename = 'gateway_session_messages'",
            &[&schema],
        )
        .await?
        .get(0);
    assert_eq!(tables, 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_is_counted_never_fatal() -> Result<()> {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?.port()
    };
    let config = HistoryConfig {
        postgres_dsn: Some(format!("postgres://postgres@127.0.0.1:{port}/test")),
        write_attempts: 2,
        write_backoff_ms: 10,
        read_timeout_ms: 500,
        ..pg_config()
    };
    let started = Instant::now();
    let history = History::start(&config, "redis://unused").await?;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "start took {:?}",
        started.elapsed()
    );
    let s = session("pg-down");
    let recorded = Instant::now();
    history.record(&s, entry(Role::User, "nobody listens"));
    // Far below a connect timeout: record() only queues.
    assert!(recorded.elapsed() < Duration::from_millis(500));
    eventually("the write to fail and be dropped", || async {
        let stats = history.stats();
        stats.write_failures >= 2 && stats.dropped == 1
    })
    .await?;

    let read = Instant::now();
    assert!(history.recent(&s, 10).await.is_empty());
    assert!(
        read.elapsed() < Duration::from_secs(2),
        "{:?}",
        read.elapsed()
    );
    assert_eq!(
        history.stats(),
        HistoryStats {
            recorded: 1,
            written: 0,
            write_failures: 2,
            dropped: 1,
            read_failures: 1,
        }
    );
    Ok(())
}

#[tokio::test]
async fn the_command_line_reads_postgres_by_the_reference_env_name() -> Result<()> {
    let s = session("pg-cli");
    let _rows = PgRows(vec![s.clone()]);
    let history = History::start(&pg_config(), &redis_url()).await?;
    history.record(&s, entry(Role::User, "via postgres"));
    history.flush(FLUSH).await?;
    let out = gatewayd_cli(
        &["history", &s],
        &[
            ("GATEWAYD_HISTORY__BACKEND", "postgres"),
            ("BYAI_HISTORY_PG_DSN", &pg_dsn()),
        ],
    )?;
    assert_eq!(out, "user: via postgres\n");
    Ok(())
}

// ----------------------------------------- the reference Python SDK

/// The venv of `tests/python/venv.sh` (reference SDK and asyncpg).
fn python() -> Result<String> {
    let script = python_dir().join("venv.sh");
    let output = std::process::Command::new("bash").arg(script).output()?;
    ensure!(
        output.status.success(),
        "venv.sh failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout)?;
    Ok(stdout.lines().last().unwrap_or_default().trim().to_owned())
}

fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python")
}

/// Runs `history_interop.py`; its one JSON result line.
async fn reference(args: &[&str]) -> Result<Value> {
    let python = python()?;
    // The SDK writes a log file into the working directory.
    let scratch = tempfile::tempdir()?;
    let output = tokio::process::Command::new(python)
        .arg(python_dir().join("history_interop.py"))
        .arg("--dsn")
        .arg(pg_dsn())
        .args(args)
        .current_dir(scratch.path())
        .env_remove("LOG_USE_JSON")
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    ensure!(
        output.status.success(),
        "history_interop.py {args:?}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let line = stdout
        .lines()
        .find(|line| line.starts_with('{'))
        .with_context(|| format!("no result line in:\n{stdout}"))?;
    Ok(serde_json::from_str(line)?)
}

#[tokio::test]
async fn the_reference_sdk_reads_what_we_write_and_we_read_what_it_writes() -> Result<()> {
    let ours = session("py-reads");
    let theirs = session("py-writes");
    let _rows = PgRows(vec![ours.clone(), theirs.clone()]);
    let history = History::start(&pg_config(), &redis_url()).await?;

    history.record(
        &ours,
        entry(Role::User, "你好, gateway").with_metadata(json!({"message_id": "msg-1"})),
    );
    history.record(
        &ours,
        entry(Role::Assistant, "hello").with_metadata(json!({"agent_id": "echo", "n": [1, 2]})),
    );
    history.record(&ours, entry(Role::System, "be brief"));
    history.flush(FLUSH).await?;
    let read = reference(&["read", "--session", &ours, "--limit", "2"]).await?;
    assert_eq!(
        read,
        json!({"history": [
            {"role": "assistant", "content": "hello", "metadata": {"agent_id": "echo", "n": [1, 2]}},
            {"role": "system", "content": "be brief", "metadata": {}},
        ]})
    );

    let written = json!([
        {"role": "user", "content": "from python", "metadata": {"message_id": "msg-py", "trace_id": "tr"}},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "reply from python", "metadata": null},
        {"role": "tool", "content": "tool output", "metadata": {"tool": "search"}},
    ]);
    let saved = reference(&[
        "write",
        "--session",
        &theirs,
        "--entries",
        &written.to_string(),
    ])
    .await?;
    assert_eq!(saved, json!({"saved": 3}));
    let back = history.recent(&theirs, 10).await;
    assert_eq!(
        serde_json::to_value(&back)?,
        json!([
            {"role": "user", "content": "from python", "metadata": {"message_id": "msg-py", "trace_id": "tr"}},
            {"role": "assistant", "content": "reply from python", "metadata": {}},
            {"role": "tool", "content": "tool output", "metadata": {"tool": "search"}},
        ])
    );
    Ok(())
}
