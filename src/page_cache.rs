//! Whole maintenance-page answers, head and body in one buffer, kept per worker
//! thread for the current second, so that the own HTTP/1.1 writer
//! ([`crate::h1_server`]) sends a page with one write from a warm buffer instead of
//! encoding the head and copying the page (4 KB and more) after it for every
//! answer. On the Intel VM of the eleventh session that copy was the largest user
//! space item of a maintenance-page answer (BENCHMARKS.md).
//!
//! Invariants:
//! - An entry is the exact bytes the writer would have produced for the same
//!   status, header lines, page and keep-alive choice in the same second (it is
//!   built by that writer's own head encoder): only the `date` line changes with
//!   the second, and every entry is rebuilt, in its own buffer, when the second
//!   changes.
//! - An entry holds its header lines and page (`Bytes` clones), so it is found
//!   by their identity (address and length) and an address cannot be reused by a
//!   newer snapshot's page while the entry lives. Entries not used during a second
//!   are dropped at the next, so a reload's old pages go within two seconds.
//! - At most [`MAX_ENTRIES`] per thread; past that, answers take the writer's
//!   ordinary path. Steady state allocates nothing: a rebuilt entry reuses its
//!   buffer unless a write still holds it.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::StatusCode;

/// Entries per worker thread: 2 request classes × 3 encodings × a few shed
/// reasons × keep-alive or not fit with room to spare.
pub const MAX_ENTRIES: usize = 48;

struct Entry {
    status: StatusCode,
    keep_alive: bool,
    lines: Bytes,
    page: Bytes,
    /// Whether the connection closes after this answer.
    close: bool,
    whole: Bytes,
    used: bool,
}

impl Entry {
    fn is(&self, status: StatusCode, keep_alive: bool, lines: &Bytes, page: &Bytes) -> bool {
        self.status == status
            && self.keep_alive == keep_alive
            && same(&self.lines, lines)
            && same(&self.page, page)
    }
}

fn same(a: &Bytes, b: &Bytes) -> bool {
    a.as_ptr() == b.as_ptr() && a.len() == b.len()
}

thread_local! {
    /// The second the entries were built in, and the entries.
    static CACHE: RefCell<(u64, Vec<Entry>)> = const { RefCell::new((0, Vec::new())) };
}

/// Encodes into `out` (cleared first) the head of an answer with this status,
/// header lines, body length and keep-alive choice, as the writer would; returns
/// whether the connection closes after it.
pub type EncodeHead<'a> = &'a dyn Fn(StatusCode, &[u8], usize, bool, &mut Vec<u8>) -> bool;

/// The whole answer (head and `page`) for the second `secs`, from this thread's
/// cache or built into it with `encode`; `None` when the cache is full. `scratch`
/// is a buffer to encode heads in. Returns the bytes and whether the connection
/// closes after them.
pub fn whole(
    secs: u64,
    status: StatusCode,
    keep_alive: bool,
    lines: &Bytes,
    page: &Bytes,
    scratch: &mut Vec<u8>,
    encode: EncodeHead<'_>,
) -> Option<(Bytes, bool)> {
    CACHE.with_borrow_mut(|(at, entries)| {
        if *at != secs {
            *at = secs;
            entries.retain(|e| e.used);
            for e in entries.iter_mut() {
                e.used = false;
                let close = encode(e.status, &e.lines, e.page.len(), e.keep_alive, scratch);
                e.whole = rebuilt(std::mem::take(&mut e.whole), scratch, &e.page);
                e.close = close;
            }
        }
        if let Some(e) = entries
            .iter_mut()
            .find(|e| e.is(status, keep_alive, lines, page))
        {
            e.used = true;
            return Some((e.whole.clone(), e.close));
        }
        if entries.len() >= MAX_ENTRIES {
            return None;
        }
        let close = encode(status, lines, page.len(), keep_alive, scratch);
        let whole = rebuilt(Bytes::new(), scratch, page);
        entries.push(Entry {
            status,
            keep_alive,
            lines: lines.clone(),
            page: page.clone(),
            close,
            whole: whole.clone(),
            used: true,
        });
        Some((whole, close))
    })
}

