//! TLS to Redis: a redis-server that speaks TLS (a throwaway CA, client
//! certificates required) on the port the daemon, the client library and
//! the bridge are given; and the refusals when a certificate is missing or
//! the server's is signed by a CA that is not trusted. TLS to PostgreSQL.
//! TLS on the daemon's own listeners (the bridge and `/healthz`,
//! `/readyz`, `/metrics`).

use byclaw_client::Client;
use integration_tests::*;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

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

/// One HTTP/1.1 request over TLS to `addr`, trusting only `ca` and checking
/// the name `localhost`: the whole response as text.
async fn https(addr: SocketAddr, ca: &Path, request: &str) -> anyhow::Result<String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca)? {
        roots.add(cert?)?;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let mut tls = connector
        .connect(ServerName::try_from("localhost")?, tcp)
        .await?;
    tls.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    match tls.read_to_end(&mut response).await {
        Ok(_) => {}
        // A server that closes without close_notify after the response.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// The same request in plain text: what a TLS port answers it (nothing
/// that looks like HTTP).
async fn plain_http(addr: SocketAddr, request: &str) -> anyhow::Result<String> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(request.as_bytes()).await?;
    let mut response = Vec::new();
    let _ = tokio::time::timeout(LONG, tcp.read_to_end(&mut response)).await?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bridge_and_the_operator_listener_serve_https() -> anyhow::Result<()> {
    let tls = integration_tests::tls::TlsMaterial::generate()?;
    let bridge_port = free_port();
    let bridge_addr = SocketAddr::from(([127, 0, 0, 1], bridge_port));
    let mut bed = TestBed::start(&["echo"], "echo", |config| {
        config.bridge.enabled = true;
        config.bridge.listen = bridge_addr;
        config.bridge.tls_cert_file = Some(tls.server_cert.clone());
        config.bridge.tls_key_file = Some(tls.server_key.clone());
        config.http.enabled = true;
        config.http.tls_cert_file = Some(tls.server_cert.clone());
        config.http.tls_key_file = Some(tls.server_key.clone());
    })
    .await?;
    let ops_addr = *bed
        .daemon
        .stats
        .http_addr
        .get()
        .expect("http listener bound");

    // The operator's endpoints answer over TLS.
    let healthz = https(
        ops_addr,
        &tls.ca_cert,
        "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(healthz.starts_with("HTTP/1.1 200"), "{healthz}");
    assert!(healthz.ends_with("ok\n"), "{healthz}");

    // A message posted to the bridge over TLS runs and completes.
    let session = format!("sess-https-{}", suffix());
    let body = json!({"agent_type": "echo", "content": "over https"}).to_string();
    let posted = https(
        bridge_addr,
        &tls.ca_cert,
        &format!(
            "POST /v1/sessions/{session}/messages HTTP/1.1\r\nHost: localhost:{bridge_port}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
    .await?;
    assert!(posted.starts_with("HTTP/1.1 202"), "{posted}");
    let sent: Value = serde_json::from_str(posted.split("\r\n\r\n").nth(1).unwrap_or(""))?;
    let message_id = sent["message_id"].as_str().expect("a message id");
    let mut conn = bed.conn.clone();
    let events = task_events(&mut conn, &session, message_id, LONG).await?;
    assert_eq!(delta_content(events.last().unwrap()), "COMPLETED");

    // Plain HTTP on a TLS port gets no HTTP answer; a client that trusts
    // another CA refuses the server.
    for addr in [bridge_addr, ops_addr] {
        let answer = plain_http(
            addr,
            "GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        )
        .await?;
        assert!(!answer.starts_with("HTTP/"), "{addr}: {answer}");
        let refused = https(
            addr,
            &tls.other_ca_cert,
            "GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",
        )
        .await;
        assert!(
            refused.is_err(),
            "{addr}: trusted a server another CA did not sign"
        );
    }
    let again = https(
        ops_addr,
        &tls.ca_cert,
        "GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    // A client that never completes its handshake holds up nobody: the next
    // one is served long before the silent one's handshake times out.
    let _silent = tokio::net::TcpStream::connect(bridge_addr).await?;
    let page = tokio::time::timeout(
        byclaw_bridge::tls::HANDSHAKE_TIMEOUT / 2,
        https(
            bridge_addr,
            &tls.ca_cert,
            &format!(
                "GET / HTTP/1.1\r\nHost: localhost:{bridge_port}\r\nConnection: close\r\n\r\n"
            ),
        ),
    )
    .await
    .map_err(|_| anyhow::anyhow!("the page waited for the silent client's handshake"))??;
    assert!(page.starts_with("HTTP/1.1 200"), "{page}");
    bed.daemon.stop().await?;
    Ok(())
}

#[test]
fn listener_tls_files_that_cannot_work_name_their_key() {
    let tls = integration_tests::tls::TlsMaterial::generate().unwrap();
    let mut config = gatewayd::config::Config::default();
    config.bridge.tls_cert_file = Some(tls.server_cert.clone());
    config.http.tls_key_file = Some(tls.server_key.clone());
    let errors = config.validate().unwrap_err().to_string();
    assert!(
        errors.contains("bridge.tls_key_file: must be set with bridge.tls_cert_file"),
        "{errors}"
    );
    assert!(
        errors.contains("http.tls_cert_file: must be set with http.tls_key_file"),
        "{errors}"
    );

    // A key of another certificate; a file that is not PEM.
    config.bridge.tls_key_file = Some(tls.client_key.clone());
    let not_pem = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(not_pem.path(), b"not a certificate").unwrap();
    config.http.tls_cert_file = Some(not_pem.path().to_owned());
    let errors = config.validate().unwrap_err().to_string();
    assert!(
        errors.contains(&format!(
            "bridge.tls_key_file: {}: does not fit the certificate in",
            tls.client_key.display()
        )),
        "{errors}"
    );
    assert!(
        errors.contains(&format!(
            "http.tls_cert_file: {}:",
            not_pem.path().display()
        )),
        "{errors}"
    );

    config.bridge.tls_key_file = Some(tls.server_key.clone());
    config.http.tls_cert_file = Some(tls.server_cert.clone());
    assert_eq!(config.validate().map_err(|e| e.to_string()), Ok(()));
}
