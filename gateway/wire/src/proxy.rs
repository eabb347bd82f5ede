//! The PROXY protocol (HAProxy's, versions 1 and 2): the header a load balancer puts in
//! front of a connection's first byte to say whom it proxies. Decoding only (the gateway
//! receives it; encoding is for tests and tools), zero-copy: [`decode`] reads the start
//! of a connection's bytes and says how long the header is and which addresses it names.
//!
//! Strict, as the specification asks of a receiver: a connection that starts with neither
//! signature is not proxied ([`ProxyError::NotProxy`]), and a header that breaks any rule
//! is an error, never a guess. Version 1 lines are at most 107 bytes; version 2 headers at
//! most 16 + 65 535. TLVs of version 2 are skipped (their length is checked).
#![forbid(unsafe_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The 12-byte signature of a version 2 header.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The prefix of a version 1 header.
pub const V1_PREFIX: &[u8] = b"PROXY ";
/// The longest version 1 line, CRLF included.
pub const V1_MAX_LEN: usize = 107;
const V2_FIXED: usize = 16;

/// A decoded header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    /// The proxied client and the address it connected to; `None` for a v2 LOCAL command
    /// (the proxy's own health check), v1 `UNKNOWN`, or an address family other than
    /// TCP/UDP over IPv4 or IPv6 (the connection's own addresses then stand).
    pub addrs: Option<(SocketAddr, SocketAddr)>,
    /// Bytes of the header: what follows is the proxied connection's first byte.
    pub len: usize,
}

/// Why bytes are not a valid PROXY header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    /// The bytes start with neither signature.
    #[error("not a PROXY protocol header")]
    NotProxy,
    /// A version 1 line longer than 107 bytes, or one that is not
    /// `PROXY TCP4|TCP6 src dst sport dport` / `PROXY UNKNOWN ...`.
    #[error("malformed PROXY v1 line")]
    BadV1,
    /// A version 2 header with a version other than 2, a command other than LOCAL or
    /// PROXY, or an address block shorter than its family needs.
    #[error("malformed PROXY v2 header")]
    BadV2,
}

/// Decodes the header at the start of `buf`. `Ok(None)` while the bytes so far are a
/// valid beginning of a header and more are needed.
pub fn decode(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] == V2_SIGNATURE[..n] {
        return if n < V2_SIGNATURE.len() {
            Ok(None)
        } else {
            decode_v2(buf)
        };
    }
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] == V1_PREFIX[..n] {
        return if n < V1_PREFIX.len() {
            Ok(None)
        } else {
            decode_v1(buf)
        };
    }
    Err(ProxyError::NotProxy)
}

fn decode_v1(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let Some(cr) = window.iter().position(|&b| b == b'\r') else {
        return if buf.len() >= V1_MAX_LEN || window.contains(&b'\n') {
            Err(ProxyError::BadV1)
        } else {
            Ok(None)
        };
    };
    if cr + 2 > V1_MAX_LEN {
        return Err(ProxyError::BadV1);
    }
    match window.get(cr + 1) {
        None => return Ok(None),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyError::BadV1),
    }
    let line = std::str::from_utf8(&window[V1_PREFIX.len()..cr]).map_err(|_| ProxyError::BadV1)?;
    let len = cr + 2;
    let mut fields = line.split(' ');
    let proto = fields.next().ok_or(ProxyError::BadV1)?;
    if proto == "UNKNOWN" {
        return Ok(Some(Header {
            version: 1,
            addrs: None,
            len,
        }));
    }
    let v6 = match proto {
        "TCP4" => false,
        "TCP6" => true,
        _ => return Err(ProxyError::BadV1),
    };
    let mut next = || fields.next().ok_or(ProxyError::BadV1);
    let (src, dst, sport, dport) = (next()?, next()?, next()?, next()?);
    if fields.next().is_some() {
        return Err(ProxyError::BadV1);
    }
    let ip = |s: &str| -> Result<IpAddr, ProxyError> {
        if v6 {
            s.parse::<Ipv6Addr>().map(IpAddr::V6)
        } else {
            s.parse::<Ipv4Addr>().map(IpAddr::V4)
        }
        .map_err(|_| ProxyError::BadV1)
    };
    // Ports are decimal without sign or leading zeros (`u16::from_str` takes "+1", "01").
    let port = |s: &str| -> Result<u16, ProxyError> {
        let canonical = !s.is_empty()
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        if !canonical {
            return Err(ProxyError::BadV1);
        }
        s.parse().map_err(|_| ProxyError::BadV1)
    };
    let src = SocketAddr::new(ip(src)?, port(sport)?);
    let dst = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Some(Header {
        version: 1,
        addrs: Some((src, dst)),
        len,
    }))
}

