//! Header maps reused per worker thread, so that a request answered from memory
//! allocates nothing.
//!
//! A `HeaderMap` costs two allocations (its index table and its entries). The own
//! HTTP/1.1 loop ([`crate::h1_server`]) needs one per request, an answer that is not
//! prebuilt needs another, and a proxied request a third for the back end's answer.
//! Instead, a map whose request or answer is done goes back to a small stack of
//! this thread's ([`give`]), cleared, and the next request on the same worker
//! takes it ([`take`]).
//!
//! Invariants:
//! - **A kept map holds no value.** It is cleared before it is kept, so it keeps no
//!   request's bytes alive (the own loop reclaims its read buffer once the request's
//!   head is dropped) and nothing leaks from one request into another.
//! - **Bounded.** At most [`KEEP`] maps per thread, each of at most [`MAX_CAPACITY`]
//!   fields; a bigger map (a head with many fields) is freed instead, so a burst of
//!   odd requests does not pin memory.
//! - **Only a cache.** [`take`] on an empty stack allocates as before; a map given
//!   on one thread and taken on another is still one whole map. Nothing depends on
//!   a map coming back.

use std::cell::RefCell;

use http::HeaderMap;

/// Maps kept per thread: more than the requests one worker has between taking a
/// map and giving it back in steady state (one or two each).
pub const KEEP: usize = 16;
/// A map that can hold more fields than this is not kept.
pub const MAX_CAPACITY: usize = 96;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
}

/// An empty map with room for `n` fields: a kept one if this thread has one.
pub fn take(n: usize) -> HeaderMap {
    let kept = SPARE.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()));
    match kept {
        Some(mut map) => {
            // Kept maps are empty; reserving within their capacity is free.
            map.reserve(n);
            map
        }
        None => HeaderMap::with_capacity(n),
    }
}

/// Done with `map`: cleared and kept for the next [`take`] on this thread, or freed.
pub fn give(mut map: HeaderMap) {
    let cap = map.capacity();
    if cap == 0 || cap > MAX_CAPACITY {
        return;
    }
    map.clear();
    SPARE.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < KEEP {
                s.push(map);
            }
        }
    });
}

/// Maps this thread keeps now.
#[cfg(test)]
fn kept() -> usize {
    SPARE.with(|s| s.borrow().len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::header::{HeaderName, HeaderValue};

    // Each test runs on its own thread, so it starts with an empty stack.

    #[test]
    fn a_given_map_comes_back_empty_with_its_room() {
        let mut map = take(8);
        let room = map.capacity();
        map.insert(http::header::HOST, HeaderValue::from_static("a"));
        map.append(http::header::ACCEPT, HeaderValue::from_static("*/*"));
        give(map);
        assert_eq!(kept(), 1);
        let again = take(4);
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        assert_eq!(kept(), 0);
    }

    #[test]
    fn a_kept_map_holds_no_bytes_of_its_request() {
        let shared = Bytes::copy_from_slice(b"from-the-read-buffer");
        let mut map = take(4);
        map.insert(
            HeaderName::from_static("x-a"),
            HeaderValue::from_maybe_shared(shared.clone()).expect("value"),
        );
        give(map);
        // Only the test's own handle is left: the map let go of the buffer.
        assert!(shared.is_unique());
    }

    #[test]
    fn bounded_in_number_and_size() {
        for _ in 0..KEEP + 5 {
            give(HeaderMap::with_capacity(4));
        }
        assert_eq!(kept(), KEEP);
        for _ in 0..KEEP {
            take(1);
        }
        give(HeaderMap::with_capacity(MAX_CAPACITY * 2));
        give(HeaderMap::new());
        assert_eq!(kept(), 0);
    }

    #[test]
    fn take_grows_a_small_kept_map_to_the_room_asked() {
        give(HeaderMap::with_capacity(2));
        let map = take(40);
        assert!(map.capacity() >= 40);
    }
}
