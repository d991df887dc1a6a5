//! The command line of `gatewayd`: its flags and commands, as clap parses
//! them; `main` runs what they say.

use clap::{Parser, Subcommand};
use gatewayd::config::LogFormat;
use std::path::PathBuf;
use std::time::Duration;

/// Runs AI agents as sandboxed WebAssembly components, fed by Redis Streams.
///
/// Without a command, runs the daemon. Settings come from defaults, then the
/// TOML file, then the environment (GATEWAYD_<TABLE>__<KEY>, and the
/// reference SDK's REDIS_HOST, REDIS_PORT, BYAI_WORKER_CONCURRENCY, ...),
/// then these flags.
#[derive(Debug, Parser)]
#[command(name = "gatewayd", version)]
pub(crate) struct Cli {
    /// TOML configuration file (see config/gateway.toml).
    #[arg(long, short = 'c', value_name = "FILE", global = true)]
    pub(crate) config: Option<PathBuf>,
    /// Redis URL, e.g. redis://127.0.0.1:6379/0 (overrides [redis]).
    #[arg(long, value_name = "URL", global = true)]
    pub(crate) redis_url: Option<String>,
    /// Redis Sentinel: the master's name (overrides redis.sentinel_master);
    /// the master is the one the sentinels name, followed across failovers.
    #[arg(long, value_name = "NAME", global = true)]
    pub(crate) redis_sentinel_master: Option<String>,
    /// Redis Sentinel: the sentinels, e.g.
    /// redis://10.0.0.1:26379,redis://10.0.0.2:26379 (overrides
    /// redis.sentinel_nodes).
    #[arg(long, value_name = "URLS", value_delimiter = ',', global = true)]
    pub(crate) redis_sentinel_nodes: Option<Vec<String>>,
    /// Log format (overrides log.format).
    #[arg(long, value_enum, global = true)]
    pub(crate) log_format: Option<LogFormat>,
    /// Log filter, e.g. `info` or `gatewayd=debug` (overrides log.level;
    /// commands other than the daemon log warnings and errors only unless
    /// given).
    #[arg(long, value_name = "FILTER", global = true)]
    pub(crate) log_level: Option<String>,
    #[command(flatten)]
    pub(crate) daemon: DaemonArgs,
    #[command(subcommand)]
    pub(crate) command: Option<Command>,
}

/// Flags of the daemon itself (no command).
#[derive(Debug, clap::Args)]
pub(crate) struct DaemonArgs {
    /// Directory of plugin `*.wasm` components (overrides plugins.dir).
    #[arg(long, value_name = "DIR")]
    pub(crate) plugin_dir: Option<PathBuf>,
    /// Worker id: consumer name and registry identity (overrides worker.id).
    #[arg(long, value_name = "ID")]
    pub(crate) worker_id: Option<String>,
    /// Check the configuration and exit.
    #[arg(long)]
    pub(crate) check_config: bool,
}

