//! The opening handshake (RFC 6455 section 4): parses the client's HTTP/1.1 Upgrade
//! request in the caller's buffer, checks it against the gateway's configuration, and
//! writes the 101 answer or the HTTP error that refuses it.
//!
//! Only what a WebSocket upgrade needs is parsed: the request line and the headers, at
//! most [`MAX_REQUEST_LEN`] bytes, strictly (CRLF line ends, no folded headers, no
//! body). The request is refused with the first rule it breaks, in this order: size
//! (431), request line (400), method (405), HTTP version (505), header syntax and
//! duplicates (400), a body (400), path (404), Host (400), not an upgrade at all (426),
//! `Sec-WebSocket-Version` (426), `Sec-WebSocket-Key` (400), Origin (403). No extension
//! (such as permessage-deflate) is ever accepted; offering one is not an error.

use std::fmt::Write as _;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use sha1::{Digest as _, Sha1};
use thiserror::Error;

/// The largest request head (request line and headers, with the blank line) accepted.
pub const MAX_REQUEST_LEN: usize = 8 * 1024;
/// The GUID RFC 6455 appends to the key before hashing it into the accept key.
pub const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Length of `Sec-WebSocket-Accept`: base64 of a 20-byte SHA-1.
pub const ACCEPT_KEY_LEN: usize = 28;

/// What the gateway accepts in an upgrade request; built once from its config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HandshakeConfig {
    /// The path WebSocket is served on, compared exactly with the request's path (the
    /// query string is ignored). Default `/ws`.
    pub path: String,
    /// Origins (`scheme://host[:port]`, compared ASCII-case-insensitively) allowed to
    /// connect. Empty: any origin, and requests without one. Otherwise a request must
    /// carry one of them; a request without `Origin` is refused as well.
    pub allowed_origins: Vec<String>,
    /// Subprotocols served, in order of preference. The first one the client also
    /// offers is chosen; when there is none in common, the upgrade goes on without a
    /// subprotocol (RFC 6455 allows it; browsers that offered one then fail the
    /// connection themselves).
    pub subprotocols: Vec<String>,
}

impl Default for HandshakeConfig {
    fn default() -> HandshakeConfig {
        HandshakeConfig {
            path: "/ws".into(),
            allowed_origins: Vec::new(),
            subprotocols: Vec::new(),
        }
    }
}

/// An accepted upgrade request, borrowing the request buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade<'a> {
    /// The `Sec-WebSocket-Accept` value to answer with (ASCII base64).
    pub accept_key: [u8; ACCEPT_KEY_LEN],
    /// The request path (the configured one).
    pub path: &'a str,
    /// The query string after `?`, if any (without the `?`).
    pub query: Option<&'a str>,
    /// The `Host` header.
    pub host: &'a str,
    /// The `Origin` header, if the client sent one (browsers always do).
    pub origin: Option<&'a str>,
    /// The chosen subprotocol, if any.
    pub subprotocol: Option<&'a str>,
}

impl Upgrade<'_> {
    /// The accept key as text.
    pub fn accept_key_str(&self) -> &str {
        // Base64 output is ASCII by construction.
        std::str::from_utf8(&self.accept_key).unwrap_or_default()
    }
}

