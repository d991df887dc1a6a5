//! The rules no type can express, each failure naming its key; every
//! violation is collected before any is reported.

use super::*;

impl Config {
    /// Checks the rules no type can express; every violation is reported.
    pub fn validate(&self) -> Result<(), ConfigErrors> {
        let mut errors = Vec::new();
        let mut check = |ok: bool, key: &str, message: &str| {
            if !ok {
                errors.push(ConfigError {
                    key: key.into(),
                    message: message.into(),
                    source: None,
                });
            }
        };
        let w = &self.worker;
        let plain = |s: &str| !s.is_empty() && !s.chars().any(char::is_whitespace);
        check(
            plain(&w.id),
            "worker.id",
            "must be non-empty, without whitespace",
        );
        check(
            plain(&w.consumer_group),
            "worker.consumer_group",
            "must be non-empty, without whitespace",
        );
        check(
            plain(&w.dead_letter_stream),
            "worker.dead_letter_stream",
            "must be non-empty, without whitespace",
        );
        check(
            (1..=10_000).contains(&w.max_concurrency),
            "worker.max_concurrency",
            "must be between 1 and 10000",
        );
        check(
            w.max_waiting <= 100_000,
            "worker.max_waiting",
            "must be at most 100000",
        );
        check(
            w.evict_after_ms <= 3_600_000,
            "worker.evict_after_ms",
            "must be at most 3600000 (one hour)",
        );
        check(
            w.max_suspended <= 1_000_000,
            "worker.max_suspended",
            "must be at most 1000000",
        );
        check(
            (1..=100).contains(&w.max_call_depth),
            "worker.max_call_depth",
            "must be between 1 and 100",
        );
        check(
            w.memory_budget_mb == 0
                || (w.memory_budget_mb <= 1 << 24
                    // Compared only with a cap that is itself valid.
                    && (w.memory_budget_mb >= self.plugins.memory_limit_mb
                        || !(1..=4096).contains(&self.plugins.memory_limit_mb))),
            "worker.memory_budget_mb",
            "must be 0 (none), or at least plugins.memory_limit_mb and at most 16777216",
        );
        check(
            w.fetch_count >= 1,
            "worker.fetch_count",
            "must be at least 1",
        );
        check(w.block_ms >= 1, "worker.block_ms", "must be at least 1");
        check(
            w.io_threads <= 1024,
            "worker.io_threads",
            "must be at most 1024 (0: half the CPUs)",
        );
        check(
            w.claim_idle_ms >= 1000,
            "worker.claim_idle_ms",
            "must be at least 1000",
        );
        check(
            w.claim_interval_ms >= 10,
            "worker.claim_interval_ms",
            "must be at least 10",
        );
        check(
            w.max_deliveries >= 1,
            "worker.max_deliveries",
            "must be at least 1",
        );
        check(
            w.heartbeat_interval_s >= 1,
            "worker.heartbeat_interval_s",
            "must be at least 1",
        );
        check(
            w.lock_ttl_s > w.heartbeat_interval_s,
            "worker.lock_ttl_s",
            "must be greater than worker.heartbeat_interval_s, or the lock expires between heartbeats",
        );
        self.plugins.validate(&mut check);
        check(
            !self.http.enabled || self.http.listen_addr().is_some(),
            "http.listen",
            "must be an address and port, e.g. 127.0.0.1:9464 or [::1]:9464",
        );
        if let Err((key, message)) = self.http.tls() {
            check(false, &key, &message);
        }
        check(
            !self.workspace.dir.as_os_str().is_empty(),
            "workspace.dir",
            "must not be empty",
        );
        check(
            self.streams.session_ttl_s >= 1,
            "streams.session_ttl_s",
            "must be at least 1",
        );
        check(
            self.streams.trim_interval_ms == 0 || self.streams.trim_interval_ms >= 100,
            "streams.trim_interval_ms",
            "must be 0 (never) or at least 100",
        );
        check(
            self.streams.control_maxlen == 0 || self.streams.trim_interval_ms > 0,
            "streams.control_maxlen",
            "needs streams.trim_interval_ms above 0: the cap is applied when streams are trimmed",
        );
        check(
            self.streams.writer_queue >= 1,
            "streams.writer_queue",
            "must be at least 1",
        );
        check(
            self.streams.writer_batch >= 1,
            "streams.writer_batch",
            "must be at least 1",
        );
        check(
            (1 << 20..=1 << 32).contains(&self.streams.writer_queue_bytes)
                && self.streams.writer_queue_bytes >= self.plugins.max_event_bytes
                && self.streams.writer_queue_bytes >= self.plugins.max_result_bytes,
            "streams.writer_queue_bytes",
            "must be between 1 MiB and 4 GiB, and hold at least the largest event and result (plugins.max_event_bytes, plugins.max_result_bytes)",
        );
        self.validate_history(&mut check);
        self.bridge.validate(&mut check);
        let r = &self.redis;
        check(r.port != 0, "redis.port", "must not be 0");
        match (&r.sentinel_master, r.sentinel_nodes.is_empty()) {
            (Some(name), _) => {
                check(
                    !name.trim().is_empty(),
                    "redis.sentinel_master",
                    "must not be empty",
                );
                check(
                    !r.sentinel_nodes.is_empty(),
                    "redis.sentinel_nodes",
                    "must name at least one sentinel (redis://host:port) when redis.sentinel_master is set",
                );
                check(
                    r.url.is_none(),
                    "redis.url",
                    "names one Redis, but redis.sentinel_master says the sentinels name it: set redis.username, password, db and tls instead",
                );
            }
            (None, false) => check(
                false,
                "redis.sentinel_master",
                "must be set when redis.sentinel_nodes is (the name the sentinels monitor the master under)",
            ),
            (None, true) => {}
        }
        for node in &r.sentinel_nodes {
            let problem = if !(node.starts_with("redis://") || node.starts_with("rediss://")) {
                Err("must start with redis:// or rediss://".to_owned())
            } else {
                redis_url_problem(node)
            };
            if let Err(reason) = problem {
                check(
                    false,
                    "redis.sentinel_nodes",
                    &format!(
                        "{}: {reason}",
                        byclaw_client::connection::redact_password(node)
                    ),
                );
            }
        }
        match &r.url {
            Some(url) => {
                let scheme_ok = ["redis://", "rediss://", "unix://", "redis+unix://"]
                    .iter()
                    .any(|s| url.starts_with(s));
                check(
                    scheme_ok,
                    "redis.url",
                    "must start with redis://, rediss://, unix:// or redis+unix://",
                );
                if scheme_ok && let Err(reason) = redis_url_problem(url) {
                    check(false, "redis.url", &reason);
                }
            }
            // The parts are only used, so only checked, without a URL.
            None => {
                check(!r.host.is_empty(), "redis.host", "must not be empty");
                check(r.db >= 0, "redis.db", "must not be negative");
                if !r.host.is_empty()
                    && let Err(reason) = redis_url_problem(&r.connection_url())
                {
                    check(false, "redis.host", &reason);
                }
            }
        }
        let tls_files = self.redis.tls_ca_file.is_some()
            || self.redis.tls_cert_file.is_some()
            || self.redis.tls_key_file.is_some();
        if tls_files {
            check(
                self.redis.connection_url().starts_with("rediss://"),
                "redis.tls_ca_file",
                "TLS files are set but the connection is not TLS: use a rediss:// url or redis.tls = true",
            );
            if let Err(error) = self.redis.endpoint() {
                check(false, &error.key, &error.message);
            }
        }
        let level = &self.log.level;
        check(
            !level.trim().is_empty() && tracing_subscriber::EnvFilter::try_new(level).is_ok(),
            "log.level",
            "is not a tracing filter (e.g. `info`, `gatewayd=debug,info`)",
        );
        let telemetry = &self.telemetry;
        check(
            (0.0..=1.0).contains(&telemetry.sample_ratio),
            "telemetry.sample_ratio",
            "must be between 0.0 and 1.0",
        );
        if let Some(endpoint) = &telemetry.endpoint {
            check(
                endpoint.starts_with("http://") || endpoint.starts_with("https://"),
                "telemetry.endpoint",
                "must be an http:// or https:// URL (OTLP over HTTP)",
            );
        }
        check(
            !telemetry.service_name.trim().is_empty(),
            "telemetry.service_name",
            "must not be empty",
        );
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigErrors { errors })
        }
    }
}