/// Operator commands; they use the configured Redis and stores.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Print a session's history, oldest first: `role: content` per entry,
    /// or one JSON object per line.
    History(HistoryArgs),
    /// Cancel a task as the reference client does (execution looked up in
    /// the session registry, CANCEL_TASK to its worker). Prints NOT_FOUND,
    /// SESSION_MISMATCH, ALREADY_FINISHED or CANCEL_REQUESTED; exits 1
    /// unless CANCEL_REQUESTED.
    Cancel(CancelArgs),
    /// Send TEXT to an agent, as the reference client does, and print the
    /// reply as it streams: chunk texts and artifact URLs on stdout; the
    /// session and message ids, the states and the final state on stderr.
    /// Ctrl-C cancels the task (twice: stop waiting). A question of the
    /// agent is read from stdin when it is a terminal.
    ///
    /// Exit codes: 0 COMPLETED, 3 FAILED, 4 CANCELLED, 5 timeout (the task
    /// goes on), 6 a question that cannot be answered, 130 a second Ctrl-C,
    /// 1 any other error.
    Send(SendArgs),
    /// Talk to an agent: one turn per line of stdin, all in one session
    /// (the daemon carries the history), each reply printed as `send` does.
    /// A question of the agent is answered by the next line. Ctrl-C cancels
    /// the running task; Ctrl-C or end of input at the prompt exits (0).
    Chat(ChatArgs),
    /// List the workers in the registry (one JSON object per line: worker
    /// id, capabilities, last heartbeat in ms), most recent first.
    Workers,
    /// Inspect plugins without running the daemon.
    #[command(subcommand)]
    Plugins(PluginsCommand),
    /// The entries workers could not run, in `worker.dead_letter_stream`:
    /// list, show, replay onto their streams, purge.
    #[command(subcommand)]
    DeadLetters(DeadLettersCommand),
    /// The plugin author's loop: build the plugin project in DIR (its
    /// `build.sh OUT.wasm`, else cargo for wasm32-wasip2), serve it on the
    /// configured Redis (a redis-server is started when none answers on a
    /// loopback address), rebuild and hot-reload on every save of its
    /// sources, and talk to it as `chat` does. Exits when standard input
    /// ends (or at Ctrl-C with --no-chat), stopping what it started.
    Dev(DevArgs),
    /// Run only the bridge for front ends ([bridge] listen, tokens: HTTP
    /// API, SSE, WebSocket, chat page), whatever bridge.enabled says; workers
    /// run elsewhere on the same Redis.
    Bridge,
}

/// `gatewayd cancel MESSAGE_ID --session ID [--reason TEXT] [--force]`.
#[derive(Debug, clap::Args)]
pub(crate) struct CancelArgs {
    /// The message id of the task.
    #[arg(value_name = "MESSAGE_ID")]
    pub(crate) message_id: String,
    /// Its session.
    #[arg(long, value_name = "ID")]
    pub(crate) session: String,
    /// Why (recorded in the execution and sent to the agent).
    #[arg(long, default_value = "cancelled from the command line")]
    pub(crate) reason: String,
    /// Stop at once instead of letting the agent notice and return.
    #[arg(long)]
    pub(crate) force: bool,
}

/// `gatewayd send --agent TYPE [--session ID] [--timeout SECS] TEXT`.
#[derive(Debug, clap::Args)]
pub(crate) struct SendArgs {
    /// The agent type (capability stream) to send to.
    #[arg(long, value_name = "TYPE")]
    pub(crate) agent: String,
    /// Continue this session [default: a new one, printed on stderr].
    #[arg(long, value_name = "ID")]
    pub(crate) session: Option<String>,
    /// Stop waiting after this many seconds (exit 5); the task is not
    /// cancelled.
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..))]
    pub(crate) timeout: Option<u64>,
    /// The message.
    #[arg(value_name = "TEXT")]
    pub(crate) text: String,
}

/// `gatewayd chat --agent TYPE [--session ID]`.
#[derive(Debug, clap::Args)]
pub(crate) struct ChatArgs {
    /// The agent type (capability stream) to talk to.
    #[arg(long, value_name = "TYPE")]
    pub(crate) agent: String,
    /// Continue this session [default: a new one, printed on stderr].
    #[arg(long, value_name = "ID")]
    pub(crate) session: Option<String>,
}

/// `gatewayd dev [DIR] [--agent TYPE] [--no-chat]`.
#[derive(Debug, clap::Args)]
pub(crate) struct DevArgs {
    /// The plugin project.
    #[arg(value_name = "DIR", default_value = ".")]
    pub(crate) dir: PathBuf,
    /// The agent type to talk to [default: the plugin's first capability].
    #[arg(long, value_name = "TYPE")]
    pub(crate) agent: Option<String>,
    /// Serve and rebuild only; no conversation (stop with Ctrl-C).
    #[arg(long)]
    pub(crate) no_chat: bool,
}

