//! How long the daemon's retry loops wait: exponential from a first wait to
//! a cap, with jitter (each wait up to twice its step, from `backon`), so
//! that daemons that lost Redis together do not all come back in step. No
//! limit on attempts here: each loop has its own stop (shutdown, a bounded
//! number of attempts), this only says how long to wait before the next.

use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use std::time::Duration;

/// The waits of one retry loop, started again after each success.
#[derive(Debug)]
pub(crate) struct Backoff {
    /// Makes a fresh sequence after a success.
    builder: ExponentialBuilder,
    /// The waits of the failures since the last success.
    waits: ExponentialBackoff,
    /// The longest step, returned should the sequence ever run out.
    cap: Duration,
    /// Whether the last attempt failed.
    failing: bool,
}

impl Backoff {
    /// Waits from `first` doubling up to `cap`, each with jitter.
    pub(crate) fn new(first: Duration, cap: Duration) -> Self {
        let builder = ExponentialBuilder::new()
            .with_min_delay(first)
            .with_max_delay(cap)
            .with_jitter()
            .without_max_times();
        Backoff {
            waits: builder.build(),
            builder,
            cap,
            failing: false,
        }
    }

    /// After a failure: how long to wait before trying again.
    pub(crate) fn next_wait(&mut self) -> Duration {
        self.failing = true;
        self.waits.next().unwrap_or(self.cap)
    }

    /// After a success: the next failure starts from the first wait again.
    /// True when the attempts before had failed (to say it works again).
    pub(crate) fn succeeded(&mut self) -> bool {
        let recovered = std::mem::take(&mut self.failing);
        if recovered {
            self.waits = self.builder.build();
        }
        recovered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_to_the_cap_with_jitter_and_start_over_after_a_success() {
        let first = Duration::from_millis(100);
        let cap = Duration::from_secs(5);
        let mut backoff = Backoff::new(first, cap);
        assert!(!backoff.succeeded(), "nothing failed yet");
        let waits: Vec<Duration> = (0..12).map(|_| backoff.next_wait()).collect();
        // Step n is first × 2^n up to the cap; jitter adds up to one step.
        for (n, wait) in waits.iter().enumerate() {
            let step = (first * 2u32.pow(n as u32)).min(cap);
            assert!(
                *wait >= step && *wait <= step * 2,
                "wait {n}: {wait:?}, step {step:?}"
            );
        }
        assert!(waits[11] >= cap, "the cap is reached: {waits:?}");
        assert!(backoff.succeeded(), "it had been failing");
        let again = backoff.next_wait();
        assert!(again >= first && again <= first * 2, "{again:?}");
    }
}
