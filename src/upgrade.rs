//! Zero-downtime binary upgrade: the running instance hands its listening sockets to
//! a new one over a Unix socket (`upgrade_socket`), then drains and exits.
//!
//! Protocol (one connection, blocking I/O off the runtime):
//! 1. new → old: connects and sends `upgrade\n` (a bare connect, such as another
//!    instance checking whether the socket is live, gets nothing).
//! 2. old → new: one message whose text is the key of each socket (`public
//!    [::]:80 0`: kind, configured address, occurrence), one a line, carrying the duplicated socket descriptors (`SCM_RIGHTS`) in the
//!    same order.
//! 3. new: starts serving with those sockets (`Server::start_with`), binding whatever
//!    else its config needs; then sends `ready\n`. If it fails to start it closes the
//!    connection instead and the old instance simply keeps running.
//! 4. old: stops accepting upgrades, answers `bye\n`, and drains like on SIGTERM.
//! 5. new: takes over the upgrade socket path for the next upgrade.
//!
//! The listening sockets are never closed in between, so no connection attempt is
//! refused: until step 4 both instances accept on them. Nothing here needs `unsafe`:
//! descriptors travel as `OwnedFd` through rustix's `sendmsg`/`recvmsg`.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::server::{BindKey, Inherited, Server};

/// Most sockets handed over in one upgrade.
pub const MAX_SOCKETS: usize = 64;
/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Errors of an upgrade.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    #[error("upgrade socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("upgrade socket {0}: the running instance sent a malformed hand-over")]
    Protocol(PathBuf),
    #[error("more than {MAX_SOCKETS} listening sockets to hand over")]
    TooMany,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> UpgradeError + '_ {
    move |source| UpgradeError::Io {
        path: path.to_owned(),
        source,
    }
}

/// The new instance's side: receives the running instance's sockets. Returns them
/// with the connection on which to confirm ([`confirm`]) once serving.
pub fn take(path: &Path) -> Result<(Inherited, UnixStream), UpgradeError> {
    let stream = UnixStream::connect(path).map_err(io(path))?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io(path))?;
    (&stream).write_all(b"upgrade\n").map_err(io(path))?;
    let mut text = vec![0u8; 64 * 1024];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let got = recvmsg(
        &stream,
        &mut [IoSliceMut::new(&mut text)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| io(path)(e.into()))?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for msg in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = msg {
            fds.extend(rights);
        }
    }
    let text = std::str::from_utf8(&text[..got.bytes])
        .map_err(|_| UpgradeError::Protocol(path.to_owned()))?;
    let addrs: Vec<BindKey> = text
        .lines()
        .map(str::parse)
        .collect::<Result<_, _>>()
        .map_err(|_| UpgradeError::Protocol(path.to_owned()))?;
    if addrs.len() != fds.len() {
        return Err(UpgradeError::Protocol(path.to_owned()));
    }
    let inherited = addrs
        .into_iter()
        .zip(fds)
        .map(|(a, fd)| (a, std::net::TcpListener::from(fd)))
        .collect();
    Ok((inherited, stream))
}

/// The new instance's side, once it serves: tells the old one to drain, waits for its
/// goodbye, then takes over the upgrade socket path.
pub fn confirm(stream: UnixStream, path: &Path) -> Result<UnixListener, UpgradeError> {
    (&stream).write_all(b"ready\n").map_err(io(path))?;
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(io(path))?;
    if line.trim() != "bye" {
        return Err(UpgradeError::Protocol(path.to_owned()));
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path).map_err(io(path))
}

/// The running instance's side: binds `path` (replacing a stale socket file).
pub fn listen(path: &Path) -> Result<UnixListener, UpgradeError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(path))?;
    }
    match UnixListener::bind(path) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            // A socket file left by a crashed instance makes bind fail; a live
            // instance would accept a connection. Only remove the file when nobody does.
            if UnixStream::connect(path).is_ok() {
                return Err(UpgradeError::Io {
                    path: path.to_owned(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::AddrInUse,
                        "another running instance uses this upgrade_socket",
                    ),
                });
            }
            let _ = std::fs::remove_file(path);
            UnixListener::bind(path).map_err(io(path))
        }
        other => other.map_err(io(path)),
    }
}

/// Serves upgrade requests on `listener` until one succeeds; then returns, and the
/// caller drains and exits. Accepts asynchronously; runs the short blocking exchange
/// off the runtime.
pub async fn serve(listener: UnixListener, server: Arc<Server>, path: PathBuf) {
    let listener = match listener
        .set_nonblocking(true)
        .and_then(|()| tokio::net::UnixListener::from_std(listener))
    {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "binary upgrades unavailable");
            return std::future::pending().await;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s
                .into_std()
                .and_then(|s| s.set_nonblocking(false).map(|()| s)),
            Err(e) => Err(e),
        };
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "upgrade socket accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (s, p) = (Arc::clone(&server), path.clone());
        match tokio::task::spawn_blocking(move || hand_over(stream, &s, &p)).await {
            Ok(Ok(())) => return,
            Ok(Err(UpgradeError::Protocol(_))) => {
                tracing::debug!("a connection to the upgrade socket asked for nothing")
            }
            Ok(Err(e)) => tracing::warn!("binary upgrade did not happen, still serving: {e}"),
            Err(e) => tracing::warn!("binary upgrade task failed, still serving: {e}"),
        }
    }
}

fn hand_over(stream: UnixStream, server: &Server, path: &Path) -> Result<(), UpgradeError> {
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io(path))?;
    let mut reader = BufReader::new(&stream);
    let mut hello = String::new();
    reader.read_line(&mut hello).map_err(io(path))?;
    if hello.trim() != "upgrade" {
        return Err(UpgradeError::Protocol(path.to_owned()));
    }
    let sockets = server.sockets().map_err(io(path))?;
    if sockets.len() > MAX_SOCKETS {
        return Err(UpgradeError::TooMany);
    }
    let text: String = sockets.iter().map(|(a, _)| format!("{a}\n")).collect();
    let fds: Vec<_> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_SOCKETS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(UpgradeError::TooMany);
    }
    sendmsg(
        &stream,
        &[IoSlice::new(text.as_bytes())],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| io(path)(e.into()))?;
    tracing::info!(
        sockets = sockets.len(),
        "handed listening sockets to a new instance"
    );
    let mut line = String::new();
    reader.read_line(&mut line).map_err(io(path))?;
    if line.trim() != "ready" {
        return Err(UpgradeError::Protocol(path.to_owned()));
    }
    (&stream).write_all(b"bye\n").map_err(io(path))?;
    Ok(())
}
