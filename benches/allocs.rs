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
    for c in alloc_count::every_path(GLOBAL, WARMUP, MEASURED) {
        println!(
            "{:<18} {:<8} head {:>7.2} allocations/request  {:>8.0} bytes/request",
            c.path, c.head, c.allocations, c.bytes
        );
    }
}
