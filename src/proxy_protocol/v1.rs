//! PROXY protocol version 1: one line of printable ASCII ending in CRLF, at most
//! [`V1_MAX_LEN`] bytes: `PROXY TCP4|TCP6 SRC DST SPORT DPORT\r\n`, or
//! `PROXY UNKNOWN\r\n` (anything between `UNKNOWN ` and the CRLF is ignored).
//!
//! Strict, as the spec asks: fields separated by exactly one space; addresses of the
//! stated family in canonical form (no leading zeros in IPv4 octets); ports 0-65535 in
//! decimal without sign or leading zeros; CRLF and nothing else ends the line. A bad
//! byte is reported as soon as it arrives, without waiting for the CRLF.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Header, Parsed, ProxyProtocolError, Version, V1_MAX_LEN};

/// The v1 line at the start of `buf` (a prefix of `PROXY `, or bytes starting with it).
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    for (i, &b) in window.iter().enumerate() {
        match b {
            b'\r' => {
                return match window.get(i + 1) {
                    Some(b'\n') => {
                        line(&window[..i]).map(|header| Parsed::Complete { header, len: i + 2 })
                    }
                    Some(_) => Err(bad("CR not followed by LF")),
                    None if window.len() == V1_MAX_LEN => Err(ProxyProtocolError::V1TooLong),
                    None => Ok(Parsed::Incomplete),
                }
            }
            b'\n' => return Err(bad("LF without CR (the line must end with CRLF)")),
            0x20..=0x7e => {}
            _ => return Err(bad(format!("byte {b:#04x} is not printable ASCII"))),
        }
    }
    if window.len() == V1_MAX_LEN {
        Err(ProxyProtocolError::V1TooLong)
    } else {
        Ok(Parsed::Incomplete)
    }
}

fn bad(why: impl Into<String>) -> ProxyProtocolError {
    ProxyProtocolError::V1(why.into())
}

/// One v1 line without its CRLF; printable ASCII, starting with `PROXY `.
fn line(line: &[u8]) -> Result<Header, ProxyProtocolError> {
    let text = std::str::from_utf8(line).map_err(|_| bad("not ASCII"))?;
    let rest = text
        .strip_prefix("PROXY ")
        .ok_or_else(|| bad("no `PROXY ` prefix"))?;
    let (family, addresses) = rest.split_once(' ').unwrap_or((rest, ""));
    let v4 = match family {
        // The spec: the receiver ignores whatever follows UNKNOWN.
        "UNKNOWN" => {
            return Ok(Header {
                version: Version::V1,
                source: None,
                destination: None,
            })
        }
        "TCP4" => true,
        "TCP6" => false,
        "" => return Err(bad("fields must be separated by exactly one space")),
        _ => {
            return Err(bad(format!(
                "protocol `{family}` is none of TCP4, TCP6, UNKNOWN"
            )))
        }
    };
    let mut fields = addresses.split(' ');
    let mut field = || fields.next().filter(|f| !f.is_empty());
    let (Some(src), Some(dst), Some(sport), Some(dport), None) =
        (field(), field(), field(), field(), fields.next())
    else {
        return Err(bad(format!(
            "`{addresses}` is not `SRC DST SPORT DPORT` separated by single spaces"
        )));
    };
    let ip = |s: &str, what: &str| {
        let ip = if v4 {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        } else {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        };
        ip.map_err(|_| bad(format!("{what} address `{s}` is not a {family} address")))
    };
    let source = SocketAddr::new(ip(src, "source")?, port(sport)?);
    let destination = SocketAddr::new(ip(dst, "destination")?, port(dport)?);
    Ok(Header {
        version: Version::V1,
        source: Some(source),
        destination: Some(destination),
    })
}

