//! Header maps and header names reused per worker thread, so that a request
//! answered from memory allocates nothing.
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
//!
//! Output buffers ([`take_out`], [`give_out`]): the own loop encodes each answer
//! (head and body) into one buffer and writes it with one system call. A buffer per
//! connection is cold by the connection's next request once there are more
//! connections than fit the cache (1000 of them hold 4 MiB of maintenance pages),
//! so each answer's copy would miss on every line. Instead a connection takes this
//! worker's buffer for the time of one answer and gives it back once the answer is
//! written: in steady state every connection of a worker writes from the same warm
//! buffer. An answer whose write has to wait (a full socket) keeps its buffer for
//! that time; the next one takes another. At most [`KEEP_OUT`] buffers are kept,
//! each of at most [`OUT_MAX_CAPACITY`] bytes, cleared (a kept buffer holds no
//! answer's bytes: [`give_out`] clears it).
//!
//! Read buffers ([`take_in`], [`give_in`]): the same for the bytes a connection
//! reads. The own loop reads a request's head into a buffer, parses it and drops
//! the head with the request; between requests its buffer is empty. A buffer per
//! connection is cold by that connection's next request (the kernel's copy into it,
//! the buffer's shared count and its bookkeeping miss, once per request); instead an
//! idle connection gives its empty buffer back and takes this worker's warm one
//! when its next bytes arrive. A buffer is kept only if nothing else holds its
//! bytes (a request's head still alive, say) and it is empty: [`give_in`] checks
//! both, so a kept buffer holds no request's bytes and is whole again. At most
//! [`KEEP_IN`] are kept, each of at most [`IN_MAX_CAPACITY`] bytes.
//!
//! Host values ([`host_value`]): a request in absolute form, and every HTTP/2
//! request, names its host in the target's authority, which becomes the back end's
//! `Host`. Each worker keeps the last [`HOST_SLOTS`] values it made, so that the
//! requests of a site share one (a clone shares the bytes).
//!
//! Header names ([`Names`]): `HeaderName::from_bytes` allocates a copy of every name
//! the `http` crate has no constant for, and browsers send eight or so of those on
//! every request (`sec-ch-ua*`, `sec-fetch-*`, `priority`). Each worker keeps the
//! names it met in [`NAME_SLOTS`] slots, by a hash of their bytes (a name may take
//! one of the few slots after its own), and a name equal (ignoring case) to one
//! kept is that name's clone, which shares its bytes.
//! - **Same names.** A slot holds a name `from_bytes` made, and only one of
//!   lowercase letters, digits and `-`: for those, bytes whose case-folded form
//!   (`| 0x20`) equals the kept name's are exactly its other spellings, which
//!   `from_bytes` would have lowercased to it. Anything else goes to `from_bytes`,
//!   and errors are its.
//! - **Bounded.** A fixed number of slots; a new name takes a free one of its
//!   ways, or else replaces the one in its own slot.

use std::cell::RefCell;

use bytes::BytesMut;
use http::header::{HeaderName, HeaderValue, InvalidHeaderName};
use http::HeaderMap;

/// Maps kept per thread: more than the requests one worker has between taking a
/// map and giving it back in steady state (one or two each).
pub const KEEP: usize = 16;
/// A map that can hold more fields than this is not kept.
pub const MAX_CAPACITY: usize = 96;

/// Output buffers kept per thread: more than the answers whose write waits on a
/// full socket at once in steady state.
pub const KEEP_OUT: usize = 8;
/// An output buffer bigger than this is freed rather than kept: room for a streamed
/// answer's flush threshold (64 KiB) and a head.
pub const OUT_MAX_CAPACITY: usize = 80 * 1024;

/// Read buffers kept per thread: more than the connections of a worker that read
/// at once in steady state (one, or a few whose heads came in pieces).
pub const KEEP_IN: usize = 8;
/// A read buffer is made with this much room (and asks for this much more when it
/// fills up).
pub const IN_CAPACITY: usize = 4096;
/// A read buffer bigger than this (one that held a long head) is freed rather than
/// kept.
pub const IN_MAX_CAPACITY: usize = 64 * 1024;

/// `Host` values kept per worker: the sites behind one balancer that are busy at
/// once on one worker, give or take.
pub const HOST_SLOTS: usize = 8;

/// Header names kept per worker: far more than the distinct names of browsers'
/// requests and back ends' answers (20 to 40).
pub const NAME_SLOTS: usize = 256;
/// A name is looked for in its slot and the next ones, up to this many.
const NAME_WAYS: usize = 4;