fn decode_v2(buf: &[u8]) -> Result<Option<Header>, ProxyError> {
    if buf.len() < V2_FIXED {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::BadV2);
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        _ => return Err(ProxyError::BadV2),
    };
    let fam = buf[13];
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    // The address block's size is checked before the rest arrives.
    let need = match fam >> 4 {
        1 => 12,
        2 => 36,
        3 => 216,
        0 => 0,
        _ => return Err(ProxyError::BadV2),
    };
    if body < need {
        return Err(ProxyError::BadV2);
    }
    let len = V2_FIXED + body;
    if buf.len() < len {
        return Ok(None);
    }
    let a = &buf[V2_FIXED..len];
    // Transport 1 (STREAM) or 2 (DGRAM); 0 is UNSPEC.
    let addrs = match (fam >> 4, fam & 0x0f) {
        _ if local => None,
        (1, 1 | 2) => {
            let ip = |o: usize| Ipv4Addr::new(a[o], a[o + 1], a[o + 2], a[o + 3]);
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V4(ip(0)), port(8)),
                SocketAddr::new(IpAddr::V4(ip(4)), port(10)),
            ))
        }
        (2, 1 | 2) => {
            let ip = |o: usize| {
                let mut b = [0u8; 16];
                b.copy_from_slice(&a[o..o + 16]);
                Ipv6Addr::from(b)
            };
            let port = |o: usize| u16::from_be_bytes([a[o], a[o + 1]]);
            Some((
                SocketAddr::new(IpAddr::V6(ip(0)), port(32)),
                SocketAddr::new(IpAddr::V6(ip(16)), port(34)),
            ))
        }
        _ => None,
    };
    Ok(Some(Header {
        version: 2,
        addrs,
        len,
    }))
}

