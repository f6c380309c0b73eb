//! A back-end connection's stream with the read and write pause limits of `[limits]`
//! (`upstream_read_timeout`, `upstream_write_timeout`).
//!
//! The limits apply only while a request is out on the connection ([`Activity::begin`]
//! to [`Activity::end`]); an idle kept-alive connection may sit quietly for ever (its
//! back end's keep-alive timeout closes it). A pause is measured in ticks of a
//! quarter of the limit: the connection fails with `TimedOut` after four ticks in a
//! row in which nothing was read or written, so a limit fires between 1× and 1.25×
//! its value after the last progress. Ticks cost one timer reset each; the request
//! path itself reads no clock.
//!
//! Invariant: the timer is polled only when a read or write would block, so it wakes
//! the connection's task at most once a tick while a request is stuck.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The limits a request out on a connection runs under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    pub connect: Duration,
    pub read: Duration,
    pub write: Duration,
}

impl UpstreamTimeouts {
    /// The `[limits] upstream_*_timeout` of a config.
    pub fn from_limits(l: &crate::config::LimitsSpec) -> Self {
        UpstreamTimeouts {
            connect: l.upstream_connect_timeout,
            read: l.upstream_read_timeout,
            write: l.upstream_write_timeout,
        }
    }
}

/// Ticks without progress before a pause is a timeout.
const TICKS: u32 = 4;

/// Whether a request is out on a connection, and its limits; shared by the
/// connection's stream and whoever holds the connection.
#[derive(Debug, Default)]
pub struct Activity {
    busy: AtomicBool,
    /// Bumped by each `begin`, so that quiet time before a request never counts.
    epoch: AtomicU64,
    read_ms: AtomicU64,
    write_ms: AtomicU64,
}

impl Activity {
    /// A request goes out now under `t`.
    pub fn begin(&self, t: UpstreamTimeouts) {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        self.read_ms.store(ms(t.read), Ordering::Relaxed);
        self.write_ms.store(ms(t.write), Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        self.busy.store(true, Ordering::Release);
    }

    /// The request's response was read to its end.
    pub fn end(&self) {
        self.busy.store(false, Ordering::Release);
    }
}

/// A back-end stream with pause limits.
pub struct UpstreamIo<I> {
    io: I,
    activity: Arc<Activity>,
    sleep: Option<Pin<Box<Sleep>>>,
    /// Reads and writes that moved bytes.
    progress: u64,
    /// `progress` and the activity's epoch when the current tick began.
    seen: (u64, u64),
    quiet_ticks: u32,
    /// The last write would have blocked: the pause is the write limit's.
    write_blocked: bool,
}

impl<I> UpstreamIo<I> {
    pub fn new(io: I, activity: Arc<Activity>) -> Self {
        UpstreamIo {
            io,
            activity,
            sleep: None,
            progress: 0,
            seen: (0, 0),
            quiet_ticks: 0,
            write_blocked: false,
        }
    }

    /// The stream inside.
    pub fn get_ref(&self) -> &I {
        &self.io
    }

    /// Called when a read or write would block: `Err` once the pause is too long.
    fn poll_pause(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if !self.activity.busy.load(Ordering::Acquire) {
            return Ok(());
        }
        let limit_ms = if self.write_blocked {
            self.activity.write_ms.load(Ordering::Relaxed)
        } else {
            self.activity.read_ms.load(Ordering::Relaxed)
        };
        let tick = Duration::from_millis(limit_ms) / TICKS;
        let now_seen = (self.progress, self.activity.epoch.load(Ordering::Relaxed));
        let Some(sleep) = &mut self.sleep else {
            self.seen = now_seen;
            self.quiet_ticks = 0;
            let mut sleep = Box::pin(tokio::time::sleep(tick));
            // A fresh timer is never ready at once; polling registers the waker.
            let _ = sleep.as_mut().poll(cx);
            self.sleep = Some(sleep);
            return Ok(());
        };
        if sleep.as_mut().poll(cx).is_pending() {
            return Ok(());
        }
        if now_seen == self.seen {
            self.quiet_ticks += 1;
        } else {
            self.quiet_ticks = 0;
            self.seen = now_seen;
        }
        if self.quiet_ticks >= TICKS {
            let which = if self.write_blocked { "write" } else { "read" };
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("back end {which} paused for {limit_ms} ms"),
            ));
        }
        sleep.as_mut().reset(Instant::now() + tick);
        let _ = sleep.as_mut().poll(cx);
        Ok(())
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for UpstreamIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.progress += 1;
                }
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_pause(cx) {
                Ok(()) => Poll::Pending,
                Err(e) => Poll::Ready(Err(e)),
            },
        }
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for UpstreamIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.write_blocked = false;
                this.progress += 1;
                Poll::Ready(r)
            }
            Poll::Pending => {
                this.write_blocked = true;
                match this.poll_pause(cx) {
                    Ok(()) => Poll::Pending,
                    Err(e) => Poll::Ready(Err(e)),
                }
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn timeouts(read: u64, write: u64) -> UpstreamTimeouts {
        UpstreamTimeouts {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(read),
            write: Duration::from_secs(write),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_connection_never_times_out() {
        let (_peer, ours) = tokio::io::duplex(64);
        let mut io = UpstreamIo::new(ours, Arc::new(Activity::default()));
        let mut buf = [0u8; 8];
        let r = tokio::time::timeout(Duration::from_secs(3600), io.read(&mut buf)).await;
        assert!(r.is_err(), "still waiting after an hour");
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_back_end_times_out_after_the_read_limit() {
        let (_peer, ours) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = UpstreamIo::new(ours, Arc::clone(&activity));
        activity.begin(timeouts(8, 8));
        let started = Instant::now();
        let mut buf = [0u8; 8];
        let err = io.read(&mut buf).await.expect_err("times out");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_secs(8) && took <= Duration::from_secs(10),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn trickling_bytes_keep_it_alive_and_a_stall_then_ends_it() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let activity = Arc::new(Activity::default());
        let mut io = UpstreamIo::new(ours, Arc::clone(&activity));
        activity.begin(timeouts(4, 4));
        let feeder = tokio::spawn(async move {
            for _ in 0..10 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                peer.write_all(b"x").await.expect("write");
            }
            peer
        });
        let mut buf = [0u8; 1];
        for _ in 0..10 {
            io.read_exact(&mut buf)
                .await
                .expect("a byte every 3 s is within 4 s");
        }
        let _peer = feeder.await.expect("join");
        let started = Instant::now();
        let err = io.read(&mut buf).await.expect_err("stalled");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() <= Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn a_back_end_that_stops_reading_times_out_the_write() {
        let (_peer, ours) = tokio::io::duplex(16);
        let activity = Arc::new(Activity::default());
        let mut io = UpstreamIo::new(ours, Arc::clone(&activity));
        activity.begin(timeouts(60, 2));
        let started = Instant::now();
        let err = io
            .write_all(&[0u8; 1024])
            .await
            .expect_err("the peer never reads");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() <= Duration::from_secs(3));
    }
}
