//! Admission and selection rules, with paused tokio time.

use super::*;
use crate::config::{BackendSpec, PoolSpec};
use std::time::Duration;
use tokio::task::JoinHandle;

fn backend(name: &str, weight: u32, max: Option<u32>, backup: bool) -> BackendSpec {
    BackendSpec {
        name: name.into(),
        address_text: "[::1]:1".into(),
        address: "[::1]:1".parse().expect("addr"),
        weight,
        max_connections: max,
        served_by: None,
        backup,
    }
}

fn pool_with(backends: Vec<BackendSpec>, depth: usize, timeout_ms: u64) -> Arc<Pool> {
    let spec = PoolSpec {
        name: "p".into(),
        queue_depth: depth,
        queue_timeout: Duration::from_millis(timeout_ms),
        maintenance: false,
        backends,
        health_check: None,
        retries: 1,
        passive_failures: 0,
        passive_cooldown: Duration::from_secs(10),
        slow_start: Duration::ZERO,
    };
    let m = Metrics::new(prometheus::Registry::new()).expect("metrics");
    Arc::new(Pool::new(spec, &m, Upstream::new))
}

/// One back end with `max` slots, a queue of `depth`, `timeout_ms` queue timeout.
fn pool(max: u32, depth: usize, timeout_ms: u64) -> Arc<Pool> {
    pool_with(vec![backend("a", 1, Some(max), false)], depth, timeout_ms)
}

fn name(l: &Lease) -> &str {
    &l.backend().spec.name
}

fn lease_now(p: &Arc<Pool>, class: Class) -> Result<Lease, Shed> {
    futures_now(p.acquire(class))
}

/// Polls a future once; it must be ready (no waiting involved).
fn futures_now<F: std::future::Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    let waker = std::task::Waker::noop();
    match f.as_mut().poll(&mut std::task::Context::from_waker(waker)) {
        std::task::Poll::Ready(v) => v,
        std::task::Poll::Pending => panic!("expected an immediate answer"),
    }
}

/// Starts a waiter and lets it reach the queue.
async fn waiter(
    p: &Arc<Pool>,
    class: Class,
    tag: usize,
) -> JoinHandle<(usize, Result<Lease, Shed>)> {
    let p = Arc::clone(p);
    let h = tokio::spawn(async move { (tag, p.acquire(class).await) });
    settle().await;
    h
}

async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn free_capacity_is_leased_and_full_backend_is_skipped() {
    let p = pool_with(
        vec![
            backend("a", 1, Some(1), false),
            backend("b", 1, None, false),
        ],
        4,
        1000,
    );
    let first = lease_now(&p, Class::Read).expect("a");
    assert_eq!(name(&first), "a");
    let held: Vec<Lease> = (0..5)
        .map(|_| lease_now(&p, Class::Read).expect("b"))
        .collect();
    assert!(held.iter().all(|l| name(l) == "b"));
    assert_eq!(p.backends()[0].in_flight(), 1);
    assert_eq!(p.backends()[1].in_flight(), 5);
    drop(first);
    drop(held);
    assert_eq!(p.backends()[0].in_flight(), 0);
    assert_eq!(p.backends()[1].metrics.in_flight.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn full_queue_sheds_on_arrival() {
    let p = pool(1, 2, 1000);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let _w1 = waiter(&p, Class::Read, 1).await;
    let _w2 = waiter(&p, Class::Read, 2).await;
    assert_eq!(p.queue_depth(), 2);
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::QueueFull));
    assert_eq!(p.metrics.queue_depth.get(), 2);
}

#[tokio::test(start_paused = true)]
async fn zero_depth_never_queues() {
    let p = pool(1, 0, 1000);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    assert_eq!(lease_now(&p, Class::Write).err(), Some(Shed::QueueFull));
}

