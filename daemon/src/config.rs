//! Configuration: the typed settings of the daemon, where they come from
//! (defaults < TOML file < environment < command-line flags) and their
//! validation, which reports every problem at once, each naming its key.
//!
//! The TOML describes what runs (Redis, streams, plugins, limits); the flags
//! describe the process (log format, which file). Nothing here does I/O
//! beyond reading the one file.

pub use byclaw_sandbox::{PluginPolicy, PluginsConfig};
use figment::Figment;
use figment::providers::{Format, Toml};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::fmt::{self, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Every setting of the daemon.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The Redis that holds the streams.
    pub redis: RedisConfig,
    /// This worker: identity, consumer group, concurrency, recovery.
    pub worker: WorkerConfig,
    /// Where plugins come from and the limits of their sandboxes.
    pub plugins: PluginsConfig,
    /// Where task workspaces live.
    pub workspace: WorkspaceConfig,
    /// Lifetime and size of the streams we write, and the event writer.
    pub streams: StreamsConfig,
    /// Where session history (the user's and the agents' messages) is kept.
    pub history: HistoryConfig,
    /// The HTTP, SSE and WebSocket bridge for front ends and its chat page.
    pub bridge: byclaw_bridge::BridgeConfig,
    /// Logging.
    pub log: LogConfig,
    /// The operator's HTTP listener: health, readiness, metrics.
    pub http: HttpConfig,
}

/// `[redis]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Full URL (`redis://`, `rediss://`, `unix://`); wins over the parts below when set.
    pub url: Option<String>,
    /// Host, as the reference SDK's REDIS_HOST.
    pub host: String,
    /// Port, as REDIS_PORT.
    pub port: u16,
    /// Database number, as REDIS_DB.
    pub db: i64,
    /// ACL user name, as REDIS_USERNAME.
    pub username: Option<String>,
    /// Password, as REDIS_PASSWORD.
    pub password: Option<String>,
    /// TLS with the parts above (`rediss://`); a `url` says it by its scheme.
    pub tls: bool,
    /// TLS: PEM file of the CA(s) that sign the server's certificate, instead
    /// of the system's trust store.
    pub tls_ca_file: Option<PathBuf>,
    /// TLS: PEM file of a client certificate, for a server that asks for one
    /// (`tls-auth-clients`); with `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// TLS: PEM file of the client certificate's private key.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: None,
            host: "127.0.0.1".into(),
            port: 6379,
            db: 0,
            username: None,
            password: None,
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl RedisConfig {
    /// The URL to connect with: `url`, or one built from the parts, the user
    /// name and password percent-encoded. An empty user name or password is
    /// no user name or password (as the reference treats `REDIS_PASSWORD=`).
    pub fn connection_url(&self) -> String {
        if let Some(url) = &self.url {
            return url.clone();
        }
        let given = |s: &Option<String>| s.as_deref().filter(|s| !s.is_empty()).map(encode);
        let auth = match (given(&self.username), given(&self.password)) {
            (Some(user), Some(pass)) => format!("{user}:{pass}@"),
            (None, Some(pass)) => format!(":{pass}@"),
            (Some(user), None) => format!("{user}@"),
            (None, None) => String::new(),
        };
        let host = &self.host;
        let scheme = if self.tls { "rediss" } else { "redis" };
        if host.contains(':') && !host.starts_with('[') {
            // An IPv6 address.
            format!("{scheme}://{auth}[{host}]:{}/{}", self.port, self.db)
        } else {
            format!("{scheme}://{auth}{host}:{}/{}", self.port, self.db)
        }
    }

    /// The Redis to connect to: [`RedisConfig::connection_url`] with the TLS
    /// files read. The error names the key of the file that is unusable.
    pub fn endpoint(&self) -> Result<byclaw_client::connection::Endpoint, ConfigError> {
        let paths = byclaw_client::connection::TlsPaths {
            ca_file: self.tls_ca_file.clone(),
            cert_file: self.tls_cert_file.clone(),
            key_file: self.tls_key_file.clone(),
        };
        byclaw_client::connection::Endpoint::with_tls(self.connection_url(), &paths).map_err(
            |error| ConfigError {
                key: format!("redis.tls_{}", error.which),
                message: format!("{}: {}", error.path.display(), error.reason),
                source: None,
            },
        )
    }
}

/// Percent-encodes everything but unreserved URL characters.
fn encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(byte as char);
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String cannot fail");
        }
    }
    out
}

/// `[worker]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Consumer name in the group and identity in the registry; one live process per id.
    pub id: String,
    /// Consumer group on every stream; shared with Python workers.
    pub consumer_group: String,
    /// Most tasks in flight; a permit is taken before more entries are read.
    pub max_concurrency: usize,
    /// Most tasks that may wait for a reply (call-agent, dispatch-group,
    /// ask-user) without holding a permit; they keep their instance.
    pub max_waiting: usize,
    /// Longest chain of agents calling agents: a task at this depth gets
    /// `error.denied` from call-agent and dispatch-group.
    pub max_call_depth: u32,
    /// Budget of the plugins' memory, all tasks together, MiB; past it new
    /// tasks wait to start until running ones give memory back (nothing
    /// fails). 0: none.
    pub memory_budget_mb: u64,
    /// Most entries one XREADGROUP returns.
    pub fetch_count: usize,
    /// XREADGROUP BLOCK, milliseconds; also bounds how long a shutdown waits for a read.
    pub block_ms: u64,
    /// An entry pending this long with another consumer is taken over, milliseconds.
    pub claim_idle_ms: u64,
    /// How often pending entries are checked (and our long tasks' entries renewed), milliseconds.
    pub claim_interval_ms: u64,
    /// An entry delivered more often than this is dead-lettered.
    pub max_deliveries: u64,
    /// Where rejected entries go, with the reason and their original fields.
    pub dead_letter_stream: String,
    /// On SIGTERM, how long in-flight tasks may finish, seconds.
    pub shutdown_grace_s: u64,
    /// Registry heartbeat and lock refresh interval, seconds.
    pub heartbeat_interval_s: u64,
    /// TTL of the worker-id lock, seconds; must exceed the heartbeat interval.
    pub lock_ttl_s: u64,
    /// After a graceful CANCEL_TASK, how long the plugin may take to return, milliseconds.
    pub cancel_grace_ms: u64,
}

