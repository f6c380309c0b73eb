//! The runtime's scheduling policy (config `scheduling`): how the one tokio runtime
//! takes turns between connections when more of them are ready than it can serve at
//! once.
//!
//! - [`Scheduling::Fair`] (the default) looks for I/O only once every ready task
//!   has had its turn ([`FAIR_EVENT_INTERVAL`] tasks at most), so that, as in
//!   nginx's and HAProxy's event loops, every connection is served once per round:
//!   at 1000 busy keep-alive connections on one core the p99 is of nginx's order
//!   (proxied ~70 ms, nginx's ~72). Each answer costs a little more CPU where the
//!   connections outnumber the cache, because each connection's state is cold by
//!   its next turn: nothing measurable at 64 and 256 connections, none proxied at
//!   1000, ~6 % on the maintenance page at 1000 (BENCHMARKS.md, "Fourteenth
//!   session").
//! - [`Scheduling::Throughput`] is tokio's own multi-thread scheduler as shipped: a
//!   worker looks for I/O every 61 tasks and puts what became ready in its local
//!   queue (256 places) or, when that is full, in a global queue that it looks at
//!   only now and then. Past ~256 ready connections per worker, the ones in the
//!   global queue wait: at 1000 busy connections the p99 is 150–280 ms, while
//!   the median is the lowest launchday reaches (the served connections' state
//!   stays in cache). It was the default until the fourteenth session, when the
//!   fair policy's cost on the proxied path had gone (README, "Runtime").
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
//! blocking in `epoll_wait`); when no [`tracked`] task (a connection) was polled
//! for `busy_poll`, it parks itself until its worker next wakes up
//! ([`after_unpark`]). Work is counted, not inferred from the time between turns,
//! so a slow machine's idle turns never keep it spinning. Known limit with several
//! workers: tokio may move a spinner to another worker (a woken task goes through
//! its shared queue); a worker holding two spinners keeps waking an idle sibling
//! to steal one, which costs the busy worker a wake-up call each time until a
//! steal succeeds (seen in about one run in ten of a test with two workers, after
//! idle pauses). Figures: BENCHMARKS.md, "Busy polling".
//!
//! Invariant: the policy is fixed when the runtime is built ([`runtime`], once per
//! process, before any connection); a reload keeps the running one, like `threads`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// Largest number of tasks a fair worker runs before it looks for I/O even though
/// tasks are still waiting: a round of up to this many ready connections is served
/// in full, and timers are never late by more than one such round.
pub const FAIR_EVENT_INTERVAL: u32 = 4096;

/// Config `scheduling`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Scheduling {
    /// tokio's default: a lower median, unfair past ~256 ready connections a worker.
    Throughput,
    /// Every ready connection served once per round (the default): a bounded tail.
    #[default]
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

/// Largest `busy_poll` the config accepts: past a few hundred microseconds a spin
/// no longer bridges the gaps between a busy worker's bursts, it only burns CPU.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);

/// Whether a [`Tracked`] task was polled since a [`spin`] task last looked: set by
/// the polls, cleared by the spinners. Each side writes only when the flag has the
/// other's value, so under load the line moves at most once per spinner turn.
static WORKED: AtomicBool = AtomicBool::new(false);

/// Whether busy polling is on (set by [`runtime`]): off, a tracked poll costs one
/// load of this read-mostly flag.
static BUSY_POLLING: AtomicBool = AtomicBool::new(false);

pin_project_lite::pin_project! {
    /// A task's future whose polls count as work for busy polling ([`tracked`]).
    pub struct Tracked<F> {
        #[pin]
        fut: F,
    }
}

/// Wraps a task's future (a client connection, an upstream connection's driver) so
/// that its polls count as work: the runtime's spinners keep their workers polling
/// for `busy_poll` after the last of them. Work is counted, not timed: a slow turn
/// of an idle worker (a busy hypervisor, a slow clock read) is not work, so an idle
/// balancer parks whatever the machine's speed. An untracked task's polls (the
/// admin listener, health checks) only let the workers park a little earlier.
pub fn tracked<F: Future>(fut: F) -> Tracked<F> {
    Tracked { fut }
}