/// `head` then `page` in `old`'s buffer when nothing else holds it, else in a new
/// one.
fn rebuilt(old: Bytes, head: &[u8], page: &[u8]) -> Bytes {
    let mut buf = old.try_into_mut().unwrap_or_else(|_| BytesMut::new());
    buf.clear();
    buf.reserve(head.len() + page.len());
    buf.extend_from_slice(head);
    buf.extend_from_slice(page);
    buf.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clear() {
        CACHE.with_borrow_mut(|(at, e)| {
            *at = 0;
            e.clear();
        });
    }

    #[test]
    fn an_entry_is_the_head_then_the_page_and_is_reused_within_the_second() {
        clear();
        let (lines, page) = (
            Bytes::from_static(b"x: 1\r\n"),
            Bytes::from(vec![b'p'; 5000]),
        );
        let calls = std::cell::Cell::new(0);
        let encode = |_: StatusCode, _: &[u8], _: usize, keep: bool, out: &mut Vec<u8>| {
            calls.set(calls.get() + 1);
            out.clear();
            out.extend_from_slice(b"HTTP/1.1 503 x\r\n\r\n");
            !keep
        };
        let get = |keep_alive| {
            whole(
                7,
                StatusCode::SERVICE_UNAVAILABLE,
                keep_alive,
                &lines,
                &page,
                &mut Vec::new(),
                &encode,
            )
            .expect("cached")
        };
        let (a, close) = get(true);
        assert!(!close);
        assert_eq!(&a[..18], b"HTTP/1.1 503 x\r\n\r\n");
        assert_eq!(&a[18..], &page[..]);
        let (b, _) = get(true);
        assert_eq!(a.as_ptr(), b.as_ptr(), "the same buffer within a second");
        assert_eq!(calls.get(), 1, "encoded once");
        // Another keep-alive choice, another entry.
        let (_, close) = get(false);
        assert!(close, "encoded for its own keep-alive choice");
        assert_eq!(calls.get(), 2);
    }

    #[test]
    fn a_new_second_rebuilds_in_place_and_drops_unused_entries() {
        clear();
        let lines = Bytes::from_static(b"");
        let (p1, p2) = (Bytes::from(vec![1u8; 100]), Bytes::from(vec![2u8; 50]));
        let mut scratch = Vec::new();
        let second = std::cell::Cell::new(b'1');
        let encode = |_: StatusCode, _: &[u8], len: usize, _: bool, out: &mut Vec<u8>| {
            out.clear();
            out.push(second.get());
            out.push(len as u8);
            true
        };
        let s = StatusCode::SERVICE_UNAVAILABLE;
        let (a, close) = whole(1, s, true, &lines, &p1, &mut scratch, &encode).expect("p1");
        assert!(close);
        let at = a.as_ptr();
        drop(a);
        whole(1, s, true, &lines, &p2, &mut scratch, &encode).expect("p2");
        // Second 2: both rebuilt (the date changed); p2 not used in it.
        second.set(b'2');
        let (a, _) = whole(2, s, true, &lines, &p1, &mut scratch, &encode).expect("p1 again");
        assert_eq!(&a[..2], &[b'2', 100], "rebuilt with its own new head");
        assert_eq!(&a[2..], &p1[..]);
        assert_eq!(a.as_ptr(), at, "in its own buffer");
        drop(a);
        // Second 3: p2 was not used during second 2, so it is gone.
        whole(3, s, true, &lines, &p1, &mut scratch, &encode).expect("p1");
        assert_eq!(CACHE.with_borrow(|(_, e)| e.len()), 1);
    }

    #[test]
    fn a_full_cache_declines_and_a_held_buffer_is_not_overwritten() {
        clear();
        let lines = Bytes::new();
        let mut scratch = Vec::new();
        let encode = |_: StatusCode, _: &[u8], _: usize, _: bool, out: &mut Vec<u8>| {
            out.clear();
            out.push(b'h');
            false
        };
        let s = StatusCode::SERVICE_UNAVAILABLE;
        let pages: Vec<Bytes> = (0..=MAX_ENTRIES)
            .map(|i| Bytes::from(vec![i as u8; 8]))
            .collect();
        let held = whole(1, s, true, &lines, &pages[0], &mut scratch, &encode).expect("first");
        for p in &pages[1..MAX_ENTRIES] {
            assert!(whole(1, s, true, &lines, p, &mut scratch, &encode).is_some());
        }
        assert!(whole(
            1,
            s,
            true,
            &lines,
            &pages[MAX_ENTRIES],
            &mut scratch,
            &encode
        )
        .is_none());
        // A write still holds the first entry's bytes: the next second builds anew.
        let again = whole(2, s, true, &lines, &pages[0], &mut scratch, &encode).expect("again");
        assert_ne!(again.0.as_ptr(), held.0.as_ptr());
        assert_eq!(&held.0[1..], &pages[0][..], "the held answer is intact");
    }
}
