//! A task's clocks: every store of a task (its instance, the tools it
//! calls) reads `wasi:clocks` through one [`TaskClocks`], which keeps the
//! readings in order. When the task's instance is dropped while it waits
//! and the task is run again, [`TaskClocks::rewind`] makes the new run read
//! the same times in the same order, then live ones: a guest that branches
//! on the time takes the path it took before.
//!
//! The readings also go to the task's journal in Redis with the next events
//! the task writes ([`TaskClocks::journal_if_new`],
//! [`TaskClocks::from_journal`]), so a run of it on another daemon after a
//! crash reads the times the first run read before any event it emitted.
//!
//! The log is bounded: a guest that reads the clock more than
//! [`MAX_READINGS`] times (polling it in a loop) is no longer replayable,
//! and [`TaskClocks::replayable`] says so; the daemon then keeps such a task
//! in memory while it waits.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// Most readings of both clocks together one task keeps.
pub const MAX_READINGS: usize = 4096;

/// The clock readings of one task, shared by its stores and its runs.
#[derive(Debug)]
pub struct TaskClocks {
    log: Mutex<ClockLog>,
    /// The monotonic clock's origin: the same for every store and every
    /// run of the task, so its readings only grow.
    origin: Instant,
}

#[derive(Debug, Default)]
struct ClockLog {
    /// Wall-clock readings, in the order they were taken.
    wall: Vec<Duration>,
    /// How many of `wall` this run has read.
    wall_read: usize,
    /// Monotonic readings (nanoseconds since `origin`), in order.
    monotonic: Vec<u64>,
    /// How many of `monotonic` this run has read.
    monotonic_read: usize,
    /// More than [`MAX_READINGS`] were taken: later ones are not kept.
    overflowed: bool,
    /// How many readings (of both clocks) the journal holds: those read
    /// from it, or written to it by [`TaskClocks::journal_if_new`].
    journaled: usize,
}

impl ClockLog {
    fn full(&self) -> bool {
        self.readings() >= MAX_READINGS
    }

    fn readings(&self) -> usize {
        self.wall.len() + self.monotonic.len()
    }
}

impl TaskClocks {
    pub fn new() -> Arc<Self> {
        Arc::new(TaskClocks {
            log: Mutex::new(ClockLog::default()),
            origin: Instant::now(),
        })
    }

    /// Whether a new run can read every time this task read so far.
    pub fn replayable(&self) -> bool {
        !self.lock().overflowed
    }

    /// Clocks that give the readings of `journal` (as [`TaskClocks::journal`]
    /// wrote it) first, then live ones: for a run of the task on another
    /// daemon. The monotonic clock goes on from the last reading kept.
    pub fn from_journal(journal: &str) -> Arc<Self> {
        let kept: JournalOfClocks = serde_json::from_str(journal).unwrap_or_default();
        let last = kept.monotonic.iter().copied().max().unwrap_or(0);
        let origin = Instant::now()
            .checked_sub(Duration::from_nanos(last))
            .unwrap_or_else(Instant::now);
        Arc::new(TaskClocks {
            log: Mutex::new(ClockLog {
                journaled: kept.wall.len() + kept.monotonic.len(),
                wall: kept.wall.into_iter().map(Duration::from_nanos).collect(),
                monotonic: kept.monotonic,
                ..ClockLog::default()
            }),
            origin,
        })
    }

    /// The readings so far, as JSON for the task's journal; `None` when
    /// there are none, or when they are not all kept.
    pub fn journal(&self) -> Option<String> {
        let log = self.lock();
        if log.overflowed || (log.wall.is_empty() && log.monotonic.is_empty()) {
            return None;
        }
        let kept = JournalOfClocks {
            wall: log
                .wall
                .iter()
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
                .collect(),
            monotonic: log.monotonic.clone(),
        };
        Some(serde_json::to_string(&kept).expect("numbers serialize"))
    }

    /// The readings so far, as [`TaskClocks::journal`] gives them, when the
    /// journal does not hold them all yet; from then on it is taken to.
    pub fn journal_if_new(&self) -> Option<String> {
        let readings = {
            let log = self.lock();
            if log.readings() == log.journaled {
                return None;
            }
            log.readings()
        };
        let journal = self.journal()?;
        self.lock().journaled = readings;
        Some(journal)
    }

    /// The next run reads the kept readings from the first.
    pub fn rewind(&self) {
        let mut log = self.lock();
        log.wall_read = 0;
        log.monotonic_read = 0;
    }

