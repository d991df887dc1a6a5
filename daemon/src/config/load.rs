//! Where the settings come from: defaults < TOML file < environment <
//! flags, merged key by key with where each value came from, and every
//! malformed or unknown key reported with it.

use super::*;

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
        if let Some(name) = &overrides.redis_sentinel_master {
            flag(
                "redis",
                "sentinel_master",
                Value::String(name.clone()),
                "redis-sentinel-master",
            );
        }
        if let Some(nodes) = &overrides.redis_sentinel_nodes {
            let nodes = nodes.iter().cloned().map(Value::String).collect();
            flag(
                "redis",
                "sentinel_nodes",
                Value::Array(nodes),
                "redis-sentinel-nodes",
            );
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
        // A list: comma-separated (`GATEWAYD_REDIS__SENTINEL_NODES=a,b`).
        Some(Value::Array(_)) => Value::Array(
            text.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| Value::String(item.to_owned()))
                .collect(),
        ),
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
