//! Load generator: N echo tasks through Redis to a `gatewayd` process, with
//! tasks/s and latency percentiles (enqueue → first chunk, enqueue →
//! COMPLETED), then the same for tasks sent one at a time (idle latency).
//!
//! With `--reloads N` the throughput run also swaps the echo plugin between
//! two versions N times, one second apart, by renaming the new file over the
//! old (as a deploy does), and reports each reload's latency: rename → first
//! COMPLETED event of a task served by the new version.
//!
//! The hard path is measured with `--idle-plugins N` (N more plugins loaded,
//! each with a stream of its own, never asked) and `--examples` (the other
//! five example plugins loaded beside echo): throughput must not depend on
//! what is loaded and idle. With `--hostile` the misbehaving fixture plugin
//! is loaded too (the daemon-wide limits become 64 MiB / 3 s) and, for the
//! whole throughput run, hostile tasks run beside echo, seven at a time:
//! an event flood, a memory bomb, an endless loop, a log flood, a 20 MB
//! result, 20 MB tool arguments and an agent calling itself. It prints how
//! each ended and the daemon's peak RSS.
//!
//! Besides tasks/s and latency it prints the CPU time per task of the
//! daemon (from `/proc/<pid>/stat`) and of Redis (`INFO cpu`), and the Redis
//! commands per task the daemon sent (`INFO commandstats`, less the load
//! generator's own commands, which it counts).
//!
//! By default it starts its own redis-server and the `gatewayd` binary next
//! to this one (`cargo build --release -p gatewayd` first; `scripts/bench`
//! does everything); `--gatewayd PATH` runs another build side by side.
//!
//! `--reference` first runs the same load against the reference Python
//! worker (byclaw-gateway-sdk, installed into a cached venv by
//! `tests/python/venv.sh`) serving an echo agent that does the same work
//! (`tests/python/bench_reference.py`), on the same Redis, then gatewayd:
//! the ratio comes from one run. It gets `--reference-tasks` tasks (default
//! the smaller of `--tasks` and 3,000: it is much slower).

use anyhow::{Context as _, Result, bail};
use integration_tests::{
    RedisServer, ask_agent_json, built_plugins, delta_content, python_venv, repo_root, suffix,
};
use redis::aio::MultiplexedConnection;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

struct Args {
    tasks: usize,
    in_flight: usize,
    idle: usize,
    readers: usize,
    concurrency: usize,
    fetch: usize,
    text: String,
    redis_url: Option<String>,
    reloads: usize,
    idle_plugins: usize,
    examples: bool,
    hostile: bool,
    gatewayd: Option<PathBuf>,
    /// Run the reference Python worker first, with this many tasks.
    reference: Option<usize>,
    /// `KEY=VALUE` for the daemon's environment (e.g. `GATEWAYD_HISTORY__BACKEND=off`).
    env: Vec<(String, String)>,
    /// Serve through Redis Sentinel: a master, a replica and three
    /// sentinels of the bench's own; the daemon finds the master through
    /// the sentinels.
    sentinel: bool,
}

