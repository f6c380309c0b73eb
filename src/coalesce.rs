//! How an HTTP/2 client connection's answers go out: written together, and
//! produced in the connection's own task when they are ready at once.
//!
//! The h2 crate flushes its output once per DATA frame larger than a few hundred
//! bytes (it writes such a frame's payload straight from the body's buffer, and has
//! room for only one of them at a time), so ten answers on one connection cost ten
//! TLS records and ten `writev` calls, each crossing the kernel's TCP stack: half of
//! launchday's CPU time in an HTTP/2 maintenance-page run was in those calls.
//! [`Coalesce`] gathers what the connection writes during one poll of its task and
//! writes it in one go, the way nginx sends an HTTP/2 connection's output once per
//! event-loop turn.
//!
//! [`InlineFirst`] is the executor hyper's HTTP/2 server runs each stream with: it
//! polls the stream's future once in the connection's task, and spawns a task only
//! when the answer is not done in that poll. A maintenance page, a snapshot hit or a
//! refusal is thus answered without a task of its own (hyper would spawn one per
//! stream: an allocation of the request future's size, a copy of it, a trip through
//! the scheduler), and the answers of all the streams a read brought in are written
//! by the connection's next flush, together.
//!
//! A poll of the connection's task is a *turn* ([`Turn`], advanced by [`NewTurn`]
//! around the connection's future): output accepted during a turn is written at the
//! first read or write of a later turn, never within the turn that produced it (hyper
//! reads between two accepted streams, and the streams' answers must wait for each
//! other).
//!
//! Invariants:
//! - A flush is deferred, never lost: `poll_flush` with output pending wakes the
//!   task, and the output is written at the first read or write of its next turn, or
//!   at once when more than [`LIMIT`] bytes are pending, or by `poll_shutdown` before
//!   the stream is shut down.
//! - Bytes are written in the order they were accepted; a write error is returned by
//!   the next read, write, flush or shutdown.
//! - At most [`LIMIT`] bytes (plus one write's worth) are held per connection, and
//!   the buffer is released when the connection is idle: with [`Coalesce::releasing`],
//!   given back to the worker's stack of output buffers (no request in flight, all
//!   output written, nothing to read), so an idle connection holds none.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::conn::Track;

/// Runs an HTTP/2 stream's future once inline, then as a task if it is not done.
#[derive(Debug, Clone, Copy, Default)]
pub struct InlineFirst;

impl<F> hyper::rt::Executor<F> for InlineFirst
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        // Pinned on the heap: a future that was polled may not move, and a pending
        // one goes on in a task.
        let mut fut = Box::pin(fut);
        // A future registers the waker of each poll that returns pending; the task's
        // first poll, which always comes, registers the task's own.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if fut.as_mut().poll(&mut cx).is_pending() {
            tokio::spawn(crate::sched::tracked(fut));
        }
    }
}

/// Pending output above which it is written at once rather than at the next poll.
pub const LIMIT: usize = 64 * 1024;

/// The polls of one connection's task, counted.
#[derive(Debug, Clone, Default)]
pub struct Turn(Arc<AtomicU32>);

impl Turn {
    fn now(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Starts the next turn.
    pub fn advance(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// Polls `fut` as a new [`Turn`] of its connection's task.
pub struct NewTurn<'a, F> {
    pub fut: F,
    pub turn: &'a Turn,
}

impl<F: Future + Unpin> Future for NewTurn<'_, F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        self.turn.advance();
        Pin::new(&mut self.fut).poll(cx)
    }
}

/// A stream whose writes are gathered and sent once per poll of its task.
pub struct Coalesce<I> {
    io: I,
    turn: Turn,
    /// The turn in which the pending output was accepted.
    since: u32,
    /// Output accepted but not yet written, from `pos` on.
    buf: Vec<u8>,
    pos: usize,
    /// The last write found the socket full: its writability will wake the task, so
    /// a deferred flush must not wake it again (that would spin).
    blocked: bool,
    /// The connection's state: with no request in flight, no output pending and
    /// nothing to read, the buffer goes back to the worker ([`Coalesce::releasing`]).
    idle: Option<Arc<Track>>,
}

impl<I> Coalesce<I> {
    pub fn new(io: I, turn: Turn) -> Self {
        Coalesce {
            io,
            since: turn.now(),
            turn,
            buf: Vec::new(),
            pos: 0,
            blocked: false,
            idle: None,
        }
    }