impl WorkerConfig {
    /// `block_ms`.
    pub fn block(&self) -> Duration {
        Duration::from_millis(self.block_ms)
    }

    /// `claim_idle_ms`.
    pub fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms)
    }

    /// `claim_interval_ms`.
    pub fn claim_interval(&self) -> Duration {
        Duration::from_millis(self.claim_interval_ms)
    }

    /// `shutdown_grace_s`.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }

    /// `heartbeat_interval_s`.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_s)
    }

    /// `lock_ttl_s`.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_secs(self.lock_ttl_s)
    }

    /// `cancel_grace_ms`.
    pub fn cancel_grace(&self) -> Duration {
        Duration::from_millis(self.cancel_grace_ms)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: "worker-1".into(),
            consumer_group: "agent_engines".into(),
            max_concurrency: 50,
            max_waiting: 1000,
            max_call_depth: 8,
            memory_budget_mb: 2048,
            fetch_count: 10,
            block_ms: 2000,
            claim_idle_ms: 60_000,
            claim_interval_ms: 5000,
            max_deliveries: 5,
            dead_letter_stream: "byai_gateway:dead_letter".into(),
            shutdown_grace_s: 30,
            heartbeat_interval_s: 30,
            lock_ttl_s: 60,
            cancel_grace_ms: 5000,
        }
    }
}

/// `[workspace]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkspaceConfig {
    /// Base of `{session}/public` and `{session}/private/{message}` directories.
    pub dir: PathBuf,
}

impl Default for WorkspaceConfig {
    fn default() -> Self {
        WorkspaceConfig {
            dir: PathBuf::from("/tmp/gateway-workspace"),
        }
    }
}

/// `[streams]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StreamsConfig {
    /// EXPIRE of session data streams and registries, seconds (reference: 7 days).
    pub session_ttl_s: u64,
    /// Approximate MAXLEN of session data streams; 0 keeps everything.
    pub session_maxlen: u64,
    /// XDEL control entries once acked, so control streams do not grow forever.
    pub delete_acked: bool,
    /// How often each capability stream served here is trimmed of what
    /// every consumer group has read and acknowledged (entries Python
    /// workers ack without deleting), milliseconds; 0: never.
    pub trim_interval_ms: u64,
    /// Most entries kept in each capability stream served here, read or
    /// not; past it the oldest are trimmed (tasks nobody ran are lost, and
    /// counted). 0: no cap, only consumed entries are trimmed.
    pub control_maxlen: u64,
    /// Approximate MAXLEN of the dead-letter stream; 0 keeps everything.
    pub dead_letter_maxlen: u64,
    /// Bound of each event-writer queue, in batches; a full queue slows emitting plugins.
    pub writer_queue: usize,
    /// Most writes in one pipeline.
    pub writer_batch: usize,
    /// Most bytes of writes queued or in flight (all lanes); past it,
    /// whoever writes waits: a plugin emitting big events is slowed to
    /// Redis' pace instead of growing the daemon.
    pub writer_queue_bytes: usize,
}

impl StreamsConfig {
    /// `session_ttl_s`.
    pub fn session_ttl(&self) -> Duration {
        Duration::from_secs(self.session_ttl_s)
    }

    /// `trim_interval_ms`; `None` when trimming is off.
    pub fn trim_interval(&self) -> Option<Duration> {
        (self.trim_interval_ms > 0).then(|| Duration::from_millis(self.trim_interval_ms))
    }
}

impl Default for StreamsConfig {
    fn default() -> Self {
        StreamsConfig {
            session_ttl_s: 604_800,
            session_maxlen: 10_000,
            delete_acked: true,
            trim_interval_ms: 60_000,
            control_maxlen: 0,
            dead_letter_maxlen: 100_000,
            writer_queue: 8192,
            writer_batch: 512,
            writer_queue_bytes: 64 << 20,
        }
    }
}