#[tokio::test(start_paused = true)]
async fn waiter_is_shed_after_queue_timeout() {
    let p = pool(1, 4, 2000);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let w = waiter(&p, Class::Read, 0).await;
    tokio::time::advance(Duration::from_millis(1999)).await;
    settle().await;
    assert!(!w.is_finished());
    tokio::time::advance(Duration::from_millis(2)).await;
    let (_, r) = w.await.expect("join");
    assert_eq!(r.err(), Some(Shed::QueueTimeout));
    assert_eq!(p.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn freed_slot_goes_straight_to_the_next_waiter() {
    let p = pool(1, 4, 1000);
    let busy = lease_now(&p, Class::Read).expect("slot");
    let w = waiter(&p, Class::Read, 0).await;
    drop(busy);
    // No time passes: the hand-over is immediate.
    let (_, r) = w.await.expect("join");
    let lease = r.expect("served");
    assert_eq!(p.backends()[0].in_flight(), 1);
    assert_eq!(p.queue_depth(), 0);
    drop(lease);
    assert_eq!(p.backends()[0].in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn writes_first_then_fifo_within_class() {
    let p = pool(1, 8, 10_000);
    let busy = lease_now(&p, Class::Read).expect("slot");
    let mut handles = Vec::new();
    for (tag, class) in [
        (0, Class::Read),
        (1, Class::Write),
        (2, Class::Read),
        (3, Class::Write),
        (4, Class::Read),
    ] {
        handles.push(waiter(&p, class, tag).await);
    }
    drop(busy);
    let mut order = Vec::new();
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    for _ in 0..5 {
        settle().await;
        let i = pending
            .iter()
            .position(|h| h.as_ref().is_some_and(|h| h.is_finished()))
            .expect("one served");
        let (tag, r) = pending[i].take().expect("h").await.expect("join");
        order.push(tag);
        drop(r.expect("served")); // frees the slot for the next one
    }
    assert_eq!(order, vec![1, 3, 0, 2, 4]);
}

#[tokio::test(start_paused = true)]
async fn write_displaces_the_newest_read() {
    let p = pool(1, 2, 10_000);
    let busy = lease_now(&p, Class::Read).expect("slot");
    let older = waiter(&p, Class::Read, 0).await;
    let newer = waiter(&p, Class::Read, 1).await;
    let write = waiter(&p, Class::Write, 2).await;
    let (_, r) = newer.await.expect("join");
    assert_eq!(r.err(), Some(Shed::QueueFull));
    assert!(!older.is_finished());
    assert_eq!(p.queue_depth(), 2);
    drop(busy);
    let (_, w) = write.await.expect("join");
    drop(w.expect("write served first"));
    let (_, o) = older.await.expect("join");
    assert!(o.is_ok());
}

#[tokio::test(start_paused = true)]
async fn write_is_shed_only_when_the_queue_holds_only_writes() {
    let p = pool(1, 2, 10_000);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let _w1 = waiter(&p, Class::Write, 0).await;
    let r1 = waiter(&p, Class::Read, 1).await;
    // Full (1 write, 1 read): a write displaces the read.
    let _w2 = waiter(&p, Class::Write, 2).await;
    assert_eq!(r1.await.expect("join").1.err(), Some(Shed::QueueFull));
    // Full of writes: now a write is shed, and a read too.
    assert_eq!(lease_now(&p, Class::Write).err(), Some(Shed::QueueFull));
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::QueueFull));
}

#[tokio::test(start_paused = true)]
async fn cancelled_waiter_leaves_the_queue_and_frees_its_place() {
    let p = pool(1, 1, 10_000);
    let busy = lease_now(&p, Class::Read).expect("slot");
    let gone = waiter(&p, Class::Read, 0).await;
    assert_eq!(p.queue_depth(), 1);
    gone.abort();
    let _ = gone.await;
    assert_eq!(p.queue_depth(), 0);
    let next = waiter(&p, Class::Read, 1).await;
    assert_eq!(p.queue_depth(), 1);
    drop(busy);
    assert!(next.await.expect("join").1.is_ok());
    assert_eq!(p.backends()[0].in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn predicted_wait_sheds_early_and_adapts() {
    // 2 slots, queue timeout 1 s.
    let p = pool(2, 100, 1000);
    // Teach the estimate a 400 ms service time.
    for _ in 0..20 {
        let l = lease_now(&p, Class::Read).expect("slot");
        tokio::time::advance(Duration::from_millis(400)).await;
        drop(l);
    }
    let st = p.service_time().expect("estimate");
    assert!((st.as_millis() as i64 - 400).abs() < 20, "{st:?}");
    let _a = lease_now(&p, Class::Read).expect("slot");
    let _b = lease_now(&p, Class::Read).expect("slot");
    // Positions 1..=5 wait 200..1000 ms: admitted. The 6th would wait 1.2 s: shed now.
    let mut queued = Vec::new();
    for i in 0..5 {
        queued.push(waiter(&p, Class::Read, i).await);
    }
    assert_eq!(p.queue_depth(), 5);
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::PredictedWait));
    // A write's position only counts writes ahead of it: admitted.
    let w = waiter(&p, Class::Write, 9).await;
    assert_eq!(p.queue_depth(), 6);
    drop(w);
    drop(queued);
}

#[tokio::test(start_paused = true)]
async fn predicted_wait_recovers_when_back_ends_speed_up() {
    let p = pool(1, 100, 1000);
    for _ in 0..10 {
        let l = lease_now(&p, Class::Read).expect("slot");
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(l);
    }
    let busy = lease_now(&p, Class::Read).expect("slot");
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::PredictedWait));
    drop(busy);
    // The back end recovers: 10 ms answers at 100/s for a second.
    for _ in 0..100 {
        let l = lease_now(&p, Class::Read).expect("slot");
        tokio::time::advance(Duration::from_millis(10)).await;
        drop(l);
    }
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let w = waiter(&p, Class::Read, 0).await;
    assert_eq!(p.queue_depth(), 1, "admitted again once the estimate fell");
    drop(w);
}

