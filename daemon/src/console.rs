//! The client commands `gatewayd send` and `gatewayd chat`: one turn sent
//! and its reply printed as it streams, the agent's questions answered,
//! Ctrl-C turned into a cancel. The protocol is the library's
//! ([`byclaw_client`]); this module owns the terminal side only: what
//! goes to standard output and standard error, reading standard input,
//! SIGINT, and the exit codes.
//!
//! Standard output carries the reply: chunk texts as they arrive, artifact
//! URLs on lines of their own, ending with a newline. Standard error carries
//! the rest: the session and message ids, the task's states (dimmed on a
//! terminal), the agent's questions, the final state.

use anyhow::Context as _;
use byclaw_client::{CancelMode, CancelStatus, Client, EventReader};
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Exit codes of `send` and `chat`; 1 (an error: Redis unreachable, no
/// worker for the agent type...) and 2 (bad flags or configuration) are
/// those of every command.
pub mod exit {
    /// The task ended COMPLETED (`chat`: standard input ended, or Ctrl-C at
    /// the prompt).
    pub const COMPLETED: u8 = 0;
    /// The task ended FAILED.
    pub const FAILED: u8 = 3;
    /// The task ended CANCELLED (after Ctrl-C, or cancelled by someone else).
    pub const CANCELLED: u8 = 4;
    /// `send --timeout` passed before the task ended; it is left running.
    pub const TIMEOUT: u8 = 5;
    /// The agent asked a question that cannot be answered: `send` with
    /// standard input not a terminal, or standard input ended. The task is
    /// left waiting for an answer (until its ask-user timeout).
    pub const UNANSWERED: u8 = 6;
    /// A second Ctrl-C: stopped waiting for a task being cancelled.
    pub const INTERRUPTED: u8 = 130;
}

/// How one turn ended, for the caller to go on or to exit with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Completed,
    Failed,
    Cancelled,
    TimedOut,
    Unanswered,
    Interrupted,
}

impl Outcome {
    fn exit_code(self) -> u8 {
        match self {
            Outcome::Completed => exit::COMPLETED,
            Outcome::Failed => exit::FAILED,
            Outcome::Cancelled => exit::CANCELLED,
            Outcome::TimedOut => exit::TIMEOUT,
            Outcome::Unanswered => exit::UNANSWERED,
            Outcome::Interrupted => exit::INTERRUPTED,
        }
    }

    /// The outcome a terminal state means.
    fn of_state(state: &str) -> Self {
        if state == "CANCELLED" {
            Outcome::Cancelled
        } else if state == "FAILED" || state.starts_with("FAILED: ") {
            Outcome::Failed
        } else {
            // COMPLETED, or `QUEUED: <caller>` (a task with a caller handed
            // its result back).
            Outcome::Completed
        }
    }
}

/// `gatewayd send`: one turn; the exit code says how the task ended.
pub async fn send(
    client: &Client,
    agent: &str,
    session: Option<String>,
    timeout: Option<Duration>,
    text: &str,
) -> anyhow::Result<u8> {
    // Questions are answered from standard input only when someone is
    // there to type; piped input is not read.
    let mut conversation =
        Conversation::open(client, agent, session, std::io::stdin().is_terminal()).await?;
    let deadline = timeout.map(|timeout| Instant::now() + timeout);
    let outcome = conversation.turn(text, deadline).await?;
    Ok(outcome.exit_code())
}