thread_local! {
    static SPARE: RefCell<Vec<HeaderMap>> = const { RefCell::new(Vec::new()) };
    static NAMES: RefCell<Names> = RefCell::new(Names::new());
    static OUT: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
    static IN: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
    static HOSTS: RefCell<Hosts> = const { RefCell::new(Hosts { kept: Vec::new(), next: 0 }) };
}

/// The `Host` values a worker made last ([`host_value`]).
struct Hosts {
    kept: Vec<HeaderValue>,
    /// The slot the next new value replaces once all are taken.
    next: usize,
}

/// The header names a worker met (see the module's doc).
pub struct Names {
    slots: Vec<Option<Known>>,
}

/// A name in its slot, with its folded bytes for a quick comparison.
struct Known {
    folded: Folded,
    name: HeaderName,
}

/// Names of at most this many bytes are kept (longer ones are rare).
const FOLD_MAX: usize = 32;

/// A name's bytes with ASCII case folded (each byte `| 0x20`), zero-padded, and
/// its length.
#[derive(PartialEq, Eq)]
struct Folded([u64; FOLD_MAX / 8], usize);

impl Folded {
    fn of(raw: &[u8]) -> Option<Self> {
        if raw.len() > FOLD_MAX {
            return None;
        }
        let mut bytes = [0u8; FOLD_MAX];
        bytes[..raw.len()].copy_from_slice(raw);
        let mut words = [0u64; FOLD_MAX / 8];
        for (w, chunk) in words.iter_mut().zip(bytes.chunks_exact(8)) {
            let mut b = [0u8; 8];
            b.copy_from_slice(chunk);
            *w = u64::from_le_bytes(b) | 0x2020_2020_2020_2020;
        }
        Some(Folded(words, raw.len()))
    }

    /// The slot, from all of the name (`sec-fetch-*` share their first ten bytes).
    fn slot(&self) -> usize {
        let [a, b, c, d] = self.0;
        let mixed = a ^ b.rotate_left(17) ^ c.rotate_left(31) ^ d.rotate_left(47) ^ self.1 as u64;
        (mixed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 57) as usize % NAME_SLOTS
    }
}

impl Names {
    fn new() -> Self {
        let mut slots = Vec::with_capacity(NAME_SLOTS);
        slots.resize_with(NAME_SLOTS, || None);
        Names { slots }
    }

    /// The header name `raw` (any case), as `HeaderName::from_bytes` makes it.
    pub fn name(&mut self, raw: &[u8]) -> Result<HeaderName, InvalidHeaderName> {
        let Some(folded) = Folded::of(raw) else {
            return HeaderName::from_bytes(raw);
        };
        let first = folded.slot();
        let ways = (0..NAME_WAYS).map(|i| (first + i) % NAME_SLOTS);
        for i in ways.clone() {
            match &self.slots[i] {
                Some(known) if known.folded == folded => return Ok(known.name.clone()),
                Some(_) => {}
                None => break,
            }
        }
        let name = HeaderName::from_bytes(raw)?;
        // Folding maps exactly a letter's two cases together only for names of
        // lowercase letters, digits and `-` (it would also fold `^` into `~`, say):
        // other names are not kept.
        if name
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            // The first free way, else the name's own slot.
            let at = ways
                .clone()
                .find(|&i| self.slots[i].is_none())
                .unwrap_or(first);
            self.slots[at] = Some(Known {
                folded,
                name: name.clone(),
            });
        }
        Ok(name)
    }
}

/// Runs `f` with this worker's [`Names`].
pub fn with_names<R>(f: impl FnOnce(&mut Names) -> R) -> R {
    NAMES.with(|n| match n.try_borrow_mut() {
        Ok(mut names) => f(&mut names),
        // Only if `f` itself asked again: a fresh set, as correct and just slower.
        Err(_) => f(&mut Names::new()),
    })
}

type Stack<T> = std::thread::LocalKey<RefCell<Vec<T>>>;

/// The last item kept on this thread's `stack`, if any.
fn pop<T: 'static>(stack: &'static Stack<T>) -> Option<T> {
    stack.with(|s| s.try_borrow_mut().ok().and_then(|mut s| s.pop()))
}

/// Keeps `item` (already cleared) on this thread's `stack` if it holds fewer than
/// `max`; else it is freed.
fn push<T: 'static>(stack: &'static Stack<T>, item: T, max: usize) {
    stack.with(|s| {
        if let Ok(mut s) = s.try_borrow_mut() {
            if s.len() < max {
                s.push(item);
            }
        }
    });
}

