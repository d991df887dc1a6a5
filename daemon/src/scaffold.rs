//! `gatewayd plugins new`: writes a plugin project to start from.
//!
//! This module owns the project templates (`daemon/templates/<lang>/`,
//! embedded in the binary with the gateway WIT, so a project needs nothing of
//! the source tree; only a Rust project points at the plugin SDK), the rules
//! for a plugin's name and for the directory it is written to, and where a
//! Rust project finds the SDK. Every template is a working agent (a tool
//! with a JSON Schema, a streamed answer) and builds with `build.sh
//! OUT.wasm`, which prints the component's path on stdout: the one
//! interface by which `gatewayd dev` and the tests build any project.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The environment variable naming the plugin SDK's directory when
/// `--sdk` is not given.
pub const SDK_ENV: &str = "BYCLAW_PLUGIN_SDK";

/// The plugin SDK of the source tree this binary was built from, used when
/// neither `--sdk` nor [`SDK_ENV`] names one and it still exists.
const SOURCE_TREE_SDK: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../plugin-sdk");

/// The WIT package every Python and JavaScript project carries in `wit/`.
const GATEWAY_WIT: &str = include_str!("../../wit/gateway.wit");

/// The language of a template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Lang {
    /// Rust on the plugin SDK, built for `wasm32-wasip2` with cargo.
    Rust,
    /// Python, built with componentize-py.
    Python,
    /// JavaScript, built with jco and componentize-js.
    Js,
}