/// `gatewayd chat`: a turn per line of standard input, in one session,
/// until standard input ends or Ctrl-C at the prompt. A question of the
/// agent is answered by the next line. Exits 0 then, whatever the turns'
/// outcomes; [`exit::UNANSWERED`] or [`exit::INTERRUPTED`] when it had to
/// stop in a turn.
pub async fn chat(client: &Client, agent: &str, session: Option<String>) -> anyhow::Result<u8> {
    let mut conversation = Conversation::open(client, agent, session, true).await?;
    let prompt = std::io::stdin().is_terminal();
    loop {
        if prompt {
            conversation.out.prompt()?;
        }
        conversation.lines()?;
        let line = tokio::select! {
            line = next_line(&mut conversation.lines) => line?,
            () = conversation.interrupts.recv() => None,
        };
        let Some(line) = line else {
            if prompt {
                // Leave the terminal's prompt line.
                eprintln!();
            }
            return Ok(exit::COMPLETED);
        };
        let text = line.trim();
        if text.is_empty() {
            continue;
        }
        match conversation.turn(text, None).await? {
            Outcome::Unanswered => return Ok(exit::UNANSWERED),
            Outcome::Interrupted => return Ok(exit::INTERRUPTED),
            Outcome::Completed | Outcome::Failed | Outcome::Cancelled | Outcome::TimedOut => {}
        }
    }
}

/// One session talked to from this terminal.
struct Conversation<'c> {
    /// Sends the turns, the answers and the cancels.
    client: &'c Client,
    /// Its own connection for the blocking reads of the session's events.
    reader: EventReader,
    /// The agent type every turn goes to.
    agent: String,
    /// The same for every turn, so the daemon carries the history.
    session: String,
    /// Where the reply and the notes go.
    out: Printer,
    /// SIGINT, taken over for the whole command so Ctrl-C cancels a task
    /// instead of killing the client and leaving the task running.
    interrupts: Interrupts,
    /// Standard input, once read (the chat's prompts and the answers).
    lines: Option<Lines>,
    /// Whether questions may be answered from standard input.
    answers_from_stdin: bool,
}

/// Where a cancel asked on Ctrl-C stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancel {
    /// Nobody asked.
    None,
    /// Asked before the task started (NOT_FOUND): asked again on its next
    /// event, when its execution exists.
    Pending,
    /// Asked and accepted, or the task had ended already.
    Sent,
}

impl<'c> Conversation<'c> {
    async fn open(
        client: &'c Client,
        agent: &str,
        session: Option<String>,
        answers_from_stdin: bool,
    ) -> anyhow::Result<Self> {
        let interrupts = Interrupts::install()?;
        let reader = client
            .event_reader()
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?;
        let mut out = Printer::new();
        let session = match session {
            Some(session) => session,
            None => {
                let session = byclaw_client::new_session_id();
                out.note(&format!(
                    "session {session} (continue it with --session {session})"
                ))?;
                session
            }
        };
        Ok(Conversation {
            client,
            reader,
            agent: agent.to_owned(),
            session,
            out,
            interrupts,
            lines: None,
            answers_from_stdin,
        })
    }

    /// Standard input, read from now on.
    fn lines(&mut self) -> anyhow::Result<&mut Lines> {
        if self.lines.is_none() {
            self.lines = Some(Lines::spawn()?);
        }
        Ok(self.lines.as_mut().expect("just set"))
    }

