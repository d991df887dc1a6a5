//! `gatewayd dev`: a project from `gatewayd plugins new` is built, served on
//! a Redis it starts itself, answers a message, is rebuilt when a source is
//! saved, and answers the next message with the new code; when standard
//! input ends, everything it started is stopped.

use std::io::{BufRead as _, BufReader, Write as _};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

/// The first build compiles the plugin SDK's dependencies for wasm32.
const FIRST_BUILD: Duration = Duration::from_secs(900);
/// A rebuild after one changed line, and its reload.
const REBUILD: Duration = Duration::from_secs(300);
/// An answer of the echo-like template.
const ANSWER: Duration = Duration::from_secs(60);

/// Where the template's cargo builds go: kept between runs, beside the
/// test targets, so only the first run compiles the SDK's dependencies.
fn template_target_dir() -> std::path::PathBuf {
    std::path::PathBuf::from(concat!(env!("CARGO_TARGET_TMPDIR"), "/plugin-templates"))
}

/// A free TCP port on loopback (nobody listens on it once returned).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Lines of a child's output, as they come, and every line so far for
/// messages.
struct Lines {
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(output: impl std::io::Read + Send + 'static) -> Self {
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines() {
                let Ok(line) = line else { return };
                if send.send(line).is_err() {
                    return;
                }
            }
        });
        Lines {
            lines,
            seen: Vec::new(),
        }
    }

    /// The first line (from now) that `matches`, within `timeout`.
    fn wait(&mut self, what: &str, timeout: Duration, matches: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if matches(&line) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line {what} within {timeout:?}; so far:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }
}

/// Kills the dev process if the test fails half-way.
struct Dev(Child);

impl Drop for Dev {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn say(stdin: &mut ChildStdin, line: &str) {
    writeln!(stdin, "{line}").unwrap();
    stdin.flush().unwrap();
}

/// Whether a Redis answers on `port`.
fn redis_answers(port: u16) -> bool {
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut reply = [0u8; 7];
    std::io::Read::read_exact(&mut stream, &mut reply).is_ok() && &reply == b"+PONG\r\n"
}

#[test]
fn dev_builds_serves_rebuilds_on_save_and_stops_what_it_started() {
    let scratch = tempfile::tempdir().unwrap();
    let name = format!("dev-test-{:08x}", fastrand::u32(..));
    let project = scratch.path().join(&name);
    let made = Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .args(["plugins", "new", &name, "--lang", "rust", "--dir"])
        .arg(&project)
        .output()
        .unwrap();
    assert!(made.status.success(), "{made:?}");

    // No Redis on this port: dev starts one, and stops it at the end.
    let port = free_port();
    let mut dev = Dev(Command::new(env!("CARGO_BIN_EXE_gatewayd"))
        .arg("--redis-url")
        .arg(format!("redis://127.0.0.1:{port}/0"))
        .arg("dev")
        .arg(&project)
        .env("CARGO_TARGET_DIR", template_target_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap());
    let mut stdin = dev.0.stdin.take().unwrap();
    let mut replies = Lines::of(dev.0.stdout.take().unwrap());
    let mut log = Lines::of(dev.0.stderr.take().unwrap());

    log.wait("saying it started redis-server", FIRST_BUILD, |line| {
        line.contains(&format!("started redis-server on port {port}"))
    });
    log.wait("saying the agent is served", ANSWER, |line| {
        line.starts_with(&format!("dev: talking to {name}"))
    });
    say(&mut stdin, "hello dev");
    let reply = replies.wait("with the answer", ANSWER, |line| !line.is_empty());
    assert_eq!(reply, "You said: hello dev");

    // One line of the handler changed and saved: the next message is
    // answered by the new build, in the same conversation.
    let source = project.join("src/lib.rs");
    let code = std::fs::read_to_string(&source).unwrap();
    assert!(
        code.contains("\"You said: {text}\""),
        "the template changed"
    );
    let saved = Instant::now();
    std::fs::write(
        &source,
        code.replace("You said: {text}", "You wrote: {text}"),
    )
    .unwrap();
    log.wait("saying the new build serves", REBUILD, |line| {
        line.starts_with("dev: new build serving")
    });
    say(&mut stdin, "hello again");
    let reply = replies.wait("with the new answer", ANSWER, |line| !line.is_empty());
    assert_eq!(reply, "You wrote: hello again");
    eprintln!(
        "save → first answer of the new build: {:.1} s",
        saved.elapsed().as_secs_f64()
    );

    // A build that fails keeps the previous one serving.
    std::fs::write(&source, "this is not Rust").unwrap();
    log.wait("saying the build failed", REBUILD, |line| {
        line.starts_with("dev: build failed; the previous build keeps serving")
    });
    say(&mut stdin, "still there?");
    let reply = replies.wait("from the previous build", ANSWER, |line| !line.is_empty());
    assert_eq!(reply, "You wrote: still there?");

    // End of input: dev stops the daemon and the Redis it started.
    drop(stdin);
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = dev.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "dev did not exit when its input ended"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}; log:\n{}", log.seen.join("\n"));
    assert!(
        !redis_answers(port),
        "the redis-server dev started still runs"
    );
}