/// Why an upgrade request was refused. Each maps to an HTTP status
/// ([`HandshakeError::status`]) and a short answer ([`HandshakeError::http_response`])
/// after which the gateway closes the connection.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Error)]
pub enum HandshakeError {
    /// The request head is over [`MAX_REQUEST_LEN`] bytes. 431.
    #[error("request head over {MAX_REQUEST_LEN} bytes")]
    TooLarge,
    /// The request line is not `METHOD SP target SP HTTP/x.y` with an origin-form
    /// target, or holds bytes a request line may not. 400.
    #[error("malformed request line")]
    BadRequestLine,
    /// A method other than GET. 405, with `Allow: GET`.
    #[error("method not allowed: a WebSocket upgrade is a GET")]
    MethodNotAllowed,
    /// An HTTP version other than HTTP/1.1. 505.
    #[error("HTTP version not supported: a WebSocket upgrade is HTTP/1.1")]
    HttpVersion,
    /// A header line that is not `name: value` (bad name, space before the colon,
    /// control bytes, a folded line, a bare CR or LF). 400.
    #[error("malformed header line")]
    BadHeader,
    /// A header that may appear once appears twice. 400.
    #[error("duplicate {0} header")]
    DuplicateHeader(&'static str),
    /// A request that announces a body (`Content-Length` other than 0 or any
    /// `Transfer-Encoding`): the bytes after the head are WebSocket frames. 400.
    #[error("an upgrade request may not carry a body")]
    BodyNotAllowed,
    /// The path is not the configured WebSocket path. 404.
    #[error("no WebSocket endpoint at this path")]
    NotFound,
    /// No `Host` header, or an empty one. 400.
    #[error("missing Host header")]
    MissingHost,
    /// A request without `Upgrade: websocket` and `Connection: upgrade`: a plain HTTP
    /// request. 426, with `Upgrade: websocket`.
    #[error(
        "this endpoint only serves WebSocket: send Upgrade: websocket and Connection: Upgrade"
    )]
    NotUpgrade,
    /// `Sec-WebSocket-Version` missing or not 13. 426, with `Sec-WebSocket-Version: 13`.
    #[error("unsupported WebSocket version: only 13 is served")]
    UnsupportedVersion,
    /// `Sec-WebSocket-Key` missing or not the base64 of 16 bytes. 400.
    #[error("Sec-WebSocket-Key missing or not the base64 of 16 bytes")]
    BadKey,
    /// An `Origin` not in the allow-list, or none while an allow-list is configured.
    /// 403.
    #[error("origin not allowed")]
    ForbiddenOrigin,
}

impl HandshakeError {
    /// The HTTP status this refusal answers with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::TooLarge => 431,
            HandshakeError::BadRequestLine
            | HandshakeError::BadHeader
            | HandshakeError::DuplicateHeader(_)
            | HandshakeError::BodyNotAllowed
            | HandshakeError::MissingHost
            | HandshakeError::BadKey => 400,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::HttpVersion => 505,
            HandshakeError::NotFound => 404,
            HandshakeError::NotUpgrade | HandshakeError::UnsupportedVersion => 426,
            HandshakeError::ForbiddenOrigin => 403,
        }
    }

    /// Appends the HTTP/1.1 answer to `out`: the status, `Connection: close`, the
    /// headers RFC 6455 and RFC 9110 ask for with this status, and a one-line plain-text
    /// body naming the problem. The gateway closes the connection once it is sent.
    pub fn http_response(&self, out: &mut Vec<u8>) {
        let status = self.status();
        let reason = match status {
            400 => "Bad Request",
            403 => "Forbidden",
            404 => "Not Found",
            405 => "Method Not Allowed",
            426 => "Upgrade Required",
            431 => "Request Header Fields Too Large",
            _ => "HTTP Version Not Supported",
        };
        let body = format!("{self}\n");
        let mut head = String::with_capacity(192);
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "HTTP/1.1 {status} {reason}\r\nConnection: close\r\n\
             Content-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            body.len()
        );
        match self {
            HandshakeError::MethodNotAllowed => head.push_str("Allow: GET\r\n"),
            HandshakeError::NotUpgrade | HandshakeError::UnsupportedVersion => {
                head.push_str("Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n")
            }
            _ => {}
        }
        head.push_str("\r\n");
        out.extend_from_slice(head.as_bytes());
        out.extend_from_slice(body.as_bytes());
    }
}

