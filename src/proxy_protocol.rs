//! PROXY protocol (HAProxy's spec, versions 1 and 2) on accepted connections: the
//! client address a TCP load balancer in front of us saw, sent before any other byte.
//!
//! [`parse`] is a pure function over the bytes received so far (fuzzable, no sockets);
//! [`read_header`] peeks at the socket until `parse` has a verdict, then reads exactly
//! the header's bytes.
//!
//! Invariants:
//! - Nothing after the header is ever consumed: bytes are only peeked until the whole
//!   header is there and valid, then exactly its length is read, so the HTTP or TLS
//!   bytes that follow stay in the socket. On an error nothing is read at all.
//! - Bounded: at most [`MAX_LEN`] bytes are examined (v1 lines up to [`V1_MAX_LEN`],
//!   v2 headers up to [`V2_MAX_LEN`] including TLVs); longer is an error.
//! - Strict: anything that does not match the spec exactly is an error, reported as
//!   soon as the bytes received show it (a plain `GET` fails on its first byte).
//! - [`read_header`] only loops after the socket's readiness was cleared, so it never
//!   spins while it waits for the rest of a header; it has no deadline of its own (the
//!   caller wraps it in `tokio::time::timeout`).

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, Interest};
use tokio::net::TcpStream;

mod v1;
mod v2;

/// Longest v1 line, CRLF included (`PROXY UNKNOWN` with two full IPv6 addresses).
pub const V1_MAX_LEN: usize = 107;
/// Longest v2 header accepted, TLVs included (16-byte fixed part + length field).
pub const V2_MAX_LEN: usize = 536;
/// Longest header of either version.
pub const MAX_LEN: usize = V2_MAX_LEN;
/// The 12 bytes every v2 header starts with.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

/// Errors of this module: why a connection's first bytes are not a PROXY header.
#[derive(Debug, thiserror::Error)]
pub enum ProxyProtocolError {
    #[error("no PROXY protocol header (neither `PROXY ` nor the v2 signature)")]
    NotProxy,
    #[error("PROXY v1 line: {0}")]
    V1(String),
    #[error("PROXY v1 line: no CRLF within {V1_MAX_LEN} bytes")]
    V1TooLong,
    #[error("PROXY v2 header: version {0} (only 2 is defined)")]
    V2Version(u8),
    #[error("PROXY v2 header: command {0:#x} (only LOCAL 0x0 and PROXY 0x1 are defined)")]
    V2Command(u8),
    #[error("PROXY v2 header: address family/protocol byte {0:#04x} is not defined")]
    V2Family(u8),
    #[error("PROXY v2 header: {0} bytes long, more than the {V2_MAX_LEN} accepted")]
    V2TooLong(usize),
    #[error("PROXY v2 header: {len} address bytes, fewer than the {need} of its family")]
    V2ShortAddresses { len: usize, need: usize },
    #[error("PROXY v2 header: TLV at byte {0} runs past the end of the header")]
    V2Tlv(usize),
    #[error("connection closed after {0} bytes, before a complete PROXY header")]
    Closed(usize),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] std::io::Error),
}

/// Which version of the protocol a header used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// A valid PROXY header. The addresses are `None` for v1 `UNKNOWN`, v2 `LOCAL`, and
/// v2 families other than TCP over IPv4/IPv6: the TCP peer address then stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub version: Version,
    /// The client's address, as the proxy in front of us saw it.
    pub source: Option<SocketAddr>,
    /// The address the client connected to.
    pub destination: Option<SocketAddr>,
}

impl Header {
    /// The client's address: the header's source if it gave one, else `peer`.
    pub fn client(&self, peer: SocketAddr) -> SocketAddr {
        self.source.unwrap_or(peer)
    }
}

/// What [`parse`] made of the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed {
    /// Valid so far; more bytes are needed.
    Incomplete,
    /// A whole header, `len` bytes long (what follows is not part of it).
    Complete { header: Header, len: usize },
}