#[tokio::test(start_paused = true)]
async fn no_backend_and_manual() {
    let drained = pool_with(vec![backend("a", 0, None, false)], 4, 1000);
    assert_eq!(
        lease_now(&drained, Class::Read).err(),
        Some(Shed::NoBackend)
    );
    let p = pool(1, 4, 10_000);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let w = waiter(&p, Class::Read, 0).await;
    p.set_maintenance(true);
    assert_eq!(w.await.expect("join").1.err(), Some(Shed::Manual));
    assert_eq!(lease_now(&p, Class::Write).err(), Some(Shed::Manual));
    p.set_maintenance(false);
    assert_eq!(p.queue_depth(), 0);
}

#[tokio::test(start_paused = true)]
async fn backups_only_when_every_primary_is_drained() {
    let p = pool_with(
        vec![
            backend("a", 1, None, false),
            backend("spare", 1, None, true),
        ],
        4,
        1000,
    );
    for _ in 0..10 {
        assert_eq!(name(&lease_now(&p, Class::Read).expect("a")), "a");
    }
    let drained = pool_with(
        vec![
            backend("a", 0, None, false),
            backend("spare", 1, None, true),
        ],
        4,
        1000,
    );
    assert_eq!(
        name(&lease_now(&drained, Class::Read).expect("spare")),
        "spare"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_never_exceeds_max_under_contention() {
    let p = pool_with(
        vec![
            backend("a", 3, Some(3), false),
            backend("b", 1, Some(2), false),
        ],
        10_000,
        30_000,
    );
    let peak = Arc::new([AtomicU32::new(0), AtomicU32::new(0)]);
    let mut tasks = Vec::new();
    for _ in 0..400 {
        let p = Arc::clone(&p);
        let peak = Arc::clone(&peak);
        tasks.push(tokio::spawn(async move {
            let l = p.acquire(Class::Read).await.expect("served eventually");
            let i = usize::from(name(&l) == "b");
            peak[i].fetch_max(l.backend().in_flight(), Ordering::Relaxed);
            tokio::task::yield_now().await;
            drop(l);
        }));
    }
    for t in tasks {
        t.await.expect("join");
    }
    assert!(peak[0].load(Ordering::Relaxed) <= 3);
    assert!(peak[1].load(Ordering::Relaxed) <= 2);
    assert_eq!(p.backends()[0].in_flight() + p.backends()[1].in_flight(), 0);
    assert_eq!(p.queue_depth(), 0);
}

fn spec(backends: Vec<BackendSpec>, depth: usize) -> PoolSpec {
    PoolSpec {
        name: "p".into(),
        queue_depth: depth,
        queue_timeout: Duration::from_secs(10),
        maintenance: false,
        backends,
        health_check: None,
        retries: 1,
        passive_failures: 0,
        passive_cooldown: Duration::from_secs(10),
        slow_start: Duration::ZERO,
    }
}

fn metrics() -> Metrics {
    Metrics::new(prometheus::Registry::new()).expect("metrics")
}

/// A pool built from `spec` with metrics `m`, and a reconfigure with a new spec.
fn build(spec: PoolSpec, m: &Metrics) -> Arc<Pool> {
    Arc::new(Pool::new(spec, m, Upstream::new))
}

fn reload(p: &Arc<Pool>, spec: PoolSpec, m: &Metrics) {
    p.reconfigure(spec, m, Upstream::new);
}

#[tokio::test(start_paused = true)]
async fn reload_keeps_in_flight_exact_when_max_connections_changes() {
    let m = metrics();
    let p = build(spec(vec![backend("a", 1, Some(2), false)], 0), &m);
    let l1 = lease_now(&p, Class::Read).expect("1");
    let l2 = lease_now(&p, Class::Read).expect("2");
    reload(&p, spec(vec![backend("a", 1, Some(3), false)], 0), &m);
    assert_eq!(p.backends()[0].in_flight(), 2, "load carried over");
    let l3 = lease_now(&p, Class::Read).expect("one more fits under 3");
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::QueueFull));
    drop((l1, l2, l3));
    assert_eq!(p.backends()[0].in_flight(), 0);
    // Lowering the limit below the load: nothing new until enough finish.
    let held: Vec<Lease> = (0..3)
        .map(|_| lease_now(&p, Class::Read).expect("slot"))
        .collect();
    reload(&p, spec(vec![backend("a", 1, Some(1), false)], 0), &m);
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::QueueFull));
    drop(held);
    assert!(lease_now(&p, Class::Read).is_ok());
}