impl Lang {
    /// The name `--lang` takes.
    pub fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

impl fmt::Display for Lang {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file of a template.
struct TemplateFile {
    /// Where it goes, relative to the project directory.
    path: &'static str,
    /// Its text, with `{{name}}` (and in `Cargo.toml` `{{sdk_path}}`) to fill
    /// in unless `verbatim`.
    text: &'static str,
    /// Copied as it is: the WIT, whose comments have braces of their own.
    verbatim: bool,
    /// Whether it is a script to run (`build.sh`).
    executable: bool,
}

const fn file(path: &'static str, text: &'static str) -> TemplateFile {
    TemplateFile {
        path,
        text,
        verbatim: false,
        executable: false,
    }
}

const fn script(path: &'static str, text: &'static str) -> TemplateFile {
    TemplateFile {
        executable: true,
        ..file(path, text)
    }
}

const fn verbatim(path: &'static str, text: &'static str) -> TemplateFile {
    TemplateFile {
        verbatim: true,
        ..file(path, text)
    }
}

const RUST: &[TemplateFile] = &[
    file("README.md", include_str!("../templates/rust/README.md")),
    file(".gitignore", include_str!("../templates/rust/gitignore")),
    file(
        "Cargo.toml",
        include_str!("../templates/rust/Cargo.toml.tmpl"),
    ),
    file("src/lib.rs", include_str!("../templates/rust/src/lib.rs")),
    script("build.sh", include_str!("../templates/rust/build.sh")),
];

const PYTHON: &[TemplateFile] = &[
    file("README.md", include_str!("../templates/python/README.md")),
    file(".gitignore", include_str!("../templates/python/gitignore")),
    file("app.py", include_str!("../templates/python/app.py")),
    script("build.sh", include_str!("../templates/python/build.sh")),
    verbatim("wit/gateway.wit", GATEWAY_WIT),
];

const JS: &[TemplateFile] = &[
    file("README.md", include_str!("../templates/js/README.md")),
    file(".gitignore", include_str!("../templates/js/gitignore")),
    file("app.js", include_str!("../templates/js/app.js")),
    file("package.json", include_str!("../templates/js/package.json")),
    file(
        "package-lock.json",
        include_str!("../templates/js/package-lock.json"),
    ),
    script("build.sh", include_str!("../templates/js/build.sh")),
    verbatim("wit/gateway.wit", GATEWAY_WIT),
];

fn template(lang: Lang) -> &'static [TemplateFile] {
    match lang {
        Lang::Rust => RUST,
        Lang::Python => PYTHON,
        Lang::Js => JS,
    }
}

/// What `gatewayd plugins new` is asked to write.
#[derive(Debug, Clone)]
pub struct NewPlugin {
    /// The plugin's id and the agent type it serves (its capability
    /// stream), so it must be a valid agent type: see [`check_name`].
    pub name: String,
    /// Which template.
    pub lang: Lang,
    /// The project directory; `None` is `./NAME`. It may exist if it is
    /// empty, so that nothing a user has is ever overwritten.
    pub dir: Option<PathBuf>,
    /// Rust only: the plugin SDK's directory the project depends on. `None`
    /// looks at [`SDK_ENV`], then at the source tree this binary was built
    /// from.
    pub sdk: Option<PathBuf>,
}

/// A project written by [`new_plugin`].
#[derive(Debug, Clone)]
pub struct Project {
    /// The plugin's id and agent type.
    pub name: String,
    /// Its template.
    pub lang: Lang,
    /// Its directory, as given (or `NAME`), for the commands printed to the
    /// user to run from where they are.
    pub dir: PathBuf,
    /// The files written, relative to `dir`, in the order they were written.
    pub files: Vec<&'static str>,
    /// For Rust: the SDK directory its `Cargo.toml` points at (absolute).
    pub sdk: Option<PathBuf>,
}

/// Why a project could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// NAME cannot be a plugin id and agent type.
    #[error(
        "invalid plugin name {name:?}: {why}. The name is the plugin's id and the agent type it \
         serves: 1-64 lowercase letters (a-z), digits and '-', starting with a letter, e.g. `my-agent`"
    )]
    InvalidName { name: String, why: String },
    /// The target directory has something in it, which is never
    /// overwritten.
    #[error(
        "{} exists and is not empty; plugins new writes only into a new or empty directory \
         (choose another with --dir)",
        dir.display()
    )]
    NotEmpty { dir: PathBuf },
    /// The target is a file (or something else that is not a directory).
    #[error("{} exists and is not a directory", dir.display())]
    NotADirectory { dir: PathBuf },
    /// Neither `--sdk` nor the environment named an SDK, and the source
    /// tree's is gone (a binary copied elsewhere, a removed checkout).
    #[error(
        "the Rust template needs the plugin SDK (byclaw-plugin-sdk) and none was found: {} does not \
         exist. Pass --sdk PATH (or set {SDK_ENV}) to the plugin-sdk directory of the gatewayd source",
        looked_at.display()
    )]
    SdkNotFound { looked_at: PathBuf },
    /// The directory named is not the `byclaw-plugin-sdk` package.
    #[error(
        "{} (from {from}) is not the plugin SDK: {why}. Pass --sdk PATH (or set {SDK_ENV}) to the \
         plugin-sdk directory of the gatewayd source",
        path.display()
    )]
    NotTheSdk {
        path: PathBuf,
        /// Who named it: `--sdk`, the environment, the source tree.
        from: &'static str,
        why: String,
    },
    /// The SDK's path cannot be written into `Cargo.toml`.
    #[error("the plugin SDK's path {} is not UTF-8, which Cargo.toml cannot hold", path.display())]
    SdkPathNotUtf8 { path: PathBuf },
    /// The target directory could not be listed.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A directory or file of the project could not be created.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Checks that `name` can be a plugin id and an agent type: 1-64 of