    /// Sends `text` and prints the reply until the task's terminal state,
    /// `deadline`, or a second Ctrl-C.
    async fn turn(&mut self, text: &str, deadline: Option<Instant>) -> anyhow::Result<Outcome> {
        let err = |error: byclaw_client::ClientError| anyhow::anyhow!("{error}");
        // Where the session's stream ends now, taken before sending: every
        // event of the task comes after it.
        let after = self
            .reader
            .last_entry_id(&self.session)
            .await
            .map_err(err)?;
        let sent = self
            .client
            .send(&self.agent, &self.session, text, serde_json::json!({}))
            .await
            .map_err(err)?;
        if self.answers_from_stdin && self.lines.is_none() {
            // Read before the first question, so a chat's piped answer
            // line and a terminal's type-ahead are not lost.
            self.lines()?;
        }
        let Conversation {
            client,
            reader,
            agent,
            session,
            out,
            interrupts,
            lines,
            ..
        } = self;
        let message_id = sent.message_id.as_str();
        out.note(&format!("message {message_id}"))?;
        let mut events = reader.follow(session, message_id, &after);
        let mut cancel = Cancel::None;
        // Set while a question of the agent waits for its answer line; the
        // events are still followed meanwhile (the question may time out,
        // the task may be cancelled by someone else).
        let mut question = false;
        loop {
            let event = tokio::select! {
                event = events.next() => event.map_err(err)?,
                answer = next_line(lines), if question => {
                    let Some(answer) = answer? else {
                        out.warn(&format!(
                            "cannot answer the agent (standard input ended); task {message_id} waits for an answer until its ask-user timeout"
                        ))?;
                        return Ok(Outcome::Unanswered);
                    };
                    question = false;
                    client
                        .answer_user(agent, session, message_id, answer.trim())
                        .await
                        .map_err(err)?;
                    continue;
                }
                () = interrupts.recv() => {
                    if cancel == Cancel::Sent {
                        out.finish_reply()?;
                        out.note("stopped waiting; the task is being cancelled")?;
                        return Ok(Outcome::Interrupted);
                    }
                    cancel = request_cancel(client, session, message_id, out).await?;
                    continue;
                }
                () = until(deadline) => return timed_out(out, session, message_id),
            };
            let Some(event) = event else {
                // `next` yields the terminal event before ending.
                anyhow::bail!("the events of {message_id} ended without a terminal state");
            };
            if cancel == Cancel::Pending {
                cancel = request_cancel(client, session, message_id, out).await?;
            }
            if let Some(state) = event.state() {
                if event.is_terminal() {
                    out.finish_reply()?;
                    out.final_state(state)?;
                    return Ok(Outcome::of_state(state));
                }
                out.state(state)?;
            } else if let Some(text) = event.chunk() {
                out.chunk(text)?;
            } else if let Some(url) = event.artifact_url() {
                out.artifact(&url)?;
            } else if let Some(prompt) = event.ask_user_prompt() {
                out.finish_reply()?;
                out.question(&prompt)?;
                if lines.is_none() {
                    out.warn(&format!(
                        "cannot answer the agent (standard input is not a terminal); task {message_id} waits for an answer until its ask-user timeout"
                    ))?;
                    return Ok(Outcome::Unanswered);
                }
                question = true;
            }
        }
    }
}

/// The next line of standard input; never when it is not read.
async fn next_line(lines: &mut Option<Lines>) -> anyhow::Result<Option<String>> {
    match lines {
        Some(lines) => lines.next().await,
        None => std::future::pending().await,
    }
}

/// Asks the daemon to cancel the task (graceful: the agent may notice and
/// return); says what came of it.
async fn request_cancel(
    client: &Client,
    session: &str,
    message_id: &str,
    out: &mut Printer,
) -> anyhow::Result<Cancel> {
    let response = client
        .cancel(
            message_id,
            session,
            "interrupted from the command line",
            CancelMode::Graceful,
        )
        .await
        .map_err(|error| anyhow::anyhow!("{error}"))?;
    out.finish_reply()?;
    Ok(match response.status {
        CancelStatus::NotFound => {
            out.note("cancel: NOT_FOUND (not started yet; asking again when it starts)")?;
            Cancel::Pending
        }
        status => {
            let hint = if status == CancelStatus::CancelRequested {
                " (Ctrl-C again to stop waiting)"
            } else {
                ""
            };
            out.note(&format!("cancel: {}{hint}", status.as_str()))?;
            Cancel::Sent
        }
    })
}

/// Resolves at `deadline`; never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

fn timed_out(out: &mut Printer, session: &str, message_id: &str) -> anyhow::Result<Outcome> {
    out.finish_reply()?;
    out.warn(&format!(
        "timed out; the task is still running (cancel it with: gatewayd cancel {message_id} --session {session})"
    ))?;
    Ok(Outcome::TimedOut)
}

/// Writes the reply to standard output and the rest to standard error.
struct Printer {
    /// Standard error is a terminal: notes are dimmed with ANSI codes.
    stderr_tty: bool,
    /// Both streams are the same terminal, where a note must not land in the
    /// middle of a reply line.
    shared_tty: bool,
    /// The last chunk did not end its line: the reply needs a newline
    /// before an artifact URL and at its end.
    mid_line: bool,
}