#[tokio::test(start_paused = true)]
async fn waiters_keep_their_place_and_more_capacity_serves_them_at_once() {
    let m = metrics();
    let p = build(spec(vec![backend("a", 1, Some(1), false)], 8), &m);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let w1 = waiter(&p, Class::Read, 1).await;
    let w2 = waiter(&p, Class::Read, 2).await;
    reload(
        &p,
        spec(
            vec![
                backend("a", 1, Some(1), false),
                backend("b", 1, Some(1), false),
            ],
            8,
        ),
        &m,
    );
    // b's one slot goes to the first waiter; the second keeps waiting.
    let (tag, r) = w1.await.expect("join");
    assert_eq!(
        (tag, r.as_ref().map(|l| name(l).to_owned()).ok()),
        (1, Some("b".to_owned()))
    );
    settle().await;
    assert!(!w2.is_finished());
    assert_eq!(p.queue_depth(), 1);
    drop(r);
    assert!(w2.await.expect("join").1.is_ok());
}

#[tokio::test(start_paused = true)]
async fn new_weight_applies_to_the_next_pick_and_positions_are_kept() {
    let m = metrics();
    let p = build(
        spec(
            vec![
                backend("vm", 11, None, false),
                backend("pi", 1, None, false),
            ],
            0,
        ),
        &m,
    );
    let first: Vec<String> = (0..6)
        .map(|_| name(&lease_now(&p, Class::Read).expect("l")).to_owned())
        .collect();
    assert!(first.iter().all(|n| n == "vm"));
    // Drain the Pi: the very next pick, and all after, go to the VM.
    reload(
        &p,
        spec(
            vec![
                backend("vm", 11, None, false),
                backend("pi", 0, None, false),
            ],
            0,
        ),
        &m,
    );
    for _ in 0..24 {
        assert_eq!(name(&lease_now(&p, Class::Read).expect("l")), "vm");
    }
    // Weights back, in another order: state follows names, not positions.
    reload(
        &p,
        spec(
            vec![
                backend("pi", 1, None, false),
                backend("vm", 11, None, false),
            ],
            0,
        ),
        &m,
    );
    let picks: Vec<String> = (0..120)
        .map(|_| name(&lease_now(&p, Class::Read).expect("l")).to_owned())
        .collect();
    let pi = picks.iter().filter(|n| *n == "pi").count();
    assert!((9..=11).contains(&pi), "{pi} of 120 to the Pi");
}