/// The `Sec-WebSocket-Accept` value for a `Sec-WebSocket-Key`:
/// base64(SHA-1(key ++ [`GUID`])).
pub fn accept_key(key: &[u8]) -> [u8; ACCEPT_KEY_LEN] {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    let digest = h.finalize();
    let mut out = [0u8; ACCEPT_KEY_LEN];
    let n = STANDARD
        .encode_slice(digest, &mut out)
        .expect("base64 of 20 bytes is exactly 28 bytes");
    debug_assert_eq!(n, ACCEPT_KEY_LEN);
    out
}

/// Parses the upgrade request at the start of `req`.
///
/// `Ok(None)` means the head (up to the blank line) is not complete yet. On success
/// returns the upgrade and the number of bytes the head took; any bytes after it are
/// the client's first frames. Garbage is refused early: a first line with bytes no
/// request line may hold fails without waiting for the rest, and a head that reaches
/// [`MAX_REQUEST_LEN`] without ending fails at once.
pub fn parse_upgrade<'a>(
    req: &'a [u8],
    cfg: &HandshakeConfig,
) -> Result<Option<(Upgrade<'a>, usize)>, HandshakeError> {
    let Some(head_len) = find_head_end(req) else {
        if req.len() >= MAX_REQUEST_LEN {
            return Err(HandshakeError::TooLarge);
        }
        let first_line = match req.iter().position(|&b| b == b'\r' || b == b'\n') {
            Some(end) => &req[..end],
            None => req,
        };
        if !first_line
            .iter()
            .all(|&b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(HandshakeError::BadRequestLine);
        }
        return Ok(None);
    };
    if head_len > MAX_REQUEST_LEN {
        return Err(HandshakeError::TooLarge);
    }
    // The head without its final blank line: lines that each end in CRLF.
    let head = &req[..head_len - 2];
    let mut lines = head_lines(head).map(|l| l.ok_or(HandshakeError::BadHeader));
    let request_line = lines.next().ok_or(HandshakeError::BadRequestLine)?;
    let request_line = request_line.map_err(|_| HandshakeError::BadRequestLine)?;
    let target = parse_request_line(request_line)?;

    let mut h = Headers::default();
    for line in lines {
        h.add(line?)?;
    }
    if h.body {
        return Err(HandshakeError::BodyNotAllowed);
    }

    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    if path != cfg.path {
        return Err(HandshakeError::NotFound);
    }
    let host = h
        .host
        .filter(|v| !v.is_empty())
        .ok_or(HandshakeError::MissingHost)?;
    let host = as_str(host)?;
    if !h.upgrade_websocket || !h.connection_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    if h.version != Some(b"13".as_slice()) {
        return Err(HandshakeError::UnsupportedVersion);
    }
    let key = h.key.ok_or(HandshakeError::BadKey)?;
    let mut raw = [0u8; 18];
    match STANDARD.decode_slice(key, &mut raw) {
        Ok(16) if key.len() == 24 => {}
        _ => return Err(HandshakeError::BadKey),
    }
    let origin = h.origin.map(as_str).transpose()?;
    if !cfg.allowed_origins.is_empty()
        && !origin.is_some_and(|o| {
            cfg.allowed_origins
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(o))
        })
    {
        return Err(HandshakeError::ForbiddenOrigin);
    }
    let subprotocol = choose_subprotocol(head, cfg)?;

    Ok(Some((
        Upgrade {
            accept_key: accept_key(key),
            path,
            query,
            host,
            origin,
            subprotocol,
        },
        head_len,
    )))
}

