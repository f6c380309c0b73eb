//! Allocations per request, counted by a counting global allocator around the real
//! balancer (in-process, one worker thread), for the three hot paths: the maintenance
//! page, an edge-snapshot hit, and a proxied request.
//!
//! The client and the origin around it allocate nothing per request (raw sockets,
//! fixed buffers, prebuilt bytes), so every allocation counted during the measured
//! window is the balancer's: launchday's own code and the libraries it drives (hyper,
//! tokio, http). `cargo bench --bench allocs`.

use std::alloc::System;

use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[path = "support/alloc_count.rs"]
mod alloc_count;

// stats_alloc wraps the system allocator with counters (the crate forbids `unsafe`,
// so the allocator comes from a library).
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const WARMUP: usize = 2_000;
const MEASURED: usize = 20_000;

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let origin = alloc_count::origin().await;
        for (name, toml) in alloc_count::configs(origin) {
            for (head, req) in [("short", alloc_count::SHORT), ("browser", alloc_count::BROWSER)] {
                let (per, bytes) = alloc_count::measure(GLOBAL, &toml, req, WARMUP, MEASURED).await;
                println!(
                    "{name:<18} {head:<8} head {per:>7.2} allocations/request  {bytes:>8.0} bytes/request"
                );
            }
        }
    });
}