#[tokio::test(start_paused = true)]
async fn a_removed_back_end_drains() {
    let m = metrics();
    let p = build(
        spec(
            vec![backend("a", 1, None, false), backend("b", 1, None, false)],
            0,
        ),
        &m,
    );
    let on_a = lease_now(&p, Class::Read).expect("a");
    assert_eq!(name(&on_a), "a");
    reload(&p, spec(vec![backend("b", 1, None, false)], 0), &m);
    for _ in 0..5 {
        assert_eq!(name(&lease_now(&p, Class::Read).expect("b")), "b");
    }
    assert_eq!(
        on_a.backend().in_flight(),
        1,
        "the request on a finishes normally"
    );
    let a = on_a.backend().load.clone();
    drop(on_a);
    assert_eq!(a.in_flight.load(Ordering::Relaxed), 0);
}

#[tokio::test(start_paused = true)]
async fn draining_everything_sheds_waiters_and_the_switch_outlives_reloads() {
    let m = metrics();
    let p = build(spec(vec![backend("a", 1, Some(1), false)], 8), &m);
    let _busy = lease_now(&p, Class::Read).expect("slot");
    let w = waiter(&p, Class::Read, 0).await;
    reload(&p, spec(vec![backend("a", 0, Some(1), false)], 8), &m);
    assert_eq!(w.await.expect("join").1.err(), Some(Shed::NoBackend));
    p.set_maintenance(true);
    reload(&p, spec(vec![backend("a", 1, None, false)], 8), &m);
    assert_eq!(lease_now(&p, Class::Read).err(), Some(Shed::Manual));
    p.set_maintenance(false);
    assert!(lease_now(&p, Class::Read).is_ok());
}

#[tokio::test(start_paused = true)]
async fn a_tunnel_holds_its_slot_but_only_its_handshake_is_service_time() {
    let p = pool(1, 0, 1000);
    let mut tunnel = lease_now(&p, Class::Read).expect("lease");
    tokio::time::advance(Duration::from_millis(20)).await;
    tunnel.into_tunnel();
    assert_eq!(p.service_time(), Some(Duration::from_millis(20)));
    // A ten-minute tunnel keeps the back end full all along...
    tokio::time::advance(Duration::from_secs(600)).await;
    assert!(matches!(lease_now(&p, Class::Read), Err(Shed::QueueFull)));
    // ...and its end frees the slot without telling the estimate it was slow.
    drop(tunnel);
    assert_eq!(p.service_time(), Some(Duration::from_millis(20)));
    assert!(lease_now(&p, Class::Read).is_ok());
}