    /// Gives the output buffer back to the worker ([`crate::recycle::give_out`])
    /// whenever the connection is idle: no request in flight on `track`, all output
    /// written, and a read finding nothing. Its next output takes one from the
    /// worker again. An idle connection then holds no output buffer; a busy one
    /// keeps its own (its output waits for its next turn, so busy connections
    /// sharing a few buffers would run out of them).
    pub fn releasing(mut self, track: Arc<Track>) -> Self {
        self.idle = Some(track);
        self
    }
}

impl<I: AsyncWrite + Unpin> Coalesce<I> {
    /// Writes the pending output; `Ready(Ok)` once all of it is written.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.pos < self.buf.len() {
            let written = Pin::new(&mut self.io).poll_write(cx, &self.buf[self.pos..]);
            self.blocked = written.is_pending();
            let n = ready!(written)?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
        }
        self.pos = 0;
        if self.buf.capacity() > LIMIT {
            // One burst of output does not keep a large buffer for the connection's life.
            self.buf = Vec::new();
        } else {
            self.buf.clear();
        }
        ready!(Pin::new(&mut self.io).poll_flush(cx))?;
        Poll::Ready(Ok(()))
    }

    fn pending(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Output is pending from an earlier turn.
    fn stale(&self) -> bool {
        self.pending() > 0 && self.since != self.turn.now()
    }

    /// Writes output left from an earlier turn, as far as the socket takes it. A full
    /// socket is no error: its writability wakes the task, and the rest goes later.
    fn drain_stale(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.stale() {
            if let Poll::Ready(Err(e)) = self.poll_drain(cx) {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Accepts `n` bytes written by `put`, writing the pending output first when it
    /// is over [`LIMIT`].
    fn poll_accept(
        &mut self,
        cx: &mut Context<'_>,
        n: usize,
        put: impl FnOnce(&mut Vec<u8>),
    ) -> Poll<io::Result<usize>> {
        if self.pending() >= LIMIT {
            ready!(self.poll_drain(cx))?;
        } else {
            // With the socket full, this goes behind the rest.
            self.drain_stale(cx)?;
        }
        if self.pending() == 0 {
            self.since = self.turn.now();
            if self.buf.capacity() == 0 && self.idle.is_some() {
                self.buf = crate::recycle::take_out();
            }
        }
        put(&mut self.buf);
        Poll::Ready(Ok(n))
    }
}

impl<I: AsyncRead + AsyncWrite + Unpin> AsyncRead for Coalesce<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // An earlier turn's output goes first; with the socket full, the read goes on.
        this.drain_stale(cx)?;
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending()
            && this.pending() == 0
            && this.buf.capacity() > 0
            && this
                .idle
                .as_ref()
                .is_some_and(|track| track.idle_since().is_some())
        {
            let out = std::mem::take(&mut this.buf);
            if out.capacity() <= LIMIT {
                crate::recycle::give_out(out);
            }
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Coalesce<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.get_mut()
            .poll_accept(cx, data.len(), |buf| buf.extend_from_slice(data))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let n = bufs.iter().map(|b| b.len()).sum();
        self.get_mut().poll_accept(cx, n, |buf| {
            buf.reserve(n);
            for b in bufs {
                buf.extend_from_slice(b);
            }
        })
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending() >= LIMIT {
            return this.poll_drain(cx);
        }
        this.drain_stale(cx)?;
        if this.pending() > 0 && !this.blocked {
            // Written at the start of the next poll, with whatever else this poll
            // still produces.
            cx.waker().wake_by_ref();
        }
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// Records every write; `full` makes writes block.
    #[derive(Default)]
    struct Mock {
        writes: Vec<Vec<u8>>,
        full: bool,
        flushes: usize,
        shut: bool,
    }

    impl AsyncRead for Mock {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    impl AsyncWrite for Mock {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            data: &[u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            if this.full {
                return Poll::Pending;
            }
            assert!(!this.shut, "write after shutdown");
            this.writes.push(data.to_vec());
            Poll::Ready(Ok(data.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().flushes += 1;
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.get_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
        fn wake_by_ref(self: &Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn waker() -> (Arc<Wakes>, Waker) {
        let w = Arc::new(Wakes::default());
        (Arc::clone(&w), Waker::from(w))
    }

    fn write(c: &mut Coalesce<Mock>, cx: &mut Context<'_>, data: &[u8]) {
        match Pin::new(c).poll_write(cx, data) {
            Poll::Ready(Ok(n)) => assert_eq!(n, data.len()),
            other => panic!("write: {other:?}"),
        }
    }

    fn read(c: &mut Coalesce<Mock>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut space = [0u8; 16];
        Pin::new(c).poll_read(cx, &mut ReadBuf::new(&mut space))
    }

    #[test]
    fn what_one_turn_writes_goes_out_in_one_write_at_the_next_turn() {
        let (wakes, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let mut c = Coalesce::new(Mock::default(), turn.clone());
        for (i, part) in [&b"HEADERS1"[..], b"DATA1", b"HEADERS2", b"DATA2"]
            .iter()
            .enumerate()
        {
            write(&mut c, &mut cx, part);
            assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
            assert_eq!(
                wakes.0.load(Ordering::SeqCst),
                i + 1,
                "each deferred flush wakes the task"
            );
            // hyper reads between two streams of the same turn: nothing goes out.
            assert!(read(&mut c, &mut cx).is_pending());
        }
        assert!(c.io.writes.is_empty(), "nothing written during the turn");
        turn.advance();
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes, [b"HEADERS1DATA1HEADERS2DATA2".to_vec()]);
        assert_eq!(c.io.flushes, 1);
        // Nothing pending: a flush neither writes nor wakes.
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 4);
        assert_eq!(c.io.writes.len(), 1);
    }

    #[test]
    fn vectored_writes_are_gathered_in_order() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let mut c = Coalesce::new(Mock::default(), turn.clone());
        let parts = [io::IoSlice::new(b"ab"), io::IoSlice::new(b"cd")];
        let n = Pin::new(&mut c).poll_write_vectored(&mut cx, &parts);
        assert!(matches!(n, Poll::Ready(Ok(4))));
        write(&mut c, &mut cx, b"ef");
        turn.advance();
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes, [b"abcdef".to_vec()]);
    }

    #[test]
    fn shutdown_writes_the_pending_output_first() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let mut c = Coalesce::new(Mock::default(), turn.clone());
        write(&mut c, &mut cx, b"GOAWAY");
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut c).poll_shutdown(&mut cx).is_ready());
        assert_eq!(c.io.writes, [b"GOAWAY".to_vec()]);
        assert!(c.io.shut);
    }

    #[test]
    fn output_over_the_limit_is_written_at_once() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let mut c = Coalesce::new(Mock::default(), turn.clone());
        let big = vec![7u8; LIMIT];
        write(&mut c, &mut cx, &big);
        assert!(c.io.writes.is_empty());
        // The next write (or flush) finds LIMIT bytes pending and writes them first.
        write(&mut c, &mut cx, b"x");
        assert_eq!(c.io.writes, [big]);
        assert_eq!(c.pending(), 1);
    }

    #[test]
    fn a_full_socket_applies_back_pressure_and_does_not_spin() {
        let (wakes, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let mut c = Coalesce::new(Mock::default(), turn.clone());
        write(&mut c, &mut cx, &vec![1u8; LIMIT]);
        c.io.full = true;
        // Over the limit with a full socket: the writer must wait.
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"more").is_pending());
        // A deferred flush does not wake the task while the socket is full (its
        // writability will); reads still go on.
        let before = wakes.0.load(Ordering::SeqCst);
        assert!(read(&mut c, &mut cx).is_pending());
        assert!(Pin::new(&mut c).poll_flush(&mut cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), before);
        c.io.full = false;
        turn.advance();
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes.concat().len(), LIMIT);
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn an_idle_connection_gives_its_buffer_back_and_takes_one_for_more_output() {
        let (_, w) = waker();
        let mut cx = Context::from_waker(&w);
        let turn = Turn::default();
        let track = Track::new(crate::conn::Deadlines {
            header_timeout: std::time::Duration::from_secs(10),
            idle_timeout: std::time::Duration::from_secs(60),
            park_after: std::time::Duration::from_secs(3600),
        });
        let mut c = Coalesce::new(Mock::default(), turn.clone()).releasing(Arc::clone(&track));
        track.begin();
        write(&mut c, &mut cx, b"HEADERS1");
        turn.advance();
        // Written, but a request is still in flight: the buffer stays.
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes, [b"HEADERS1".to_vec()]);
        assert!(c.buf.capacity() > 0);
        write(&mut c, &mut cx, b"DATA1");
        track.end();
        // Output pending: kept until it is written.
        assert!(read(&mut c, &mut cx).is_pending());
        assert!(c.buf.capacity() > 0);
        turn.advance();
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes, [b"HEADERS1".to_vec(), b"DATA1".to_vec()]);
        assert_eq!(c.buf.capacity(), 0, "idle and written: given back");
        // The next answer takes a buffer again and goes out whole.
        track.begin();
        write(&mut c, &mut cx, b"HEADERS3");
        write(&mut c, &mut cx, b"DATA3");
        turn.advance();
        assert!(read(&mut c, &mut cx).is_pending());
        assert_eq!(c.io.writes[2], b"HEADERS3DATA3".to_vec());
    }
}
