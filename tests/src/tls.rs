//! Throwaway certificates for TLS tests, made with `openssl`: a CA, a
//! server certificate for 127.0.0.1 and localhost, and a client certificate,
//! all signed by that CA and valid for a day.

use anyhow::{Context as _, Result, ensure};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

/// PEM files in a directory that lives as long as any clone.
#[derive(Clone)]
pub struct TlsMaterial {
    /// Keeps the files.
    _dir: Arc<tempfile::TempDir>,
    pub ca_cert: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA of its own that signed nothing here: trusting it trusts nobody.
    pub other_ca_cert: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (is it installed?)")?;
    ensure!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// A CA certificate and key: `name.crt`, `name.key`.
fn make_ca(dir: &Path, name: &str) -> Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

/// A certificate for `name` signed by `ca`, with `extensions` (an
/// openssl extension file's contents).
fn make_signed(dir: &Path, ca: &str, name: &str, extensions: &str) -> Result<()> {
    std::fs::write(dir.join(format!("{name}.ext")), extensions)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.crt"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.crt"),
        ],
    )
}

impl TlsMaterial {
    /// Makes a new CA, server and client certificate.
    pub fn generate() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path();
        make_ca(path, "ca")?;
        make_ca(path, "other-ca")?;
        make_signed(
            path,
            "ca",
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
        )?;
        make_signed(path, "ca", "client", "extendedKeyUsage=clientAuth\n")?;
        Ok(TlsMaterial {
            ca_cert: path.join("ca.crt"),
            server_cert: path.join("server.crt"),
            server_key: path.join("server.key"),
            client_cert: path.join("client.crt"),
            client_key: path.join("client.key"),
            other_ca_cert: path.join("other-ca.crt"),
            _dir: Arc::new(dir),
        })
    }
}