/// `[history]`: the store of session messages (see [`crate::history`]).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Which store: Redis (shared by every worker of the cluster), the
    /// reference's PostgreSQL table, or none.
    pub backend: HistoryBackend,
    /// Redis: newest entries kept per session; older ones are trimmed.
    pub max_entries: usize,
    /// Redis: EXPIRE of a session's history list, refreshed on every write, seconds.
    pub ttl_s: u64,
    /// Most entries injected into a task as `extra_payload.history`.
    pub inject_limit: usize,
    /// Most bytes of one task's streamed reply kept as its history entry;
    /// the rest is left out and the entry's metadata says `truncated`.
    pub max_entry_bytes: usize,
    /// Bound of the write queue, in entries; when full, entries are dropped
    /// (counted and logged) rather than slowing a task down.
    pub queue: usize,
    /// Most entries written in one round trip (pipeline or INSERT).
    pub write_batch: usize,
    /// Deadline of one write attempt, milliseconds.
    pub write_timeout_ms: u64,
    /// Attempts at one batch before its entries are dropped (counted and logged).
    pub write_attempts: u32,
    /// First wait between attempts, milliseconds; doubled each time, at most 5 s.
    pub write_backoff_ms: u64,
    /// Deadline of one read, milliseconds; a read that fails or is late
    /// yields no history (counted and logged), never a failed task.
    pub read_timeout_ms: u64,
    /// PostgreSQL connection string (URL or `key=value` form); required by
    /// the postgres backend. Reference name: BYAI_HISTORY_PG_DSN.
    pub postgres_dsn: Option<String>,
    /// Most pooled PostgreSQL connections.
    pub postgres_pool: usize,
    /// With `sslmode=require` in the DSN: PEM file of the CA(s) that sign
    /// the server's certificate (else the Mozilla roots). The certificate
    /// and the host name are always checked.
    pub postgres_ca_file: Option<PathBuf>,
}

impl HistoryConfig {
    /// `ttl_s`.
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.ttl_s)
    }

    /// `write_timeout_ms`.
    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }

    /// `write_backoff_ms`.
    pub fn write_backoff(&self) -> Duration {
        Duration::from_millis(self.write_backoff_ms)
    }

    /// `read_timeout_ms`.
    pub fn read_timeout(&self) -> Duration {
        Duration::from_millis(self.read_timeout_ms)
    }
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig {
            backend: HistoryBackend::Redis,
            max_entries: 200,
            ttl_s: 604_800,
            inject_limit: 10,
            max_entry_bytes: 256 * 1024,
            queue: 10_000,
            write_batch: 500,
            write_timeout_ms: 5000,
            write_attempts: 5,
            write_backoff_ms: 200,
            read_timeout_ms: 2000,
            postgres_dsn: None,
            postgres_pool: 8,
            postgres_ca_file: None,
        }
    }
}

/// Where session history is kept.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryBackend {
    /// A capped list per session in the Redis of the streams.
    Redis,
    /// The reference SDK's `gateway_session_messages` table.
    Postgres,
    /// Nothing is stored; tasks get no history.
    Off,
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter directive, e.g. `info` or `gatewayd=debug,info`.
    pub level: String,
    /// `human` or `json`.
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Human,
        }
    }
}

/// `[http]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Serve `/healthz`, `/readyz` and `/metrics`.
    pub enabled: bool,
    /// Address and port; loopback by default (port 0 picks a free one).
    pub listen: String,
    /// PEM file of the certificate chain to serve HTTPS with; unset: plain
    /// HTTP. Needs `tls_key_file`.
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM file of that certificate's private key.
    pub tls_key_file: Option<std::path::PathBuf>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: "127.0.0.1:9464".into(),
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

impl HttpConfig {
    /// `listen` as an address (checked by validation).
    pub fn listen_addr(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    /// The TLS setup of `tls_cert_file` and `tls_key_file` (files read and
    /// checked now); `None` for plain HTTP. The error is (key, message).
    pub fn tls(&self) -> Result<Option<Arc<rustls::ServerConfig>>, (String, String)> {
        byclaw_bridge::listener_tls("http", &self.tls_cert_file, &self.tls_key_file)
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// Where a configuration came from, to read it again the same way (a
/// reload): the file, then the process environment, then the flags.
#[derive(Debug, Clone)]
pub struct Source {
    /// The TOML file.
    pub file: PathBuf,
    /// The flags given at start.
    pub overrides: Overrides,
}

impl Source {
    /// Reads and checks the configuration again.
    pub fn load(&self) -> Result<Config, ConfigErrors> {
        Config::load(Some(&self.file), &self.overrides)
    }
}

/// Settings given as command-line flags; they win over everything. `None`
/// leaves the key to the lower layers.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--redis-url`: sets `redis.url`, so it also wins over the parts.
    pub redis_url: Option<String>,
    /// `--plugin-dir`: sets `plugins.dir`, to try a build without editing the file.
    pub plugin_dir: Option<PathBuf>,
    /// `--worker-id`: sets `worker.id`, so one file serves several workers.
    pub worker_id: Option<String>,
    /// `--log-format`: sets `log.format`; a property of the process, not of the file.
    pub log_format: Option<LogFormat>,
    /// `--log-level`: sets `log.level`, for a debugging run.
    pub log_level: Option<String>,
}

/// One problem with the configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// Dotted key, e.g. `worker.max_concurrency`.
    pub key: String,
    /// What is wrong.
    pub message: String,
    /// The file or environment variable the value came from, when known.
    pub source: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)?;
        if let Some(source) = &self.source {
            write!(f, " (from {source})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

/// Every problem found, one per line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct ConfigErrors {
    /// All of them, so that one run shows everything to fix; never empty
    /// when returned as an error.
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            // A TOML syntax error spans lines; keep them under their bullet.
            for (j, line) in error.to_string().lines().enumerate() {
                match j {
                    0 => write!(f, "  - {line}")?,
                    _ => write!(f, "\n    {line}")?,
                }
            }
        }
        Ok(())
    }
}

/// Environment names of the reference SDK and the key each sets.
const REFERENCE_ENV: &[(&str, &str, &str)] = &[
    ("REDIS_HOST", "redis", "host"),
    ("REDIS_PORT", "redis", "port"),
    ("REDIS_DB", "redis", "db"),
    ("REDIS_PASSWORD", "redis", "password"),
    ("REDIS_USERNAME", "redis", "username"),
    ("BYAI_WORKER_CONCURRENCY", "worker", "max_concurrency"),
    ("BYAI_WORKER_FETCH_COUNT", "worker", "fetch_count"),
    ("LOG_LEVEL", "log", "level"),
    ("BYAI_HISTORY_PG_DSN", "history", "postgres_dsn"),
];

