//! The runtime's scheduling policy (config `scheduling`): how the one tokio runtime
//! takes turns between connections when more of them are ready than it can serve at
//! once.
//!
//! - [`Scheduling::Throughput`] (the default) is tokio's own multi-thread scheduler
//!   as shipped: a worker looks for I/O every 61 tasks and puts what became ready in
//!   its local queue (256 places) or, when that is full, in a global queue that it
//!   looks at only now and then. Past ~256 ready connections per worker, the ones in
//!   the global queue wait; at 1000 busy keep-alive connections on one core the p99
//!   is ~150 ms against nginx's ~8 ms, while the median and the throughput are the
//!   best launchday reaches (the served connections' state stays in cache).
//! - [`Scheduling::Fair`] looks for I/O only once every ready task has had its turn
//!   ([`FAIR_EVENT_INTERVAL`] tasks at most), so that, as in nginx's event loop,
//!   every connection is served once per round: the p99 at 1000 connections drops to
//!   ~11 ms, and each answer costs more CPU because each connection's state is cold
//!   by its next turn. To keep that cost down, a fair runtime also builds each
//!   answer's handler future in a fresh allocation (warm: the allocator hands back
//!   the block the previous answer freed) instead of in the connection's long-lived,
//!   cold task: [`boxes_answers`]. Figures: BENCHMARKS.md, "Scheduling".
//!
//! Invariant: the policy is fixed when the runtime is built ([`runtime`], once per
//! process, before any connection); a reload keeps the running one, like `threads`.

use std::sync::atomic::{AtomicBool, Ordering};

/// Largest number of tasks a fair worker runs before it looks for I/O even though
/// tasks are still waiting: a round of up to this many ready connections is served
/// in full, and timers are never late by more than one such round.
pub const FAIR_EVENT_INTERVAL: u32 = 4096;

/// Config `scheduling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scheduling {
    /// tokio's default: most throughput, unfair past ~256 ready connections a worker.
    #[default]
    Throughput,
    /// Every ready connection served once per round; less throughput at saturation.
    Fair,
}

impl Scheduling {
    /// The config's spelling of each policy.
    pub const NAMES: [&'static str; 2] = ["throughput", "fair"];

    /// Parses the config value.
    pub fn parse(text: &str) -> Option<Scheduling> {
        match text {
            "throughput" => Some(Scheduling::Throughput),
            "fair" => Some(Scheduling::Fair),
            _ => None,
        }
    }
}

/// Set by [`runtime`] when it builds a fair runtime; read per request.
static BOX_ANSWERS: AtomicBool = AtomicBool::new(false);

/// Whether answers' handler futures get their own (warm) allocation: only under
/// [`Scheduling::Fair`], where it saves ~0.8 µs of cache misses per answer at 1000
/// connections; under the default policy it would only be an allocation more.
pub fn boxes_answers() -> bool {
    BOX_ANSWERS.load(Ordering::Relaxed)
}

/// The builder of the process's runtime: multi-thread with `threads` workers and
/// the given policy.
fn builder(threads: usize, scheduling: Scheduling) -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads.max(1)).enable_all();
    if scheduling == Scheduling::Fair {
        b.event_interval(FAIR_EVENT_INTERVAL);
    }
    b
}

/// Builds the process's runtime (see the module header for the one-per-process
/// invariant).
pub fn runtime(threads: usize, scheduling: Scheduling) -> std::io::Result<tokio::runtime::Runtime> {
    BOX_ANSWERS.store(scheduling == Scheduling::Fair, Ordering::Relaxed);
    builder(threads, scheduling).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_two_names_only() {
        assert_eq!(Scheduling::parse("fair"), Some(Scheduling::Fair));
        assert_eq!(
            Scheduling::parse("throughput"),
            Some(Scheduling::Throughput)
        );
        assert_eq!(Scheduling::parse("Fair"), None);
        assert_eq!(Scheduling::parse(""), None);
        for name in Scheduling::NAMES {
            assert!(Scheduling::parse(name).is_some());
        }
    }

    #[test]
    fn only_a_fair_runtime_boxes_answers() {
        let rt = runtime(1, Scheduling::Fair).expect("fair runtime");
        assert!(boxes_answers());
        assert_eq!(
            rt.block_on(async { tokio::spawn(async { 7 }).await }).ok(),
            Some(7)
        );
        drop(rt);
        let rt = runtime(1, Scheduling::Throughput).expect("default runtime");
        assert!(!boxes_answers());
        drop(rt);
    }
}
