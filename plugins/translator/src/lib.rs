//! The translator agent: translates English text word by word with a small
//! built-in dictionary (French or German, `extra_payload.language`), streams
//! the translation and returns it. An example of an agent other agents call;
//! `extra_payload.delay_ms` makes it work that long first (checking for a
//! cancel every 10 ms), which the cancel tests use.

use byclaw_plugin_sdk::{Agent, Command, Error, Manifest, emit, export_agent, is_cancelled};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

const FRENCH: &[(&str, &str)] = &[
    ("hello", "bonjour"),
    ("world", "monde"),
    ("the", "le"),
    ("of", "de"),
    ("and", "et"),
    ("solar", "solaire"),
    ("energy", "énergie"),
    ("power", "puissance"),
    ("water", "eau"),
    ("city", "ville"),
    ("future", "avenir"),
    ("history", "histoire"),
    ("risks", "risques"),
    ("applications", "applications"),
    ("agents", "agents"),
    ("good", "bon"),
    ("morning", "matin"),
];

const GERMAN: &[(&str, &str)] = &[
    ("hello", "hallo"),
    ("world", "Welt"),
    ("the", "die"),
    ("of", "von"),
    ("and", "und"),
    ("solar", "Solar"),
    ("energy", "Energie"),
    ("power", "Kraft"),
    ("water", "Wasser"),
    ("city", "Stadt"),
    ("future", "Zukunft"),
    ("history", "Geschichte"),
    ("good", "gut"),
    ("morning", "Morgen"),
];

/// Works for `delay_ms`, returning early when the task is cancelled.
pub fn work(delay_ms: u64) -> Result<(), Error> {
    let until = Instant::now() + Duration::from_millis(delay_ms);
    while Instant::now() < until {
        if is_cancelled() {
            return Err(Error::Cancelled("stopped on request".into()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

struct Translator;

impl Agent for Translator {
    fn manifest() -> Manifest {
        Manifest::new("translator", env!("CARGO_PKG_VERSION"))
            .description("Translates English word by word (French, German)")
            .capability("translator")
    }

    fn handle(command: Command) -> Result<Value, Error> {
        let language = command.extra_payload["language"]
            .as_str()
            .unwrap_or("fr")
            .to_owned();
        let dictionary = match language.as_str() {
            "fr" => FRENCH,
            "de" => GERMAN,
            other => {
                return Err(Error::InvalidInput(format!(
                    "language {other:?} is not supported (fr, de)"
                )));
            }
        };
        work(command.extra_payload["delay_ms"].as_u64().unwrap_or(0))?;
        let text = command.text();
        let translation: Vec<String> = text
            .split_whitespace()
            .map(|word| {
                let lower = word.to_lowercase();
                dictionary
                    .iter()
                    .find(|(en, _)| *en == lower)
                    .map_or_else(|| word.to_owned(), |(_, to)| (*to).to_owned())
            })
            .collect();
        let translation = translation.join(" ");
        emit::chunk(&translation);
        Ok(json!({ "translation": translation, "language": language }))
    }
}

export_agent!(Translator);
