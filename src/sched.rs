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
//! Busy polling (config `busy_poll`, off by default, as HAProxy's `busy-polling`):
//! a worker that runs out of work keeps looking for I/O without sleeping, for up to
//! the configured time since it last had work, then sleeps as usual. A sleeping
//! worker must be woken by the kernel when a request arrives, and in a virtual
//! machine that wake-up (an IPI, a VM exit, a halted vCPU resumed) costs tens of
//! microseconds of latency and CPU on whichever core delivers the packet. The spin
//! is bounded, so an idle balancer still sleeps; the price is CPU time that would
//! otherwise be idle, which also shows in `top` and in CPU-based capacity figures:
//! that is why it is opt-in. How: one [`spin`] task per worker yields in a loop
//! (each yield makes tokio poll the I/O driver with a zero timeout instead of
//! blocking in `epoll_wait`); idle for `busy_poll`, it parks itself until its
//! worker next wakes up ([`after_unpark`]). Figures: BENCHMARKS.md, "Busy polling".
//!
//! Invariant: the policy is fixed when the runtime is built ([`runtime`], once per
//! process, before any connection); a reload keeps the running one, like `threads`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

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

/// Largest `busy_poll` the config accepts: past a few hundred microseconds a spin
/// no longer bridges the gaps between a busy worker's bursts, it only burns CPU.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// A gap between two turns of a [`spin`] task longer than this means the worker ran
/// something else in between: it had work. One idle turn (a task poll and an
/// `epoll_wait` with a zero timeout) takes about a microsecond.
const WORK_GAP: Duration = Duration::from_micros(5);

thread_local! {
    /// The [`spin`] tasks parked on this worker thread (usually one; more when tokio
    /// moved one here from another worker).
    static PARKED: RefCell<Vec<Waker>> = const { RefCell::new(Vec::new()) };
}

/// The runtime's `on_thread_unpark` hook when busy polling is on: the worker woke
/// up (an event or a timer), so the spinners parked on it resume.
fn after_unpark() {
    let parked = PARKED.with(|p| std::mem::take(&mut *p.borrow_mut()));
    for waker in parked {
        waker.wake();
    }
}

/// Pending until the worker thread it was first polled on next wakes from sleep.
struct UntilUnpark {
    parked: bool,
}

impl Future for UntilUnpark {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.parked {
            return Poll::Ready(());
        }
        self.parked = true;
        PARKED.with(|p| p.borrow_mut().push(cx.waker().clone()));
        Poll::Pending
    }
}

/// A worker's spinner: keeps its worker polling for I/O while it has had work
/// within `limit`, then parks until the worker wakes up again.
async fn spin(limit: Duration) {
    let mut worked = Instant::now();
    let mut turn = worked;
    loop {
        tokio::task::yield_now().await;
        let now = Instant::now();
        if now.duration_since(turn) > WORK_GAP {
            worked = now;
        }
        turn = now;
        if now.duration_since(worked) > limit {
            UntilUnpark { parked: false }.await;
            worked = Instant::now();
            turn = worked;
        }
    }
}

/// The builder of the process's runtime: multi-thread with `threads` workers and
/// the given policy.
fn builder(threads: usize, scheduling: Scheduling, busy_poll: Duration) -> tokio::runtime::Builder {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    b.worker_threads(threads.max(1)).enable_all();
    if scheduling == Scheduling::Fair {
        b.event_interval(FAIR_EVENT_INTERVAL);
    }
    if !busy_poll.is_zero() {
        b.on_thread_unpark(after_unpark);
    }
    b
}

