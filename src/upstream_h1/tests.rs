//! Unit tests of the fast-path HTTP/1.1 exchange: a scripted back end on `[::1]`
//! writes raw answers; each test checks the answer, the body and whether the
//! connection went back to the idle stack.

use std::time::Duration;

use bytes::BytesMut;
use http_body::Body as _;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

/// Bound on every wait: nothing in these tests takes more than a few milliseconds.
const STEP: Duration = Duration::from_secs(5);

/// `f`, which must end within [`STEP`].
async fn within<F: Future>(f: F) -> F::Output {
    tokio::time::timeout(STEP, f).await.expect("in time")
}

const CHUNKED_HEAD: &[u8] = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";

/// A connection to a scripted server: the client side as a `RawConn`, the server
/// side as a plain stream, and the pool the connection returns to.
async fn pair() -> (RawConn, TcpStream, Arc<Upstream>) {
    let listener = TcpListener::bind("[::1]:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let client = within(TcpStream::connect(addr)).await.expect("connect");
    let (server, _) = within(listener.accept()).await.expect("accept");
    // Each scripted write leaves as its own segment, so splits are real.
    server.set_nodelay(true).expect("nodelay");
    (RawConn::new(client), server, Upstream::new(addr))
}

/// Sends `GET /` on `conn` and reads the whole request head on `server`.
async fn send_get(conn: &mut RawConn, server: &mut TcpStream) {
    let req = Request::get("/")
        .header("host", "a")
        .body(())
        .expect("request");
    conn.encode(&req);
    within(conn.write_head()).await.expect("write");
    let mut got = Vec::new();
    while !got.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = within(server.read(&mut byte)).await.expect("request read");
        assert_eq!(n, 1, "request head cut short: {got:?}");
        got.push(byte[0]);
    }
}

/// One exchange: the answer's head (or why it failed), and what the body needs.
struct Exchange {
    head: Result<Head, ExchangeError>,
    conn: RawConn,
    server: TcpStream,
    home: Arc<Upstream>,
}