/// `gatewayd dead-letters list|show|replay|purge`.
#[derive(Debug, Subcommand)]
pub(crate) enum DeadLettersCommand {
    /// One JSON object per line, oldest first: id, reason, source stream
    /// and entry id, consumer group, worker, deliveries, when and how long
    /// ago it was dead-lettered.
    List {
        #[command(flatten)]
        filter: DeadLetterFilterArgs,
        /// At most this many (0: all).
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// One entry with its original fields (a JSON field shown as JSON).
    Show {
        /// Its id in the dead-letter stream.
        #[arg(value_name = "ID")]
        id: String,
    },
    /// Put entries back on the streams they came from and delete them from
    /// the dead-letter stream; a control command gets
    /// `header.metadata.replayed_from`. By id, or every entry the filters
    /// select (`--all`: every entry). Prints one JSON line per entry.
    Replay {
        /// Ids in the dead-letter stream.
        #[arg(value_name = "ID")]
        ids: Vec<String>,
        #[command(flatten)]
        filter: DeadLetterFilterArgs,
        /// Every entry (needed when no id and no filter is given).
        #[arg(long)]
        all: bool,
    },
    /// Delete the entries the filters select (`--all`: every entry);
    /// prints how many went.
    Purge {
        #[command(flatten)]
        filter: DeadLetterFilterArgs,
        /// Every entry (needed when no filter is given).
        #[arg(long)]
        all: bool,
    },
}

/// Which dead letters: every condition given must hold.
#[derive(Debug, clap::Args)]
pub(crate) struct DeadLetterFilterArgs {
    /// The reason contains TEXT.
    #[arg(long, value_name = "TEXT")]
    pub(crate) reason: Option<String>,
    /// It came from STREAM (its full name, or an agent type).
    #[arg(long, value_name = "STREAM")]
    pub(crate) stream: Option<String>,
    /// Dead-lettered at least AGE ago (`90s`, `15m`, `2h`, `7d`).
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub(crate) older_than: Option<Duration>,
    /// Dead-lettered less than AGE ago.
    #[arg(long, value_name = "AGE", value_parser = humantime::parse_duration)]
    pub(crate) newer_than: Option<Duration>,
}

impl From<DeadLetterFilterArgs> for byclaw_client::DeadLetterFilter {
    fn from(args: DeadLetterFilterArgs) -> Self {
        byclaw_client::DeadLetterFilter {
            reason: args.reason,
            stream: args.stream,
            older_than: args.older_than,
            newer_than: args.newer_than,
        }
    }
}

#[derive(Debug, Subcommand)]
pub(crate) enum PluginsCommand {
    /// Validate a component against the agent world and print its manifest
    /// and the lifecycle hooks it implements (JSON); exits 1 when it would
    /// not load.
    Check {
        /// The `.wasm` file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List what the daemon would load from plugins.dir (JSON, one line per
    /// plugin; rejected files on stderr).
    List,
    /// Write a working plugin project to start from: an agent that streams
    /// its answer word by word and offers a tool with a JSON Schema, a
    /// README, and `build.sh OUT.wasm` with pinned tools. Prints the files
    /// written and the commands to run next. Needs no configuration or
    /// Redis; exits 2 for an invalid NAME, 1 when it cannot write.
    New {
        /// The plugin's id and the agent type it serves: lowercase letters,
        /// digits and '-', starting with a letter.
        #[arg(value_name = "NAME")]
        name: String,
        /// The template's language.
        #[arg(long, value_enum)]
        lang: gatewayd::scaffold::Lang,
        /// Where to write it, a new or empty directory [default: ./NAME].
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Rust: the plugin SDK's directory (plugin-sdk/ of the gatewayd
        /// source) for the project's Cargo.toml [default: $BYCLAW_PLUGIN_SDK,
        /// else the source tree gatewayd was built from].
        #[arg(long, value_name = "PATH")]
        sdk: Option<PathBuf>,
    },
}

/// `gatewayd history SESSION_ID [--limit N] [--json]`.
#[derive(Debug, clap::Args)]
pub(crate) struct HistoryArgs {
    /// The session.
    #[arg(value_name = "SESSION_ID")]
    pub(crate) session_id: String,
    /// Newest entries to show [default: history.max_entries].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) limit: Option<u32>,
    /// One JSON object ({"role", "content", "metadata"}) per line.
    #[arg(long)]
    pub(crate) json: bool,
}
