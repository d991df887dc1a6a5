//! A PostgreSQL server of a test's own, with TLS (`ssl = on`, a server
//! certificate of a throwaway CA): `initdb` into a temporary directory and
//! `postgres` on a free loopback port, stopped when dropped. Run as the
//! `postgres` user when the tests run as root (PostgreSQL refuses root).

use crate::tls::TlsMaterial;
use anyhow::{Context as _, Result, bail, ensure};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running private PostgreSQL.
pub struct PostgresServer {
    child: Child,
    pub port: u16,
    /// Data directory and sockets; removed when dropped.
    dir: tempfile::TempDir,
}

/// The directory of the PostgreSQL binaries (`initdb`, `postgres`).
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL server binaries are required (/usr/lib/postgresql)")?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

/// `program args...`, as the `postgres` user when we are root.
fn as_server_user(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

impl PostgresServer {
    /// Starts one serving TLS with `tls`'s server certificate (and plain
    /// connections too: `sslmode` decides), trust authentication.
    pub async fn start_tls(tls: &TlsMaterial) -> Result<Self> {
        let bin = bin_dir()?;
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        if is_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            ensure!(status.success(), "chown of the data directory failed");
        }
        let output = as_server_user(&bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .context("running initdb")?;
        ensure!(
            output.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        // The server reads its key only when it is its own and private.
        for (from, to) in [
            (&tls.server_cert, "server.crt"),
            (&tls.server_key, "server.key"),
        ] {
            std::fs::copy(from, data.join(to))?;
        }
        if is_root() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(data.join("server.crt"))
                .arg(data.join("server.key"))
                .status()?;
            ensure!(status.success(), "chown of the certificate failed");
        }
        std::fs::set_permissions(
            data.join("server.key"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )?;
        for _attempt in 0..5 {
            let port = std::net::TcpListener::bind("127.0.0.1:0")?
                .local_addr()?
                .port();
            let mut child = as_server_user(&bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .args(["-c", "ssl=on", "-c", "fsync=off"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting postgres")?;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let ready = Command::new(bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
                    .status()?
                    .success();
                if ready {
                    return Ok(PostgresServer { child, port, dir });
                }
                if child.try_wait()?.is_some() || Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        bail!("could not start a private PostgreSQL with TLS")
    }

    /// A DSN of its `postgres` database with `sslmode`.
    pub fn dsn(&self, sslmode: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}",
            self.port
        )
    }

    /// Where its data lives (for logs of a failed test).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        // SIGINT to the postmaster itself (its pid is the first line of
        // postmaster.pid): a fast shutdown. When we are root it runs under
        // runuser, which is the child we hold.
        let pid = std::fs::read_to_string(self.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|text| text.lines().next().map(str::to_owned));
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-INT", &pid]).status();
        } else {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}
