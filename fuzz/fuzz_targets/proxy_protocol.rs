//! The first bytes of a connection → `launchday::proxy_protocol::parse`.
//!
//! Never panics, and keeps what `read_header` relies on, checked over every prefix of
//! the input (the bytes as they might arrive):
//! - bounded: `Incomplete` only below `MAX_LEN` bytes (else `read_header` would wait
//!   forever with a full buffer); a complete header is 1..=`MAX_LEN` bytes (v1 at most
//!   `V1_MAX_LEN`) and within what was received;
//! - streaming: prefixes go Incomplete… then either an error or a header, and stay
//!   there: more bytes never turn an error into a header, and never change a complete
//!   header or its length (bytes after it are ignored);
//! - the version is the one the first byte announced.

#![no_main]

use launchday::proxy_protocol::{
    parse, Parsed, ProxyProtocolError, Version, MAX_LEN, V1_MAX_LEN, V2_SIGNATURE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_LEN + 64)];
    let mut settled: Option<Result<Parsed, String>> = None;
    for end in 0..=data.len() {
        let buf = &data[..end];
        let now = parse(buf);
        match &now {
            Ok(Parsed::Incomplete) => {
                assert!(buf.len() < MAX_LEN, "Incomplete after {} bytes", buf.len());
            }
            Ok(Parsed::Complete { header, len }) => {
                assert!(
                    *len >= 1 && *len <= buf.len() && *len <= MAX_LEN,
                    "len {len} of {}",
                    buf.len()
                );
                match header.version {
                    Version::V1 => {
                        assert!(buf.starts_with(b"PROXY "));
                        assert!(*len <= V1_MAX_LEN, "v1 header of {len} bytes");
                        assert!(buf[..*len].ends_with(b"\r\n"));
                    }
                    Version::V2 => assert!(buf.starts_with(&V2_SIGNATURE)),
                }
                // Bytes after the header are not part of it.
                let whole = Parsed::Complete {
                    header: *header,
                    len: *len,
                };
                assert_eq!(parse(&buf[..*len]).ok(), Some(whole));
            }
            Err(e) => {
                assert!(!e.to_string().is_empty());
                assert!(
                    !matches!(e, ProxyProtocolError::Closed(_) | ProxyProtocolError::Io(_)),
                    "parse reported {e:?}"
                );
            }
        }
        match (&settled, &now) {
            (None, Ok(Parsed::Incomplete)) => {}
            (None, _) => settled = Some(now.map_err(|e| e.to_string())),
            (Some(Err(_)), Err(_)) => {}
            (Some(Err(before)), Ok(p)) => {
                panic!("error {before:?} at a shorter prefix, then {p:?} after {end} bytes")
            }
            (Some(Ok(before)), Ok(p)) => {
                assert_eq!(before, p, "header changed after {end} bytes")
            }
            (Some(Ok(before)), Err(e)) => {
                panic!("{before:?} at a shorter prefix, then error {e} after {end} bytes")
            }
        }
    }
});
