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
    for c in alloc_count::every_path(GLOBAL, 300, 2_000) {
        assert!(
            c.allocations <= AT_MOST,
            "{}, {} head: {:.3} allocations ({:.0} bytes) per request, expected none",
            c.path,
            c.head,
            c.allocations,
            c.bytes
        );
    }
}
