//! Unit tests of the fast-path HTTP/1.1 exchange: a scripted back end on `[::1]`
//! writes raw answers; each test checks the answer, the body and whether the
//! connection went back to the idle stack.

use std::time::Duration;

use bytes::BytesMut;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const STEP: Duration = Duration::from_secs(5);

/// A connection to a scripted server: the client side as a `RawConn`, the server
/// side as a plain stream, and the pool the connection returns to.
async fn pair() -> (RawConn, TcpStream, Arc<Upstream>) {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    (RawConn::new(client), server, Upstream::new(addr))
}

fn get(path: &str) -> Request<()> {
    Request::get(path)
        .header("host", "a")
        .body(())
        .expect("request")
}

/// Sends `GET /` and reads the head of the answer the server writes in `parts`.
async fn exchange(
    parts: &[&[u8]],
    head_request: bool,
) -> (
    Result<Head, ExchangeError>,
    RawConn,
    TcpStream,
    Arc<Upstream>,
) {
    let (mut conn, mut server, home) = pair().await;
    conn.encode(&get("/"));
    conn.write_head().await.expect("write");
    let mut req = [0u8; 256];
    let _ = server.read(&mut req).await.expect("request read");
    let owned: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
    let writer = tokio::spawn(async move {
        for p in owned {
            server.write_all(&p).await.expect("server write");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server
    });
    let head = tokio::time::timeout(STEP, conn.read_head(head_request))
        .await
        .expect("head in time");
    let server = writer.await.expect("writer");
    (head, conn, server, home)
}

/// The body of `head` read on `conn`: its bytes, or the error it ended with.
async fn body_of(head: Head, conn: RawConn, home: &Arc<Upstream>) -> Result<Vec<u8>, String> {
    let resp = head.into_response(conn, Arc::clone(home));
    let mut body = resp.into_body();
    let mut out = Vec::new();
    loop {
        match tokio::time::timeout(STEP, body.frame())
            .await
            .expect("body in time")
        {
            Some(Ok(f)) => out.extend_from_slice(f.data_ref().expect("data frame")),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Ok(out),
        }
    }
}

#[tokio::test]
async fn the_request_head_is_encoded_as_is_in_one_write() {
    let (mut conn, mut server, _home) = pair().await;
    let req = Request::get("/p?q=1")
        .header("host", "a")
        .header("x-y", "z")
        .body(())
        .expect("request");
    conn.encode(&req);
    conn.write_head().await.expect("write");
    let want = b"GET /p?q=1 HTTP/1.1\r\nhost: a\r\nx-y: z\r\n\r\n";
    let mut got = vec![0u8; want.len()];
    server.read_exact(&mut got).await.expect("read");
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_content_length_body_split_over_reads_is_read_and_the_connection_reused() {
    let (head, conn, _server, home) = exchange(
        &[
            b"HTTP/1.1 200 OK\r\ncontent-le",
            b"ngth: 5\r\nx-a: b\r\n\r\nhe",
            b"llo",
        ],
        false,
    )
    .await;
    let head = head.expect("head");
    assert_eq!(head.response.status(), StatusCode::OK);
    assert_eq!(head.response.headers()["x-a"], "b");
    assert_eq!(body_of(head, conn, &home).await.expect("body"), b"hello");
    assert_eq!(
        home.idle_count(),
        1,
        "a clean answer gives its connection back"
    );
}

#[tokio::test]
async fn a_chunked_body_split_anywhere_is_decoded_and_trailers_dropped() {
    let (head, conn, _server, home) = exchange(
        &[
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            b"5;ext=1\r",
            b"\nhello\r",
            b"\n6\r\n world\r\n0\r\nx-trailer: t",
            b"\r\n\r\n",
        ],
        false,
    )
    .await;
    let head = head.expect("head");
    assert_eq!(
        body_of(head, conn, &home).await.expect("body"),
        b"hello world"
    );
    assert_eq!(home.idle_count(), 1);
}

#[tokio::test]
async fn content_length_beside_chunked_is_removed_and_the_connection_not_reused() {
    let (head, conn, _server, home) = exchange(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"],
        false,
    )
    .await;
    let head = head.expect("head");
    assert!(head.response.headers().get("content-length").is_none());
    assert_eq!(body_of(head, conn, &home).await.expect("body"), b"ok");
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn a_body_without_framing_lasts_until_close_and_is_not_reused() {
    let (head, conn, server, home) =
        exchange(&[b"HTTP/1.1 200 OK\r\n\r\nsome ", b"bytes"], false).await;
    drop(server);
    let head = head.expect("head");
    assert_eq!(
        body_of(head, conn, &home).await.expect("body"),
        b"some bytes"
    );
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn keep_alive_follows_connection_and_the_version() {
    for (answer, reused) in [
        (
            &b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nok"[..],
            0,
        ),
        (b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok", 0),
        (
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nok",
            1,
        ),
        (
            b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\ncontent-length: 2\r\n\r\nok",
            0,
        ),
    ] {
        let (head, conn, _server, home) = exchange(&[answer], false).await;
        let head = head.expect("head");
        assert_eq!(body_of(head, conn, &home).await.expect("body"), b"ok");
        assert_eq!(
            home.idle_count(),
            reused,
            "{}",
            String::from_utf8_lossy(answer)
        );
    }
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body() {
    for (answer, head_request) in [
        (&b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"[..], true),
        (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            false,
        ),
    ] {
        let (head, conn, _server, home) = exchange(&[answer], head_request).await;
        let head = head.expect("head");
        let resp = head.into_response(conn, Arc::clone(&home));
        assert!(http_body::Body::is_end_stream(resp.body()));
        assert_eq!(home.idle_count(), 1, "given back at once");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert!(body.is_empty());
    }
}

#[tokio::test]
async fn interim_answers_are_skipped_and_an_unasked_switch_refused() {
    let (head, conn, _server, home) = exchange(
        &[
            b"HTTP/1.1 100 Continue\r\n\r\n",
            b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx",
        ],
        false,
    )
    .await;
    let head = head.expect("head");
    assert_eq!(head.response.status(), StatusCode::CREATED);
    assert!(head.response.headers().get("link").is_none());
    assert_eq!(body_of(head, conn, &home).await.expect("body"), b"x");

    let (head, ..) = exchange(
        &[b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"],
        false,
    )
    .await;
    assert!(
        matches!(head, Err(ExchangeError::UnaskedSwitch)),
        "{head:?}"
    );
}

#[tokio::test]
async fn a_close_before_or_during_the_head_is_told_apart() {
    let (mut conn, server, _home) = pair().await;
    conn.encode(&get("/"));
    conn.write_head().await.expect("write");
    drop(server);
    let r = tokio::time::timeout(STEP, conn.read_head(false))
        .await
        .expect("in time");
    assert!(matches!(r, Err(ExchangeError::ClosedBeforeAnswer)), "{r:?}");

    let (mut conn, mut server, _home) = pair().await;
    conn.encode(&get("/"));
    conn.write_head().await.expect("write");
    // Read the request first: closing with unread bytes would send a reset instead.
    let mut req = [0u8; 64];
    let _ = server.read(&mut req).await.expect("request");
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-")
        .await
        .expect("write");
    drop(server);
    let r = tokio::time::timeout(STEP, conn.read_head(false))
        .await
        .expect("in time");
    assert!(matches!(r, Err(ExchangeError::ClosedInHead)), "{r:?}");
}

#[tokio::test]
async fn oversized_heads_and_bad_fields_are_refused() {
    let mut many = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..=MAX_HEADERS {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    let (head, ..) = exchange(&[many.as_slice()], false).await;
    assert!(matches!(head, Err(ExchangeError::HeadTooLarge)), "{head:?}");

    let mut long = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    long.resize(MAX_HEAD + 10, b'a');
    let (head, ..) = exchange(&[long.as_slice()], false).await;
    assert!(matches!(head, Err(ExchangeError::HeadTooLarge)), "{head:?}");

    for bad in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 12345678901234567890\r\n\r\n",
    ] {
        let (head, ..) = exchange(&[bad], false).await;
        assert!(
            matches!(head, Err(ExchangeError::BadLength)),
            "{}: {head:?}",
            String::from_utf8_lossy(bad)
        );
    }
    let (head, ..) = exchange(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello"],
        false,
    )
    .await;
    assert!(head.is_ok(), "repeats that agree are one length: {head:?}");

    let (head, ..) = exchange(&[b"HTTP/1.1 200 OK\r\nx-a: b\r\n  folded\r\n\r\n"], false).await;
    assert!(
        matches!(head, Err(ExchangeError::Parse(_))),
        "obs-fold: {head:?}"
    );
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
    let (head, conn, server, home) = exchange(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"],
        false,
    )
    .await;
    drop(server);
    let r = body_of(head.expect("head"), conn, &home).await;
    assert!(r.is_err_and(|e| e.contains("before the answer's body ended")));
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn bad_chunked_framing_is_an_error() {
    for (bad, why) in [
        (&b"zz\r\nhello\r\n0\r\n\r\n"[..], "no chunk size"),
        (b"5\r\nhelloXX0\r\n\r\n", "no CRLF after chunk data"),
        (b"5\nhello\r\n0\r\n\r\n", "not ended by CRLF"),
        (b"5x\r\nhello\r\n", "invalid chunk size"),
    ] {
        let mut answer = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        answer.extend_from_slice(bad);
        let (head, conn, _server, home) = exchange(&[answer.as_slice()], false).await;
        let r = body_of(head.expect("head"), conn, &home).await;
        assert!(r.as_ref().is_err_and(|e| e.contains(why)), "{why}: {r:?}");
        assert_eq!(home.idle_count(), 0);
    }
}

#[tokio::test]
async fn extra_bytes_after_the_body_keep_the_connection_out_of_the_pool() {
    let (head, conn, _server, home) = exchange(
        &[b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"],
        false,
    )
    .await;
    assert_eq!(
        body_of(head.expect("head"), conn, &home)
            .await
            .expect("body"),
        b"ok"
    );
    assert_eq!(
        home.idle_count(),
        0,
        "a stray byte would desynchronise the next answer"
    );
}

#[tokio::test]
async fn an_idle_connection_closed_by_the_back_end_is_stale() {
    let (conn, server, _home) = pair().await;
    assert!(!conn.is_stale(), "open and silent");
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(conn.is_stale(), "closed by the back end");

    let (conn, mut server, _home) = pair().await;
    server.write_all(b"x").await.expect("write");
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(conn.is_stale(), "bytes nobody asked for");
}

#[test]
fn chunk_sizes_and_lengths_parse_strictly() {
    assert_eq!(chunk_size(b"1a\r").ok(), Some(26));
    assert_eq!(chunk_size(b"A;name=value\r").ok(), Some(10));
    assert_eq!(chunk_size(b"0\r").ok(), Some(0));
    assert_eq!(
        chunk_size(b"fffffffffffffff\r").ok(),
        Some(0xfff_ffff_ffff_ffff)
    );
    assert!(chunk_size(b"ffffffffffffffff\r").is_err(), "16 digits");
    assert!(chunk_size(b"\r").is_err());
    assert!(chunk_size(b"g\r").is_err());
    assert!(chunk_size(b"5").is_err(), "no CR");

    assert_eq!(parse_length(b"0"), Some(0));
    assert_eq!(parse_length(b"4000"), Some(4000));
    assert_eq!(
        parse_length(b"9999999999999999999"),
        Some(9_999_999_999_999_999_999)
    );
    assert_eq!(parse_length(b"12345678901234567890"), None, "20 digits");
    assert_eq!(parse_length(b""), None);
    assert_eq!(parse_length(b"+5"), None);
    assert_eq!(parse_length(b"5 "), None);
}

#[test]
fn chunked_decoding_fed_one_byte_at_a_time() {
    let wire = b"3\r\nabc\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nt: 1\r\n\r\n";
    let mut framing = Framing::Chunked(Chunk::Size);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut ended = false;
    for &b in wire {
        buf.extend_from_slice(&[b]);
        loop {
            match framing.decode(&mut buf).expect("valid") {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::NeedMore => break,
                Decoded::End => {
                    ended = true;
                    break;
                }
            }
        }
    }
    assert!(ended);
    assert!(buf.is_empty());
    assert_eq!(data, b"abc0123456789abcdef");
}