fn parse_args() -> Result<Args> {
    let mut args = Args {
        tasks: 20_000,
        in_flight: 200,
        idle: 200,
        readers: 4,
        concurrency: 256,
        fetch: 64,
        text: "hello from the benchmark".into(),
        redis_url: None,
        reloads: 0,
        idle_plugins: 0,
        examples: false,
        hostile: false,
        gatewayd: None,
        reference: None,
        env: Vec::new(),
        sentinel: false,
    };
    let mut reference_tasks = None;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--tasks" => args.tasks = value()?.parse()?,
            "--in-flight" => args.in_flight = value()?.parse()?,
            "--idle" => args.idle = value()?.parse()?,
            "--readers" => args.readers = value()?.parse()?,
            "--concurrency" => args.concurrency = value()?.parse()?,
            "--fetch" => args.fetch = value()?.parse()?,
            "--text" => args.text = value()?,
            "--redis-url" => args.redis_url = Some(value()?),
            "--reloads" => args.reloads = value()?.parse()?,
            "--idle-plugins" => args.idle_plugins = value()?.parse()?,
            "--examples" => args.examples = true,
            "--sentinel" => args.sentinel = true,
            "--hostile" => args.hostile = true,
            "--gatewayd" => args.gatewayd = Some(PathBuf::from(value()?)),
            "--reference" => args.reference = Some(0),
            "--reference-tasks" => reference_tasks = Some(value()?.parse()?),
            "--env" => {
                let pair = value()?;
                let (key, val) = pair
                    .split_once('=')
                    .with_context(|| format!("--env {pair}: expected KEY=VALUE"))?;
                args.env.push((key.to_owned(), val.to_owned()));
            }
            "-h" | "--help" => {
                println!(
                    "gatewayd-bench [--tasks 20000] [--in-flight 200] [--idle 200] [--readers 4] \
                     [--concurrency 256] [--fetch 64] [--text T] [--redis-url URL] [--reloads N] \
                     [--idle-plugins N] [--examples] [--hostile] [--gatewayd PATH] [--env KEY=VALUE]... \
                     [--reference [--reference-tasks N]] [--sentinel]"
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other}"),
        }
    }
    args.readers = args.readers.clamp(1, args.in_flight.max(1));
    if args.reference.is_some() || reference_tasks.is_some() {
        args.reference = Some(reference_tasks.unwrap_or(args.tasks.min(3_000)));
    }
    Ok(args)
}

/// Latencies of one task, from its enqueue.
#[derive(Default, Clone, Copy)]
struct Sample {
    first_chunk: Duration,
    completed: Duration,
    /// When COMPLETED arrived.
    at: Option<Instant>,
    /// Served by echo 0.2.0 (the fixture `echo-v2`) rather than 0.1.0.
    new_version: bool,
}

/// One in-flight slot: a session that runs one task at a time.
struct Slot {
    session: String,
    stream: String,
    last_id: String,
    message: String,
    sent: Instant,
    first_chunk: Option<Duration>,
    busy: bool,
    /// Queued in the pipeline being built; its clock starts when it is sent.
    fresh: bool,
}

const CAPABILITY_STREAM: &str = "byai_gateway:ctrl:capability:echo";

/// What one driver saw: latencies, failed tasks, and the Redis commands it
/// sent itself (subtracted from the server's count).
struct Driven {
    samples: Vec<Sample>,
    failures: usize,
    commands: u64,
}

