//! PROXY protocol version 2: the 12-byte signature, a version/command byte (version 2;
//! LOCAL or PROXY), a family/protocol byte, a big-endian length, then that many bytes:
//! the addresses of the family (12 bytes for IPv4, 36 for IPv6, 216 for unix sockets)
//! and TLVs.
//!
//! Only PROXY over TCP/IPv4 or TCP/IPv6 yields addresses; LOCAL (whatever its family),
//! AF_UNSPEC, UDP and unix sockets yield none, so the TCP peer address stands. TLVs are
//! skipped, but each must fit inside the header. Headers longer than [`V2_MAX_LEN`] are
//! rejected as soon as the length field arrives.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{Header, Parsed, ProxyProtocolError, Version, V2_MAX_LEN};

/// The v2 header at the start of `buf` (a prefix of the signature, or bytes starting
/// with all of it).
pub(super) fn parse(buf: &[u8]) -> Result<Parsed, ProxyProtocolError> {
    // Check each fixed byte as soon as it is there, to fail early.
    let command = match buf.get(12) {
        None => return Ok(Parsed::Incomplete),
        Some(&b) if b >> 4 != 2 => return Err(ProxyProtocolError::V2Version(b >> 4)),
        Some(&b) if b & 0xf > 1 => return Err(ProxyProtocolError::V2Command(b & 0xf)),
        Some(&b) => b & 0xf,
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Parsed::Incomplete);
    };
    // LOCAL: "discard the protocol block including the family which is ignored".
    let (family, protocol) = if command == 0 {
        (0, 0)
    } else {
        (fam >> 4, fam & 0xf)
    };
    if family > 3 || protocol > 2 {
        return Err(ProxyProtocolError::V2Family(fam));
    }
    let (Some(&hi), Some(&lo)) = (buf.get(14), buf.get(15)) else {
        return Ok(Parsed::Incomplete);
    };
    let body_len = usize::from(u16::from_be_bytes([hi, lo]));
    let len = 16 + body_len;
    if len > V2_MAX_LEN {
        return Err(ProxyProtocolError::V2TooLong(len));
    }
    let Some(body) = buf.get(16..len) else {
        return Ok(Parsed::Incomplete);
    };
    let mut header = Header {
        version: Version::V2,
        source: None,
        destination: None,
    };
    // LOCAL, or an unspecified family or protocol: the block is skipped unread.
    if family == 0 || protocol == 0 {
        return Ok(Parsed::Complete { header, len });
    }
    let need = match family {
        1 => 12,
        2 => 36,
        _ => 216,
    };
    if body_len < need {
        return Err(ProxyProtocolError::V2ShortAddresses {
            len: body_len,
            need,
        });
    }
    // TLVs: type (1), length (2), value; skipped, but each must fit in the header.
    let mut at = need;
    while at < body_len {
        let Some([_, hi, lo]) = body.get(at..at + 3) else {
            return Err(ProxyProtocolError::V2Tlv(16 + at));
        };
        let end = at + 3 + usize::from(u16::from_be_bytes([*hi, *lo]));
        if end > body_len {
            return Err(ProxyProtocolError::V2Tlv(16 + at));
        }
        at = end;
    }
    // Addresses only for TCP over IPv4/IPv6 (UDP and unix sockets keep the peer's).
    if protocol == 1 && family != 3 {
        let (src, dst): (IpAddr, IpAddr) = if family == 1 {
            (
                Ipv4Addr::from(array::<4>(body, 0)).into(),
                Ipv4Addr::from(array::<4>(body, 4)).into(),
            )
        } else {
            (
                Ipv6Addr::from(array::<16>(body, 0)).into(),
                Ipv6Addr::from(array::<16>(body, 16)).into(),
            )
        };
        let port = |at| u16::from_be_bytes(array(body, at));
        header.source = Some(SocketAddr::new(src, port(need - 4)));
        header.destination = Some(SocketAddr::new(dst, port(need - 2)));
    }
    Ok(Parsed::Complete { header, len })
}

/// `N` bytes of `b` from `at` (zeros past its end; callers check lengths first).
fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0; N];
    if let Some(src) = b.get(at..at + N) {
        out.copy_from_slice(src);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::super::testing::*;
    use super::super::*;
    use std::net::Ipv6Addr;

    #[test]
    fn v2_ipv4_ipv6_local_udp_unix_and_tlvs() {
        let (h, len) = complete(&[v2(0x21, 0x11, &V4_BODY), b"GET".to_vec()].concat());
        assert_eq!((h.version, len), (Version::V2, 28));
        assert_eq!(
            addrs(h),
            ("192.0.2.1:56244".into(), "198.51.100.2:443".into())
        );
        let mut v6 = [0u8; 36];
        v6[..16].copy_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().expect("ip").octets());
        v6[31] = 2;
        v6[32..].copy_from_slice(&[0, 80, 1, 187]);
        let (h, _) = complete(&v2(0x21, 0x21, &v6));
        assert_eq!(addrs(h), ("[2001:db8::1]:80".into(), "[::2]:443".into()));
        // LOCAL ignores whatever block and family it carries; UDP and unix keep the peer.
        for header in [
            v2(0x20, 0x00, &[]),
            v2(0x20, 0xff, &[1, 2, 3]),
            v2(0x21, 0x12, &V4_BODY),
            v2(0x21, 0x31, &[0; 216]),
            v2(0x21, 0x00, &[]),
        ] {
            let (h, len) = complete(&header);
            assert_eq!((h.source, len), (None, header.len()), "{header:x?}");
        }
        // TLVs (ALPN "h2", NOOP, empty) are skipped.
        let tlvs = [&V4_BODY[..], &[1, 0, 2, b'h', b'2', 4, 0, 1, 0, 5, 0, 0]].concat();
        let (h, len) = complete(&v2(0x21, 0x11, &tlvs));
        assert_eq!((h.source.map(|a| a.port()), len), (Some(56244), 16 + 24));
    }

    #[test]
    fn v2_malformed_headers_are_rejected_with_the_reason() {
        let mut bad_sig = v2(0x21, 0x11, &V4_BODY);
        bad_sig[8] = b'X';
        for (header, why) in [
            (bad_sig, "neither `PROXY `"),
            (v2(0x11, 0x11, &V4_BODY), "version 1"),
            (v2(0x22, 0x11, &V4_BODY), "command 0x2"),
            (v2(0x21, 0x41, &V4_BODY), "byte 0x41"),
            (v2(0x21, 0x13, &V4_BODY), "byte 0x13"),
            (
                v2(0x21, 0x11, &V4_BODY[..11]),
                "11 address bytes, fewer than the 12",
            ),
            (v2(0x21, 0x21, &V4_BODY), "fewer than the 36"),
            (
                v2(0x21, 0x11, &[&V4_BODY[..], &[1, 0, 3, 0]].concat()),
                "TLV at byte 28",
            ),
            (
                v2(0x21, 0x11, &[&V4_BODY[..], &[1, 0]].concat()),
                "TLV at byte 28",
            ),
            (v2(0x21, 0x11, &[0; V2_MAX_LEN - 15]), "537 bytes long"),
        ] {
            let e = error(&header);
            assert!(e.contains(why), "{header:x?}: {e}");
        }
    }
}
