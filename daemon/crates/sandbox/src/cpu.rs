//! CPU time per task against its plugin's `cpu_ms`: what a task's code costs
//! the host, measured on the thread that runs it, not the time it spends
//! waiting for other agents, the user or the network.
//!
//! The guest runtime polls a task's future (`CpuMeter::measure` wraps each
//! poll with the thread's CPU clock); the guest's code runs inside those
//! polls, and so do the host functions it calls, its tools' instances
//! included. The epoch callback, which runs on the same thread every
//! [`EPOCH_TICK`](crate::EPOCH_TICK) of guest execution, asks
//! `CpuMeter::check` and ends the store with [`CpuBudgetExceeded`] once the
//! task has used its budget. Without a budget nothing is measured.

use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

/// The trap raised when a task has used its CPU budget.
#[derive(Debug, Clone, thiserror::Error)]
#[error("CPU budget of {budget_ms} ms exceeded (plugins.cpu_ms; used {used_ms} ms)")]
pub struct CpuBudgetExceeded {
    budget_ms: u128,
    used_ms: u128,
}

/// The CPU time one task's code has used, against its budget.
#[derive(Debug)]
pub struct CpuMeter {
    /// `None`: no budget (`cpu_ms = 0`), nothing measured.
    budget: Option<Duration>,
    /// Nanoseconds of thread CPU time spent in the task's finished polls.
    used_ns: AtomicU64,
    /// The polling thread's CPU clock when the current poll began, in
    /// nanoseconds; 0 between polls. The epoch callback adds what the poll
    /// in progress has used so far.
    poll_began_ns: AtomicU64,
}

/// The CPU time the calling thread has used.
fn thread_cpu_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    let seconds = u64::try_from(now.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(now.tv_nsec).unwrap_or(0);
    // Never 0, which means "not polling".
    seconds
        .saturating_mul(1_000_000_000)
        .saturating_add(nanos)
        .max(1)
}

impl CpuMeter {
    /// A meter for a task allowed `budget` of CPU time (`None`: unlimited).
    pub fn new(budget: Option<Duration>) -> Self {
        CpuMeter {
            budget,
            used_ns: AtomicU64::new(0),
            poll_began_ns: AtomicU64::new(0),
        }
    }

    /// The CPU time the task has used in its finished polls (zero without a
    /// budget).
    pub fn used(&self) -> Duration {
        Duration::from_nanos(self.used_ns.load(Ordering::Relaxed))
    }

    /// Runs `future`, counting the CPU time of each of its polls.
    pub(crate) async fn measure<T>(&self, future: impl Future<Output = T>) -> T {
        if self.budget.is_none() {
            return future.await;
        }
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            let began = thread_cpu_ns();
            self.poll_began_ns.store(began, Ordering::Relaxed);
            let polled: Poll<T> = future.as_mut().poll(cx);
            let spent = thread_cpu_ns().saturating_sub(began);
            self.poll_began_ns.store(0, Ordering::Relaxed);
            self.used_ns.fetch_add(spent, Ordering::Relaxed);
            polled
        })
        .await
    }

    /// Whether the task is still within its budget; called on the thread
    /// that polls it, while it runs.
    pub(crate) fn check(&self) -> Result<(), CpuBudgetExceeded> {
        let Some(budget) = self.budget else {
            return Ok(());
        };
        let began = self.poll_began_ns.load(Ordering::Relaxed);
        let current = if began == 0 {
            0
        } else {
            thread_cpu_ns().saturating_sub(began)
        };
        let used =
            Duration::from_nanos(self.used_ns.load(Ordering::Relaxed).saturating_add(current));
        if used > budget {
            return Err(CpuBudgetExceeded {
                budget_ms: budget.as_millis(),
                used_ms: used.as_millis(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spin(for_at_least: Duration) {
        let began = thread_cpu_ns();
        while thread_cpu_ns() - began < for_at_least.as_nanos() as u64 {
            std::hint::black_box(0);
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn work_counts_and_waiting_does_not() {
        let meter = CpuMeter::new(Some(Duration::from_millis(50)));
        meter
            .measure(async {
                spin(Duration::from_millis(20));
                // Waiting costs no CPU.
                tokio::time::sleep(Duration::from_millis(200)).await;
                spin(Duration::from_millis(20));
            })
            .await;
        let used = meter.used();
        assert!(used >= Duration::from_millis(40), "{used:?}");
        assert!(used < Duration::from_millis(150), "{used:?}");
        assert!(meter.check().is_ok());

        let over = meter
            .measure(async {
                spin(Duration::from_millis(20));
                // The poll in progress counts before it ends.
                meter.check()
            })
            .await;
        let error = over.expect_err("60 ms used of 50").to_string();
        assert!(
            error.starts_with("CPU budget of 50 ms exceeded (plugins.cpu_ms; used "),
            "{error}"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn without_a_budget_nothing_is_measured_or_refused() {
        let meter = CpuMeter::new(None);
        meter
            .measure(async { spin(Duration::from_millis(20)) })
            .await;
        assert_eq!(meter.used(), Duration::ZERO);
        assert!(meter.check().is_ok());
    }
}