/// A decimal port 0-65535 without sign or leading zeros.
fn port(s: &str) -> Result<u16, ProxyProtocolError> {
    let plain =
        s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()) && (s == "0" || !s.starts_with('0'));
    plain
        .then(|| s.parse::<u16>().ok())
        .flatten()
        .ok_or_else(|| {
            bad(format!(
                "port `{s}` is not a decimal number 0-65535 without leading zeros"
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;

    #[test]
    fn v1_tcp4_tcp6_and_unknown() {
        let line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56244 443\r\nGET / HTTP/1.1\r\n";
        let (h, len) = complete(line);
        assert_eq!((h.version, len), (Version::V1, 45));
        assert_eq!(
            addrs(h),
            ("192.0.2.1:56244".into(), "198.51.100.2:443".into())
        );
        let (h, _) = complete(b"PROXY TCP6 2001:db8::1 ::ffff:192.0.2.9 0 65535\r\n");
        assert_eq!(
            addrs(h),
            ("[2001:db8::1]:0".into(), "[::ffff:192.0.2.9]:65535".into())
        );
        for unknown in [&b"PROXY UNKNOWN\r\n"[..], b"PROXY UNKNOWN ::1 ::2 1 2\r\nx"] {
            let (h, len) = complete(unknown);
            assert_eq!((h.source, h.destination), (None, None));
            assert_eq!(&unknown[len - 2..len], b"\r\n");
        }
        let peer: SocketAddr = "[::1]:9".parse().expect("addr");
        assert_eq!(complete(b"PROXY UNKNOWN\r\n").0.client(peer), peer);
    }

    #[test]
    fn v1_malformed_lines_are_rejected_with_the_reason() {
        let long = format!("PROXY UNKNOWN {}\r\n", "f".repeat(100));
        for (line, why) in [
            (
                "PROXY TCP4 192.0.2.256 192.0.2.2 1 2\r\n",
                "`192.0.2.256` is not a TCP4",
            ),
            (
                "PROXY TCP4 192.0.2 192.0.2.2 1 2\r\n",
                "`192.0.2` is not a TCP4",
            ),
            (
                "PROXY TCP4 192.0.2.01 192.0.2.2 1 2\r\n",
                "`192.0.2.01` is not a TCP4",
            ),
            ("PROXY TCP4 2001:db8::1 192.0.2.2 1 2\r\n", "not a TCP4"),
            (
                "PROXY TCP6 192.0.2.1 ::1 1 2\r\n",
                "`192.0.2.1` is not a TCP6",
            ),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n", "LF without CR"),
            (
                "PROXY TCP4 192.0.2.1 192.0.2.2 1 2\rX",
                "CR not followed by LF",
            ),
            (&long, "no CRLF within 107"),
            (
                "PROXY  TCP4 192.0.2.1 192.0.2.2 1 2\r\n",
                "exactly one space",
            ),
            ("PROXY TCP4 192.0.2.1  192.0.2.2 1 2\r\n", "single spaces"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 2 \r\n", "single spaces"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1\r\n", "single spaces"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 65536 2\r\n", "port `65536`"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 +80 2\r\n", "port `+80`"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 080\r\n", "port `080`"),
            ("PROXY TCP4 192.0.2.1 192.0.2.2 1 -1\r\n", "port `-1`"),
            ("PROXY UDP4 192.0.2.1 192.0.2.2 1 2\r\n", "protocol `UDP4`"),
            ("PROXY UNKNOWNX\r\n", "protocol `UNKNOWNX`"),
            (
                "PROXY TCP4 192.0.2.1\t192.0.2.2 1 2\r\n",
                "0x09 is not printable",
            ),
            ("proxy TCP4 192.0.2.1 192.0.2.2 1 2\r\n", "neither `PROXY `"),
            ("GET / HTTP/1.1\r\n", "neither `PROXY `"),
        ] {
            let e = error(line.as_bytes());
            assert!(e.contains(why), "{line:?}: {e}");
        }
        // The longest legal line is accepted; one byte more is not.
        let max = format!("PROXY UNKNOWN {}\r\n", "f".repeat(V1_MAX_LEN - 16));
        assert_eq!(complete(max.as_bytes()).1, V1_MAX_LEN);
        let over = format!("PROXY UNKNOWN {}\r\n", "f".repeat(V1_MAX_LEN - 15));
        assert!(error(over.as_bytes()).contains("no CRLF"));
    }
}