/// Builds the process's runtime (see the module header for the one-per-process
/// invariant), with one spinner per worker when `busy_poll` is not zero.
pub fn runtime(
    threads: usize,
    scheduling: Scheduling,
    busy_poll: Duration,
) -> std::io::Result<tokio::runtime::Runtime> {
    BOX_ANSWERS.store(scheduling == Scheduling::Fair, Ordering::Relaxed);
    let rt = builder(threads, scheduling, busy_poll).build()?;
    if !busy_poll.is_zero() {
        for _ in 0..threads.max(1) {
            rt.spawn(spin(busy_poll));
        }
    }
    Ok(rt)
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
        let rt = runtime(1, Scheduling::Fair, Duration::ZERO).expect("fair runtime");
        assert!(boxes_answers());
        assert_eq!(
            rt.block_on(async { tokio::spawn(async { 7 }).await }).ok(),
            Some(7)
        );
        drop(rt);
        let rt = runtime(1, Scheduling::Throughput, Duration::ZERO).expect("default runtime");
        assert!(!boxes_answers());
        drop(rt);
    }

    /// CPU time (user + system) of this whole process: nextest runs each test in
    /// a process of its own.
    fn cpu_time() -> Duration {
        let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat");
        // Fields after the command name (which may hold spaces) start at ')'.
        let rest = &stat[stat.rfind(')').expect("comm") + 2..];
        let f: Vec<u64> = rest
            .split(' ')
            .skip(11)
            .take(2)
            .map(|v| v.parse().expect("ticks"))
            .collect();
        // Linux reports these in USER_HZ, 100 a second on every architecture it
        // runs on with glibc.
        Duration::from_millis((f[0] + f[1]) * 10)
    }

    /// How many times the runtime's workers have gone to sleep, all together.
    fn park_count(rt: &tokio::runtime::Runtime) -> u64 {
        let m = rt.metrics();
        (0..m.num_workers()).map(|w| m.worker_park_count(w)).sum()
    }

    /// Spawns `n` tasks from outside the runtime, `gap` apart, and waits for each.
    fn spaced_tasks(rt: &tokio::runtime::Runtime, n: usize, gap: Duration) {
        for i in 0..n {
            let done = rt.spawn(async move { i * 2 });
            assert_eq!(rt.block_on(done).ok(), Some(i * 2));
            std::thread::sleep(gap);
        }
    }

    #[test]
    fn a_busy_polling_worker_does_not_sleep_between_close_tasks() {
        let rt = runtime(1, Scheduling::Throughput, MAX_BUSY_POLL).expect("runtime");
        spaced_tasks(&rt, 3, Duration::ZERO);
        let before = park_count(&rt);
        spaced_tasks(&rt, 50, Duration::from_millis(1));
        let parks = park_count(&rt) - before;
        // Without busy polling each task wakes a sleeping worker (checked below);
        // here a stall of the machine longer than 10ms may cost a park or two.
        assert!(parks <= 5, "{parks} parks in 50 tasks 1ms apart");
        drop(rt);

        let rt = runtime(1, Scheduling::Throughput, Duration::ZERO).expect("runtime");
        spaced_tasks(&rt, 3, Duration::ZERO);
        let before = park_count(&rt);
        spaced_tasks(&rt, 50, Duration::from_millis(1));
        let parks = park_count(&rt) - before;
        assert!(parks >= 25, "only {parks} parks without busy polling");
    }

    #[test]
    fn every_worker_of_a_busy_polling_runtime_stays_awake_between_close_tasks() {
        let rt = runtime(2, Scheduling::Throughput, MAX_BUSY_POLL).expect("runtime");
        spaced_tasks(&rt, 20, Duration::ZERO);
        let before = park_count(&rt);
        spaced_tasks(&rt, 50, Duration::from_millis(1));
        let parked = park_count(&rt) - before;
        assert!(
            parked <= 10,
            "{parked} parks of two workers in 50 tasks 1ms apart"
        );
    }

    #[test]
    fn both_workers_spin_again_after_idle_pauses() {
        let rt = runtime(2, Scheduling::Throughput, Duration::from_millis(5)).expect("runtime");
        let mut parked = 0;
        for _ in 0..5 {
            std::thread::sleep(Duration::from_millis(20));
            // The first tasks wake the workers up and their spinners with them.
            spaced_tasks(&rt, 5, Duration::ZERO);
            let before = park_count(&rt);
            spaced_tasks(&rt, 20, Duration::from_millis(1));
            parked += park_count(&rt) - before;
        }
        assert!(
            parked <= 10,
            "{parked} parks of two workers in 100 tasks 1ms apart"
        );
    }

    /// A waker that records that it was woken.
    struct Flag(std::sync::atomic::AtomicBool);

    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    #[test]
    fn an_unpark_resumes_every_spinner_parked_on_the_thread() {
        let flags: Vec<_> = (0..2)
            .map(|_| std::sync::Arc::new(Flag(AtomicBool::new(false))))
            .collect();
        let mut parked: Vec<_> = flags
            .iter()
            .map(|_| UntilUnpark { parked: false })
            .collect();
        for (until, flag) in parked.iter_mut().zip(&flags) {
            let waker = Waker::from(std::sync::Arc::clone(flag));
            let polled = Pin::new(until).poll(&mut Context::from_waker(&waker));
            assert!(polled.is_pending());
        }
        assert!(flags.iter().all(|f| !f.0.load(Ordering::SeqCst)));
        after_unpark();
        assert!(
            flags.iter().all(|f| f.0.load(Ordering::SeqCst)),
            "a spinner left parked"
        );
        for (until, flag) in parked.iter_mut().zip(&flags) {
            let waker = Waker::from(std::sync::Arc::clone(flag));
            assert!(Pin::new(until)
                .poll(&mut Context::from_waker(&waker))
                .is_ready());
        }
        // Nothing is left to wake twice.
        assert!(PARKED.with(|p| p.borrow().is_empty()));
    }

    #[test]
    fn a_busy_polling_worker_sleeps_once_idle_for_its_limit() {
        let rt = runtime(1, Scheduling::Throughput, Duration::from_millis(2)).expect("runtime");
        spaced_tasks(&rt, 3, Duration::ZERO);
        let (cpu, parks) = (cpu_time(), park_count(&rt));
        std::thread::sleep(Duration::from_millis(400));
        let spent = cpu_time() - cpu;
        // A spinner that never stopped would take the whole 400ms of a core.
        assert!(
            spent < Duration::from_millis(150),
            "{spent:?} of CPU while idle"
        );
        assert!(park_count(&rt) > parks, "the worker never slept");
        // And it spins again once work comes back: tasks still run.
        spaced_tasks(&rt, 3, Duration::from_millis(1));
    }
}