/// lowercase ASCII letters, digits and `-`, starting with a letter (the
/// Rust template also makes it a package name, `NAME-plugin`).
pub fn check_name(name: &str) -> Result<(), ScaffoldError> {
    let why = if name.is_empty() {
        Some("it is empty".to_owned())
    } else if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(format!("{c:?} is not allowed"))
    } else if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
        Some("it does not start with a letter".to_owned())
    } else if name.len() > 64 {
        Some(format!("it is {} characters long", name.len()))
    } else {
        None
    };
    match why {
        Some(why) => Err(ScaffoldError::InvalidName {
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// Writes the project `request` describes: checks the name, finds the SDK
/// (Rust), makes sure the directory is new or empty, then writes every file
/// of the template with the name filled in. A file that appeared meanwhile
/// is never overwritten.
pub fn new_plugin(request: &NewPlugin) -> Result<Project, ScaffoldError> {
    check_name(&request.name)?;
    let sdk = match request.lang {
        Lang::Rust => Some(find_sdk(request.sdk.as_deref())?),
        Lang::Python | Lang::Js => None,
    };
    let dir = request
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&request.name));
    prepare_dir(&dir)?;

    let sdk_path = match &sdk {
        Some(path) => toml_string(path)?,
        None => String::new(),
    };
    let vars = [("name", request.name.as_str()), ("sdk_path", &sdk_path)];
    let mut files = Vec::new();
    for file in template(request.lang) {
        let text = if file.verbatim {
            Cow::Borrowed(file.text)
        } else {
            Cow::Owned(render(file.text, &vars))
        };
        write_file(&dir.join(file.path), &text, file.executable)?;
        files.push(file.path);
    }
    tracing::info!(
        name = %request.name,
        lang = %request.lang,
        dir = %dir.display(),
        files = files.len(),
        sdk = ?sdk,
        "wrote a plugin project"
    );
    Ok(Project {
        name: request.name.clone(),
        lang: request.lang,
        dir,
        files,
        sdk,
    })
}

impl Project {
    /// What was written and the commands to run next, for the terminal.
    pub fn summary(&self) -> String {
        let name = &self.name;
        let mut out = format!(
            "Wrote the {} plugin {name} to {}:\n",
            self.lang,
            self.dir.display()
        );
        for file in &self.files {
            out += &format!("  {file}\n");
        }
        if let Some(sdk) = &self.sdk {
            out += &format!("Its Cargo.toml uses the plugin SDK in {}.\n", sdk.display());
        }
        let steps = [
            (
                format!("cd {}", shell_quote(&self.dir.to_string_lossy())),
                "",
            ),
            (
                format!("./build.sh plugins/{name}.wasm"),
                "build it (prints the component's path)",
            ),
            (
                "gatewayd --plugin-dir plugins".to_owned(),
                "serve it (Redis at redis://127.0.0.1:6379 by default)",
            ),
            (
                format!("gatewayd chat --agent {name}"),
                "talk to it, from another terminal",
            ),
        ];
        let width = steps
            .iter()
            .filter(|(_, what)| !what.is_empty())
            .map(|(command, _)| command.len())
            .max()
            .unwrap_or(0);
        out += "\nNext:\n";
        for (command, what) in steps {
            if what.is_empty() {
                out += &format!("  {command}\n");
            } else {
                out += &format!("  {command:width$}  # {what}\n");
            }
        }
        out +=
            "Or all in one, rebuilding on every save (in the project directory):\n  gatewayd dev\n";
        out
    }
}

/// The SDK directory: `--sdk`, else [`SDK_ENV`], else the source tree's;
/// checked to be the SDK package, made absolute (the project's
/// `Cargo.toml` must not depend on where the command ran).
fn find_sdk(flag: Option<&Path>) -> Result<PathBuf, ScaffoldError> {
    let (path, from) = if let Some(path) = flag {
        (path.to_owned(), "--sdk")
    } else if let Some(path) = std::env::var_os(SDK_ENV).filter(|value| !value.is_empty()) {
        (PathBuf::from(path), SDK_ENV)
    } else {
        let path = PathBuf::from(SOURCE_TREE_SDK);
        if !path.is_dir() {
            return Err(ScaffoldError::SdkNotFound { looked_at: path });
        }
        (path, "the source tree gatewayd was built from")
    };
    let not_the_sdk = |why: String| ScaffoldError::NotTheSdk {
        path: path.clone(),
        from,
        why,
    };
    let manifest = path.join("Cargo.toml");
    let text = std::fs::read_to_string(&manifest)
        .map_err(|error| not_the_sdk(format!("cannot read {}: {error}", manifest.display())))?;
    let is_sdk = text
        .lines()
        .any(|line| line.split_whitespace().collect::<String>() == r#"name="byclaw-plugin-sdk""#);
    if !is_sdk {
        return Err(not_the_sdk(
            "its Cargo.toml is not the package byclaw-plugin-sdk".into(),
        ));
    }
    path.canonicalize()
        .map_err(|error| not_the_sdk(format!("cannot resolve the path: {error}")))
}

/// Makes sure `dir` is a new or empty directory.
fn prepare_dir(dir: &Path) -> Result<(), ScaffoldError> {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                return Err(ScaffoldError::NotEmpty {
                    dir: dir.to_owned(),
                });
            }
            Ok(())
        }
        Err(_) if dir.exists() && !dir.is_dir() => Err(ScaffoldError::NotADirectory {
            dir: dir.to_owned(),
        }),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => std::fs::create_dir_all(dir)
            .map_err(|source| ScaffoldError::Write {
                path: dir.to_owned(),
                source,
            }),
        Err(source) => Err(ScaffoldError::Read {
            path: dir.to_owned(),
            source,
        }),
    }
}