/// Prefix of our own environment variables: `GATEWAYD_<TABLE>__<KEY>`.
const ENV_PREFIX: &str = "GATEWAYD_";

/// A value of the merged configuration and where it came from.
type Origins = std::collections::HashMap<String, String>;

impl Config {
    /// Loads from defaults, the file, the process environment and the flags.
    pub fn load(file: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigErrors> {
        // `std::env::vars` panics on a variable that is not UTF-8, even one
        // that is none of ours.
        let env = std::env::vars_os().map(|(name, value)| {
            (
                name.to_string_lossy().into_owned(),
                value.to_string_lossy().into_owned(),
            )
        });
        Self::load_from(file, env, overrides)
    }

    /// Like [`Config::load`] with an explicit environment (for tests).
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &Overrides,
    ) -> Result<Config, ConfigErrors> {
        let defaults = serde_json::to_value(Config::default()).expect("defaults serialize");
        let mut merged = defaults.clone();
        let mut origins = Origins::new();
        let mut errors = Vec::new();

        if let Some(path) = file {
            match read_toml(path) {
                Ok(table) => merge(
                    &mut merged,
                    table,
                    &path.display().to_string(),
                    &mut origins,
                ),
                Err(message) => errors.push(ConfigError {
                    key: "(file)".into(),
                    message,
                    source: Some(path.display().to_string()),
                }),
            }
        }

        let env: Vec<(String, String)> = env.into_iter().collect();
        let mut env_layer = Map::new();
        let mut env_origins = Vec::new();
        // Reference names first, so that GATEWAYD_* set later wins.
        for (name, table, key) in REFERENCE_ENV {
            if let Some((_, value)) = env.iter().find(|(n, _)| n == name) {
                let value = match *name {
                    // The reference reads an empty one as none.
                    "REDIS_PASSWORD" | "REDIS_USERNAME" | "BYAI_HISTORY_PG_DSN"
                        if value.is_empty() =>
                    {
                        continue;
                    }
                    "LOG_LEVEL" => python_level(value),
                    _ => typed(&defaults, table, key, value),
                };
                set(&mut env_layer, table, key, value);
                env_origins.push((format!("{table}.{key}"), name.to_string()));
            }
        }
        if let Some((_, value)) = env.iter().find(|(n, _)| n == "LOG_USE_JSON") {
            let json = matches!(value.to_ascii_lowercase().as_str(), "1" | "true" | "yes");
            let format = if json { "json" } else { "human" };
            set(
                &mut env_layer,
                "log",
                "format",
                Value::String(format.into()),
            );
            env_origins.push(("log.format".into(), "LOG_USE_JSON".into()));
        }
        let mut ours: Vec<&(String, String)> = env
            .iter()
            .filter(|(name, _)| name.starts_with(ENV_PREFIX))
            .collect();
        ours.sort();
        for (name, value) in ours {
            let path = name[ENV_PREFIX.len()..].to_ascii_lowercase();
            match path.split_once("__") {
                Some((table, key)) if !table.is_empty() && !key.is_empty() => {
                    set(
                        &mut env_layer,
                        table,
                        key,
                        typed(&defaults, table, key, value),
                    );
                    env_origins.push((format!("{table}.{key}"), name.clone()));
                }
                _ => errors.push(ConfigError {
                    key: path,
                    message: format!("expected {ENV_PREFIX}<TABLE>__<KEY>"),
                    source: Some(name.clone()),
                }),
            }
        }
        merge(&mut merged, Value::Object(env_layer), "", &mut origins);
        for (key, name) in env_origins {
            origins.insert(key, format!("environment variable {name}"));
        }

        let mut flags = Map::new();
        let mut flag = |table: &str, key: &str, value: Value, name: &str| {
            set(&mut flags, table, key, value);
            origins.insert(format!("{table}.{key}"), format!("flag --{name}"));
        };
        if let Some(url) = &overrides.redis_url {
            flag("redis", "url", Value::String(url.clone()), "redis-url");
        }
        if let Some(dir) = &overrides.plugin_dir {
            flag(
                "plugins",
                "dir",
                Value::String(dir.display().to_string()),
                "plugin-dir",
            );
        }
        if let Some(id) = &overrides.worker_id {
            flag("worker", "id", Value::String(id.clone()), "worker-id");
        }
        if let Some(format) = overrides.log_format {
            flag(
                "log",
                "format",
                serde_json::to_value(format).expect("enum serializes"),
                "log-format",
            );
        }
        if let Some(level) = &overrides.log_level {
            flag("log", "level", Value::String(level.clone()), "log-level");
        }
        let mut flag_origins = Origins::new();
        merge(&mut merged, Value::Object(flags), "", &mut flag_origins);

        let mut config = check_shape(&defaults, &merged, &origins, &mut errors);
        if let Some(dir) = &overrides.plugin_dir {
            // The JSON layer above holds it as text; keep the path exact.
            config.plugins.dir = dir.clone();
        }
        if let Err(semantic) = config.validate() {
            errors.extend(semantic.errors.into_iter().map(|mut e| {
                e.source = origins.get(&e.key).cloned();
                e
            }));
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors { errors })
        }
    }

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

impl Config {}

