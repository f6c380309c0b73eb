//! The own HTTP/1.1 paths allocate nothing per request in steady state: the
//! maintenance page, a snapshot hit and a proxied request, counted by a counting
//! global allocator around the real balancer (`benches/allocs.rs` prints the same
//! counts over more requests). One test in this binary, so no other test's
//! allocations are counted.

use std::alloc::System;

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[path = "../benches/support/alloc_count.rs"]
mod alloc_count;

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// A few stray allocations in the window are allowed (a timer wheel level or a
/// metrics bucket touched for the first time); one per request is not.
const AT_MOST: f64 = 0.05;

#[test]
fn no_allocation_per_request_on_the_own_paths() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let origin = alloc_count::origin().await;
        for (name, toml) in alloc_count::configs(origin) {
            for (head, req) in [("short", alloc_count::SHORT), ("browser", alloc_count::BROWSER)] {
                let (per, bytes) = alloc_count::measure(GLOBAL, &toml, req, 300, 2_000).await;
                assert!(
                    per <= AT_MOST,
                    "{name}, {head} head: {per:.3} allocations ({bytes:.0} bytes) per request, expected none"
                );
            }
        }
    });
}