/// Drives `slots` sessions until `next` reaches `total`.
async fn drive(
    mut conn: MultiplexedConnection,
    slots: usize,
    next: Arc<AtomicUsize>,
    total: usize,
    text: Arc<str>,
) -> Result<Driven> {
    let run = suffix();
    let mut slots: Vec<Slot> = (0..slots)
        .map(|i| {
            let session = format!("bench-{run}-{i}");
            Slot {
                stream: format!("byai_gateway:session:{session}:data_stream"),
                session,
                last_id: "0".into(),
                message: String::new(),
                sent: Instant::now(),
                first_chunk: None,
                busy: false,
                fresh: false,
            }
        })
        .collect();
    let mut samples = Vec::new();
    let mut failures = 0;
    let mut commands = 0u64;
    loop {
        // Fill free slots with new tasks, one pipeline.
        let mut pipe = redis::pipe();
        let mut queued = 0;
        for slot in slots.iter_mut().filter(|s| !s.busy) {
            if next.fetch_add(1, Ordering::Relaxed) >= total {
                break;
            }
            slot.message = format!("msg-{}", suffix());
            let trace = format!("{:032x}", fastrand::u128(..));
            let data = ask_agent_json(
                &slot.session,
                &slot.message,
                &trace,
                "echo",
                serde_json::json!(&*text),
                "",
            );
            pipe.cmd("XADD")
                .arg(CAPABILITY_STREAM)
                .arg("*")
                .arg("data")
                .arg(data)
                .ignore();
            slot.busy = true;
            slot.fresh = true;
            slot.first_chunk = None;
            queued += 1;
        }
        if queued > 0 {
            let enqueued = Instant::now();
            for slot in slots
                .iter_mut()
                .filter(|s| s.busy && s.first_chunk.is_none() && s.fresh)
            {
                slot.sent = enqueued;
                slot.fresh = false;
            }
            pipe.query_async::<()>(&mut conn).await?;
            commands += queued as u64;
        }
        let busy: Vec<usize> = (0..slots.len()).filter(|&i| slots[i].busy).collect();
        if busy.is_empty() {
            return Ok(Driven {
                samples,
                failures,
                commands,
            });
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(64)
            .arg("BLOCK")
            .arg(1000)
            .arg("STREAMS");
        for &i in &busy {
            cmd.arg(&slots[i].stream);
        }
        for &i in &busy {
            cmd.arg(&slots[i].last_id);
        }
        let reply: Option<redis::streams::StreamReadReply> = cmd.query_async(&mut conn).await?;
        commands += 1;
        let arrived = Instant::now();
        for key in reply.map(|r| r.keys).unwrap_or_default() {
            let Some(&i) = busy.iter().find(|&&i| slots[i].stream == key.key) else {
                continue;
            };
            let slot = &mut slots[i];
            for entry in key.ids {
                slot.last_id = entry.id.clone();
                let data: String = entry.get("data").unwrap_or_default();
                if !data.contains(&slot.message) {
                    continue; // an event of the slot's previous task
                }
                if has_field(&data, "event_type", "answerDelta") {
                    slot.first_chunk.get_or_insert(arrived - slot.sent);
                } else if has_field(&data, "contentType", "3003") {
                    let completed = has_field(&data, "content", "COMPLETED");
                    if completed {
                        samples.push(Sample {
                            first_chunk: slot.first_chunk.unwrap_or(arrived - slot.sent),
                            completed: arrived - slot.sent,
                            at: Some(arrived),
                            new_version: has_field(&data, "plugin_version", "0.2.0"),
                        });
                    } else {
                        failures += 1;
                    }
                    slot.busy = false;
                }
            }
        }
    }
}

/// Whether event JSON `data` holds `"key":"value"` — compact as gatewayd
/// writes it, or with a space after the colon as Python's `json.dumps`
/// does. A substring test: the load generator must not cost more than the
/// workers it measures.
fn has_field(data: &str, key: &str, value: &str) -> bool {
    let mut at = 0;
    while let Some(found) = data[at..].find(key) {
        let rest = &data[at + found + key.len()..];
        if let Some(rest) = rest.strip_prefix("\":")
            && let Some(rest) = rest.strip_prefix(' ').or(Some(rest))
            && let Some(rest) = rest.strip_prefix('"')
            && rest.starts_with(value)
            && rest[value.len()..].starts_with('"')
        {
            return true;
        }
        at += found + key.len();
    }
    false
}

/// `total` tasks over `args.readers` connections, `args.in_flight` in all.
async fn drive_all(
    client: &redis::Client,
    args: &Args,
    next: Arc<AtomicUsize>,
    total: usize,
    text: Arc<str>,
) -> Result<Driven> {
    let mut drivers = Vec::new();
    for r in 0..args.readers {
        let slots = args.in_flight / args.readers + usize::from(r < args.in_flight % args.readers);
        // Its reads block up to a second when no event comes (a slow
        // worker): no response timeout.
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        let conn = client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        drivers.push(tokio::spawn(drive(
            conn,
            slots,
            next.clone(),
            total,
            text.clone(),
        )));
    }
    let mut all = Driven {
        samples: Vec::new(),
        failures: 0,
        commands: 0,
    };
    for driver in drivers {
        let driven = driver.await??;
        all.samples.extend(driven.samples);
        all.failures += driven.failures;
        all.commands += driven.commands;
    }
    Ok(all)
}

/// Waits until `worker` serves echo in the registry; fails with the
/// process' log when it exits or `limit` passes first.
async fn wait_registered(
    conn: &mut MultiplexedConnection,
    worker: &str,
    process: &mut tokio::process::Child,
    log: &tempfile::NamedTempFile,
    limit: Duration,
    what: &str,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let member: bool = redis::cmd("SISMEMBER")
            .arg("byai_gateway:registry:capability:workers:echo")
            .arg(worker)
            .query_async(conn)
            .await?;
        if member {
            return Ok(());
        }
        if started.elapsed() > limit || process.try_wait()?.is_some() {
            bail!(
                "{what} did not start: {}",
                std::fs::read_to_string(log.path())?
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--reference`: the reference Python worker serving echo on the same
/// Redis, warmed up, then `tasks` tasks; stopped before gatewayd starts.
async fn reference_run(
    client: &redis::Client,
    conn: &mut MultiplexedConnection,
    url: &str,
    args: &Args,
    tasks: usize,
) -> Result<()> {
    let python = python_venv().await?;
    let worker = format!("bench-reference-{}", suffix());
    // The SDK writes a log file into its working directory.
    let cwd = tempfile::tempdir()?;
    let log = tempfile::NamedTempFile::new()?;
    let mut process = tokio::process::Command::new(&python)
        .arg(repo_root().join("tests/python/bench_reference.py"))
        .args(["--redis-url", url, "--worker-id", &worker])
        .args(["--max-concurrency", &args.concurrency.to_string()])
        .args(["--fetch-count", &args.fetch.to_string()])
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::null())
        .stderr(log.reopen()?)
        .kill_on_drop(true)
        .spawn()?;
    let pid = process
        .id()
        .context("the reference worker exited at once")?;
    wait_registered(
        conn,
        &worker,
        &mut process,
        &log,
        Duration::from_secs(60),
        "the reference worker",
    )
    .await?;
    println!(
        "reference Python worker {python} (max_concurrency {}, fetch {}) · {tasks} tasks, {} in flight",
        args.concurrency, args.fetch, args.in_flight
    );
    let text: Arc<str> = Arc::from(args.text.as_str());
    for (label, total) in [
        ("reference warm-up", args.in_flight),
        ("reference throughput", tasks),
    ] {
        let next = Arc::new(AtomicUsize::new(0));
        let before = usage(conn, pid).await?;
        let started = Instant::now();
        let driven = drive_all(client, args, next, total, text.clone()).await?;
        let wall = started.elapsed();
        let after = usage(conn, pid).await?;
        if label == "reference throughput" {
            report(label, &driven.samples, driven.failures, wall);
            report_cost(
                "reference",
                &before,
                &after,
                driven.samples.len() + driven.failures,
                driven.commands,
            );
        }
        delete_bench_keys(conn).await?;
    }
    let _ = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status()
        .await;
    if tokio::time::timeout(Duration::from_secs(10), process.wait())
        .await
        .is_err()
    {
        process.kill().await?;
    }
    // Whatever it left in the registry: gatewayd's run must not count it.
    let _: () = redis::cmd("SREM")
        .arg("byai_gateway:registry:capability:workers:echo")
        .arg(&worker)
        .query_async(conn)
        .await?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index].as_secs_f64() * 1000.0
}

fn report(label: &str, samples: &[Sample], failures: usize, wall: Duration) {
    let mut first: Vec<Duration> = samples.iter().map(|s| s.first_chunk).collect();
    let mut done: Vec<Duration> = samples.iter().map(|s| s.completed).collect();
    first.sort();
    done.sort();
    println!(
        "{label}: {} tasks ({failures} failed) in {:.2} s = {:.0} tasks/s",
        samples.len(),
        wall.as_secs_f64(),
        samples.len() as f64 / wall.as_secs_f64()
    );
    for (name, values) in [("first chunk", &first), ("completed  ", &done)] {
        println!(
            "  {name}  p50 {:.3} ms  p90 {:.3} ms  p99 {:.3} ms  max {:.3} ms",
            percentile(values, 0.50),
            percentile(values, 0.90),
            percentile(values, 0.99),
            percentile(values, 1.0)
        );
    }
}

/// Per swap: rename → first COMPLETED of a task on the version swapped in.
fn report_reloads(samples: &[Sample], swaps: &[(Instant, bool)]) {
    let mut latencies = Vec::new();
    for (k, (at, to_new)) in swaps.iter().enumerate() {
        let next_swap = swaps.get(k + 1).map(|(t, _)| *t);
        let first = samples
            .iter()
            .filter(|s| s.new_version == *to_new)
            .filter_map(|s| s.at)
            .filter(|t| t > at && next_swap.is_none_or(|next| *t < next))
            .min();
        match first {
            Some(t) => latencies.push(t - *at),
            None => {
                println!("  reload {k}: no task served by the new version before the next swap")
            }
        }
    }
    latencies.sort();
    println!(
        "reloads: {} of {} observed · rename → first task on the new version p50 {:.1} ms  max {:.1} ms",
        latencies.len(),
        swaps.len(),
        percentile(&latencies, 0.5),
        percentile(&latencies, 1.0)
    );
}

async fn delete_bench_keys(conn: &mut MultiplexedConnection) -> Result<()> {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("byai_gateway:session:bench-*")
        .query_async(conn)
        .await?;
    for chunk in keys.chunks(1000) {
        let _: () = redis::cmd("DEL").arg(chunk).query_async(conn).await?;
    }
    Ok(())
}

/// The hostile tasks of `--hostile`: capability and input.
const HOSTILE: &[(&str, &str)] = &[
    ("fault-flood", "x"),
    ("fault-memory", "x"),
    ("fault-loop", "x"),
    ("fault-chatter", "100000"),
    ("fault-big-result", "20000000"),
    ("fault-big-tool", "20000000"),
    ("recurse", "0"),
];

/// How long a round of hostile tasks may take before those still running
/// are reported as never ending (the policy's deadline is 3 s).
const HOSTILE_ROUND_LIMIT: Duration = Duration::from_secs(60);

/// Runs every kind of [`HOSTILE`] task at once, again and again, until
/// `stop`; returns how each ended (kind → terminal states, counted).
async fn hostile(
    mut conn: MultiplexedConnection,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Result<std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>>> {
    let mut ended: std::collections::BTreeMap<String, std::collections::BTreeMap<String, usize>> =
        Default::default();
    let run = suffix();
    let mut round = 0;
    while !stop.load(Ordering::Relaxed) {
        round += 1;
        let mut waiting = Vec::new();
        let mut pipe = redis::pipe();
        for (capability, input) in HOSTILE {
            let session = format!("bench-hostile-{run}-{round}-{capability}");
            let message = format!("msg-{}", suffix());
            let trace = format!("{:032x}", fastrand::u128(..));
            let data = ask_agent_json(
                &session,
                &message,
                &trace,
                capability,
                serde_json::json!(input),
                "",
            );
            pipe.cmd("XADD")
                .arg(format!("byai_gateway:ctrl:capability:{capability}"))
                .arg("*")
                .arg("data")
                .arg(data)
                .ignore();
            waiting.push((capability.to_string(), session, message, "0".to_owned()));
        }
        pipe.query_async::<()>(&mut conn).await?;
        let round_started = Instant::now();
        while !waiting.is_empty() {
            if round_started.elapsed() > HOSTILE_ROUND_LIMIT {
                // Reported, not waited for forever: the summary says which
                // kinds never ended, and stderr names their sessions.
                for (capability, session, message, _) in waiting.drain(..) {
                    eprintln!(
                        "hostile {capability}: no terminal event for {message} in session {session} after {HOSTILE_ROUND_LIMIT:?}"
                    );
                    *ended
                        .entry(capability)
                        .or_default()
                        .entry(format!("no terminal event in {HOSTILE_ROUND_LIMIT:?}"))
                        .or_default() += 1;
                }
                break;
            }
            let mut cmd = redis::cmd("XREAD");
            cmd.arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(1000)
                .arg("STREAMS");
            for (_, session, _, _) in &waiting {
                cmd.arg(format!("byai_gateway:session:{session}:data_stream"));
            }
            for (_, _, _, last) in &waiting {
                cmd.arg(last);
            }
            let reply: Option<redis::streams::StreamReadReply> = cmd.query_async(&mut conn).await?;
            let mut done = Vec::new();
            for key in reply.map(|r| r.keys).unwrap_or_default() {
                let Some(i) = waiting
                    .iter()
                    .position(|(_, session, _, _)| key.key.contains(session.as_str()))
                else {
                    continue;
                };
                for entry in key.ids {
                    waiting[i].3 = entry.id.clone();
                    let data: String = entry.get("data").unwrap_or_default();
                    let Ok(event) = serde_json::from_str::<serde_json::Value>(&data) else {
                        continue;
                    };
                    let state = delta_content(&event);
                    let terminal = event["message_id"] == waiting[i].2.as_str()
                        && event["data"]["contentType"] == "3003"
                        && ["COMPLETED", "FAILED", "CANCELLED"]
                            .iter()
                            .any(|t| state.starts_with(t));
                    if terminal {
                        // The reason without its sizes, so like ones count together.
                        let reason: String = state.chars().take(48).collect();
                        *ended
                            .entry(waiting[i].0.clone())
                            .or_default()
                            .entry(reason)
                            .or_default() += 1;
                        done.push(i);
                    }
                }
            }
            done.sort_unstable();
            done.dedup();
            for i in done.into_iter().rev() {
                waiting.remove(i);
            }
        }
    }
    Ok(ended)
}

/// The daemon's resident memory now and at its peak, MiB (`VmRSS`,
/// `VmHWM` of `/proc/<pid>/status`).
fn rss_mib(pid: u32) -> Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> f64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}

/// CPU seconds a process has used (user + system), from `/proc/<pid>/stat`.
fn process_cpu_s(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name is in parentheses and may hold spaces; the fields
    // after it are fixed: utime and stime are the 12th and 13th.
    let after_name = stat.rsplit_once(')').context("unexpected /proc stat")?.1;
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    Ok(ticks / clock_ticks_per_s())
}

fn clock_ticks_per_s() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|out| String::from_utf8(out.stdout).ok())
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// One `INFO` section as `field → value`.
async fn redis_info(
    conn: &mut MultiplexedConnection,
    section: &str,
) -> Result<Vec<(String, String)>> {
    let text: String = redis::cmd("INFO").arg(section).query_async(conn).await?;
    Ok(text
        .lines()
        .filter_map(|line| line.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect())
}

/// What the daemon and Redis had used at one moment.
struct Usage {
    /// The worker's: gatewayd, or the reference Python worker.
    worker_cpu_s: f64,
    redis_cpu_s: f64,
    /// Calls per command, from `INFO commandstats`.
    redis_calls: std::collections::BTreeMap<String, u64>,
}

async fn usage(conn: &mut MultiplexedConnection, worker_pid: u32) -> Result<Usage> {
    let cpu = redis_info(conn, "cpu").await?;
    let field = |name: &str| -> f64 {
        cpu.iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(0.0)
    };
    let redis_cpu_s = field("used_cpu_user") + field("used_cpu_sys");
    let mut redis_calls = std::collections::BTreeMap::new();
    for (key, value) in redis_info(conn, "commandstats").await? {
        // cmdstat_xadd:calls=12,usec=...
        let Some(command) = key.strip_prefix("cmdstat_") else {
            continue;
        };
        let calls = value
            .split(',')
            .find_map(|kv| kv.strip_prefix("calls="))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        redis_calls.insert(command.to_owned(), calls);
    }
    Ok(Usage {
        worker_cpu_s: process_cpu_s(worker_pid)?,
        redis_cpu_s,
        redis_calls,
    })
}

/// CPU per task and the daemon's Redis commands per task over a run.
fn report_cost(worker: &str, before: &Usage, after: &Usage, tasks: usize, generator_commands: u64) {
    let tasks = tasks.max(1) as f64;
    let mut calls: Vec<(String, u64)> = after
        .redis_calls
        .iter()
        .map(|(command, n)| {
            let was = before.redis_calls.get(command).copied().unwrap_or(0);
            (command.clone(), n.saturating_sub(was))
        })
        .filter(|(command, n)| *n > 0 && command != "info")
        .collect();
    calls.sort_by_key(|call| std::cmp::Reverse(call.1));
    let total: u64 = calls.iter().map(|(_, n)| n).sum();
    let daemon_commands = total.saturating_sub(generator_commands);
    println!(
        "  cpu per task   {worker} {:.0} µs  redis {:.0} µs (redis also serves the load generator)",
        (after.worker_cpu_s - before.worker_cpu_s) / tasks * 1e6,
        (after.redis_cpu_s - before.redis_cpu_s) / tasks * 1e6,
    );
    let breakdown: Vec<String> = calls
        .iter()
        .map(|(command, n)| format!("{command} {:.2}", *n as f64 / tasks))
        .collect();
    println!(
        "  redis commands per task  {:.2} by {worker} ({:.2} in all: {})",
        daemon_commands as f64 / tasks,
        total as f64 / tasks,
        breakdown.join(", ")
    );
}

/// A plugin directory for the run: echo, and the neighbours asked for.
fn plugin_directory(args: &Args, plugins: &std::path::Path) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    std::fs::copy(plugins.join("echo.wasm"), dir.path().join("echo.wasm"))?;
    if args.examples {
        for name in ["showcase", "planner", "translator", "researcher", "tools"] {
            std::fs::copy(
                plugins.join(format!("{name}.wasm")),
                dir.path().join(format!("{name}.wasm")),
            )?;
        }
    }
    if args.hostile {
        std::fs::copy(plugins.join("faults.wasm"), dir.path().join("faults.wasm"))?;
    }
    if args.idle_plugins > 0 {
        // The fixture names itself `idle-0000`; each copy gets its own id
        // and capability by rewriting that placeholder (same length).
        let template = std::fs::read(plugins.join("idle.wasm"))?;
        let placeholder = b"idle-0000";
        anyhow::ensure!(
            template
                .windows(placeholder.len())
                .any(|w| w == placeholder),
            "idle.wasm does not contain its placeholder id"
        );
        anyhow::ensure!(args.idle_plugins <= 9999, "--idle-plugins: at most 9999");
        for n in 1..=args.idle_plugins {
            let id = format!("idle-{n:04}");
            let mut bytes = template.clone();
            let mut at = 0;
            while let Some(found) = bytes[at..]
                .windows(placeholder.len())
                .position(|w| w == placeholder)
            {
                let start = at + found;
                bytes[start..start + placeholder.len()].copy_from_slice(id.as_bytes());
                at = start + placeholder.len();
            }
            std::fs::write(dir.path().join(format!("{id}.wasm")), bytes)?;
        }
    }
    Ok(dir)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = parse_args()?;
    let sentinel = match args.sentinel {
        true => Some(integration_tests::sentinel::SentinelSet::start().await?),
        false => None,
    };
    let own_redis = match (&args.redis_url, &sentinel) {
        (None, None) => Some(RedisServer::start().await?),
        _ => None,
    };
    let url = match (&sentinel, &args.redis_url, &own_redis) {
        (Some(set), _, _) => format!("redis://127.0.0.1:{}/0", set.master_port().await?),
        (None, Some(url), _) => url.clone(),
        (None, None, own) => own.as_ref().expect("started above").url(),
    };
    let client = redis::Client::open(url.as_str())?;
    let mut conn = client.get_multiplexed_async_connection().await?;

    if let Some(tasks) = args.reference {
        reference_run(&client, &mut conn, &url, &args, tasks).await?;
    }

    let plugins = built_plugins();
    let plugin_dir = plugin_directory(&args, plugins)?;
    let loaded = std::fs::read_dir(plugin_dir.path())?.count();
    let workspace = tempfile::tempdir()?;
    let gatewayd: PathBuf = match &args.gatewayd {
        Some(path) => path.clone(),
        None => std::env::current_exe()?.with_file_name("gatewayd"),
    };
    anyhow::ensure!(
        gatewayd.is_file(),
        "{} missing: cargo build --release -p gatewayd",
        gatewayd.display()
    );
    let worker = format!("bench-{}", suffix());
    let log = tempfile::NamedTempFile::new()?;
    let mut command = tokio::process::Command::new(&gatewayd);
    match &sentinel {
        Some(set) => command
            .args(["--redis-sentinel-master", &set.master_name])
            .args(["--redis-sentinel-nodes", &set.sentinel_urls().join(",")]),
        None => command.args(["--redis-url", &url]),
    };
    command
        .args(["--worker-id", &worker, "--log-level", "warn"])
        .arg("--plugin-dir")
        .arg(plugin_dir.path())
        .env(
            "GATEWAYD_WORKER__MAX_CONCURRENCY",
            args.concurrency.to_string(),
        )
        .env("GATEWAYD_WORKER__FETCH_COUNT", args.fetch.to_string())
        .env("GATEWAYD_WORKSPACE__DIR", workspace.path())
        .env("GATEWAYD_HTTP__LISTEN", "127.0.0.1:0");
    if args.hostile {
        command
            .env("GATEWAYD_PLUGINS__MEMORY_LIMIT_MB", "64")
            .env("GATEWAYD_PLUGINS__DEADLINE_S", "3");
    }
    for (key, value) in &args.env {
        command.env(key, value);
    }
    let mut daemon = command.stderr(log.reopen()?).kill_on_drop(true).spawn()?;
    let daemon_pid = daemon.id().context("gatewayd exited at once")?;
    wait_registered(
        &mut conn,
        &worker,
        &mut daemon,
        &log,
        Duration::from_secs(120),
        "gatewayd",
    )
    .await?;
    println!(
        "gatewayd {} (max_concurrency {}, fetch {}, {} plugins loaded) · {} tasks, {} in flight, {} reader connections",
        gatewayd.display(),
        args.concurrency,
        args.fetch,
        loaded,
        args.tasks,
        args.in_flight,
        args.readers
    );
    for (key, value) in &args.env {
        println!("  env {key}={value}");
    }

    // Warm up, then the throughput run.
    let text: Arc<str> = Arc::from(args.text.as_str());
    for (label, total) in [("warm-up", args.in_flight * 5), ("throughput", args.tasks)] {
        let next = Arc::new(AtomicUsize::new(0));
        let before = usage(&mut conn, daemon_pid).await?;
        let started = Instant::now();
        let swapper = (label == "throughput" && args.reloads > 0).then(|| {
            let dir = plugin_dir.path().to_owned();
            let plugins = plugins.to_owned();
            let reloads = args.reloads;
            tokio::spawn(async move {
                let mut swaps = Vec::new();
                for k in 0..reloads {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let to_new = k % 2 == 0;
                    let file = if to_new { "echo-v2.wasm" } else { "echo.wasm" };
                    let staged = dir.join("echo.wasm.staged");
                    std::fs::copy(plugins.join(file), &staged)?;
                    std::fs::rename(&staged, dir.join("echo.wasm"))?;
                    swaps.push((Instant::now(), to_new));
                }
                anyhow::Ok(swaps)
            })
        });
        let stop_hostile = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let neighbour = (label == "throughput" && args.hostile).then(|| {
            let stop = stop_hostile.clone();
            let client = client.clone();
            tokio::spawn(async move {
                // Its reads block up to a second on tasks that emit nothing
                // for seconds: no response timeout.
                let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
                let conn = client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?;
                hostile(conn, stop).await
            })
        });
        let Driven {
            samples,
            failures,
            commands: generator_commands,
        } = drive_all(&client, &args, next, total, text.clone()).await?;
        let wall = started.elapsed();
        let after = usage(&mut conn, daemon_pid).await?;
        stop_hostile.store(true, Ordering::Relaxed);
        if label == "throughput" {
            report(label, &samples, failures, wall);
            let (rss, peak) = rss_mib(daemon_pid)?;
            println!("  gatewayd memory  RSS {rss:.0} MiB, peak {peak:.0} MiB");
            // The usage reads themselves: two INFO calls each (not counted),
            // and nothing else of ours ran in between.
            report_cost(
                "gatewayd",
                &before,
                &after,
                samples.len() + failures,
                generator_commands,
            );
        }
        if let Some(swapper) = swapper {
            report_reloads(&samples, &swapper.await??);
        }
        if let Some(neighbour) = neighbour {
            let ended = neighbour.await??;
            let (_, peak) = rss_mib(daemon_pid)?;
            println!("  hostile tasks beside it (gatewayd peak RSS {peak:.0} MiB):");
            for (kind, states) in ended {
                let states: Vec<String> = states.iter().map(|(s, n)| format!("{n}× {s}")).collect();
                println!("    {kind}: {}", states.join("; "));
            }
        }
        delete_bench_keys(&mut conn).await?;
    }

    // Idle latency: one task at a time.
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let driven = drive(conn.clone(), 1, next, args.idle, text).await?;
    report(
        "idle (1 in flight)",
        &driven.samples,
        driven.failures,
        started.elapsed(),
    );
    delete_bench_keys(&mut conn).await?;

    let _ = tokio::process::Command::new("kill")
        .arg("-TERM")
        .arg(daemon_pid.to_string())
        .status()
        .await;
    let _ = tokio::time::timeout(Duration::from_secs(10), daemon.wait()).await;
    Ok(())
}