/// Parses the PROXY header at the start of `buf`. Bytes after the header are ignored.
pub fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let starts = |magic: &[u8]| {
        let n = buf.len().min(magic.len());
        buf[..n] == magic[..n]
    };
    match buf.first() {
        None => Ok(Parsed::Incomplete),
        Some(b'\r') if starts(&V2_SIGNATURE) => v2::parse(buf),
        Some(b'P') if starts(V1_PREFIX) => v1::parse(buf),
        Some(_) => Err(ProxyProtocolError::NotProxy),
    }
}

/// Reads the PROXY header at the start of `stream`, leaving every later byte unread.
///
/// Waits for as many bytes as the header needs (wrap it in a timeout); fails at once on
/// bytes that cannot start a valid header, and when the peer closes mid-header. On an
/// error, no byte has been consumed.
///
/// A plain `peek()` + `readable()` loop would spin while a partial header sits in the
/// socket (peeking never clears tokio's readiness), so the peek is a `MSG_PEEK` recv
/// inside `try_io`, which clears the readiness when the header is still incomplete.
pub async fn read_header(stream: &mut TcpStream) -> Result<Header, ProxyProtocolError> {
    let mut buf = [0u8; MAX_LEN];
    let mut seen = 0;
    let (header, len) = loop {
        let ready = stream.ready(Interest::READABLE).await?;
        // Peek inside `try_io`: when the header is still incomplete, the WouldBlock
        // clears the readiness (unless bytes arrived since it was sampled), so the next
        // `ready()` waits for new bytes instead of spinning on the ones already here.
        let s: &TcpStream = stream;
        let verdict = s.try_io(Interest::READABLE, || {
            let (n, _) = rustix::net::recv(s, &mut buf[..], rustix::net::RecvFlags::PEEK)?;
            seen = n;
            match parse(&buf[..n]) {
                Ok(Parsed::Incomplete) if n > 0 => Err(std::io::ErrorKind::WouldBlock.into()),
                other => Ok(other),
            }
        });
        match verdict {
            Ok(Ok(Parsed::Complete { header, len })) => break (header, len),
            Ok(Ok(Parsed::Incomplete)) => return Err(ProxyProtocolError::Closed(0)),
            Ok(Err(e)) => return Err(e),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Closed is final, never cleared: what we peeked is all there will be.
                if ready.is_read_closed() {
                    return Err(ProxyProtocolError::Closed(seen));
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    };
    stream.read_exact(&mut buf[..len]).await?;
    Ok(header)
}

/// Helpers for the tests of this module and its submodules.
#[cfg(test)]
mod testing {
    use super::*;

    pub fn complete(bytes: &[u8]) -> (Header, usize) {
        match parse(bytes) {
            Ok(Parsed::Complete { header, len }) => (header, len),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    pub fn error(bytes: &[u8]) -> String {
        match parse(bytes) {
            Err(e) => e.to_string(),
            other => panic!("{:?} accepted: {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    pub fn addrs(h: Header) -> (String, String) {
        let s = |a: Option<SocketAddr>| a.map(|a| a.to_string()).unwrap_or_default();
        (s(h.source), s(h.destination))
    }

    /// A v2 header: signature, `ver_cmd`, `fam`, length, `body`.
    pub fn v2(ver_cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let len = u16::try_from(body.len()).expect("short body");
        let mut h = V2_SIGNATURE.to_vec();
        h.extend([ver_cmd, fam]);
        h.extend(len.to_be_bytes());
        h.extend(body);
        h
    }

    pub const V4_BODY: [u8; 12] = [192, 0, 2, 1, 198, 51, 100, 2, 0xdb, 0xb4, 1, 187];
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn every_strict_prefix_is_incomplete() {
        let tlv = [&V4_BODY[..], &[4, 0, 1, 0]].concat();
        for header in [
            b"PROXY TCP6 2001:db8::1 2001:db8::2 65535 1\r\n".to_vec(),
            v2(0x21, 0x11, &tlv),
        ] {
            for n in 0..header.len() {
                assert_eq!(parse(&header[..n]).ok(), Some(Parsed::Incomplete), "{n}");
            }
            assert_eq!(complete(&header).1, header.len());
        }
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            tail in proptest::collection::vec(proptest::num::u8::ANY, 0..600),
            v in 0u8..3,
        ) {
            // Random bytes alone, or after a valid start of either version.
            let head: &[u8] = [&b""[..], b"PROXY ", &V2_SIGNATURE][usize::from(v)];
            let buf = [head, &tail].concat();
            if let Ok(Parsed::Complete { len, .. }) = parse(&buf) {
                proptest::prop_assert!(len <= buf.len() && len <= MAX_LEN);
            }
        }
    }

    /// A connected pair on loopback: (client, accepted server side).
    async fn pair() -> (TcpStream, TcpStream) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = TcpStream::connect(l.local_addr().expect("addr"));
        let (client, accepted) = tokio::join!(client, l.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    async fn read_within(server: &mut TcpStream) -> Result<Header, ProxyProtocolError> {
        let read = tokio::time::timeout(Duration::from_secs(5), read_header(server));
        read.await.expect("read_header finishes in time")
    }

    #[tokio::test]
    async fn bytes_after_the_header_stay_in_the_socket() {
        let v1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56244 443\r\n".to_vec();
        for header in [v1, v2(0x21, 0x11, &V4_BODY)] {
            let (mut client, mut server) = pair().await;
            client
                .write_all(&[&header[..], b"GET / HTTP/1.1\r\n\r\n"].concat())
                .await
                .expect("write");
            let h = read_within(&mut server).await.expect("header");
            assert_eq!(h.source, Some("192.0.2.1:56244".parse().expect("addr")));
            let mut rest = [0u8; 18];
            server
                .read_exact(&mut rest)
                .await
                .expect("the request is still there");
            assert_eq!(&rest, b"GET / HTTP/1.1\r\n\r\n");
        }
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_waited_for() {
        let (mut client, mut server) = pair().await;
        let reader = tokio::spawn(async move { (read_within(&mut server).await, server) });
        for piece in [&b"PRO"[..], b"XY TCP6 2001:db8::1 ", b"::1 1 2\r", b"\nTLS"] {
            tokio::time::sleep(Duration::from_millis(20)).await;
            client.write_all(piece).await.expect("write");
        }
        let (h, mut server) = reader.await.expect("task");
        assert_eq!(
            h.expect("header").source,
            Some("[2001:db8::1]:1".parse().expect("addr"))
        );
        let mut rest = [0u8; 3];
        server.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"TLS");
    }

    #[tokio::test]
    async fn errors_come_at_once_and_consume_nothing() {
        // No PROXY header: rejected on the first bytes, though the client stays open.
        let (mut client, mut server) = pair().await;
        client
            .write_all(b"GET / HTTP/1.1\r\n")
            .await
            .expect("write");
        let e = read_within(&mut server).await.expect_err("not PROXY");
        assert!(matches!(e, ProxyProtocolError::NotProxy), "{e}");
        let mut first = [0u8; 3];
        server.read_exact(&mut first).await.expect("unread");
        assert_eq!(&first, b"GET");
        // Truncated: the client closes mid-header.
        let (mut client, mut server) = pair().await;
        client
            .write_all(&v2(0x21, 0x11, &V4_BODY)[..20])
            .await
            .expect("write");
        client.shutdown().await.expect("shutdown");
        let e = read_within(&mut server).await.expect_err("truncated");
        assert!(matches!(e, ProxyProtocolError::Closed(20)), "{e}");
        // Nothing at all.
        let (client, mut server) = pair().await;
        drop(client);
        let e = read_within(&mut server).await.expect_err("empty");
        assert!(matches!(e, ProxyProtocolError::Closed(0)), "{e}");
    }
}