/// Appends a version 2 PROXY header for `addrs` (LOCAL when `None`) to `out`, with no TLVs.
/// Both addresses must be of one family.
pub fn encode_v2(addrs: Option<(SocketAddr, SocketAddr)>, out: &mut Vec<u8>) {
    out.extend_from_slice(&V2_SIGNATURE);
    match addrs {
        None => out.extend_from_slice(&[0x20, 0x00, 0, 0]),
        Some((SocketAddr::V4(s), SocketAddr::V4(d))) => {
            out.extend_from_slice(&[0x21, 0x11, 0, 12]);
            out.extend_from_slice(&s.ip().octets());
            out.extend_from_slice(&d.ip().octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
        Some((s, d)) => {
            let v6 = |a: SocketAddr| match a.ip() {
                IpAddr::V4(v4) => v4.to_ipv6_mapped(),
                IpAddr::V6(v6) => v6,
            };
            out.extend_from_slice(&[0x21, 0x21, 0, 36]);
            out.extend_from_slice(&v6(s).octets());
            out.extend_from_slice(&v6(d).octets());
            out.extend_from_slice(&s.port().to_be_bytes());
            out.extend_from_slice(&d.port().to_be_bytes());
        }
    }
}

/// Appends a version 1 PROXY line for `addrs` (`UNKNOWN` when `None`) to `out`.
pub fn encode_v1(addrs: Option<(SocketAddr, SocketAddr)>, out: &mut Vec<u8>) {
    let line = match addrs {
        None => "PROXY UNKNOWN\r\n".to_string(),
        Some((s, d)) => format!(
            "PROXY {} {} {} {} {}\r\n",
            if s.is_ipv4() { "TCP4" } else { "TCP6" },
            s.ip(),
            d.ip(),
            s.port(),
            d.port()
        ),
    };
    out.extend_from_slice(line.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Need more, or a header with these addresses, or an error.
    type Want = Result<Option<Option<(&'static str, &'static str)>>, ProxyError>;

    #[test]
    fn v1_lines() {
        let cases: &[(&[u8], Want)] = &[
            (
                b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\nrest",
                Ok(Some(Some(("192.0.2.1:56324", "198.51.100.2:443")))),
            ),
            (
                b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n",
                Ok(Some(Some(("[2001:db8::1]:1", "[2001:db8::2]:2")))),
            ),
            (b"PROXY UNKNOWN\r\n", Ok(Some(None))),
            (b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n", Ok(Some(None))),
            (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r", Ok(None)),
            (b"PROXY TCP4 192.0", Ok(None)),
            (b"PRO", Ok(None)),
            (
                b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n",
                Err(ProxyError::BadV1),
            ),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", Err(ProxyError::BadV1)),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 3\r\n",
                Err(ProxyError::BadV1),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n",
                Err(ProxyError::BadV1),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 +1 2\r\n",
                Err(ProxyError::BadV1),
            ),
            (
                b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n",
                Err(ProxyError::BadV1),
            ),
            (b"PROXY TCP4 ::1 ::1 1 2\r\n", Err(ProxyError::BadV1)),
            (
                b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n",
                Err(ProxyError::BadV1),
            ),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rx", Err(ProxyError::BadV1)),
            (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", Err(ProxyError::BadV1)),
            (b"\x16\x03\x01\x02\x00", Err(ProxyError::NotProxy)),
            (b"GET / HTTP/1.1\r\n", Err(ProxyError::NotProxy)),
        ];
        for (input, want) in cases {
            let got = decode(input).map(|h| h.map(|h| h.addrs));
            let want = (*want).map(|o| o.map(|a| a.map(|(s, d)| (sa(s), sa(d)))));
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(input));
        }
        let long = [b"PROXY UNKNOWN ".as_slice(), &[b'x'; 100]].concat();
        assert_eq!(decode(&long), Err(ProxyError::BadV1), "over 107 bytes");
    }

    #[test]
    fn v2_headers() {
        let mut b = Vec::new();
        encode_v2(
            Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443"))),
            &mut b,
        );
        b.extend_from_slice(b"\x16\x03\x01");
        let h = decode(&b).unwrap().unwrap();
        assert_eq!(h.len, 28);
        assert_eq!(
            h.addrs,
            Some((sa("192.0.2.1:56324"), sa("198.51.100.2:443")))
        );
        for cut in 0..28 {
            assert_eq!(decode(&b[..cut]), Ok(None), "cut at {cut}");
        }
        // LOCAL: no addresses, even with an address block.
        let mut local = b[..28].to_vec();
        local[12] = 0x20;
        assert_eq!(decode(&local).unwrap().unwrap().addrs, None);
        // TLVs after the addresses are skipped.
        let mut tlv = b[..28].to_vec();
        tlv[15] = 12 + 5;
        tlv.extend_from_slice(&[0x04, 0, 2, b'h', b'i']);
        assert_eq!(decode(&tlv).unwrap().unwrap().len, 33);
        // Bad version, command, family, or an address block too short for its family.
        for (i, v) in [(12, 0x11), (12, 0x22), (13, 0x41), (15, 11)] {
            let mut bad = b[..28].to_vec();
            bad[i] = v;
            assert_eq!(decode(&bad), Err(ProxyError::BadV2), "byte {i} = {v:#x}");
        }
        // AF_UNIX and UNSPEC carry no IP addresses.
        let mut unspec = V2_SIGNATURE.to_vec();
        unspec.extend_from_slice(&[0x21, 0x00, 0, 0]);
        assert_eq!(decode(&unspec).unwrap().unwrap().addrs, None);
        let mut v6 = Vec::new();
        encode_v2(
            Some((sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2"))),
            &mut v6,
        );
        assert_eq!(
            decode(&v6).unwrap().unwrap().addrs,
            Some((sa("[2001:db8::1]:1"), sa("[2001:db8::2]:2")))
        );
    }

    fn addr_pair() -> impl Strategy<Value = Option<(SocketAddr, SocketAddr)>> {
        let v4 = (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p)));
        let v6 = (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(ip, p)| SocketAddr::from((Ipv6Addr::from(ip), p)));
        prop_oneof![
            Just(None),
            (v4.clone(), v4).prop_map(Some),
            (v6.clone(), v6).prop_map(Some),
        ]
    }

    proptest! {
        #[test]
        fn encoded_headers_decode_to_what_was_encoded(addrs in addr_pair(), v1 in any::<bool>(), rest in proptest::collection::vec(any::<u8>(), 0..64)) {
            let mut b = Vec::new();
            if v1 { encode_v1(addrs, &mut b) } else { encode_v2(addrs, &mut b) }
            let len = b.len();
            b.extend_from_slice(&rest);
            let h = decode(&b).unwrap().unwrap();
            prop_assert_eq!(h.len, len);
            prop_assert_eq!(h.addrs, addrs);
            for cut in 0..len {
                prop_assert_eq!(decode(&b[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_stay_in_bounds(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some(h)) = decode(&b) {
                prop_assert!(h.len <= b.len());
            }
        }
    }
}
