//! TLS to Redis: a redis-server that speaks TLS (a throwaway CA, client
//! certificates required) on the port the daemon, the client library and
//! the bridge are given; and the refusals when a certificate is missing or
//! the server's is signed by a CA that is not trusted.

use byclaw_client::Client;
use integration_tests::*;
use serde_json::json;
use std::time::Duration;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_and_its_clients_speak_tls_to_redis() -> anyhow::Result<()> {
    let redis = RedisServer::start_tls().await?;
    let tls = redis.tls_material().expect("started with TLS").clone();
    let plugins = plugin_dir(&["echo"]);
    let workspace = tempfile::tempdir()?;
    let mut config = test_config(&redis, plugins.path(), workspace.path());
    config.redis.url = redis.tls_url();
    config.redis.tls_ca_file = Some(tls.ca_cert.clone());
    config.redis.tls_cert_file = Some(tls.client_cert.clone());
    config.redis.tls_key_file = Some(tls.client_key.clone());
    config.bridge.enabled = true;
    config.bridge.listen = "127.0.0.1:0".parse()?;
    config.validate()?;
    let endpoint = config.redis.endpoint()?;
    // The harness watches the plain port; the daemon has only the TLS one.
    let mut daemon = Daemon::start(config.clone(), &redis, "echo").await?;

    let client = Client::connect(&endpoint).await?;
    let session = format!("sess-tls-{}", suffix());
    let sent = client.send("echo", &session, "over tls", json!({})).await?;
    let mut reader = client.event_reader().await?;
    let mut events = reader.follow(&session, &sent.message_id, "0");
    let mut text = String::new();
    let terminal = loop {
        let event = tokio::time::timeout(LONG, events.next())
            .await??
            .expect("a terminal event");
        if let Some(chunk) = event.chunk() {
            text.push_str(chunk);
        }
        if event.is_terminal() {
            break event;
        }
    };
    assert_eq!(terminal.state(), Some("COMPLETED"));
    assert_eq!(text, "over tls");

    // Every connection of the daemon and of this client came in over TLS:
    // the plain port has only the harness's own.
    let mut plain = redis.connect().await?;
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut plain)
        .await?;
    let tls_port = endpoint
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches("/0");
    let over_tls = clients
        .lines()
        .filter(|line| line.contains(&format!("laddr=127.0.0.1:{tls_port}")))
        .count();
    assert!(over_tls >= 5, "{over_tls} TLS connections:\n{clients}");

    // Without a client certificate the server refuses us; with a CA that
    // did not sign the server's certificate we refuse the server.
    let mut no_cert = config.redis.clone();
    no_cert.tls_cert_file = None;
    no_cert.tls_key_file = None;
    let mut wrong_ca = config.redis.clone();
    wrong_ca.tls_ca_file = Some(tls.other_ca_cert.clone());
    let mut system_roots = config.redis.clone();
    system_roots.tls_ca_file = None;
    for (what, redis_config) in [
        ("no client certificate", no_cert),
        ("another CA", wrong_ca),
        ("the system's CAs", system_roots),
    ] {
        let result = Client::connect(redis_config.endpoint()?).await;
        assert!(result.is_err(), "connected with {what}");
    }
    daemon.stop().await?;
    Ok(())
}

#[test]
fn tls_settings_that_cannot_work_name_their_key() {
    let mut config = gatewayd::config::Config::default();
    config.redis.tls_ca_file = Some("/nonexistent/ca.pem".into());
    let errors = config.validate().unwrap_err().to_string();
    assert!(
        errors.contains("redis.tls_ca_file: TLS files are set but the connection is not TLS"),
        "{errors}"
    );
    assert!(
        errors.contains("redis.tls_ca_file: /nonexistent/ca.pem:"),
        "{errors}"
    );

    config.redis.tls = true;
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_pem.path(), b"not a certificate").unwrap();
    config.redis.tls_ca_file = Some(not_pem.path().to_owned());
    config.redis.tls_cert_file = Some(not_pem.path().to_owned());
    let errors = config.validate().unwrap_err().to_string();
    assert!(errors.contains("is not a PEM file"), "{errors}");
    assert_eq!(
        config.redis.connection_url(),
        "rediss://127.0.0.1:6379/0",
        "redis.tls makes the URL built from parts a TLS one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_history_store_speaks_tls_and_checks_the_server() -> anyhow::Result<()> {
    use gatewayd::config::{HistoryBackend, HistoryConfig};
    use gatewayd::history::{History, HistoryEntry, Role};
    let tls = integration_tests::tls::TlsMaterial::generate()?;
    let pg = integration_tests::postgres::PostgresServer::start_tls(&tls).await?;
    let config = HistoryConfig {
        backend: HistoryBackend::Postgres,
        postgres_dsn: Some(pg.dsn("require")),
        postgres_ca_file: Some(tls.ca_cert.clone()),
        postgres_pool: 2,
        ..HistoryConfig::default()
    };
    let history = History::start(&config, "redis://unused").await?;
    let session = format!("sess-pg-tls-{}", suffix());
    history.record(&session, HistoryEntry::new(Role::User, "over tls"));
    history.flush(LONG).await?;
    let back = history.read(&session, 10).await?;
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].content, "over tls");
    // The server says its connections from us are encrypted.
    let (plain, connection) =
        tokio_postgres::connect(&pg.dsn("disable"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let encrypted: i64 = plain
        .query_one(
            "SELECT count(*) FROM pg_stat_ssl JOIN pg_stat_activity USING (pid) \
             WHERE ssl AND application_name = 'gatewayd'",
            &[],
        )
        .await?
        .get(0);
    assert!(encrypted >= 1, "{encrypted} TLS connections of gatewayd");
    history.close(LONG).await?;

    // A server whose certificate another CA signed is not written to.
    let wrong = HistoryConfig {
        postgres_ca_file: Some(tls.other_ca_cert.clone()),
        write_attempts: 1,
        write_backoff_ms: 10,
        ..config.clone()
    };
    let refused = History::start(&wrong, "redis://unused").await?;
    refused.record(&session, HistoryEntry::new(Role::User, "must not land"));
    wait_for("the write refused", LONG, || {
        let stats = refused.stats();
        async move { Ok((stats.dropped >= 1).then_some(())) }
    })
    .await?;
    assert_eq!(refused.stats().written, 0);
    assert_eq!(history_rows(&pg, &session).await?, 1);
    Ok(())
}

/// Rows of `session` in the reference's table, read over a plain connection.
async fn history_rows(
    pg: &integration_tests::postgres::PostgresServer,
    session: &str,
) -> anyhow::Result<i64> {
    let (client, connection) =
        tokio_postgres::connect(&pg.dsn("disable"), tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client
        .query_one(
            "SELECT count(*) FROM gateway_session_messages WHERE session_id = $1",
            &[&session],
        )
        .await?
        .get(0))
}
