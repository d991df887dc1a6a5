//! `[worker]`: this worker's identity, consumer group, concurrency and recovery.

use super::*;

/// `[worker]`
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Consumer name in the group and identity in the registry; one live process per id.
    pub id: String,
    /// Consumer group on every stream; shared with Python workers.
    pub consumer_group: String,
    /// Most tasks in flight; a permit is taken before more entries are read.
    pub max_concurrency: usize,
    /// Most tasks that may wait for a reply (call-agent, dispatch-group,
    /// ask-user) without holding a permit; they keep their instance.
    pub max_waiting: usize,
    /// How long a waiting task keeps its sandbox, milliseconds; then it is
    /// dropped and the task run again from its journal when the reply
    /// comes (0: at once).
    pub evict_after_ms: u64,
    /// Most tasks waiting without a sandbox at once.
    pub max_suspended: usize,
    /// Longest chain of agents calling agents: a task at this depth gets
    /// `error.denied` from call-agent and dispatch-group.
    pub max_call_depth: u32,
    /// Budget of the plugins' memory, all tasks together, MiB; past it new
    /// tasks wait to start until running ones give memory back (nothing
    /// fails). 0: none.
    pub memory_budget_mb: u64,
    /// Most entries one XREADGROUP returns.
    pub fetch_count: usize,
    /// XREADGROUP BLOCK, milliseconds; also bounds how long a shutdown waits for a read.
    pub block_ms: u64,
    /// An entry pending this long with another consumer is taken over, milliseconds.
    pub claim_idle_ms: u64,
    /// How often pending entries are checked (and our long tasks' entries renewed), milliseconds.
    pub claim_interval_ms: u64,
    /// An entry delivered more often than this is dead-lettered.
    pub max_deliveries: u64,
    /// Where rejected entries go, with the reason and their original fields.
    pub dead_letter_stream: String,
    /// On SIGTERM, how long in-flight tasks may finish, seconds.
    pub shutdown_grace_s: u64,
    /// Registry heartbeat and lock refresh interval, seconds.
    pub heartbeat_interval_s: u64,
    /// TTL of the worker-id lock, seconds; must exceed the heartbeat interval.
    pub lock_ttl_s: u64,
    /// After a graceful CANCEL_TASK, how long the plugin may take to return, milliseconds.
    pub cancel_grace_ms: u64,
    /// Threads of the daemon's own runtime (reading, Redis, the event
    /// writer, HTTP); 0: half the CPUs, at least 1. Plugin code runs on
    /// `plugins.guest_threads`.
    pub io_threads: usize,
}

impl WorkerConfig {
    /// `block_ms`.
    pub fn block(&self) -> Duration {
        Duration::from_millis(self.block_ms)
    }

    /// `claim_idle_ms`.
    pub fn claim_idle(&self) -> Duration {
        Duration::from_millis(self.claim_idle_ms)
    }

    /// `claim_interval_ms`.
    pub fn claim_interval(&self) -> Duration {
        Duration::from_millis(self.claim_interval_ms)
    }

    /// `shutdown_grace_s`.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_s)
    }

    /// `heartbeat_interval_s`.
    pub fn heartbeat_interval(&self) -> Duration {
        Duration::from_secs(self.heartbeat_interval_s)
    }

    /// `lock_ttl_s`.
    pub fn lock_ttl(&self) -> Duration {
        Duration::from_secs(self.lock_ttl_s)
    }

    /// `cancel_grace_ms`.
    pub fn cancel_grace(&self) -> Duration {
        Duration::from_millis(self.cancel_grace_ms)
    }
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            id: "worker-1".into(),
            consumer_group: "agent_engines".into(),
            max_concurrency: 50,
            max_waiting: 1000,
            evict_after_ms: 1000,
            max_suspended: 100_000,
            max_call_depth: 8,
            memory_budget_mb: 2048,
            fetch_count: 10,
            block_ms: 2000,
            claim_idle_ms: 60_000,
            claim_interval_ms: 5000,
            max_deliveries: 5,
            dead_letter_stream: "byai_gateway:dead_letter".into(),
            shutdown_grace_s: 30,
            heartbeat_interval_s: 30,
            lock_ttl_s: 60,
            cancel_grace_ms: 5000,
            io_threads: 0,
        }
    }
}

/// How many threads each of the daemon's two runtimes gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Threads {
    /// The daemon's own runtime: reading, Redis, the event writer, HTTP.
    pub io: usize,
    /// The runtime plugin code runs on.
    pub guests: usize,
}

impl Threads {
    /// `worker.io_threads` and `plugins.guest_threads` on a machine with
    /// `cpus` CPUs, zeros resolved: half the CPUs for the daemon's own work
    /// (at least 1), one thread per CPU for guests. The daemon's runtime
    /// with a thread per CPU cost ~10 % more CPU per task in wake-ups and
    /// idle workers looking for work; guests keep one per CPU so a guest
    /// computing for its whole deadline holds one thread while the others
    /// run (measured in the book's performance chapter).
    pub fn resolve(io_threads: usize, guest_threads: usize, cpus: usize) -> Threads {
        let cpus = cpus.max(1);
        let io = if io_threads > 0 {
            io_threads
        } else {
            (cpus / 2).max(1)
        };
        let guests = if guest_threads > 0 {
            guest_threads
        } else {
            cpus
        };
        Threads { io, guests }
    }
}

impl Config {
    /// The runtimes' threads on this machine.
    pub fn threads(&self) -> Threads {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        Threads::resolve(self.worker.io_threads, self.plugins.guest_threads, cpus)
    }
}

#[cfg(test)]
mod threads_tests {
    use super::Threads;

    #[test]
    fn the_cpus_are_shared_between_the_daemon_and_its_guests() {
        assert_eq!(Threads::resolve(0, 0, 0), Threads { io: 1, guests: 1 });
        assert_eq!(Threads::resolve(0, 0, 1), Threads { io: 1, guests: 1 });
        assert_eq!(Threads::resolve(0, 0, 2), Threads { io: 1, guests: 2 });
        assert_eq!(Threads::resolve(0, 0, 3), Threads { io: 1, guests: 3 });
        assert_eq!(Threads::resolve(0, 0, 16), Threads { io: 8, guests: 16 });
        // What is set is kept, whatever the CPUs.
        assert_eq!(Threads::resolve(6, 0, 8), Threads { io: 6, guests: 8 });
        assert_eq!(Threads::resolve(0, 1, 8), Threads { io: 4, guests: 1 });
        assert_eq!(Threads::resolve(3, 5, 2), Threads { io: 3, guests: 5 });
    }
}
