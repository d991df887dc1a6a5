//! A task's random numbers: every store of a task (its instance, the tools
//! it calls, in order) gets `wasi:random` generators seeded from one seed
//! per task, kept in its execution record. A run of the task after a crash
//! draws the same numbers, so a guest given the same replies takes the same
//! path; the seed comes from the operating system's generator and the
//! generators are ChaCha (`StdRng`), so the numbers stay unpredictable to
//! anyone who cannot read the record.

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use std::sync::Mutex;

/// A new seed for a task: 32 random bytes from the OS, as 64 hex digits.
pub fn new_seed() -> String {
    let seed: [u8; 32] = rand::random();
    crate::cache::hex(&seed)
}

/// Where the stores of one task draw their generators from.
#[derive(Debug)]
pub struct TaskRandom {
    /// Seeded by the task's seed; each store takes its seeds from it in the
    /// order the stores are made.
    source: Mutex<StdRng>,
}

/// The generators of one store.
pub(crate) struct StoreRandom {
    pub(crate) secure: StdRng,
    pub(crate) insecure: StdRng,
    pub(crate) insecure_seed: u128,
}

impl TaskRandom {
    /// From a seed as [`new_seed`] makes it; `None` when it is not one (a
    /// record written without it).
    pub fn from_seed(seed: &str) -> Option<Self> {
        let bytes = unhex(seed)?;
        Some(TaskRandom {
            source: Mutex::new(StdRng::from_seed(bytes)),
        })
    }

    /// The generators of the task's next store.
    pub(crate) fn next_store(&self) -> StoreRandom {
        let mut source = self
            .source
            .lock()
            .expect("random source lock is never poisoned");
        let mut seed = || {
            let mut bytes = [0u8; 32];
            source.fill_bytes(&mut bytes);
            bytes
        };
        let (secure, insecure) = (seed(), seed());
        let insecure_seed = u128::from(source.next_u64()) << 64 | u128::from(source.next_u64());
        StoreRandom {
            secure: StdRng::from_seed(secure),
            insecure: StdRng::from_seed(insecure),
            insecure_seed,
        }
    }
}

fn unhex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.is_ascii() {
        return None;
    }
    let mut bytes = [0u8; 32];
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn draws(random: &TaskRandom) -> Vec<u64> {
        (0..3)
            .map(|_| {
                let mut store = random.next_store();
                store.secure.next_u64() ^ store.insecure.next_u64() ^ store.insecure_seed as u64
            })
            .collect()
    }

    #[test]
    fn one_seed_gives_every_run_the_same_numbers_and_another_seed_others() {
        let seed = new_seed();
        assert_eq!(seed.len(), 64);
        let first = draws(&TaskRandom::from_seed(&seed).unwrap());
        assert_eq!(first, draws(&TaskRandom::from_seed(&seed).unwrap()));
        // Each store of a task gets its own numbers.
        assert_ne!(first[0], first[1]);
        assert_ne!(first, draws(&TaskRandom::from_seed(&new_seed()).unwrap()));
        assert!(TaskRandom::from_seed("not hex").is_none());
        assert!(TaskRandom::from_seed(&"g".repeat(64)).is_none());
    }
}