/// Whether the Redis client accepts `url`, as the broker will open it.
fn redis_url_problem(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo as _;
    url.into_connection_info().map(drop).map_err(|error| {
        let text = error.to_string();
        let reason = text.strip_suffix(" - InvalidClientConfig").unwrap_or(&text);
        format!("is not a usable Redis URL: {reason}")
    })
}

fn read_toml(path: &Path) -> Result<Value, String> {
    if !path.is_file() {
        return Err(format!(
            "configuration file {} does not exist",
            path.display()
        ));
    }
    // The error's source names the file; the kind alone says what is wrong.
    Figment::from(Toml::file_exact(path))
        .extract::<Value>()
        .map_err(|e| e.kind.to_string().trim_end().to_owned())
}

/// The reference's LOG_LEVEL holds Python level names (`INFO`, `WARNING`,
/// `CRITICAL`). Tracing reads `INFO` but takes `WARNING` for a target
/// name, which would silence every log line; map the ones it lacks.
fn python_level(text: &str) -> Value {
    let level = match text.trim().to_ascii_lowercase().as_str() {
        "warning" => "warn",
        "critical" | "fatal" => "error",
        "notset" => "trace",
        _ => text,
    };
    Value::String(level.to_owned())
}

fn set(layer: &mut Map<String, Value>, table: &str, key: &str, value: Value) {
    let entry = layer
        .entry(table.to_owned())
        .or_insert_with(|| Value::Object(Map::new()));
    if let Value::Object(map) = entry {
        map.insert(key.to_owned(), value);
    }
}

/// Environment values are text; give them the type the default has.
fn typed(defaults: &Value, table: &str, key: &str, text: &str) -> Value {
    match defaults.get(table).and_then(|t| t.get(key)) {
        Some(Value::Number(_)) => text
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .or_else(|_| text.trim().parse::<u64>().map(Value::from))
            .unwrap_or_else(|_| Value::String(text.to_owned())),
        Some(Value::Bool(_)) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Value::Bool(true),
            "false" | "0" | "no" => Value::Bool(false),
            _ => Value::String(text.to_owned()),
        },
        _ => Value::String(text.to_owned()),
    }
}

/// Overlays `layer` on `base` leaf by leaf, noting where each leaf came from.
fn merge(base: &mut Value, layer: Value, origin: &str, origins: &mut Origins) {
    let (Value::Object(base), Value::Object(layer)) = (base, layer) else {
        return;
    };
    for (table, value) in layer {
        match (base.get_mut(&table), value) {
            (Some(Value::Object(base_table)), Value::Object(layer_table)) => {
                for (key, value) in layer_table {
                    if !origin.is_empty() {
                        origins.insert(format!("{table}.{key}"), origin.to_owned());
                    }
                    base_table.insert(key, value);
                }
            }
            (_, value) => {
                if !origin.is_empty() {
                    origins.insert(table.clone(), origin.to_owned());
                }
                base.insert(table, value);
            }
        }
    }
}

/// Checks every table and key of the merged values against the schema (the
/// shape of the defaults), each key on its own so that all errors are found.
fn check_shape(
    defaults: &Value,
    merged: &Value,
    origins: &Origins,
    errors: &mut Vec<ConfigError>,
) -> Config {
    let defaults = defaults.as_object().expect("config is a table");
    let merged = merged.as_object().expect("config is a table");
    let tables: Vec<&str> = defaults.keys().map(String::as_str).collect();
    let mut cleaned = defaults.clone();
    for (table, value) in merged {
        let Some(default_table) = defaults.get(table).and_then(Value::as_object) else {
            errors.push(ConfigError {
                key: table.clone(),
                message: format!("unknown table, expected one of: {}", tables.join(", ")),
                source: origins.get(table).cloned(),
            });
            continue;
        };
        let Some(table_values) = value.as_object() else {
            errors.push(ConfigError {
                key: table.clone(),
                message: "must be a table".into(),
                source: origins.get(table).cloned(),
            });
            continue;
        };
        let known: Vec<&str> = default_table.keys().map(String::as_str).collect();
        for (key, leaf) in table_values {
            let dotted = format!("{table}.{key}");
            if table == "plugins" && !default_table.contains_key(key) && leaf.is_object() {
                if let Some(policy) = check_policy(key, leaf, origins, errors) {
                    cleaned["plugins"]["policy"][key.as_str()] = policy;
                }
                continue;
            }
            if !default_table.contains_key(key) {
                errors.push(ConfigError {
                    message: format!("unknown key, expected one of: {}", known.join(", ")),
                    source: origins.get(&dotted).cloned(),
                    key: dotted,
                });
                continue;
            }
            // Deserialize the defaults with just this key replaced.
            let mut probe = Value::Object(defaults.clone());
            probe[table.as_str()][key.as_str()] = leaf.clone();
            match serde_json::from_value::<Config>(probe) {
                Ok(_) => cleaned[table.as_str()][key.as_str()] = leaf.clone(),
                Err(error) => errors.push(ConfigError {
                    message: plain_words(&error.to_string()),
                    source: origins.get(&dotted).cloned(),
                    key: dotted,
                }),
            }
        }
    }
    // Valid keys only: the semantic rules can still be checked on the rest.
    serde_json::from_value(Value::Object(cleaned)).expect("a config of valid leaves deserializes")
}