impl Printer {
    fn new() -> Self {
        let stderr_tty = std::io::stderr().is_terminal();
        Printer {
            stderr_tty,
            shared_tty: stderr_tty && std::io::stdout().is_terminal(),
            mid_line: false,
        }
    }

    fn chunk(&mut self, text: &str) -> std::io::Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(text.as_bytes())?;
        stdout.flush()?;
        self.mid_line = !text.ends_with('\n');
        Ok(())
    }

    fn artifact(&mut self, url: &str) -> std::io::Result<()> {
        self.finish_reply()?;
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "{url}")?;
        stdout.flush()
    }

    /// Ends the reply's last line.
    fn finish_reply(&mut self) -> std::io::Result<()> {
        if self.mid_line {
            self.mid_line = false;
            let mut stdout = std::io::stdout().lock();
            writeln!(stdout)?;
            stdout.flush()?;
        }
        Ok(())
    }

    /// A line on standard error, dimmed on a terminal.
    fn note(&mut self, text: &str) -> std::io::Result<()> {
        self.line(text, "\x1b[2m")
    }

    fn state(&mut self, state: &str) -> std::io::Result<()> {
        self.note(&format!("[{state}]"))
    }

    fn final_state(&mut self, state: &str) -> std::io::Result<()> {
        self.line(state, "\x1b[1m")
    }

    fn question(&mut self, question: &str) -> std::io::Result<()> {
        self.line(&format!("? {question}"), "\x1b[1m")
    }

    fn warn(&mut self, text: &str) -> std::io::Result<()> {
        self.line(&format!("gatewayd: {text}"), "")
    }

    fn prompt(&mut self) -> std::io::Result<()> {
        let mut stderr = std::io::stderr().lock();
        stderr.write_all(b"> ")?;
        stderr.flush()
    }

    fn line(&mut self, text: &str, style: &str) -> std::io::Result<()> {
        if self.shared_tty && self.mid_line {
            // Stdout keeps its bytes; on screen the note gets a line.
            self.mid_line = false;
            eprintln!();
        }
        let mut stderr = std::io::stderr().lock();
        if self.stderr_tty && !style.is_empty() {
            writeln!(stderr, "{style}{text}\x1b[0m")
        } else {
            writeln!(stderr, "{text}")
        }
    }
}

/// Lines of standard input, read on a thread of their own: a blocking read
/// of a terminal cannot be cancelled, and would hold up the runtime's
/// shutdown. The thread ends with the process, or at end of input.
struct Lines {
    /// One line at a time (the thread waits while one is unread), or the
    /// read error; closed at end of input.
    rx: mpsc::Receiver<std::io::Result<String>>,
}

impl Lines {
    fn spawn() -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel(1);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                for line in std::io::stdin().lock().lines() {
                    let failed = line.is_err();
                    if tx.blocking_send(line).is_err() || failed {
                        break;
                    }
                }
            })
            .context("cannot start the thread reading standard input")?;
        Ok(Lines { rx })
    }

    /// The next line, without its line ending; `None` at end of input.
    async fn next(&mut self) -> anyhow::Result<Option<String>> {
        match self.rx.recv().await {
            None => Ok(None),
            Some(line) => {
                let line = line.context("cannot read standard input")?;
                Ok(Some(line.trim_end_matches('\r').to_owned()))
            }
        }
    }
}

/// SIGINT (Ctrl-C), handled rather than fatal.
struct Interrupts {
    /// The signal stream, registered once at start so no Ctrl-C is missed
    /// between two waits.
    #[cfg(unix)]
    signal: tokio::signal::unix::Signal,
}

impl Interrupts {
    fn install() -> anyhow::Result<Self> {
        Ok(Interrupts {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
                .context("cannot handle SIGINT")?,
        })
    }

    /// The next Ctrl-C.
    async fn recv(&mut self) {
        #[cfg(unix)]
        if self.signal.recv().await.is_none() {
            // The signal driver is gone: no more Ctrl-C will come.
            std::future::pending::<()>().await;
        }
        #[cfg(not(unix))]
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