/// Appends the `101 Switching Protocols` answer for `up` to `out`. After it the
/// connection speaks WebSocket frames.
pub fn write_accept_response(up: &Upgrade<'_>, out: &mut Vec<u8>) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Accept: ",
    );
    out.extend_from_slice(&up.accept_key);
    out.extend_from_slice(b"\r\n");
    if let Some(p) = up.subprotocol {
        out.extend_from_slice(b"Sec-WebSocket-Protocol: ");
        out.extend_from_slice(p.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Length of the request head including the blank line, once it is all there.
fn find_head_end(req: &[u8]) -> Option<usize> {
    req.windows(4).position(|w| w == b"\r\n\r\n").map(|i| i + 4)
}

/// The lines of `head` without their CRLF; `None` for a line with a bare CR or LF.
fn head_lines(head: &[u8]) -> impl Iterator<Item = Option<&[u8]>> {
    head.split_inclusive(|&b| b == b'\n').map(|l| {
        l.strip_suffix(b"\r\n")
            .filter(|l| !l.contains(&b'\r') && !l.contains(&b'\n'))
    })
}

/// Checks `GET SP origin-form SP HTTP/1.1` and returns the target.
fn parse_request_line(line: &[u8]) -> Result<&str, HandshakeError> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HandshakeError::BadRequestLine);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(HandshakeError::BadRequestLine);
    }
    if !target.starts_with(b"/") || !target.iter().all(u8::is_ascii_graphic) {
        return Err(HandshakeError::BadRequestLine);
    }
    let Some(v) = version.strip_prefix(b"HTTP/") else {
        return Err(HandshakeError::BadRequestLine);
    };
    if !matches!(v, [major, b'.', minor] if major.is_ascii_digit() && minor.is_ascii_digit()) {
        return Err(HandshakeError::BadRequestLine);
    }
    if method != b"GET" {
        return Err(HandshakeError::MethodNotAllowed);
    }
    if v != b"1.1" {
        return Err(HandshakeError::HttpVersion);
    }
    // Graphic ASCII throughout, so UTF-8.
    as_str(target).map_err(|_| HandshakeError::BadRequestLine)
}

/// The headers the handshake looks at, borrowing their values.
#[derive(Default)]
struct Headers<'a> {
    host: Option<&'a [u8]>,
    origin: Option<&'a [u8]>,
    key: Option<&'a [u8]>,
    version: Option<&'a [u8]>,
    upgrade_websocket: bool,
    connection_upgrade: bool,
    body: bool,
}

impl<'a> Headers<'a> {
    fn add(&mut self, line: &'a [u8]) -> Result<(), HandshakeError> {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(HandshakeError::BadHeader)?;
        let (name, value) = (&line[..colon], trim(&line[colon + 1..]));
        // An empty or non-token name also catches folded lines (leading space) and a
        // space before the colon.
        if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
            return Err(HandshakeError::BadHeader);
        }
        if !value
            .iter()
            .all(|&b| b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80)
        {
            return Err(HandshakeError::BadHeader);
        }
        let once = |slot: &mut Option<&'a [u8]>, what: &'static str| {
            if slot.replace(value).is_some() {
                Err(HandshakeError::DuplicateHeader(what))
            } else {
                Ok(())
            }
        };
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if is("host") {
            once(&mut self.host, "Host")?;
        } else if is("origin") {
            once(&mut self.origin, "Origin")?;
        } else if is("sec-websocket-key") {
            once(&mut self.key, "Sec-WebSocket-Key")?;
        } else if is("sec-websocket-version") {
            once(&mut self.version, "Sec-WebSocket-Version")?;
        } else if is("upgrade") {
            self.upgrade_websocket |= has_token(value, b"websocket");
        } else if is("connection") {
            self.connection_upgrade |= has_token(value, b"upgrade");
        } else if is("content-length") {
            self.body |= value != b"0";
        } else if is("transfer-encoding") {
            self.body = true;
        }
        Ok(())
    }
}

