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
//! The journal only grows: each batch appends the readings taken since the
//! last (`w<ns>,` for the wall clock, `m<ns>,` for the monotonic one), so a
//! task that reads the clock before every chunk writes each reading once.
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
    /// How many of `wall` the journal holds: read from it, or appended to
    /// it by [`TaskClocks::journal_if_new`].
    wall_journaled: usize,
    /// How many of `monotonic` the journal holds.
    monotonic_journaled: usize,
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

    /// Clocks that give the readings of `journal` (what
    /// [`TaskClocks::journal_if_new`] appended, in order) first, then live
    /// ones: for a run of the task on another daemon. The monotonic clock
    /// goes on from the last reading kept. A token that does not parse ends
    /// what is read (a journal is only ever appended whole tokens).
    pub fn from_journal(journal: &str) -> Arc<Self> {
        let mut wall = Vec::new();
        let mut monotonic = Vec::new();
        for token in journal.split(',').filter(|token| !token.is_empty()) {
            let (clock, nanos) = token.split_at(1);
            let Ok(nanos) = nanos.parse::<u64>() else {
                break;
            };
            match clock {
                "w" => wall.push(Duration::from_nanos(nanos)),
                "m" => monotonic.push(nanos),
                _ => break,
            }
        }
        let last = monotonic.iter().copied().max().unwrap_or(0);
        let origin = Instant::now()
            .checked_sub(Duration::from_nanos(last))
            .unwrap_or_else(Instant::now);
        Arc::new(TaskClocks {
            log: Mutex::new(ClockLog {
                wall_journaled: wall.len(),
                monotonic_journaled: monotonic.len(),
                wall,
                monotonic,
                ..ClockLog::default()
            }),
            origin,
        })
    }

    /// The readings the journal does not hold yet, as text to append to it
    /// (`w<ns>,` and `m<ns>,` tokens); `None` when there are none. From then
    /// on the journal is taken to hold them.
    pub fn journal_if_new(&self) -> Option<String> {
        use std::fmt::Write as _;
        let mut log = self.lock();
        let (wall, monotonic) = (log.wall_journaled, log.monotonic_journaled);
        if wall == log.wall.len() && monotonic == log.monotonic.len() {
            return None;
        }
        let mut tail = String::with_capacity(24 * (log.readings() - wall - monotonic));
        for reading in &log.wall[wall..] {
            let nanos = u64::try_from(reading.as_nanos()).unwrap_or(u64::MAX);
            let _ = write!(tail, "w{nanos},");
        }
        for nanos in &log.monotonic[monotonic..] {
            let _ = write!(tail, "m{nanos},");
        }
        log.wall_journaled = log.wall.len();
        log.monotonic_journaled = log.monotonic.len();
        Some(tail)
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
        let first = (wall.now(), monotonic.now(), wall.now());
        let journal = clocks.journal_if_new().expect("readings were taken");
        let elsewhere = TaskClocks::from_journal(&journal);
        let (wall, monotonic) = elsewhere.for_store();
        assert_eq!((wall.now(), monotonic.now(), wall.now()), first);
        assert!(monotonic.now() >= first.1);
        assert_eq!(TaskClocks::new().journal_if_new(), None);
        // A torn or foreign token ends what is read: later readings are live.
        let torn = TaskClocks::from_journal(&format!("{journal}w12x,m5,"));
        let (wall, monotonic) = torn.for_store();
        assert_eq!((wall.now(), monotonic.now(), wall.now()), first);
        assert_ne!(wall.now().as_nanos(), 12);
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
        // Each batch appends only what is new: one token each.
        assert!(
            first.starts_with('w') && second.starts_with('m'),
            "{first}{second}"
        );
        assert_eq!(
            (first.matches(',').count(), second.matches(',').count()),
            (1, 1)
        );
        // A run elsewhere holds what its journal held: nothing new until
        // it reads past it.
        let elsewhere = TaskClocks::from_journal(&(first + &second));
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
