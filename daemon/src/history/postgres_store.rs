//! The PostgreSQL store: the reference SDK's table
//! `gateway_session_messages`, created once by racing daemons, written in
//! batches (a refused batch again entry by entry), over TLS when the DSN
//! asks for it.

use super::*;

/// The reference SDK's table, created as it creates it.
const CREATE_TABLE_SQL: &str = "
    CREATE TABLE IF NOT EXISTS gateway_session_messages (
        id BIGSERIAL PRIMARY KEY,
        session_id VARCHAR(128) NOT NULL,
        role VARCHAR(32) NOT NULL CHECK (role IN ('user', 'assistant', 'system', 'tool')),
        content TEXT NOT NULL,
        metadata JSONB NOT NULL DEFAULT '{}'::jsonb,
        created_at TIMESTAMPTZ NOT NULL DEFAULT NOW()
    );
";

/// The reference SDK's index, serving the read below.
const CREATE_INDEX_SQL: &str = "
    CREATE INDEX IF NOT EXISTS idx_gateway_session_messages_session_created_at
    ON gateway_session_messages (session_id, created_at DESC, id DESC);
";

/// Serializes schema creation between processes: concurrent `CREATE TABLE
/// IF NOT EXISTS` can fail with a unique violation in `pg_type`.
const SCHEMA_LOCK_KEY: i64 = 0x6761_7465_7761_7968; // "gatewayh"

/// The reference's insert of one entry; used when a batch was refused, to
/// find the entries at fault.
const INSERT_ONE_SQL: &str = "
    INSERT INTO gateway_session_messages (session_id, role, content, metadata)
    VALUES ($1, $2, $3, $4)
";

/// A batch in one statement; `id` follows the batch order, so entries that
/// share a `created_at` (one transaction) still read back in order.
const INSERT_BATCH_SQL: &str = "
    INSERT INTO gateway_session_messages (session_id, role, content, metadata)
    SELECT session_id, role, content, metadata
    FROM unnest($1::varchar[], $2::varchar[], $3::text[], $4::jsonb[])
        WITH ORDINALITY AS batch (session_id, role, content, metadata, position)
    ORDER BY position
";

/// The reference's read: the newest first.
const SELECT_SQL: &str = "
    SELECT role, content, metadata
    FROM gateway_session_messages
    WHERE session_id = $1
    ORDER BY created_at DESC, id DESC
    LIMIT $2
";

/// The reference SDK's `gateway_session_messages` table behind a pool.
pub(super) struct PostgresStore {
    /// Connections, opened on demand up to `history.postgres_pool`.
    pool: Pool,
    /// Whether the table and index are known to exist; reset when a
    /// statement finds the table missing.
    schema_ready: AtomicBool,
    /// One schema creation at a time in this process.
    schema_lock: tokio::sync::Mutex<()>,
}