/// Picks the first configured subprotocol that any `Sec-WebSocket-Protocol` header of
/// the request offers, borrowing the client's spelling (identical: tokens compare
/// exactly).
fn choose_subprotocol<'a>(
    head: &'a [u8],
    cfg: &HandshakeConfig,
) -> Result<Option<&'a str>, HandshakeError> {
    if cfg.subprotocols.is_empty() {
        return Ok(None);
    }
    let offered = || {
        head_lines(head).skip(1).flatten().filter_map(|line| {
            let colon = line.iter().position(|&b| b == b':')?;
            line[..colon]
                .eq_ignore_ascii_case(b"sec-websocket-protocol")
                .then(|| trim(&line[colon + 1..]))
        })
    };
    for want in &cfg.subprotocols {
        for value in offered() {
            if let Some(token) = value
                .split(|&b| b == b',')
                .map(trim)
                .find(|t| *t == want.as_bytes())
            {
                return as_str(token).map(Some);
            }
        }
    }
    Ok(None)
}

/// Whether a comma-separated header value lists `token` (ASCII-case-insensitively).
fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| trim(t).eq_ignore_ascii_case(token))
}

fn trim(mut v: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = v {
        v = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = v {
        v = rest;
    }
    v
}

fn as_str(v: &[u8]) -> Result<&str, HandshakeError> {
    std::str::from_utf8(v).map_err(|_| HandshakeError::BadHeader)
}

/// RFC 9110 `tchar`: the characters of a method or header name.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RFC_REQUEST: &str = "GET /chat HTTP/1.1\r\n\
        Host: server.example.com\r\n\
        Upgrade: websocket\r\n\
        Connection: Upgrade\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Origin: http://example.com\r\n\
        Sec-WebSocket-Protocol: chat, superchat\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";

    fn cfg() -> HandshakeConfig {
        HandshakeConfig {
            path: "/chat".into(),
            allowed_origins: vec![],
            subprotocols: vec!["superchat".into(), "chat".into()],
        }
    }

    fn request(lines: &[&str]) -> String {
        let mut s = String::new();
        for l in lines {
            s.push_str(l);
            s.push_str("\r\n");
        }
        s.push_str("\r\n");
        s
    }

    /// A browser-like request to `/ws`, with `extra` header lines replacing those of the
    /// same name (or removing them when the value is empty).
    fn browser(target: &str, extra: &[(&str, &str)]) -> String {
        let mut headers = vec![
            ("Host", "gateway.example.com:7443"),
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Origin", "https://app.example.com"),
            ("Sec-WebSocket-Version", "13"),
            ("Sec-WebSocket-Key", "x3JJHMbDL1EzLkh9GBhXDw=="),
        ];
        for (name, value) in extra {
            headers.retain(|(n, _)| !n.eq_ignore_ascii_case(name));
            if !value.is_empty() {
                headers.push((name, value));
            }
        }
        let mut lines = vec![format!("GET {target} HTTP/1.1")];
        lines.extend(headers.iter().map(|(n, v)| format!("{n}: {v}")));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        request(&refs)
    }

    #[test]
    fn rfc_sample() {
        assert_eq!(
            &accept_key(b"dGhlIHNhbXBsZSBub25jZQ=="),
            b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        // The client's first frame bytes may follow the head.
        let mut req = RFC_REQUEST.as_bytes().to_vec();
        req.extend_from_slice(&[0x81, 0x85]);
        let (up, used) = parse_upgrade(&req, &cfg()).unwrap().unwrap();
        assert_eq!(used, RFC_REQUEST.len());
        assert_eq!(up.accept_key_str(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(up.path, "/chat");
        assert_eq!(up.query, None);
        assert_eq!(up.host, "server.example.com");
        assert_eq!(up.origin, Some("http://example.com"));
        // Server preference wins over the client's order.
        assert_eq!(up.subprotocol, Some("superchat"));
        let mut out = Vec::new();
        write_accept_response(&up, &mut out);
        assert_eq!(
            std::str::from_utf8(&out).unwrap(),
            "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\
             Sec-WebSocket-Protocol: superchat\r\n\r\n"
        );
    }

    #[test]
    fn headless_chromium_request() {
        // Captured from Chromium 156 opening ws://localhost:18600/ws?token=abc from a
        // file:// page, offering two subprotocols.
        let req = "GET /ws?token=abc HTTP/1.1\r\n\
            Host: localhost:18600\r\n\
            Connection: Upgrade\r\n\
            Pragma: no-cache\r\n\
            Cache-Control: no-cache\r\n\
            User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
            HeadlessChrome/156.0.0.0 Safari/537.36\r\n\
            Upgrade: websocket\r\n\
            Origin: null\r\n\
            Sec-WebSocket-Version: 13\r\n\
            Accept-Encoding: gzip, deflate, br, zstd\r\n\
            Accept-Language: en-US,en;q=0.9\r\n\
            Sec-WebSocket-Key: w0l63j/jjlMTDXVObnFPFw==\r\n\
            Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
            Sec-WebSocket-Protocol: chat.v1, holdfast.v1\r\n\r\n";
        let c = HandshakeConfig {
            subprotocols: vec!["holdfast.v1".into()],
            ..HandshakeConfig::default()
        };
        let (up, used) = parse_upgrade(req.as_bytes(), &c).unwrap().unwrap();
        assert_eq!(used, req.len());
        assert_eq!(up.accept_key_str(), "0wvNaXDoAKA3POnnrn4pucpMdnM=");
        assert_eq!((up.path, up.query), ("/ws", Some("token=abc")));
        assert_eq!(up.host, "localhost:18600");
        // A file:// page's origin is "null": refused by any allow-list that lacks it.
        assert_eq!(up.origin, Some("null"));
        assert_eq!(up.subprotocol, Some("holdfast.v1"));
        let strict = HandshakeConfig {
            allowed_origins: vec!["https://app.example.com".into()],
            ..c
        };
        assert_eq!(
            parse_upgrade(req.as_bytes(), &strict),
            Err(HandshakeError::ForbiddenOrigin)
        );
    }

    #[test]
    fn incomplete_until_the_blank_line() {
        let req = RFC_REQUEST.as_bytes();
        for n in 0..req.len() {
            assert_eq!(parse_upgrade(&req[..n], &cfg()), Ok(None), "{n}");
        }
        assert!(parse_upgrade(req, &cfg()).unwrap().is_some());
    }

    #[test]
    fn browser_variants_accepted() {
        let c = HandshakeConfig {
            path: "/ws".into(),
            allowed_origins: vec!["https://app.example.com".into()],
            subprotocols: vec!["holdfast.v1".into()],
        };
        // (target, header overrides, expected subprotocol)
        type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>);
        let cases: &[Case<'_>] = &[
            ("/ws", &[], None),
            ("/ws?token=abc", &[], None),
            // Firefox sends "keep-alive, Upgrade".
            ("/ws", &[("Connection", "keep-alive, Upgrade")], None),
            (
                "/ws",
                &[("upgrade", "WebSocket"), ("CONNECTION", "upgrade")],
                None,
            ),
            ("/ws", &[("Origin", "HTTPS://APP.example.com")], None),
            (
                "/ws",
                &[("Sec-WebSocket-Protocol", "other,  holdfast.v1 ")],
                Some("holdfast.v1"),
            ),
            ("/ws", &[("Sec-WebSocket-Protocol", "other")], None),
            (
                "/ws",
                &[(
                    "Sec-WebSocket-Extensions",
                    "permessage-deflate; client_max_window_bits",
                )],
                None,
            ),
            ("/ws", &[("Content-Length", "0")], None),
            ("/ws", &[("X-Binary", "caf\u{e9}")], None),
        ];
        for (target, extra, proto) in cases {
            let req = browser(target, extra);
            let got = parse_upgrade(req.as_bytes(), &c);
            let Ok(Some((up, used))) = got else {
                panic!("{req:?}: {got:?}")
            };
            assert_eq!(used, req.len());
            assert_eq!(up.subprotocol, *proto, "{req:?}");
            assert_eq!(up.path, "/ws");
            assert_eq!(up.query, target.split_once('?').map(|(_, q)| q));
            assert_eq!(up.accept_key_str(), "HSmrc0sMlYUkAGmm5OPpG2HaGWk=");
        }
    }

    #[test]
    fn subprotocol_offered_in_several_headers() {
        let req = request(&[
            "GET /chat HTTP/1.1",
            "Host: h",
            "Upgrade: websocket",
            "Connection: Upgrade",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat",
            "sec-websocket-protocol: superchat",
        ]);
        let (up, _) = parse_upgrade(req.as_bytes(), &cfg()).unwrap().unwrap();
        assert_eq!(up.subprotocol, Some("superchat"));
        let none = HandshakeConfig {
            subprotocols: vec![],
            ..cfg()
        };
        let (up, _) = parse_upgrade(req.as_bytes(), &none).unwrap().unwrap();
        assert_eq!(up.subprotocol, None);
        let mut out = Vec::new();
        write_accept_response(&up, &mut out);
        assert!(!String::from_utf8(out)
            .unwrap()
            .contains("Sec-WebSocket-Protocol"));
    }

    #[test]
    fn refusals_with_their_status() {
        let c = HandshakeConfig {
            path: "/ws".into(),
            allowed_origins: vec!["https://app.example.com".into()],
            subprotocols: vec![],
        };
        use HandshakeError as E;
        let cases: Vec<(String, E, u16)> = vec![
            (
                browser("/ws", &[]).replace("GET", "POST"),
                E::MethodNotAllowed,
                405,
            ),
            (
                browser("/ws", &[]).replace("GET", "HEAD"),
                E::MethodNotAllowed,
                405,
            ),
            (
                "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".into(),
                E::BadRequestLine,
                400,
            ),
            (
                browser("/ws", &[]).replace("HTTP/1.1", "HTTP/1.0"),
                E::HttpVersion,
                505,
            ),
            (
                browser("/ws", &[]).replace("HTTP/1.1", "HTTP/2"),
                E::BadRequestLine,
                400,
            ),
            (
                browser("/ws", &[]).replace("GET /ws", "GET  /ws"),
                E::BadRequestLine,
                400,
            ),
            (
                browser("/ws", &[]).replace("GET /ws", "GET http://h/ws"),
                E::BadRequestLine,
                400,
            ),
            (browser("/other", &[]), E::NotFound, 404),
            (browser("/ws/", &[]), E::NotFound, 404),
            (browser("/WS", &[]), E::NotFound, 404),
            (browser("/ws", &[("Host", "")]), E::MissingHost, 400),
            (browser("/ws", &[("Host", " ")]), E::MissingHost, 400),
            (
                browser("/ws", &[]).replace("Host:", "Host :"),
                E::BadHeader,
                400,
            ),
            (
                browser("/ws", &[]).replace("Upgrade: websocket", "Upgrade: websocket\r\n folded"),
                E::BadHeader,
                400,
            ),
            (
                browser("/ws", &[]).replace("Upgrade: websocket\r\n", "Upgrade: websocket\n"),
                E::BadHeader,
                400,
            ),
            (browser("/ws", &[("X-Bad", "a\u{1}b")]), E::BadHeader, 400),
            (
                browser("/ws", &[]).replace("Upgrade: websocket", "Upgrade websocket"),
                E::BadHeader,
                400,
            ),
            (
                browser("/ws", &[("Host", "")]).replace("Origin", "Host-x: h\r\nOrigin"),
                E::MissingHost,
                400,
            ),
            (
                browser("/ws", &[]).replace("Origin:", "Host: again\r\nOrigin:"),
                E::DuplicateHeader("Host"),
                400,
            ),
            (
                browser("/ws", &[]).replace(
                    "Sec-WebSocket-Version",
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version",
                ),
                E::DuplicateHeader("Sec-WebSocket-Key"),
                400,
            ),
            (
                browser("/ws", &[("Content-Length", "5")]),
                E::BodyNotAllowed,
                400,
            ),
            (
                browser("/ws", &[("Transfer-Encoding", "chunked")]),
                E::BodyNotAllowed,
                400,
            ),
            // A plain HTTP request, as a browser tab opening the URL sends it.
            (
                request(&["GET /ws HTTP/1.1", "Host: h", "Accept: text/html"]),
                E::NotUpgrade,
                426,
            ),
            (browser("/ws", &[("Upgrade", "")]), E::NotUpgrade, 426),
            (browser("/ws", &[("Upgrade", "h2c")]), E::NotUpgrade, 426),
            (
                browser("/ws", &[("Connection", "keep-alive")]),
                E::NotUpgrade,
                426,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Version", "")]),
                E::UnsupportedVersion,
                426,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Version", "8")]),
                E::UnsupportedVersion,
                426,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Version", "13, 8")]),
                E::UnsupportedVersion,
                426,
            ),
            (browser("/ws", &[("Sec-WebSocket-Key", "")]), E::BadKey, 400),
            (
                browser("/ws", &[("Sec-WebSocket-Key", "c2hvcnQ=")]),
                E::BadKey,
                400,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Key", "AAAAAAAAAAAAAAAAAAAAAAAA")]),
                E::BadKey,
                400,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Key", "x3JJHMbDL1EzLkh9GBhXD===")]),
                E::BadKey,
                400,
            ),
            (
                browser("/ws", &[("Sec-WebSocket-Key", "x3JJHMbDL1EzLkh9GBhXDw")]),
                E::BadKey,
                400,
            ),
            (
                browser("/ws", &[("Origin", "https://evil.example.com")]),
                E::ForbiddenOrigin,
                403,
            ),
            (
                browser("/ws", &[("Origin", "https://app.example.com.evil.com")]),
                E::ForbiddenOrigin,
                403,
            ),
            (browser("/ws", &[("Origin", "")]), E::ForbiddenOrigin, 403),
        ];
        for (req, err, status) in cases {
            assert_eq!(parse_upgrade(req.as_bytes(), &c), Err(err), "{req:?}");
            assert_eq!(err.status(), status);
            let mut out = Vec::new();
            err.http_response(&mut out);
            let text = String::from_utf8(out).unwrap();
            let (head, body) = text.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
            assert!(head.contains("\r\nConnection: close"), "{head}");
            assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
            assert_eq!(body, format!("{err}\n"));
            if status == 426 {
                assert!(head.contains("\r\nSec-WebSocket-Version: 13"), "{head}");
                assert!(head.contains("\r\nUpgrade: websocket"), "{head}");
            }
            if status == 405 {
                assert!(head.contains("\r\nAllow: GET"), "{head}");
            }
        }
    }

    #[test]
    fn oversized_and_garbage_fail_early() {
        // A head that never ends.
        let mut req = b"GET /ws HTTP/1.1\r\nX-Pad: ".to_vec();
        req.resize(MAX_REQUEST_LEN - 1, b'a');
        assert_eq!(parse_upgrade(&req, &cfg()), Ok(None));
        req.push(b'a');
        assert_eq!(parse_upgrade(&req, &cfg()), Err(HandshakeError::TooLarge));
        // One that ends just past the limit.
        req.extend_from_slice(b"\r\n\r\n");
        assert_eq!(parse_upgrade(&req, &cfg()), Err(HandshakeError::TooLarge));
        // A TLS ClientHello (or other binary) instead of HTTP fails on its first bytes.
        assert_eq!(
            parse_upgrade(&[0x16, 0x03, 0x01, 0x02, 0x00], &cfg()),
            Err(HandshakeError::BadRequestLine)
        );
        assert_eq!(
            parse_upgrade(b"GET /ws\x00", &cfg()),
            Err(HandshakeError::BadRequestLine)
        );
        assert_eq!(
            parse_upgrade(b"\r\n\r\n", &cfg()),
            Err(HandshakeError::BadRequestLine)
        );
    }
}