impl<F: Future> Future for Tracked<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if BUSY_POLLING.load(Ordering::Relaxed) && !WORKED.load(Ordering::Relaxed) {
            WORKED.store(true, Ordering::Relaxed);
        }
        self.project().fut.poll(cx)
    }
}

/// Counts the times a spinner found [`WORKED`] raised, so that every spinner
/// learns of work one of them took the flag for.
static WORK_EPOCH: AtomicU64 = AtomicU64::new(0);

/// Whether a tracked task ran since this spinner's last look (`seen`: the
/// [`WORK_EPOCH`] it saw then).
fn worked_since(seen: &mut u64) -> bool {
    if WORKED.load(Ordering::Relaxed) {
        WORKED.store(false, Ordering::Relaxed);
        WORK_EPOCH.fetch_add(1, Ordering::Relaxed);
    }
    let epoch = WORK_EPOCH.load(Ordering::Relaxed);
    if epoch == *seen {
        return false;
    }
    *seen = epoch;
    true
}

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

/// A [`spin`] task's state: when the runtime last had work.
struct Spinner {
    limit: Duration,
    worked: Instant,
}

impl Spinner {
    /// One turn, at `now`, told whether a tracked task ran since the last look:
    /// whether to park (no work for longer than the limit). Only work restarts
    /// the limit, whatever the time between the turns.
    fn turn(&mut self, now: Instant, worked: bool) -> bool {
        if worked {
            self.worked = now;
            return false;
        }
        now.duration_since(self.worked) > self.limit
    }
}