/// Checks a `[plugins.<id>]` table key by key; the valid part, if the id is.
fn check_policy(
    id: &str,
    table: &Value,
    origins: &Origins,
    errors: &mut Vec<ConfigError>,
) -> Option<Value> {
    let at = format!("plugins.{id}");
    let id_ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !id_ok {
        errors.push(ConfigError {
            message: "unknown key; a table here is a plugin's policy and its name a plugin id (1-64 of [a-z0-9_-])".into(),
            source: origins.get(&at).cloned(),
            key: at,
        });
        return None;
    }
    let defaults = serde_json::to_value(PluginPolicy::default()).expect("policy serializes");
    let known: Vec<&str> = defaults
        .as_object()
        .expect("policy is a table")
        .keys()
        .map(String::as_str)
        .collect();
    let mut cleaned = defaults.clone();
    for (key, leaf) in table.as_object().expect("checked to be a table") {
        let dotted = format!("{at}.{key}");
        if !known.contains(&key.as_str()) {
            errors.push(ConfigError {
                message: format!("unknown key, expected one of: {}", known.join(", ")),
                source: origins.get(&dotted).cloned(),
                key: dotted,
            });
            continue;
        }
        let mut probe = defaults.clone();
        probe[key.as_str()] = leaf.clone();
        match serde_json::from_value::<PluginPolicy>(probe) {
            Ok(_) => cleaned[key.as_str()] = leaf.clone(),
            Err(error) => errors.push(ConfigError {
                message: plain_words(&error.to_string()),
                source: origins.get(&dotted).cloned(),
                key: dotted,
            }),
        }
    }
    Some(cleaned)
}