/// Sends `GET /` (or, for `head_request`, a request whose answer has no body) and
/// reads the head of the answer the server writes in `parts`, a few ms apart.
async fn exchange(parts: &[&[u8]], head_request: bool) -> Exchange {
    let (mut conn, mut server, home) = pair().await;
    send_get(&mut conn, &mut server).await;
    let owned: Vec<Vec<u8>> = parts.iter().map(|p| p.to_vec()).collect();
    let writer = tokio::spawn(async move {
        for p in owned {
            server.write_all(&p).await.expect("server write");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server
    });
    let head = within(conn.read_head(head_request)).await;
    let server = within(writer).await.expect("writer");
    Exchange {
        head,
        conn,
        server,
        home,
    }
}

/// The head of an answer expected to be valid, with its body as a `RawBody`.
fn response(ex: Exchange) -> (Response<RawBody>, TcpStream, Arc<Upstream>) {
    let head = ex.head.expect("head");
    let resp = head.into_response(ex.conn, Arc::clone(&ex.home));
    (resp, ex.server, ex.home)
}

/// [`exchange`] for a `GET` whose answer's head must be valid.
async fn answer(parts: &[&[u8]]) -> (Response<RawBody>, TcpStream, Arc<Upstream>) {
    response(exchange(parts, false).await)
}

/// Reads `body` to its end: its bytes, or the error it ended with.
async fn read_body(mut body: RawBody) -> Result<Vec<u8>, ExchangeError> {
    let mut out = Vec::new();
    loop {
        match within(body.frame()).await {
            Some(Ok(f)) => out.extend_from_slice(f.data_ref().expect("data frame")),
            Some(Err(e)) => return Err(e),
            None => return Ok(out),
        }
    }
}

/// Reads exactly `n` bytes on `server`.
async fn read_n(server: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    let read = within(server.read_exact(&mut got)).await;
    read.expect("read");
    got
}

/// The first frame of `body`, which must be data.
async fn first_data(body: &mut RawBody) -> Bytes {
    let frame = within(body.frame())
        .await
        .expect("a frame")
        .expect("no error");
    frame.into_data().expect("data")
}

/// Gives the reactor time to see what the other side did.
async fn settle() {
    tokio::time::sleep(Duration::from_millis(50)).await;
}

/// The error of an exchange whose head must be refused.
async fn head_error(parts: &[&[u8]]) -> ExchangeError {
    exchange(parts, false).await.head.expect_err("refused")
}

/// The body error of a chunked answer whose body part is `body`.
async fn chunked_error(body: &[u8]) -> (ExchangeError, Arc<Upstream>) {
    let (resp, _server, home) = answer(&[CHUNKED_HEAD, body]).await;
    let err = read_body(resp.into_body()).await.expect_err("refused");
    (err, home)
}

#[tokio::test]
async fn the_request_head_is_encoded_as_is() {
    let (mut conn, mut server, _home) = pair().await;
    let req = Request::get("/p?q=1")
        .header("host", "a")
        .header("x-y", "z")
        .body(())
        .expect("request");
    conn.encode(&req);
    conn.write_head().await.expect("write");
    let want = b"GET /p?q=1 HTTP/1.1\r\nhost: a\r\nx-y: z\r\n\r\n";
    assert_eq!(read_n(&mut server, want.len()).await, want);

    // An absolute-form URI is sent in origin form, `/` when it has no path; the
    // buffer is rebuilt each time.
    let req = Request::head("http://b.example").body(()).expect("request");
    conn.encode(&req);
    conn.write_head().await.expect("write");
    let want = b"HEAD / HTTP/1.1\r\n\r\n";
    assert_eq!(read_n(&mut server, want.len()).await, want);
}

#[tokio::test]
async fn a_content_length_body_split_over_reads_is_read_and_the_connection_reused() {
    let (resp, _server, home) = answer(&[
        b"HTTP/1.1 200 OK\r\ncontent-le",
        b"ngth: 5\r\nx-a: b\r\n\r\nhe",
        b"l",
        b"lo",
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), Version::HTTP_11);
    assert_eq!(resp.headers()["x-a"], "b");
    assert_eq!(resp.headers()["content-length"], "5");
    assert_eq!(resp.body().size_hint().exact(), Some(5));
    assert_eq!(home.idle_count(), 0, "not given back before the body ends");
    let body = read_body(resp.into_body()).await.expect("body");
    assert_eq!(body, b"hello");
    assert_eq!(
        home.idle_count(),
        1,
        "a clean answer gives its connection back"
    );
}

#[tokio::test]
async fn an_empty_content_length_body_ends_at_once_and_is_reused() {
    let (resp, _server, home) = answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"]).await;
    assert!(resp.body().is_end_stream());
    assert_eq!(home.idle_count(), 1);
    assert!(read_body(resp.into_body()).await.expect("body").is_empty());
}

#[tokio::test]
async fn a_chunked_body_split_anywhere_is_decoded_and_trailers_dropped() {
    let (resp, _server, home) = answer(&[
        CHUNKED_HEAD,
        b"5;ext=1\r",
        b"\nhel",
        b"lo",
        b"\r",
        b"\n1",
        b"0\r\n0123456789abcdef\r\n0\r\nx-trailer: t",
        b"\r\n\r",
        b"\n",
    ])
    .await;
    assert!(!resp.body().is_end_stream());
    let body = read_body(resp.into_body()).await.expect("body");
    assert_eq!(body, b"hello0123456789abcdef");
    assert_eq!(home.idle_count(), 1);
}

#[tokio::test]
async fn content_length_beside_chunked_is_removed_and_the_connection_not_reused() {
    let (resp, _server, home) = answer(&[
        b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\ntransfer-encoding: chunked\r\n\r\n",
        b"2\r\nok\r\n0\r\n\r\n",
    ])
    .await;
    assert!(resp.headers().get("content-length").is_none());
    assert_eq!(resp.headers()["transfer-encoding"], "chunked");
    assert_eq!(read_body(resp.into_body()).await.expect("body"), b"ok");
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn bytes_after_the_end_of_a_body_keep_the_connection_out_of_the_pool() {
    for wire in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nokHTTP/1.1 200 OK\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nX",
        b"HTTP/1.1 204 No Content\r\n\r\nX",
    ] {
        let (resp, _server, home) = answer(&[wire]).await;
        let body = read_body(resp.into_body()).await.expect("body");
        assert_eq!(body, &b"ok"[..body.len()]);
        assert_eq!(
            home.idle_count(),
            0,
            "a stray byte would desynchronise the next answer: {}",
            String::from_utf8_lossy(wire)
        );
    }
}

#[tokio::test]
async fn a_body_without_framing_lasts_until_close_and_is_not_reused() {
    for head in [
        &b"HTTP/1.1 200 OK\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked, gzip\r\n\r\n",
    ] {
        let (resp, server, home) = answer(&[head, b"some ", b"bytes"]).await;
        assert_eq!(resp.body().size_hint().exact(), None);
        drop(server);
        let body = read_body(resp.into_body()).await.expect("body");
        assert_eq!(body, b"some bytes", "{}", String::from_utf8_lossy(head));
        assert_eq!(home.idle_count(), 0);
    }
}

#[tokio::test]
async fn keep_alive_follows_connection_and_the_version() {
    for (version, field, reused) in [
        (Version::HTTP_11, "connection: close\r\n", 0),
        (Version::HTTP_10, "", 0),
        (Version::HTTP_10, "connection: keep-alive\r\n", 1),
        (Version::HTTP_11, "connection: Keep-Alive, Close\r\n", 0),
        (Version::HTTP_11, "connection: keep-alive\r\n", 1),
        (Version::HTTP_11, "", 1),
    ] {
        let v = if version == Version::HTTP_10 { 0 } else { 1 };
        let what = format!("HTTP/1.{v} 200 OK\r\n{field}content-length: 2\r\n\r\nok");
        let (resp, _server, home) = answer(&[what.as_bytes()]).await;
        assert_eq!(resp.version(), version, "{what}");
        assert_eq!(read_body(resp.into_body()).await.expect("body"), b"ok");
        assert_eq!(home.idle_count(), reused, "{what}");
    }
}

#[tokio::test]
async fn head_204_and_304_answers_have_no_body() {
    for (answer, head_request) in [
        (&b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n"[..], true),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            true,
        ),
        (b"HTTP/1.1 204 No Content\r\n\r\n", false),
        (
            b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n",
            false,
        ),
    ] {
        let what = String::from_utf8_lossy(answer);
        let (resp, _server, home) = response(exchange(&[answer], head_request).await);
        assert!(resp.body().is_end_stream(), "{what}");
        assert_eq!(resp.body().size_hint().exact(), Some(0), "{what}");
        assert_eq!(home.idle_count(), 1, "given back at once: {what}");
        let body = read_body(resp.into_body()).await.expect("body");
        assert!(body.is_empty(), "{what}");
    }
}

#[tokio::test]
async fn interim_answers_are_skipped_and_an_unasked_switch_refused() {
    let (resp, _server, home) = answer(&[
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nlink: </a.css>\r\n\r\nHTTP/1.1 201 Cre",
        b"ated\r\ncontent-length: 1\r\n\r\nx",
    ])
    .await;
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert!(
        resp.headers().get("link").is_none(),
        "interim fields dropped"
    );
    assert_eq!(read_body(resp.into_body()).await.expect("body"), b"x");
    assert_eq!(home.idle_count(), 1);

    let err =
        head_error(&[b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n"]).await;
    assert!(matches!(err, ExchangeError::UnaskedSwitch), "{err:?}");
}

#[tokio::test]
async fn a_close_before_or_during_the_head_is_told_apart() {
    // A clean close after reading the request.
    let (mut conn, mut server, _home) = pair().await;
    send_get(&mut conn, &mut server).await;
    drop(server);
    let r = within(conn.read_head(false)).await;
    assert!(matches!(r, Err(ExchangeError::ClosedBeforeAnswer)), "{r:?}");

    // A reset is the same: no byte of an answer came.
    let (mut conn, mut server, _home) = pair().await;
    send_get(&mut conn, &mut server).await;
    server.set_zero_linger().expect("linger");
    drop(server);
    let r = within(conn.read_head(false)).await;
    assert!(matches!(r, Err(ExchangeError::ClosedBeforeAnswer)), "{r:?}");

    // Part of a head, then a clean close.
    let (mut conn, mut server, _home) = pair().await;
    send_get(&mut conn, &mut server).await;
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-")
        .await
        .expect("write");
    drop(server);
    let r = within(conn.read_head(false)).await;
    assert!(matches!(r, Err(ExchangeError::ClosedInHead)), "{r:?}");
}

#[tokio::test]
async fn oversized_heads_are_refused() {
    let head_with = |fields: usize| {
        let mut h = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
        for i in 1..fields {
            h.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
        }
        h.extend_from_slice(b"\r\n");
        h
    };
    let fine = head_with(MAX_HEADERS);
    let ex = exchange(&[fine.as_slice()], false).await;
    let head = ex.head.expect("exactly MAX_HEADERS fields are accepted");
    assert_eq!(head.response.headers().len(), MAX_HEADERS);

    let many = head_with(MAX_HEADERS + 1);
    let err = head_error(&[many.as_slice()]).await;
    assert!(matches!(err, ExchangeError::HeadTooLarge), "{err:?}");

    let mut long = b"HTTP/1.1 200 OK\r\nx-long: ".to_vec();
    long.resize(MAX_HEAD + 10, b'a');
    let err = head_error(&[long.as_slice()]).await;
    assert!(matches!(err, ExchangeError::HeadTooLarge), "{err:?}");
}

#[tokio::test]
async fn bad_lengths_and_folded_fields_are_refused() {
    for bad in [
        &b"HTTP/1.1 200 OK\r\ncontent-length: 5, 6\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: five\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5,\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 12345678901234567890\r\n\r\n",
    ] {
        let err = head_error(&[bad]).await;
        assert!(
            matches!(err, ExchangeError::BadLength),
            "{}: {err:?}",
            String::from_utf8_lossy(bad)
        );
    }

    let agree = b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\ncontent-length: 5\r\n\r\nhello";
    let (resp, _server, home) = answer(&[agree]).await;
    assert_eq!(read_body(resp.into_body()).await.expect("body"), b"hello");
    assert_eq!(home.idle_count(), 1, "repeats that agree are one length");

    let err = head_error(&[b"HTTP/1.1 200 OK\r\nx-a: b\r\n  folded\r\n\r\n"]).await;
    assert!(matches!(err, ExchangeError::Parse(_)), "obs-fold: {err:?}");
}

#[tokio::test]
async fn a_body_cut_short_is_an_error_and_the_connection_is_dropped() {
    let (resp, server, home) = answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]).await;
    drop(server);
    let mut body = resp.into_body();
    assert_eq!(first_data(&mut body).await, "abc");
    let r = read_body(body).await;
    assert!(matches!(r, Err(ExchangeError::ClosedInBody)), "{r:?}");
    assert_eq!(home.idle_count(), 0);

    let (resp, server, home) = answer(&[CHUNKED_HEAD, b"5\r\nhel"]).await;
    drop(server);
    let r = read_body(resp.into_body()).await;
    assert!(matches!(r, Err(ExchangeError::ClosedInBody)), "{r:?}");
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn a_body_dropped_midway_drops_the_connection() {
    let (resp, _server, home) =
        answer(&[b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc"]).await;
    let mut body = resp.into_body();
    assert_eq!(first_data(&mut body).await, "abc");
    drop(body);
    assert_eq!(home.idle_count(), 0);
}

#[tokio::test]
async fn bad_chunked_framing_is_an_error() {
    let mut long_line = vec![b'1'; 1];
    long_line.resize(MAX_CHUNK_LINE + 10, b' ');
    let mut big_trailers = b"0\r\n".to_vec();
    while big_trailers.len() <= MAX_TRAILERS + 100 {
        big_trailers.extend_from_slice(b"x-t: 0123456789012345678901234567890123456789\r\n");
    }
    for (bad, why) in [
        (&b"zz\r\nhello\r\n0\r\n\r\n"[..], "no chunk size"),
        (b"5\r\nhelloXX0\r\n\r\n", "no CRLF after chunk data"),
        (
            b"5\nhello\r\n0\r\n\r\n",
            "chunk-size line not ended by CRLF",
        ),
        (b"5x\r\nhello\r\n", "invalid chunk size"),
        (b"10000000000000000\r\n", "chunk size too large"),
        (long_line.as_slice(), "chunk-size line too long"),
        (big_trailers.as_slice(), "trailer section too large"),
        (b"0\r\n\n", "bare LF ends the trailer section"),
    ] {
        let (err, home) = chunked_error(bad).await;
        assert!(
            matches!(err, ExchangeError::Chunked(m) if m == why),
            "{why}: {err:?}"
        );
        assert_eq!(home.idle_count(), 0, "{why}");
    }
}

#[tokio::test]
async fn an_idle_connection_closed_by_the_back_end_is_stale() {
    let (conn, server, _home) = pair().await;
    settle().await;
    assert!(!conn.is_stale(), "open and silent");
    drop(server);
    settle().await;
    assert!(conn.is_stale(), "closed by the back end");

    let (conn, mut server, _home) = pair().await;
    server.write_all(b"x").await.expect("write");
    settle().await;
    assert!(conn.is_stale(), "bytes nobody asked for");

    // After a whole answer the connection is clean again, until the back end closes.
    let Exchange {
        head, conn, server, ..
    } = exchange(&[b"HTTP/1.1 204 No Content\r\n\r\n"], false).await;
    assert_eq!(
        head.expect("head").response.status(),
        StatusCode::NO_CONTENT
    );
    settle().await;
    assert!(!conn.is_stale(), "kept-alive and silent");
    drop(server);
    settle().await;
    assert!(conn.is_stale(), "closed after an exchange");
}

#[test]
fn chunk_sizes_and_lengths_parse_strictly() {
    assert_eq!(chunk_size(b"1a\r").ok(), Some(26));
    assert_eq!(chunk_size(b"A;name=value\r").ok(), Some(10));
    assert_eq!(
        chunk_size(b"a \t;x\r").ok(),
        Some(10),
        "whitespace before extensions"
    );
    assert!(
        chunk_size(b"5 garbage\r").is_err(),
        "only extensions may follow"
    );
    assert_eq!(chunk_size(b"5 \r").ok(), Some(5));
    assert_eq!(chunk_size(b"5 ;ext\r").ok(), Some(5));
    assert_eq!(chunk_size(b"0\r").ok(), Some(0));
    assert_eq!(
        chunk_size(b"fffffffffffffff\r").ok(),
        Some(0xfff_ffff_ffff_ffff)
    );
    let err = |line: &[u8]| match chunk_size(line) {
        Err(ExchangeError::Chunked(m)) => m,
        other => panic!("{line:?}: {other:?}"),
    };
    assert_eq!(err(b"ffffffffffffffff\r"), "chunk size too large");
    assert_eq!(err(b"\r"), "no chunk size");
    assert_eq!(err(b";ext\r"), "no chunk size");
    assert_eq!(err(b"g\r"), "no chunk size");
    assert_eq!(err(b"5g\r"), "invalid chunk size");
    assert_eq!(err(b"5"), "chunk-size line not ended by CRLF");

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
    assert_eq!(parse_length(b"0x10"), None);
}

#[test]
fn chunked_decoding_fed_one_byte_at_a_time() {
    let wire = b"3\r\nabc\r\n10;x=y\r\n0123456789abcdef\r\n0\r\nt: 1\r\n\r\n";
    let mut framing = Framing::Chunked(Chunk::Size);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut ended = 0;
    for (i, &b) in wire.iter().enumerate() {
        assert_eq!(ended, 0, "ended early, before byte {i}");
        buf.extend_from_slice(&[b]);
        loop {
            match framing.decode(&mut buf).expect("valid") {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::NeedMore => break,
                Decoded::End => {
                    ended += 1;
                    break;
                }
            }
        }
    }
    assert_eq!(ended, 1);
    assert_eq!(framing, Framing::Done);
    assert!(buf.is_empty());
    assert_eq!(data, b"abc0123456789abcdef");
}

#[test]
fn length_decoding_stops_at_the_length() {
    let mut framing = Framing::Length(3);
    let mut buf = BytesMut::from(&b"abcdef"[..]);
    assert_eq!(
        framing.decode(&mut buf).expect("data"),
        Decoded::Data(Bytes::from_static(b"abc"))
    );
    assert_eq!(framing.decode(&mut buf).expect("end"), Decoded::End);
    assert_eq!(&buf[..], b"def", "the rest stays buffered");
}