impl Config {
    /// The rules of `[history]`.
    fn validate_history(&self, check: &mut impl FnMut(bool, &str, &str)) {
        let h = &self.history;
        check(
            (1024..=64 << 20).contains(&h.max_entry_bytes),
            "history.max_entry_bytes",
            "must be between 1024 and 67108864",
        );
        check(
            (1..=100_000).contains(&h.max_entries),
            "history.max_entries",
            "must be between 1 and 100000",
        );
        check(h.ttl_s >= 1, "history.ttl_s", "must be at least 1");
        check(
            h.inject_limit <= 1000,
            "history.inject_limit",
            "must be at most 1000",
        );
        if h.backend == HistoryBackend::Redis {
            check(
                h.inject_limit <= h.max_entries,
                "history.inject_limit",
                "must be at most history.max_entries, which is all Redis keeps",
            );
        }
        check(
            (1..=10_000_000).contains(&h.queue),
            "history.queue",
            "must be between 1 and 10000000",
        );
        check(
            (1..=10_000).contains(&h.write_batch),
            "history.write_batch",
            "must be between 1 and 10000",
        );
        check(
            h.write_timeout_ms >= 1,
            "history.write_timeout_ms",
            "must be at least 1",
        );
        check(
            (1..=100).contains(&h.write_attempts),
            "history.write_attempts",
            "must be between 1 and 100",
        );
        check(
            (1..=60_000).contains(&h.write_backoff_ms),
            "history.write_backoff_ms",
            "must be between 1 and 60000",
        );
        check(
            h.read_timeout_ms >= 1,
            "history.read_timeout_ms",
            "must be at least 1",
        );
        check(
            (1..=1000).contains(&h.postgres_pool),
            "history.postgres_pool",
            "must be between 1 and 1000",
        );
        match h.postgres_dsn.as_deref().filter(|dsn| !dsn.is_empty()) {
            Some(dsn) => {
                if let Err(error) = dsn.parse::<tokio_postgres::Config>() {
                    // The error shows only its kind; its cause names the
                    // faulty option, never the password.
                    let reason = match std::error::Error::source(&error) {
                        Some(cause) => format!("{error}: {cause}"),
                        None => error.to_string(),
                    };
                    check(
                        false,
                        "history.postgres_dsn",
                        &format!("is not a usable PostgreSQL connection string: {reason}"),
                    );
                }
            }
            None => check(
                h.backend != HistoryBackend::Postgres,
                "history.postgres_dsn",
                "must be set when history.backend is postgres (or set BYAI_HISTORY_PG_DSN)",
            ),
        }
    }
}

/// Whether the Redis client accepts `url`, as the broker will open it.
fn redis_url_problem(url: &str) -> Result<(), String> {
    use ::redis::IntoConnectionInfo as _;
    url.into_connection_info().map(drop).map_err(|error| {
        let text = error.to_string();
        let reason = text.strip_suffix(" - InvalidClientConfig").unwrap_or(&text);
        format!("is not a usable Redis URL: {reason}")
    })
}