/// TLS to PostgreSQL: the server's certificate checked against
/// `history.postgres_ca_file`, or the Mozilla roots without one.
fn postgres_tls(
    config: &HistoryConfig,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, HistoryError> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    match &config.postgres_ca_file {
        Some(path) => {
            let ca_error = |reason: String| HistoryError::PostgresCa {
                path: path.clone(),
                reason,
            };
            let certs = CertificateDer::pem_file_iter(path)
                .map_err(|e| ca_error(e.to_string()))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| ca_error(e.to_string()))?;
            if certs.is_empty() {
                return Err(ca_error("holds no PEM certificate".into()));
            }
            for cert in certs {
                roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("ring supports the default protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
}

impl PostgresStore {
    pub(super) async fn connect(config: &HistoryConfig) -> Result<PostgresStore, HistoryError> {
        let dsn = config
            .postgres_dsn
            .as_deref()
            .filter(|dsn| !dsn.is_empty())
            .ok_or(HistoryError::MissingDsn)?;
        let mut pg: tokio_postgres::Config = dsn.parse().map_err(HistoryError::InvalidDsn)?;
        if pg.get_connect_timeout().is_none() {
            pg.connect_timeout(Duration::from_secs(5));
        }
        if pg.get_application_name().is_none() {
            pg.application_name("gatewayd");
        }
        let settings = ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        };
        // `sslmode=require`: TLS, and the server's certificate checked
        // (stricter than libpq's require). Otherwise plain, as before.
        let manager = if pg.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
            Manager::from_config(pg, postgres_tls(config)?, settings)
        } else {
            Manager::from_config(pg, NoTls, settings)
        };
        let timeout = Some(config.write_timeout());
        let pool = Pool::builder(manager)
            .max_size(config.postgres_pool.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(timeout)
            .create_timeout(timeout)
            .recycle_timeout(timeout)
            .build()
            .map_err(HistoryError::Pool)?;
        let store = PostgresStore {
            pool,
            schema_ready: AtomicBool::new(false),
            schema_lock: tokio::sync::Mutex::new(()),
        };
        match tokio::time::timeout(config.write_timeout(), store.ensure_schema()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(
                %error,
                "history table not ready (is PostgreSQL up?); starting anyway: writes are retried, then dropped, reads give no history, until it is"
            ),
            Err(_) => tracing::warn!(
                timeout_ms = config.write_timeout_ms,
                "PostgreSQL did not answer in time; starting anyway (writes are retried, then dropped; reads give no history)"
            ),
        }
        Ok(store)
    }

    /// Creates the table and index if missing, once they are known to exist
    /// only again after a statement found the table gone.
    async fn ensure_schema(&self) -> Result<(), HistoryError> {
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let _one_at_a_time = self.schema_lock.lock().await;
        if self.schema_ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let failed = |source| HistoryError::Postgres {
            operation: "create schema",
            context: "gateway_session_messages".into(),
            source,
        };
        let mut client = self
            .pool
            .get()
            .await
            .map_err(|source| HistoryError::PostgresPool {
                operation: "create schema",
                context: "gateway_session_messages".into(),
                source,
            })?;
        let transaction = client.transaction().await.map_err(failed)?;
        transaction
            .execute("SELECT pg_advisory_xact_lock($1)", &[&SCHEMA_LOCK_KEY])
            .await
            .map_err(failed)?;
        transaction
            .batch_execute(CREATE_TABLE_SQL)
            .await
            .map_err(failed)?;
        transaction
            .batch_execute(CREATE_INDEX_SQL)
            .await
            .map_err(failed)?;
        transaction.commit().await.map_err(failed)?;
        self.schema_ready.store(true, Ordering::Release);
        tracing::debug!("history table gateway_session_messages ready");
        Ok(())
    }

    /// Notes a missing table (dropped behind our back) so the next attempt
    /// creates it again.
    fn check_schema(&self, error: &HistoryError) {
        if error.sql_state() == Some("42P01") {
            self.schema_ready.store(false, Ordering::Release);
        }
    }

    async fn client(
        &self,
        operation: &'static str,
        context: impl FnOnce() -> String,
    ) -> Result<deadpool_postgres::Object, HistoryError> {
        self.pool
            .get()
            .await
            .map_err(|source| HistoryError::PostgresPool {
                operation,
                context: context(),
                source,
            })
    }

    /// One statement for the whole batch. When the server refuses the data
    /// (a NUL byte, an over-long session id), the entries are inserted one
    /// by one so that only the faulty ones are lost.
    pub(super) async fn write(&self, records: &[Record]) -> Result<Vec<Refusal>, HistoryError> {
        self.ensure_schema().await?;
        let context = || format!("{} entries", records.len());
        let client = self.client("insert", context).await?;
        let sessions: Vec<&str> = records.iter().map(|r| &*r.session_id).collect();
        let roles: Vec<&str> = records.iter().map(|r| r.entry.role.as_str()).collect();
        let contents: Vec<&str> = records.iter().map(|r| r.entry.content.as_str()).collect();
        let metadata: Vec<Json<&Value>> = records.iter().map(|r| Json(&r.entry.metadata)).collect();
        let inserted = async {
            let statement = client.prepare_cached(INSERT_BATCH_SQL).await?;
            client
                .execute(&statement, &[&sessions, &roles, &contents, &metadata])
                .await
        }
        .await
        .map_err(|source| HistoryError::Postgres {
            operation: "insert",
            context: context(),
            source,
        });
        match inserted {
            Ok(_) => Ok(Vec::new()),
            Err(error) if error.is_refused_data() => {
                tracing::warn!(
                    entries = records.len(),
                    %error,
                    "history batch refused; inserting its entries one by one"
                );
                Ok(self.write_one_by_one(&client, records).await)
            }
            Err(error) => {
                self.check_schema(&error);
                Err(error)
            }
        }
    }

    /// Inserts in order; stops at the first failure that is not about the
    /// data, leaving it and the rest to be retried (so order holds).
    async fn write_one_by_one(
        &self,
        client: &deadpool_postgres::Object,
        records: &[Record],
    ) -> Vec<Refusal> {
        let mut refusals = Vec::new();
        for (index, record) in records.iter().enumerate() {
            let inserted = async {
                let statement = client.prepare_cached(INSERT_ONE_SQL).await?;
                client
                    .execute(
                        &statement,
                        &[
                            &&*record.session_id,
                            &record.entry.role.as_str(),
                            &record.entry.content,
                            &Json(&record.entry.metadata),
                        ],
                    )
                    .await
            }
            .await
            .map_err(|source| HistoryError::Postgres {
                operation: "insert",
                context: format!("session {}", record.session_id),
                source,
            });
            match inserted {
                Ok(_) => {}
                Err(error) if error.is_refused_data() => refusals.push(Refusal {
                    indices: vec![index],
                    error,
                    retry: false,
                }),
                Err(error) => {
                    self.check_schema(&error);
                    refusals.push(Refusal {
                        indices: (index..records.len()).collect(),
                        error,
                        retry: true,
                    });
                    break;
                }
            }
        }
        refusals
    }

    pub(super) async fn read(
        &self,
        session_id: &str,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, HistoryError> {
        self.ensure_schema().await?;
        let context = || format!("session {session_id}");
        let client = self.client("select", context).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = async {
            let statement = client.prepare_cached(SELECT_SQL).await?;
            client.query(&statement, &[&session_id, &limit]).await
        }
        .await
        .map_err(|source| HistoryError::Postgres {
            operation: "select",
            context: context(),
            source,
        })
        .inspect_err(|error| self.check_schema(error))?;
        let mut entries = Vec::with_capacity(rows.len());
        // Newest first from the server; the reference returns oldest first.
        for row in rows.iter().rev() {
            let decoded = row
                .try_get::<_, String>("role")
                .and_then(|role| Ok((role, row.try_get::<_, String>("content")?)))
                .and_then(|(role, content)| {
                    let metadata = row.try_get::<_, Option<Json<Value>>>("metadata")?;
                    Ok((role, content, metadata))
                });
            let (role, content, metadata) = match decoded {
                Ok(columns) => columns,
                Err(source) => {
                    return Err(HistoryError::Postgres {
                        operation: "decode",
                        context: context(),
                        source,
                    });
                }
            };
            match role.parse::<Role>() {
                Ok(role) => entries.push(
                    HistoryEntry {
                        role,
                        content,
                        metadata: metadata.map_or(Value::Null, |Json(value)| value),
                    }
                    .normalized(),
                ),
                Err(error) => tracing::warn!(session_id, %error, "skipping a history row"),
            }
        }
        Ok(entries)
    }
}