/// A worker's spinner: keeps its worker polling for I/O while the runtime has had
/// work within `limit`, then parks until the worker wakes up again. Work anywhere
/// counts (with several workers, one spinner may take the flag another set), and
/// tokio may move a spinner between workers: the spin is a latency aid, not a
/// schedule, and a worker without a spinner only sleeps as it would without one.
async fn spin(limit: Duration) {
    let mut state = Spinner {
        limit,
        worked: Instant::now(),
    };
    let mut seen = WORK_EPOCH.load(Ordering::Relaxed);
    loop {
        tokio::task::yield_now().await;
        if state.turn(Instant::now(), worked_since(&mut seen)) {
            UntilUnpark { parked: false }.await;
            state.worked = Instant::now();
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
    BUSY_POLLING.store(!busy_poll.is_zero(), Ordering::Relaxed);
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
    fn the_default_is_fair_and_both_policies_build_a_runtime() {
        assert_eq!(Scheduling::default(), Scheduling::Fair);
        for policy in [Scheduling::Fair, Scheduling::Throughput] {
            let rt = runtime(1, policy, Duration::ZERO).expect("runtime");
            assert_eq!(
                rt.block_on(async { tokio::spawn(async { 7 }).await }).ok(),
                Some(7),
                "{policy:?}"
            );
        }
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
            let done = rt.spawn(tracked(async move { i * 2 }));
            assert_eq!(rt.block_on(done).ok(), Some(i * 2));
            std::thread::sleep(gap);
        }
    }

    /// Parks of the runtime's workers over 50 tasks 1ms apart, after `warm` tasks
    /// back to back.
    fn parks_in_close_tasks(rt: &tokio::runtime::Runtime, warm: usize) -> u64 {
        spaced_tasks(rt, warm, Duration::ZERO);
        let before = park_count(rt);
        spaced_tasks(rt, 50, Duration::from_millis(1));
        park_count(rt) - before
    }

    #[test]
    fn a_busy_polling_worker_does_not_sleep_between_close_tasks() {
        let rt = runtime(1, Scheduling::Throughput, MAX_BUSY_POLL).expect("runtime");
        let parks = parks_in_close_tasks(&rt, 3);
        // Without busy polling each task wakes a sleeping worker (checked below);
        // here a stall of the machine longer than 10ms may cost a park or two.
        assert!(parks <= 5, "{parks} parks in 50 tasks 1ms apart");
        drop(rt);

        let rt = runtime(1, Scheduling::Throughput, Duration::ZERO).expect("runtime");
        let parks = parks_in_close_tasks(&rt, 3);
        assert!(parks >= 25, "only {parks} parks without busy polling");
    }

    #[test]
    fn every_worker_of_a_busy_polling_runtime_stays_awake_between_close_tasks() {
        let rt = runtime(2, Scheduling::Throughput, MAX_BUSY_POLL).expect("runtime");
        let parked = parks_in_close_tasks(&rt, 20);
        assert!(
            parked <= 10,
            "{parked} parks of two workers in 50 tasks 1ms apart"
        );
    }

    /// After idle pauses (the spinner parked, the worker asleep) the first tasks
    /// wake the worker and its spinner with it. One worker: with two, the woken
    /// spinners go through tokio's shared queue and may both land on one worker,
    /// which then wakes the other again and again to steal one (module header).
    #[test]
    fn the_spinner_spins_again_after_idle_pauses() {
        // The whole limit, so that a test process starved of CPU for a few
        // milliseconds (tests run side by side) does not count as a park.
        let rt = runtime(1, Scheduling::Throughput, MAX_BUSY_POLL).expect("runtime");
        let mut parked = 0;
        for _ in 0..5 {
            let before = park_count(&rt);
            std::thread::sleep(Duration::from_millis(60));
            assert!(
                park_count(&rt) > before,
                "the worker did not sleep while idle"
            );
            spaced_tasks(&rt, 5, Duration::ZERO);
            let before = park_count(&rt);
            spaced_tasks(&rt, 20, Duration::from_millis(1));
            parked += park_count(&rt) - before;
        }
        assert!(parked <= 10, "{parked} parks in 100 tasks 1ms apart");
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

    /// On a slow machine an idle turn takes long (tens of microseconds under a busy
    /// hypervisor): that is not work, and the spinner still parks after its limit.
    #[test]
    fn slow_idle_turns_are_not_work_but_tracked_polls_are() {
        let t0 = Instant::now();
        let at = |us: u64| t0 + Duration::from_micros(us);
        let limit = Duration::from_micros(100);
        // Turns 40us apart, nothing else polled: park once past 100us.
        let mut s = Spinner { limit, worked: t0 };
        assert!(!s.turn(at(40), false));
        assert!(!s.turn(at(80), false));
        assert!(
            s.turn(at(120), false),
            "slow idle turns kept the spinner awake"
        );
        // Work between turns restarts the limit, even 1us later.
        let mut s = Spinner { limit, worked: t0 };
        assert!(!s.turn(at(90), true));
        assert!(!s.turn(at(91), false));
        assert!(!s.turn(at(189), false));
        assert!(s.turn(at(192), false));
    }

    #[test]
    fn tracked_polls_raise_the_flag_only_while_busy_polling() {
        let poll = || {
            let mut fut = std::pin::pin!(tracked(std::future::ready(3)));
            let polled = fut.as_mut().poll(&mut Context::from_waker(Waker::noop()));
            assert_eq!(polled, Poll::Ready(3));
        };
        let (mut one, mut other) = (0, 0);
        BUSY_POLLING.store(false, Ordering::Relaxed);
        worked_since(&mut one);
        worked_since(&mut other);
        poll();
        assert!(!worked_since(&mut one), "counted while busy polling is off");
        BUSY_POLLING.store(true, Ordering::Relaxed);
        poll();
        // Every spinner learns of it, whichever looks first.
        assert!(worked_since(&mut one));
        assert!(worked_since(&mut other));
        assert!(!worked_since(&mut one), "seen twice");
        assert!(!worked_since(&mut other), "seen twice");
    }

    #[test]
    fn a_busy_polling_worker_sleeps_once_idle_for_its_limit() {
        let rt = runtime(1, Scheduling::Throughput, Duration::from_millis(2)).expect("runtime");
        spaced_tasks(&rt, 3, Duration::ZERO);
        let cpu = cpu_time();
        std::thread::sleep(Duration::from_millis(400));
        let spent = cpu_time() - cpu;
        // A spinner that never stopped would take the whole 400ms of a core.
        assert!(
            spent < Duration::from_millis(150),
            "{spent:?} of CPU while idle"
        );
        // And it spins again once work comes back: tasks still run.
        spaced_tasks(&rt, 3, Duration::from_millis(1));
    }
}
