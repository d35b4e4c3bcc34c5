//! Keeping rayon's threads awake between the short parallel sections of a training step.
//!
//! A step runs hundreds of parallel sections (several per layer) with short serial stretches
//! between them. An idle rayon thread yields about 30 times and then sleeps on a futex, so
//! after every serial stretch longer than a few microseconds the next section starts on the
//! calling thread alone until the others have been woken (an inter-processor interrupt, slow
//! in a virtual machine). On a bf16 LoRA step of SmolLM2-135M on 2 cores that left the second
//! core idle 12% of the time. OpenMP runtimes spin for a while instead (Intel's
//! `KMP_BLOCKTIME`, 200 ms by default), which is what PyTorch gets; [`KeepAwake`] does the
//! same for rayon: while it lives, every other thread of the global pool polls for work, and
//! only after [`SPIN`] without any does it back off into short sleeps.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a thread polls for work without finding any before it starts to sleep between
/// polls (a serial stretch that long is not part of a step's inner loop).
pub const SPIN: Duration = Duration::from_millis(2);
/// The first sleep after [`SPIN`]; each idle poll after one doubles it, up to [`MAX_NAP`].
const FIRST_NAP: Duration = Duration::from_micros(20);
/// The longest sleep between polls: how late an idle thread can join new work.
const MAX_NAP: Duration = Duration::from_millis(2);
/// `pause` instructions between two polls (about a microsecond): a poll looks through every
/// thread's queue, so a tighter loop only adds traffic on their cache lines.
const PAUSES_PER_POLL: usize = 16;

/// Threads polling for work right now (all guards); for tests and diagnostics.
static POLLING: AtomicUsize = AtomicUsize::new(0);
/// Nanoseconds the polling threads have found no work, summed over threads and guards.
static IDLE_NANOS: AtomicU64 = AtomicU64::new(0);

/// While alive, keeps the other threads of rayon's global pool polling for work; dropping it
/// lets them sleep again (each finishes the job it is running first).
///
/// It must be created on a thread of the global pool (the thread that runs the serial
/// stretches); elsewhere it does nothing, since pool threads spinning beside a busy outside
/// thread would compete with it for the cores.
#[must_use = "the threads sleep again as soon as the guard is dropped"]
pub struct KeepAwake {
    stop: Option<Arc<AtomicBool>>,
}

impl KeepAwake {
    /// Starts the other pool threads polling (see the module doc).
    pub fn start() -> Self {
        let Some(caller) = rayon::current_thread_index() else {
            return KeepAwake { stop: None };
        };
        if rayon::current_num_threads() < 2 {
            return KeepAwake { stop: None };
        }
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        rayon::spawn_broadcast(move |ctx| {
            if ctx.index() != caller {
                poll_for_work(&flag);
            }
        });
        KeepAwake { stop: Some(stop) }
    }

    /// Threads of all live guards polling for work right now.
    pub fn polling_threads() -> usize {
        POLLING.load(Ordering::SeqCst)
    }

    /// Seconds the polling threads have spent without work so far, summed over threads (idle
    /// stretches still running are not counted yet). The difference over a training step,
    /// divided by the step's time and the other threads' count, is the share of their time
    /// the step left them idle: the serial part of the step.
    pub fn idle_seconds() -> f64 {
        IDLE_NANOS.load(Ordering::Relaxed) as f64 * 1e-9
    }
}

impl Drop for KeepAwake {
    fn drop(&mut self) {
        if let Some(stop) = &self.stop {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

/// Runs pending jobs of the pool on this thread until `stop`, spinning between them for up to
/// [`SPIN`], then sleeping between polls.
fn poll_for_work(stop: &AtomicBool) {
    POLLING.fetch_add(1, Ordering::SeqCst);
    // The first and the latest poll of the current idle stretch.
    let mut idle: Option<(Instant, Instant)> = None;
    let mut nap = FIRST_NAP;
    let add_idle = |(first, last): (Instant, Instant)| {
        let nanos = (last - first).as_nanos().min(u64::MAX as u128) as u64;
        IDLE_NANOS.fetch_add(nanos, Ordering::Relaxed);
    };
    while !stop.load(Ordering::Relaxed) {
        match rayon::yield_now() {
            Some(rayon::Yield::Executed) => {
                if let Some(stretch) = idle.take() {
                    add_idle(stretch);
                }
                nap = FIRST_NAP;
            }
            Some(rayon::Yield::Idle) => {
                let now = Instant::now();
                let first = idle.map_or(now, |(first, _)| first);
                idle = Some((first, now));
                if now - first < SPIN {
                    for _ in 0..PAUSES_PER_POLL {
                        std::hint::spin_loop();
                    }
                } else {
                    std::thread::sleep(nap);
                    nap = (nap * 2).min(MAX_NAP);
                }
            }
            None => break, // not a pool thread: cannot happen for a broadcast job
        }
    }
    if let Some(stretch) = idle {
        add_idle(stretch);
    }
    POLLING.fetch_sub(1, Ordering::SeqCst);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Waits up to a second for `POLLING` to reach `want`.
    fn polling_becomes(want: usize) -> bool {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(1) {
            if KeepAwake::polling_threads() == want {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    /// On a pool thread, the guard sets the other threads polling, work still runs on all of
    /// them with the same result, and they stop when it is dropped. (The global pool is shared
    /// by the tests of this crate, so this is the only test that creates a guard.)
    #[test]
    fn keep_awake_polls_while_alive_and_stops_when_dropped() {
        // Outside the pool: nothing starts.
        drop(KeepAwake::start());
        assert_eq!(KeepAwake::polling_threads(), 0);
        let threads = rayon::current_num_threads();
        if threads < 2 {
            return;
        }
        rayon::scope(|_| {
            let awake = KeepAwake::start();
            assert!(
                polling_becomes(threads - 1),
                "the other threads did not start polling"
            );
            // Work handed out while they poll runs as usual (they take part by stealing).
            let seen: Vec<usize> = (0..64)
                .into_par_iter()
                .map(|i| {
                    std::thread::sleep(Duration::from_millis(1));
                    i * i
                })
                .collect();
            assert_eq!(seen, (0..64).map(|i| i * i).collect::<Vec<_>>());
            drop(awake);
            assert!(
                polling_becomes(0),
                "the threads kept polling after the drop"
            );
        });
    }
}