/// serde's message for a value that does not fit, in an operator's words:
/// `invalid type: string "abc", expected usize` becomes
/// `invalid type: found string "abc", expected an unsigned integer`.
/// A message of another shape is kept as it is.
fn plain_words(message: &str) -> String {
    let mut message = message.to_owned();
    for kind in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = message.strip_prefix(kind) {
            message = format!("{kind}found {rest}");
            break;
        }
    }
    for (rust, words) in [
        ("expected usize", "expected an unsigned integer"),
        ("expected u64", "expected an unsigned integer"),
        ("expected u16", "expected an integer from 0 to 65535"),
        ("expected i64", "expected an integer"),
    ] {
        if let Some(head) = message.strip_suffix(rust) {
            return format!("{head}{words}");
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_match_the_reference() {
        let config = Config::load_from(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(config, Config::default());
        assert_eq!(config.worker.id, "worker-1");
        assert_eq!(config.worker.consumer_group, "agent_engines");
        assert_eq!(config.worker.max_concurrency, 50);
        assert_eq!(config.worker.fetch_count, 10);
        assert_eq!(
            config.workspace.dir,
            PathBuf::from("/tmp/gateway-workspace")
        );
        assert_eq!(config.redis.connection_url(), "redis://127.0.0.1:6379/0");
    }

    #[test]
    fn file_then_env_then_flags() {
        let toml = file(
            "[worker]\nid = \"from-file\"\nmax_concurrency = 7\nfetch_count = 3\n[redis]\nhost = \"file-host\"\n[log]\nlevel = \"warn\"\n",
        );
        let config = Config::load_from(
            Some(toml.path()),
            env(&[
                ("BYAI_WORKER_CONCURRENCY", "9"),
                ("REDIS_HOST", "ref-host"),
                ("GATEWAYD_REDIS__HOST", "our-host"),
                ("GATEWAYD_WORKER__ID", "from-env"),
                ("LOG_USE_JSON", "true"),
                ("LOG_LEVEL", "debug"),
            ]),
            &Overrides {
                worker_id: Some("from-flag".into()),
                log_format: Some(LogFormat::Human),
                plugin_dir: Some("/opt/plugins".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        // default < file
        assert_eq!(config.worker.block_ms, 2000, "untouched keys keep defaults");
        assert_eq!(config.worker.fetch_count, 3);
        // file < env
        assert_eq!(config.worker.max_concurrency, 9);
        assert_eq!(config.redis.host, "our-host", "GATEWAYD_* beats REDIS_HOST");
        assert_eq!(config.log.level, "debug");
        // env < flags
        assert_eq!(config.worker.id, "from-flag");
        assert_eq!(
            config.log.format,
            LogFormat::Human,
            "--log-format beats LOG_USE_JSON"
        );
        assert_eq!(config.plugins.dir, PathBuf::from("/opt/plugins"));
    }

    #[test]
    fn reference_env_names_are_honoured() {
        let config = Config::load_from(
            None,
            env(&[
                ("REDIS_HOST", "10.0.0.5"),
                ("REDIS_PORT", "6380"),
                ("REDIS_DB", "2"),
                ("REDIS_USERNAME", "app"),
                ("REDIS_PASSWORD", "p@ss word"),
                ("BYAI_WORKER_FETCH_COUNT", "20"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(
            config.redis.connection_url(),
            "redis://app:p%40ss%20word@10.0.0.5:6380/2"
        );
        assert_eq!(config.worker.fetch_count, 20);
        let flagged = Config::load_from(
            None,
            env(&[("REDIS_HOST", "10.0.0.5")]),
            &Overrides {
                redis_url: Some("redis://other:1/0".into()),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(flagged.redis.connection_url(), "redis://other:1/0");
    }

    #[test]
    fn a_bad_file_reports_every_error_with_its_key() {
        let toml = file(
            "[worker]\nmax_concurency = 5\nmax_concurrency = \"abc\"\nfetch_count = 0\n\n[plugin]\ndir = \"x\"\n\n[plugins]\nmemory_limit_mb = 9000\n",
        );
        let errors =
            Config::load_from(Some(toml.path()), env(&[]), &Overrides::default()).unwrap_err();
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(errors.errors.len(), 5, "{errors}");
        assert!(keys.contains(&"worker.max_concurency"), "{errors}");
        assert!(keys.contains(&"worker.max_concurrency"), "{errors}");
        assert!(keys.contains(&"plugin"), "{errors}");
        assert!(
            keys.contains(&"worker.fetch_count"),
            "range errors too: {errors}"
        );
        assert!(keys.contains(&"plugins.memory_limit_mb"), "{errors}");
        let text = errors.to_string();
        assert_eq!(text.lines().count(), 5, "one error per line:\n{text}");
        assert!(
            text.contains("worker.max_concurency: unknown key, expected one of: "),
            "{text}"
        );
        assert!(text.contains("plugin: unknown table"), "{text}");
        assert!(
            text.contains(
                "worker.max_concurrency: invalid type: found string \"abc\", expected an unsigned integer"
            ),
            "{text}"
        );
        assert!(text.contains(&toml.path().display().to_string()), "{text}");
    }

    #[test]
    fn range_errors_are_all_reported_with_their_source() {
        let errors = Config::load_from(
            None,
            env(&[
                ("GATEWAYD_WORKER__FETCH_COUNT", "0"),
                ("GATEWAYD_PLUGINS__MEMORY_LIMIT_MB", "9000"),
                ("GATEWAYD_WORKER__HEARTBEAT_INTERVAL_S", "90"),
                ("GATEWAYD_NOPE", "1"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        let text = errors.to_string();
        for needle in [
            "worker.fetch_count: must be at least 1 (from environment variable GATEWAYD_WORKER__FETCH_COUNT)",
            "plugins.memory_limit_mb: must be between 1 and 4096",
            "worker.lock_ttl_s: must be greater than worker.heartbeat_interval_s",
            "GATEWAYD_NOPE",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
    }

    #[test]
    fn environment_errors_name_the_variable() {
        let errors = Config::load_from(
            None,
            env(&[
                ("GATEWAYD_WORKER__MAX_CONCURRENCY", "abc"),
                ("GATEWAYD_WORKER__MAX_CONCURENCY", "8"),
                ("REDIS_PORT", "70000"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err();
        let text = errors.to_string();
        for needle in [
            "worker.max_concurrency: invalid type: found string \"abc\", expected an unsigned integer (from environment variable GATEWAYD_WORKER__MAX_CONCURRENCY)",
            "worker.max_concurency: unknown key",
            "redis.port: invalid value: found integer `70000`, expected an integer from 0 to 65535 (from environment variable REDIS_PORT)",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in\n{text}");
        }
        let sources: Vec<_> = errors.errors.iter().map(|e| e.source.as_deref()).collect();
        assert!(
            sources.contains(&Some(
                "environment variable GATEWAYD_WORKER__MAX_CONCURENCY"
            )),
            "{sources:?}"
        );
    }

    #[test]
    fn reference_values_mean_what_they_mean_there() {
        let config = Config::load_from(
            None,
            env(&[
                ("LOG_LEVEL", "WARNING"),
                ("REDIS_PASSWORD", ""),
                ("REDIS_USERNAME", ""),
                ("LOG_USE_JSON", "1"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.log.level, "warn", "not a target named WARNING");
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(config.redis.password, None);
        assert_eq!(config.redis.connection_url(), "redis://127.0.0.1:6379/0");
        for (python, ours) in [("CRITICAL", "error"), ("INFO", "INFO"), ("debug", "debug")] {
            let config =
                Config::load_from(None, env(&[("LOG_LEVEL", python)]), &Overrides::default())
                    .unwrap();
            assert_eq!(config.log.level, ours);
        }
    }

    #[test]
    fn the_url_escapes_what_the_parts_contain() {
        use redis::IntoConnectionInfo as _;
        let redis = RedisConfig {
            username: Some("svc:gw@eu".into()),
            password: Some("p@ss:w/o%rd #?é".into()),
            host: "redis.internal".into(),
            port: 6380,
            db: 3,
            ..RedisConfig::default()
        };
        let url = redis.connection_url();
        assert_eq!(
            url,
            "redis://svc%3Agw%40eu:p%40ss%3Aw%2Fo%25rd%20%23%3F%C3%A9@redis.internal:6380/3"
        );
        // The client decodes them back to what was configured.
        let info = url.as_str().into_connection_info().unwrap();
        assert_eq!(info.redis_settings().username(), Some("svc:gw@eu"));
        assert_eq!(info.redis_settings().password(), Some("p@ss:w/o%rd #?é"));

        let password_only = RedisConfig {
            password: Some("s3cret".into()),
            ..RedisConfig::default()
        };
        assert_eq!(
            password_only.connection_url(),
            "redis://:s3cret@127.0.0.1:6379/0"
        );
        let ipv6 = RedisConfig {
            host: "::1".into(),
            ..RedisConfig::default()
        };
        assert_eq!(ipv6.connection_url(), "redis://[::1]:6379/0");
        assert!(
            ipv6.connection_url()
                .as_str()
                .into_connection_info()
                .is_ok()
        );
        let url_wins = RedisConfig {
            url: Some("rediss://cache:6379/1".into()),
            host: "ignored".into(),
            ..RedisConfig::default()
        };
        assert_eq!(url_wins.connection_url(), "rediss://cache:6379/1");
    }

    #[test]
    fn validate_checks_a_config_built_in_code() {
        assert_eq!(Config::default().validate(), Ok(()));
        let config = Config {
            worker: WorkerConfig {
                id: "two words".into(),
                max_concurrency: 0,
                heartbeat_interval_s: 60,
                ..WorkerConfig::default()
            },
            redis: RedisConfig {
                url: Some("http://localhost".into()),
                ..RedisConfig::default()
            },
            log: LogConfig {
                level: String::new(),
                ..LogConfig::default()
            },
            ..Config::default()
        };
        let errors = config.validate().unwrap_err();
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "worker.id",
                "worker.max_concurrency",
                "worker.lock_ttl_s",
                "redis.url",
                "log.level"
            ],
            "{errors}"
        );
        assert!(errors.errors.iter().all(|e| e.source.is_none()));
    }

    #[test]
    fn redis_urls_are_checked_as_the_client_reads_them() {
        for good in [
            "redis://localhost",
            "redis://u:p@h:6379/2",
            "unix:///run/redis.sock",
            "redis+unix:///run/redis.sock?db=1",
        ] {
            let overrides = Overrides {
                redis_url: Some(good.into()),
                ..Overrides::default()
            };
            Config::load_from(None, env(&[]), &overrides).unwrap();
        }
        for (bad, why) in [
            ("localhost:6379", "must start with"),
            ("redis://", "Missing hostname"),
            ("redis://h/abc", "Invalid database number"),
            ("unix://", "Missing path"),
        ] {
            let overrides = Overrides {
                redis_url: Some(bad.into()),
                ..Overrides::default()
            };
            let errors = Config::load_from(None, env(&[]), &overrides).unwrap_err();
            let text = errors.to_string();
            assert!(text.contains("redis.url: "), "{bad}: {text}");
            assert!(text.contains(why), "{bad}: {text}");
            assert!(text.contains("(from flag --redis-url)"), "{bad}: {text}");
        }
        let errors = Config::load_from(
            None,
            env(&[("REDIS_HOST", "bad host"), ("REDIS_DB", "-1")]),
            &Overrides::default(),
        )
        .unwrap_err();
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["redis.db", "redis.host"], "{errors}");
    }

    #[test]
    fn a_syntax_error_stays_under_its_bullet() {
        let toml = file("[worker\nid = 1\n");
        let errors =
            Config::load_from(Some(toml.path()), env(&[]), &Overrides::default()).unwrap_err();
        assert_eq!(errors.errors.len(), 1, "{errors}");
        assert_eq!(
            errors.errors[0].source.as_deref(),
            Some(toml.path().display().to_string().as_str())
        );
        let text = errors.to_string();
        assert!(text.starts_with("  - (file): TOML parse error"), "{text}");
        assert!(
            text.lines().skip(1).all(|line| line.starts_with("    ")),
            "{text}"
        );
    }

    #[test]
    fn duration_helpers_use_the_unit_in_the_name() {
        let config = Config::default();
        assert_eq!(config.worker.block(), Duration::from_secs(2));
        assert_eq!(config.worker.claim_idle(), Duration::from_secs(60));
        assert_eq!(config.worker.lock_ttl(), Duration::from_secs(60));
        assert_eq!(config.worker.cancel_grace(), Duration::from_secs(5));
        assert_eq!(config.plugins.deadline(), Duration::from_secs(300));
        assert_eq!(config.plugins.memory_limit_bytes(), 128 << 20);
        assert_eq!(
            config.streams.session_ttl(),
            Duration::from_secs(7 * 86_400)
        );
    }

    #[test]
    fn the_bridge_needs_tokens_off_loopback_and_keeps_tenants_apart() {
        let toml = file("[bridge]\nlisten = \"0.0.0.0:8780\"\nbuffer = 0\n");
        let errors =
            Config::load_from(Some(toml.path()), env(&[]), &Overrides::default()).unwrap_err();
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(keys, ["bridge.listen", "bridge.buffer"], "{errors}");
        assert!(
            errors.to_string().contains("bridge.tokens is empty"),
            "{errors}"
        );

        let toml = file(concat!(
            "[bridge]\nlisten = \"0.0.0.0:8780\"\n",
            "[[bridge.tokens]]\ntoken = \"aaaaaaaaaaaaaaaa\"\ntenant = \"a\"\nsession_prefix = \"a-\"\n",
            "[[bridge.tokens]]\ntoken = \"short\"\ntenant = \"b\"\nsession_prefix = \"a-b-\"\n",
            "[[bridge.tokens]]\ntoken = \"aaaaaaaaaaaaaaaa\"\ntenant = \"\"\nsession_prefix = \"c/\"\n",
        ));
        let errors =
            Config::load_from(Some(toml.path()), env(&[]), &Overrides::default()).unwrap_err();
        let keys: Vec<&str> = errors.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "bridge.tokens[1].token",
                "bridge.tokens[1].session_prefix",
                "bridge.tokens[2].token",
                "bridge.tokens[2].tenant",
                "bridge.tokens[2].session_prefix",
            ],
            "{errors}"
        );

        let toml = file(
            "[bridge]\nlisten = \"0.0.0.0:8780\"\ntokens = [{ token = \"aaaaaaaaaaaaaaaa\", tenant = \"a\", colour = 1 }]\n",
        );
        let errors =
            Config::load_from(Some(toml.path()), env(&[]), &Overrides::default()).unwrap_err();
        assert!(
            errors
                .to_string()
                .contains("bridge.tokens: unknown field `colour`"),
            "{errors}"
        );
    }

    #[test]
    fn a_missing_file_is_an_error_naming_it() {
        let errors = Config::load_from(
            Some(Path::new("/nonexistent/gateway.toml")),
            env(&[]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(errors.to_string().contains("/nonexistent/gateway.toml"));
    }
}