/// An empty map with room for `n` fields: a kept one if this thread has one.
pub fn take(n: usize) -> HeaderMap {
    match pop(&SPARE) {
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
    push(&SPARE, map, KEEP);
}

/// An empty output buffer: the one this worker's last answer used, if it gave it
/// back.
pub fn take_out() -> Vec<u8> {
    pop(&OUT).unwrap_or_default()
}

/// Done with an output buffer: cleared and kept for the next [`take_out`] on this
/// thread, or freed.
pub fn give_out(mut out: Vec<u8>) {
    let cap = out.capacity();
    if cap == 0 || cap > OUT_MAX_CAPACITY {
        return;
    }
    out.clear();
    push(&OUT, out, KEEP_OUT);
}

/// An empty read buffer with room for at least [`IN_CAPACITY`] bytes: the one this
/// worker's last read used, if it was given back.
pub fn take_in() -> BytesMut {
    pop(&IN).unwrap_or_else(|| BytesMut::with_capacity(IN_CAPACITY))
}

/// Done with a read buffer for now: kept for the next [`take_in`] on this thread if
/// it is empty, nothing else shares its bytes and it is of a kept size; else it is
/// dropped (its memory freed once the last bytes sharing it go).
pub fn give_in(mut buf: BytesMut) {
    // `try_reclaim` succeeds only for a buffer whose allocation is this handle's
    // alone, and then makes all of it room again without allocating.
    if !buf.is_empty()
        || buf.capacity() > IN_MAX_CAPACITY
        || !buf.try_reclaim(IN_CAPACITY)
        || buf.capacity() > IN_MAX_CAPACITY
    {
        return;
    }
    push(&IN, buf, KEEP_IN);
}

/// The `Host` value for `authority`: a kept one equal to it, else a new one (then
/// kept in place of the oldest). `None` if it is not a valid header value.
pub fn host_value(authority: &str) -> Option<HeaderValue> {
    HOSTS.with(|h| {
        let Ok(mut hosts) = h.try_borrow_mut() else {
            return HeaderValue::from_str(authority).ok();
        };
        if let Some(v) = hosts
            .kept
            .iter()
            .find(|v| v.as_bytes() == authority.as_bytes())
        {
            return Some(v.clone());
        }
        let v = HeaderValue::from_str(authority).ok()?;
        if hosts.kept.len() < HOST_SLOTS {
            hosts.kept.push(v.clone());
        } else {
            let at = hosts.next;
            hosts.kept[at] = v.clone();
            hosts.next = (at + 1) % HOST_SLOTS;
        }
        Some(v)
    })
}

/// Output buffers this thread keeps now.
#[cfg(test)]
fn kept_out() -> usize {
    OUT.with(|o| o.borrow().len())
}

/// Read buffers this thread keeps now.
#[cfg(test)]
fn kept_in() -> usize {
    IN.with(|o| o.borrow().len())
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
    fn names_are_those_from_bytes_makes_and_shared_after_the_first() {
        with_names(|names| {
            for raw in [
                &b"Sec-Fetch-Dest"[..],
                b"sec-fetch-dest",
                b"SEC-FETCH-MODE",
                b"Host",
                b"x-a",
                b"X-A",
            ] {
                let name = names.name(raw).expect("valid");
                assert_eq!(name, HeaderName::from_bytes(raw).expect("valid"));
            }
            // The second lookup of a custom name shares the first one's bytes.
            let a = names.name(b"Sec-CH-UA-Platform").expect("valid");
            let b = names.name(b"sec-ch-ua-platform").expect("valid");
            assert_eq!(a.as_str().as_ptr(), b.as_str().as_ptr());
            // Invalid names are refused as from_bytes refuses them.
            assert!(names.name(b"bad name").is_err());
            assert!(names.name(b"").is_err());
            // `^` and `~` fold together: a name holding one is not kept, so the
            // other is never taken for it.
            assert_eq!(names.name(b"x^y").expect("valid").as_str(), "x^y");
            assert_eq!(names.name(b"x~y").expect("valid").as_str(), "x~y");
            assert_eq!(names.name(b"x^y").expect("valid").as_str(), "x^y");
            // Longer than kept: still made.
            let long = [b'a'; 40];
            assert_eq!(names.name(&long).expect("valid").as_str().len(), 40);
        });
    }

    #[test]
    fn names_in_one_slot_replace_each_other_and_stay_right() {
        // More names than ways that start in one slot.
        let slot = |raw: &[u8]| Folded::of(raw).expect("short").slot();
        let a = b"x-name-0".to_vec();
        let same: Vec<Vec<u8>> = std::iter::once(a.clone())
            .chain(
                (1..100_000)
                    .map(|i| format!("x-name-{i}").into_bytes())
                    .filter(|b| slot(b) == slot(&a)),
            )
            .take(NAME_WAYS + 2)
            .collect();
        assert_eq!(same.len(), NAME_WAYS + 2);
        with_names(|names| {
            for _ in 0..3 {
                for raw in &same {
                    assert_eq!(
                        names.name(raw).expect("valid").as_str().as_bytes(),
                        &raw[..]
                    );
                }
            }
        });
    }

    #[test]
    fn an_output_buffer_comes_back_empty_warm_and_bounded() {
        let mut out = take_out();
        out.extend_from_slice(b"HTTP/1.1 503 Service Unavailable\r\n\r\n");
        let (at, room) = (out.as_ptr(), out.capacity());
        give_out(out);
        assert_eq!(kept_out(), 1);
        // The next answer on this thread writes from the same memory.
        let again = take_out();
        assert!(again.is_empty());
        assert_eq!((again.as_ptr(), again.capacity()), (at, room));
        // Two answers out at once: the second gets a fresh buffer.
        let other = take_out();
        assert_eq!(other.capacity(), 0);
        give_out(again);
        give_out(other);
        assert_eq!(kept_out(), 1, "an unused (empty) buffer is not kept");
        for _ in 0..KEEP_OUT + 3 {
            give_out(Vec::with_capacity(16));
        }
        assert_eq!(kept_out(), KEEP_OUT);
        while kept_out() > 0 {
            take_out();
        }
        give_out(Vec::with_capacity(OUT_MAX_CAPACITY + 1));
        assert_eq!(kept_out(), 0, "a huge buffer is freed");
    }

    #[test]
    fn a_read_buffer_is_kept_only_whole_and_unshared() {
        let mut buf = take_in();
        assert!(buf.capacity() >= IN_CAPACITY);
        buf.extend_from_slice(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n");
        // The request's head, split off as the own loop does, still alive.
        let head = buf.split().freeze();
        give_in(buf);
        assert_eq!(
            kept_in(),
            0,
            "a buffer whose bytes a head holds is not kept"
        );

        let mut buf = take_in();
        buf.extend_from_slice(b"GET /next HTTP/1.1\r\n");
        let head2 = buf.split_to(4).freeze();
        drop(head2);
        give_in(buf);
        assert_eq!(
            kept_in(),
            0,
            "a buffer holding bytes (a partial head) is not kept"
        );
        drop(head);

        let mut buf = take_in();
        let at = buf.as_ptr();
        buf.extend_from_slice(b"GET / HTTP/1.1\r\n\r\n");
        let head = buf.split().freeze();
        drop(head);
        give_in(buf);
        assert_eq!(kept_in(), 1);
        // The next read on this thread goes to the same memory, whole again.
        let again = take_in();
        assert!(again.is_empty());
        assert!(again.capacity() >= IN_CAPACITY);
        assert_eq!(again.as_ptr(), at);
        for _ in 0..KEEP_IN + 3 {
            give_in(BytesMut::with_capacity(IN_CAPACITY));
        }
        assert_eq!(kept_in(), KEEP_IN);
        while kept_in() > 0 {
            take_in();
        }
        give_in(BytesMut::with_capacity(IN_MAX_CAPACITY + 1));
        assert_eq!(kept_in(), 0, "a huge buffer is freed");
    }

    #[test]
    fn host_values_are_shared_per_site_and_bounded() {
        let a = host_value("shop.example:8443").expect("valid");
        assert_eq!(a, "shop.example:8443");
        let again = host_value("shop.example:8443").expect("valid");
        assert_eq!(
            a.as_bytes().as_ptr(),
            again.as_bytes().as_ptr(),
            "shared bytes"
        );
        assert!(host_value("bad\nhost").is_none());
        // More sites than slots: each still gets its own right value, and the
        // oldest one is made anew.
        for round in 0..2 {
            for i in 0..HOST_SLOTS + 3 {
                let name = format!("site{i}.example");
                assert_eq!(
                    host_value(&name).expect("valid"),
                    name.as_str(),
                    "round {round}"
                );
            }
        }
        assert_eq!(HOSTS.with(|h| h.borrow().kept.len()), HOST_SLOTS);
        assert_eq!(
            host_value("shop.example:8443").expect("valid"),
            "shop.example:8443"
        );
    }

    #[test]
    fn take_grows_a_small_kept_map_to_the_room_asked() {
        give(HeaderMap::with_capacity(2));
        let map = take(40);
        assert!(map.capacity() >= 40);
    }
}
