//! Selection cost: smooth weighted round robin alone, and a whole `Pool::acquire`
//! (lock, capacity check, pick, lease taken and dropped), with 2 and 100 back ends.

use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use std::future::Future;

use launchday::config::{BackendSpec, Class, PoolSpec};
use launchday::metrics::Metrics;
use launchday::pool::select::SmoothWrr;
use launchday::pool::Pool;
use launchday::upstream::Upstream;

fn weights(n: usize) -> Vec<u32> {
    (0..n)
        .map(|i| if i == 0 { 11 } else { 1 + (i % 5) as u32 })
        .collect()
}

fn pool(n: usize) -> Arc<Pool> {
    let backends = weights(n)
        .into_iter()
        .enumerate()
        .map(|(i, w)| BackendSpec {
            name: format!("b{i}"),
            address_text: format!("[::1]:{}", 10000 + i),
            address: format!("[::1]:{}", 10000 + i).parse().expect("addr"),
            weight: w,
            max_connections: Some(64),
            served_by: None,
            backup: false,
        })
        .collect();
    let spec = PoolSpec {
        name: "bench".into(),
        queue_depth: 1024,
        queue_timeout: Duration::from_secs(1),
        maintenance: false,
        backends,
        health_check: None,
        retries: 1,
        passive_failures: 0,
        passive_cooldown: Duration::from_secs(10),
        slow_start: Duration::ZERO,
    };
    let metrics = Metrics::new(prometheus::Registry::new()).expect("metrics");
    Arc::new(Pool::new(spec, &metrics, Upstream::new))
}

/// `Pool::acquire` with free capacity answers without waiting: poll it once.
fn acquire_now(p: &Arc<Pool>) -> Option<launchday::pool::Lease> {
    let mut f = std::pin::pin!(p.acquire(Class::Read));
    match f
        .as_mut()
        .poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
    {
        std::task::Poll::Ready(r) => r.ok(),
        std::task::Poll::Pending => None,
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("select");
    for n in [2usize, 100] {
        let w = weights(n);
        let mut s = SmoothWrr::new(n);
        g.bench_with_input(BenchmarkId::new("swrr_pick", n), &n, |b, _| {
            b.iter(|| black_box(s.pick(|i| w[i])))
        });
        let p = pool(n);
        g.bench_with_input(BenchmarkId::new("pool_acquire_release", n), &n, |b, _| {
            b.iter(|| drop(black_box(acquire_now(&p))))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
