//! Configuration: the typed settings of the daemon, where they come from
//! (defaults < TOML file < environment < command-line flags) and their
//! validation, which reports every problem at once, each naming its key.
//!
//! The TOML describes what runs (Redis, streams, plugins, limits); the flags
//! describe the process (log format, which file). Nothing here does I/O
//! beyond reading the one file (and the TLS files it names, to check them).
//!
//! One module per table of the daemon's own (`redis`, `worker`, `workspace`,
//! `streams`, `history`, `log`, `http`, `telemetry`; `[plugins]` and `[bridge]` belong to
//! their crates), `load` for the layering and `validate` for the rules; the
//! whole configuration and its errors are here.

mod history;
mod http;
mod load;
mod log;
mod redis;
mod streams;
mod telemetry;
mod validate;
mod worker;
mod workspace;

pub use history::{HistoryBackend, HistoryConfig};
pub use http::HttpConfig;
pub use log::{LogConfig, LogFormat};
pub use redis::RedisConfig;
pub use streams::StreamsConfig;
pub use telemetry::TelemetryConfig;
pub use worker::{Threads, WorkerConfig};
pub use workspace::WorkspaceConfig;

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
    /// Traces over OTLP.
    pub telemetry: TelemetryConfig,
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
    /// `--redis-sentinel-master`: sets `redis.sentinel_master`.
    pub redis_sentinel_master: Option<String>,
    /// `--redis-sentinel-nodes`: sets `redis.sentinel_nodes`.
    pub redis_sentinel_nodes: Option<Vec<String>>,
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
        use ::redis::IntoConnectionInfo as _;
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
    fn sentinel_is_configured_from_the_environment_or_flags_and_checked() {
        let config = Config::load_from(
            None,
            env(&[
                ("GATEWAYD_REDIS__SENTINEL_MASTER", "mymaster"),
                (
                    "GATEWAYD_REDIS__SENTINEL_NODES",
                    "redis://10.0.0.1:26379, redis://:pw@10.0.0.2:26379",
                ),
                ("REDIS_PASSWORD", "master-secret"),
            ]),
            &Overrides::default(),
        )
        .unwrap();
        assert_eq!(config.redis.sentinel_master.as_deref(), Some("mymaster"));
        assert_eq!(
            config.redis.sentinel_nodes,
            ["redis://10.0.0.1:26379", "redis://:pw@10.0.0.2:26379"]
        );
        let endpoint = config.redis.endpoint().unwrap();
        let sentinel = endpoint
            .sentinel()
            .expect("the endpoint goes through sentinel");
        assert_eq!(sentinel.master_name, "mymaster");
        assert_eq!(sentinel.nodes.len(), 2);
        assert!(
            endpoint.url().contains(":master-secret@"),
            "the master's password is kept"
        );

        let flagged = Config::load_from(
            None,
            env(&[]),
            &Overrides {
                redis_sentinel_master: Some("other".into()),
                redis_sentinel_nodes: Some(vec!["redis://s1:26379".into()]),
                ..Overrides::default()
            },
        )
        .unwrap();
        assert_eq!(flagged.redis.sentinel_master.as_deref(), Some("other"));
        assert_eq!(flagged.redis.sentinel_nodes, ["redis://s1:26379"]);

        // Every problem at once, each under its key.
        let errors = Config::load_from(
            None,
            env(&[
                (
                    "GATEWAYD_REDIS__SENTINEL_NODES",
                    "s1:26379,redis://:secret@h/abc",
                ),
                ("GATEWAYD_REDIS__URL", "redis://one:6379"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("redis.sentinel_master: must be set"),
            "{errors}"
        );
        assert!(
            errors.contains("redis.sentinel_nodes: s1:26379: must start with redis://"),
            "{errors}"
        );
        assert!(errors.contains("Invalid database number"), "{errors}");
        assert!(
            !errors.contains("secret"),
            "passwords stay out of errors: {errors}"
        );
        let errors = Config::load_from(
            None,
            env(&[
                ("GATEWAYD_REDIS__SENTINEL_MASTER", "mymaster"),
                ("GATEWAYD_REDIS__URL", "redis://one:6379"),
            ]),
            &Overrides::default(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            errors.contains("redis.sentinel_nodes: must name at least one sentinel"),
            "{errors}"
        );
        assert!(errors.contains("redis.url: names one Redis"), "{errors}");
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