    /// The clocks a store of this task reads.
    pub(crate) fn for_store(self: &Arc<Self>) -> (WallOf, MonotonicOf) {
        (WallOf(self.clone()), MonotonicOf(self.clone()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockLog> {
        self.log.lock().expect("clock log lock is never poisoned")
    }

    fn wall_now(&self) -> Duration {
        let mut log = self.lock();
        if let Some(&kept) = log.wall.get(log.wall_read) {
            log.wall_read += 1;
            return kept;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        if log.overflowed || log.full() {
            log.overflowed = true;
        } else {
            log.wall.push(now);
            log.wall_read += 1;
        }
        now
    }

    fn monotonic_now(&self) -> u64 {
        let mut log = self.lock();
        if let Some(&kept) = log.monotonic.get(log.monotonic_read) {
            log.monotonic_read += 1;
            return kept;
        }
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if log.overflowed || log.full() {
            log.overflowed = true;
        } else {
            log.monotonic.push(now);
            log.monotonic_read += 1;
        }
        now
    }
}

/// The clock readings of a task as its journal keeps them: nanoseconds.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct JournalOfClocks {
    wall: Vec<u64>,
    monotonic: Vec<u64>,
}

/// `wasi:clocks/wall-clock` of one store.
pub(crate) struct WallOf(Arc<TaskClocks>);

impl HostWallClock for WallOf {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(1)
    }

    fn now(&self) -> Duration {
        self.0.wall_now()
    }
}

/// `wasi:clocks/monotonic-clock` of one store.
pub(crate) struct MonotonicOf(Arc<TaskClocks>);

impl HostMonotonicClock for MonotonicOf {
    fn resolution(&self) -> u64 {
        1
    }

    fn now(&self) -> u64 {
        self.0.monotonic_now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rewound_task_reads_the_same_times_then_live_ones() {
        let clocks = TaskClocks::new();
        let (wall, monotonic) = clocks.for_store();
        let first = (wall.now(), monotonic.now(), monotonic.now());
        std::thread::sleep(Duration::from_millis(2));
        clocks.rewind();
        // A second store of the new run reads the same, in order.
        let (wall, monotonic) = clocks.for_store();
        assert_eq!((wall.now(), monotonic.now(), monotonic.now()), first);
        // Past the kept readings, the clocks are live and never go back.
        let live = monotonic.now();
        assert!(live >= first.2 + 2_000_000, "{live} after {}", first.2);
        assert!(wall.now() >= first.0);
        assert!(clocks.replayable());
    }

    #[test]
    fn a_run_on_another_daemon_reads_the_times_of_the_journal_then_goes_on() {
        let clocks = TaskClocks::new();
        let (wall, monotonic) = clocks.for_store();
        let first = (wall.now(), monotonic.now());
        let journal = clocks.journal().expect("readings were taken");
        let elsewhere = TaskClocks::from_journal(&journal);
        let (wall, monotonic) = elsewhere.for_store();
        assert_eq!((wall.now(), monotonic.now()), first);
        assert!(monotonic.now() >= first.1);
        assert_eq!(TaskClocks::new().journal(), None);
    }

    #[test]
    fn readings_go_to_the_journal_once_each_time_there_are_new_ones() {
        let clocks = TaskClocks::new();
        assert_eq!(clocks.journal_if_new(), None, "nothing read yet");
        let (wall, monotonic) = clocks.for_store();
        wall.now();
        let first = clocks.journal_if_new().expect("one new reading");
        assert_eq!(clocks.journal_if_new(), None, "written already");
        monotonic.now();
        let second = clocks.journal_if_new().expect("one more reading");
        assert_ne!(first, second);
        // A run elsewhere holds what its journal held: nothing new until
        // it reads past it.
        let elsewhere = TaskClocks::from_journal(&second);
        assert_eq!(elsewhere.journal_if_new(), None);
        let (wall, _) = elsewhere.for_store();
        wall.now();
        assert_eq!(
            elsewhere.journal_if_new(),
            None,
            "a reading from the journal"
        );
        wall.now();
        assert!(elsewhere.journal_if_new().is_some(), "a live reading");
    }

    #[test]
    fn a_task_polling_the_clock_is_no_longer_replayable() {
        let clocks = TaskClocks::new();
        let (_, monotonic) = clocks.for_store();
        for _ in 0..MAX_READINGS {
            monotonic.now();
        }
        assert!(clocks.replayable(), "{MAX_READINGS} readings are kept");
        monotonic.now();
        assert!(!clocks.replayable());
    }
}
