//! Every configuration file shipped in `config/` loads and validates.

use gatewayd::config::{Config, Overrides};
use std::path::Path;

#[test]
fn every_file_in_config_loads() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config");
    let mut loaded = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = Config::load_from(Some(&path), Vec::new(), &Overrides::default())
                .unwrap_or_else(|e| panic!("{}:\n{e}", path.display()));
            config.validate().unwrap();
            loaded += 1;
        }
    }
    assert!(
        loaded >= 2,
        "found only {loaded} files in {}",
        dir.display()
    );
}

#[test]
fn the_documented_file_states_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/gateway.toml");
    let config = Config::load_from(Some(&path), Vec::new(), &Overrides::default()).unwrap();
    let mut expected = Config::default();
    expected.plugins.dir = "plugins-out".into();
    assert_eq!(config, expected);
}