/// Creates `path` (and its parent directories) with `text`; fails if it
/// exists.
fn write_file(path: &Path, text: &str, executable: bool) -> Result<(), ScaffoldError> {
    let failed = |source| ScaffoldError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(failed)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if executable { 0o755 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = executable;
    let mut file = options.open(path).map_err(failed)?;
    file.write_all(text.as_bytes()).map_err(failed)
}

/// `template` with every `{{key}}` of `vars` replaced by its value.
fn render(template: &str, vars: &[(&str, &str)]) -> String {
    vars.iter().fold(template.to_owned(), |text, (key, value)| {
        text.replace(&format!("{{{{{key}}}}}"), value)
    })
}

/// `path` as a TOML basic string, quotes included. A JSON string is one:
/// TOML has the same escapes.
fn toml_string(path: &Path) -> Result<String, ScaffoldError> {
    let text = path.to_str().ok_or_else(|| ScaffoldError::SdkPathNotUtf8 {
        path: path.to_owned(),
    })?;
    Ok(serde_json::Value::from(text).to_string())
}

/// `text` as one shell word: unchanged when it needs no quoting.
fn shell_quote(text: &str) -> Cow<'_, str> {
    let plain = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./+:@%".contains(c));
    if plain {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(format!("'{}'", text.replace('\'', r"'\''")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_agent_types() {
        for good in ["echo", "my-agent", "a1", "tpl-rust-0badf00d"] {
            check_name(good).unwrap();
        }
        for (bad, why) in [
            ("", "it is empty"),
            ("My-Agent", "'M' is not allowed"),
            ("my_agent", "'_' is not allowed"),
            ("my agent", "' ' is not allowed"),
            ("1agent", "does not start with a letter"),
            ("-agent", "does not start with a letter"),
        ] {
            let error = check_name(bad).unwrap_err().to_string();
            assert!(error.contains(why), "{bad:?}: {error}");
            assert!(error.contains("lowercase letters"), "{error}");
        }
        assert!(check_name(&"a".repeat(64)).is_ok());
        assert!(check_name(&"a".repeat(65)).is_err());
    }

    #[test]
    fn every_placeholder_is_filled() {
        for lang in [Lang::Rust, Lang::Python, Lang::Js] {
            for file in template(lang).iter().filter(|file| !file.verbatim) {
                let text = render(file.text, &[("name", "demo"), ("sdk_path", "\"/sdk\"")]);
                assert!(!text.contains("{{"), "{lang} {}: {text}", file.path);
            }
        }
    }

    #[test]
    fn the_projects_carry_all_of_the_wit() {
        let wit = Path::new(env!("CARGO_MANIFEST_DIR")).join("../wit");
        let mut files: Vec<String> = std::fs::read_dir(&wit)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        // A new file in wit/ needs its own `verbatim` entry in PYTHON and JS.
        assert_eq!(files, ["gateway.wit"]);
        assert_eq!(
            GATEWAY_WIT,
            std::fs::read_to_string(wit.join("gateway.wit")).unwrap()
        );
    }

    #[test]
    fn the_js_template_pins_what_js_echo_pins() {
        let js_echo = include_str!("../../plugins/js-echo/package-lock.json");
        let lock = JS.iter().find(|f| f.path == "package-lock.json").unwrap();
        assert_eq!(render(lock.text, &[("name", "js-echo")]), js_echo);
        let js_echo = include_str!("../../plugins/js-echo/package.json");
        let package = JS.iter().find(|f| f.path == "package.json").unwrap();
        assert_eq!(render(package.text, &[("name", "js-echo")]), js_echo);
    }

    #[test]
    fn a_project_is_written_once_and_never_over_anything() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("demo");
        let request = NewPlugin {
            name: "demo".into(),
            lang: Lang::Python,
            dir: Some(dir.clone()),
            sdk: None,
        };
        let project = new_plugin(&request).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("wit/gateway.wit")).unwrap(),
            GATEWAY_WIT
        );
        let app = std::fs::read_to_string(dir.join("app.py")).unwrap();
        assert!(app.contains(r#"NAME = "demo""#), "{app}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir.join("build.sh"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o111, 0o111);
        }
        assert!(project.summary().contains("./build.sh plugins/demo.wasm"));

        let again = new_plugin(&request).unwrap_err();
        assert!(matches!(again, ScaffoldError::NotEmpty { .. }), "{again}");
        // An empty directory is fine.
        let empty = root.path().join("empty");
        std::fs::create_dir(&empty).unwrap();
        new_plugin(&NewPlugin {
            dir: Some(empty),
            ..request.clone()
        })
        .unwrap();
    }

    #[test]
    fn the_rust_template_points_at_the_sdk() {
        let root = tempfile::tempdir().unwrap();
        let sdk = Path::new(SOURCE_TREE_SDK);
        let project = new_plugin(&NewPlugin {
            name: "demo".into(),
            lang: Lang::Rust,
            dir: Some(root.path().join("demo")),
            sdk: Some(sdk.to_owned()),
        })
        .unwrap();
        let manifest = std::fs::read_to_string(project.dir.join("Cargo.toml")).unwrap();
        let expected = format!(
            "byclaw-plugin-sdk = {{ path = {} }}",
            toml_string(&sdk.canonicalize().unwrap()).unwrap()
        );
        assert!(manifest.contains(&expected), "{manifest}");
        assert!(manifest.contains("\n[workspace]\n"), "{manifest}");

        // The workspace root is not the SDK.
        let wrong = new_plugin(&NewPlugin {
            name: "demo".into(),
            lang: Lang::Rust,
            dir: Some(root.path().join("other")),
            sdk: Some(sdk.join("..")),
        })
        .unwrap_err();
        assert!(
            wrong.to_string().contains("is not the plugin SDK"),
            "{wrong}"
        );
        assert!(!root.path().join("other").exists());
    }

    #[test]
    fn paths_are_quoted_for_the_shell_and_toml() {
        assert_eq!(shell_quote("/tmp/x"), "/tmp/x");
        assert_eq!(shell_quote("my dir/it's"), r"'my dir/it'\''s'");
        assert_eq!(
            toml_string(Path::new(r#"/a "b"\c"#)).unwrap(),
            r#""/a \"b\"\\c""#
        );
    }
}
