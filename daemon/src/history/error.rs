//! What can go wrong with the history store, with what we were doing.

use deadpool_postgres::PoolError;
use std::time::Duration;

/// A history failure, with what we were doing.
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    /// The postgres backend needs a connection string.
    #[error("history.backend is postgres but history.postgres_dsn is not set")]
    MissingDsn,
    /// The connection string does not parse.
    #[error("history.postgres_dsn is not a usable PostgreSQL connection string: {}", pg_text(.0))]
    InvalidDsn(#[source] tokio_postgres::Error),
    /// The CA file for TLS to PostgreSQL cannot be used.
    #[error("history.postgres_ca_file {path}: {reason}")]
    PostgresCa {
        path: std::path::PathBuf,
        reason: String,
    },
    /// The pool could not be built (a configuration problem, not an outage).
    #[error("cannot build the PostgreSQL pool for history: {0}")]
    Pool(#[source] deadpool_postgres::BuildError),
    /// Redis refused the connection settings or was unreachable at start.
    #[error("cannot connect to Redis for history: {0}")]
    RedisConnect(#[source] redis::RedisError),
    /// A Redis command failed.
    #[error("redis {operation} on {key}: {source}")]
    Redis {
        /// The command, e.g. `LRANGE`.
        operation: &'static str,
        /// The key, or a summary of the keys of a pipeline.
        key: String,
        #[source]
        source: redis::RedisError,
    },
    /// A PostgreSQL statement failed.
    #[error("postgres {operation} ({context}): {}", pg_text(.source))]
    Postgres {
        /// What the statement was for, e.g. `insert`.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        #[source]
        source: tokio_postgres::Error,
    },
    /// No PostgreSQL connection could be had from the pool.
    #[error("postgres {operation} ({context}): {}", pool_text(.source))]
    PostgresPool {
        /// What the connection was for.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        #[source]
        source: PoolError,
    },
    /// An entry could not be encoded as JSON.
    #[error("cannot encode a history entry of session {session_id}: {source}")]
    Encode {
        /// The session of the entry.
        session_id: String,
        #[source]
        source: serde_json::Error,
    },
    /// The store did not answer in time.
    #[error("history {operation} ({context}) took longer than {after:?}")]
    Timeout {
        /// `read`, `write` or `flush`.
        operation: &'static str,
        /// The session, or the size of the batch.
        context: String,
        /// The deadline that passed.
        after: Duration,
    },
    /// `history.backend` is `off`: nothing is stored, nothing can be read.
    #[error("history is off (history.backend = \"off\")")]
    Off,
    /// The writer was stopped by [`History::close`](super::History::close).
    #[error("the history writer has stopped")]
    Closed,
}

impl HistoryError {
    /// The SQLSTATE of a PostgreSQL error, when the server sent one.
    pub(super) fn sql_state(&self) -> Option<&str> {
        match self {
            HistoryError::Postgres { source, .. } => source.code().map(|code| code.code()),
            _ => None,
        }
    }

    /// The server refused the data itself (class 22, data exception, e.g. a
    /// NUL byte or a session id over 128 characters; class 23, integrity,
    /// e.g. the role check): the same rows will never be accepted.
    pub(super) fn is_refused_data(&self) -> bool {
        self.sql_state()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23"))
    }
}

/// tokio-postgres displays only the kind of an error ("db error"); add the
/// server's message or the I/O error under it.
pub(super) fn pg_text(error: &tokio_postgres::Error) -> String {
    match std::error::Error::source(error) {
        Some(cause) => format!("{error}: {cause}"),
        None => error.to_string(),
    }
}

pub(super) fn pool_text(error: &PoolError) -> String {
    match error {
        PoolError::Backend(error) => format!("cannot connect: {}", pg_text(error)),
        other => other.to_string(),
    }
}
