//! Per-request context shared by every phase, and the shared grammar's evaluation:
//! client IP, `${...}` templates and request keys.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::request::Parts;
use http::HeaderMap;
use ipnet::IpNet;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use portico_config::grammar::{KeyPart, KeySpec, Template, Var};
use portico_router::Params;

pub use portico_store::Consumer;

/// What is percent-encoded in a value substituted into a URL path: everything but
/// the unreserved characters of RFC 3986.
pub const PATH_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Whether a path (before any `?`) has a `.` or `..` segment, which an upstream
/// would resolve against the segments before it.
pub fn has_dot_segment(path: &str) -> bool {
    let p = path.split_once('?').map_or(path, |(p, _)| p);
    p.split('/').any(|seg| seg == "." || seg == "..")
}

/// A client certificate the TLS listener verified (mutual TLS).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The subject distinguished name, e.g. `CN=client-a, O=Example`.
    pub subject: String,
    pub common_name: Option<String>,
    /// DNS names, e-mail addresses, URIs and IP addresses of the subject alternative names.
    pub sans: Vec<String>,
    /// SHA-256 of the certificate (DER), lowercase hex.
    pub fingerprint: String,
}

/// A request's id: 1–200 visible ASCII characters, kept as the `X-Request-Id` header
/// value it is sent as (so that the context, the upstream request and the answer share
/// one allocation).
#[derive(Clone, Debug)]
pub struct RequestId(http::HeaderValue);

impl RequestId {
    /// `None` unless `v` is 1–200 visible ASCII characters.
    pub fn new(v: http::HeaderValue) -> Option<RequestId> {
        let b = v.as_bytes();
        (!b.is_empty() && b.len() <= 200 && b.iter().all(u8::is_ascii_graphic))
            .then_some(RequestId(v))
    }

    /// The client's id (`X-Request-Id`) when it is usable, else a new random one: 32
    /// lowercase hex digits (128 bits).
    pub fn of_request(client: Option<&http::HeaderValue>) -> RequestId {
        if let Some(id) = client.and_then(|v| RequestId::new(v.clone())) {
            return id;
        }
        // Each byte's two hex digits at once.
        const PAIRS: [[u8; 2]; 256] = {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            let mut t = [[0u8; 2]; 256];
            let mut i = 0;
            while i < 256 {
                t[i] = [HEX[i >> 4], HEX[i & 0xf]];
                i += 1;
            }
            t
        };
        let mut buf = [0u8; 32];
        for (pair, b) in buf
            .chunks_exact_mut(2)
            .zip(fastrand::u128(..).to_le_bytes())
        {
            pair.copy_from_slice(&PAIRS[usize::from(b)]);
        }
        // One allocation, shared by every clone (the upstream request, the answer).
        match http::HeaderValue::from_maybe_shared(bytes::Bytes::from_owner(buf)) {
            Ok(v) => RequestId(v),
            Err(_) => RequestId(http::HeaderValue::from_static("-")),
        }
    }

    pub fn as_str(&self) -> &str {
        // Visible ASCII only (checked when made).
        std::str::from_utf8(self.0.as_bytes()).unwrap_or_default()
    }

    /// The id as a header value.
    pub fn header(&self) -> &http::HeaderValue {
        &self.0
    }
}

impl std::ops::Deref for RequestId {
    type Target = str;
    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// For contexts made outside a client request (tests, background work): a string that
/// is not a valid id becomes `-`.
impl From<&str> for RequestId {
    fn from(s: &str) -> RequestId {
        http::HeaderValue::from_str(s)
            .ok()
            .and_then(RequestId::new)
            .unwrap_or_else(|| RequestId(http::HeaderValue::from_static("-")))
    }
}

impl From<String> for RequestId {
    fn from(s: String) -> RequestId {
        RequestId::from(s.as_str())
    }
}

/// What the pipeline knows about one request.
#[derive(Debug)]
pub struct Ctx {
    pub request_id: RequestId,
    pub client_ip: IpAddr,
    pub route_name: Arc<str>,
    /// The normalized request path (what routing saw).
    pub path: String,
    pub params: Params,
    /// The authenticated caller, set by an authentication policy (or the route's
    /// anonymous consumer).
    pub consumer: Option<Arc<Consumer>>,
    /// The authentication policy that accepted the request's credential, if any.
    /// (A JWT or token may authenticate a request without naming a consumer.)
    pub auth: Option<&'static str>,
    /// The client certificate of the connection, when the TLS listener asked for one
    /// and the client sent a valid one.
    pub client_cert: Option<Arc<ClientCert>>,
    /// The request came over TLS (an HTTPS listener), e.g. for absolute URLs built
    /// from the request (`https://` + `Host`).
    pub tls: bool,
    /// Some request header name has an underscore: identity headers must then also
    /// be removed under their `_` spellings ([`remove_identity_headers`]).
    pub underscores: bool,
    /// A query parameter that carried a credential (its value is not logged).
    pub secret_query: Option<Arc<str>>,
    /// Claims of a verified JWT, for `${jwt.CLAIM}` and `jwt_claim:` keys.
    pub jwt_claims: Option<serde_json::Value>,
    /// Free-form per-request data for policies.
    pub extensions: http::Extensions,
}

impl Ctx {
    #[inline]
    pub fn new(
        request_id: RequestId,
        client_ip: IpAddr,
        route_name: Arc<str>,
        path: String,
        params: Params,
    ) -> Self {
        Ctx {
            request_id,
            client_ip,
            route_name,
            path,
            params,
            consumer: None,
            auth: None,
            secret_query: None,
            underscores: false,
            client_cert: None,
            tls: false,
            jwt_claims: None,
            extensions: http::Extensions::new(),
        }
    }

    /// The value of a template variable for this request.
    pub fn var<'a>(&'a self, req: Option<&'a Parts>, v: &Var) -> Option<Cow<'a, str>> {
        match v {
            Var::Param(n) => self.params.get(&self.path, n).map(Cow::Borrowed),
            Var::Header(n) => req
                .and_then(|r| header_str(&r.headers, n))
                .map(Cow::Borrowed),
            Var::Query(n) => req.and_then(|r| query_param(r.uri.query(), n)),
            Var::Cookie(n) => req.and_then(|r| cookie(&r.headers, n)).map(Cow::Borrowed),
            Var::ConsumerName => self
                .consumer
                .as_ref()
                .map(|c| Cow::Borrowed(c.name.as_str())),
            Var::JwtClaim(n) => self
                .jwt_claims
                .as_ref()
                .and_then(|c| c.get(n))
                .map(|v| match v {
                    serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
                    other => Cow::Owned(other.to_string()),
                }),
            Var::RequestId => Some(Cow::Borrowed(self.request_id.as_str())),
            Var::ClientIp => Some(Cow::Owned(self.client_ip.to_string())),
            Var::RouteName => Some(Cow::Borrowed(&self.route_name)),
        }
    }

    /// Render a template for this request; missing values render empty. Without the
    /// request (response phases), `header.`, `query.` and `cookie.` render empty.
    pub fn render(&self, req: Option<&Parts>, t: &Template) -> String {
        t.render(|v, out| {
            if let Some(value) = self.var(req, v) {
                out.push_str(&value);
            }
        })
    }

    /// Render a template into a URL path. Path captures go in as they are (each is a
    /// segment of the normalized path, already in URL form); every other value
    /// (headers, query values, claims, ...) is percent-encoded so that it stays
    /// inside its segment: it cannot add `/`, `?` or `#`. A value that is exactly `.`
    /// or `..` would still make a dot segment: check the result with
    /// [`has_dot_segment`].
    pub fn render_path(&self, req: Option<&Parts>, t: &Template) -> String {
        t.render(|v, out| {
            if let Some(value) = self.var(req, v) {
                if matches!(v, Var::Param(_)) {
                    out.push_str(&value);
                } else {
                    out.extend(utf8_percent_encode(&value, PATH_VALUE));
                }
            }
        })
    }

    /// The value of a request key; parts are joined by `|`, a missing part is empty.
    pub fn key(&self, req: &Parts, k: &KeySpec) -> String {
        self.key_in(&req.headers, &req.uri, k).0
    }

    /// The value of a request key for a whole request (the request phase), or `None`
    /// when every part of the key is missing (e.g. `consumer` on an anonymous request,
    /// or an absent `header:`).
    pub fn key_of<B>(&self, req: &http::Request<B>, k: &KeySpec) -> Option<String> {
        let (v, any) = self.key_in(req.headers(), req.uri(), k);
        any.then_some(v)
    }

    /// The key's value, and whether any part of it was present.
    fn key_in(&self, headers: &HeaderMap, uri: &http::Uri, k: &KeySpec) -> (String, bool) {
        let mut out = String::new();
        let mut any = false;
        for (i, part) in k.0.iter().enumerate() {
            if i > 0 {
                out.push('|');
            }
            let v: Option<Cow<'_, str>> = match part {
                KeyPart::Ip => Some(Cow::Owned(self.client_ip.to_string())),
                KeyPart::Consumer => self
                    .consumer
                    .as_ref()
                    .map(|c| Cow::Borrowed(c.name.as_str())),
                KeyPart::Route => Some(Cow::Borrowed(&self.route_name)),
                KeyPart::Path => Some(Cow::Borrowed(&self.path)),
                KeyPart::Header(n) => header_str(headers, n).map(Cow::Borrowed),
                KeyPart::Query(n) => query_param(uri.query(), n),
                KeyPart::Cookie(n) => cookie(headers, n).map(Cow::Borrowed),
                KeyPart::JwtClaim(n) => {
                    self.jwt_claims
                        .as_ref()
                        .and_then(|c| c.get(n))
                        .map(|v| match v {
                            serde_json::Value::String(s) => Cow::Borrowed(s.as_str()),
                            other => Cow::Owned(other.to_string()),
                        })
                }
            };
            if let Some(v) = v {
                any = true;
                out.push_str(&v);
            }
        }
        (out, any)
    }
}

/// Remove headers a client must not set (identity headers the gateway owns), also
/// when spelt with `_` for `-` (`X-Consumer_Name`): CGI-style servers (PHP-FPM, WSGI,
/// Rack) read both spellings as the same variable. `underscores` says whether any
/// header name has an underscore (known from parsing), so the common case is just
/// the exact removals.
pub fn remove_identity_headers(h: &mut HeaderMap, names: &[http::HeaderName], underscores: bool) {
    // One pass over the names comparing lengths is cheaper than hashing each
    // protected name for a lookup, and most requests carry none of them.
    if !h
        .keys()
        .any(|k| names.iter().any(|n| n.as_str().len() == k.as_str().len()))
    {
        return;
    }
    for n in names {
        h.remove(n);
    }
    if !underscores {
        return;
    }
    let aliases: Vec<http::HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str().as_bytes();
            k.contains(&b'_') && names.iter().any(|n| is_spelling_of(n, k))
        })
        .cloned()
        .collect();
    for a in aliases {
        h.remove(a);
    }
}

/// Whether the field name `k` (any case) is `name`, also with `_` for `-`: the
/// spellings under which an identity header must not reach the upstream.
pub fn is_spelling_of(name: &http::HeaderName, k: &[u8]) -> bool {
    let n = name.as_str().as_bytes();
    n.len() == k.len()
        && n.iter()
            .zip(k)
            .all(|(a, b)| a.eq_ignore_ascii_case(b) || (*a == b'-' && *b == b'_'))
}

fn header_str<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

/// The first value of a query parameter, percent-decoded (`+` as space).
pub fn query_param<'a>(query: Option<&'a str>, name: &str) -> Option<Cow<'a, str>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode(k) == name {
            Some(decode(v))
        } else {
            None
        }
    })
}

fn decode(s: &str) -> Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return Cow::Borrowed(s);
    }
    let plus = s.replace('+', " ");
    Cow::Owned(
        percent_encoding::percent_decode_str(&plus)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

/// The value of a cookie from the `Cookie` headers.
pub fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|line| {
            line.split(';').find_map(|c| {
                let (k, v) = c.trim().split_once('=')?;
                (k == name).then(|| v.trim_matches('"'))
            })
        })
}

/// The client's address: the socket peer, or — when the peer is a trusted proxy — the
/// right-most address in `X-Forwarded-For` (or `Forwarded: for=`) that is not itself
/// trusted. Logs, limits, IP rules and hashing all use this one function.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !is_trusted(peer, trusted) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    let xff: Vec<&str> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if !xff.is_empty() {
        for line in xff {
            chain.extend(
                line.split(',')
                    .filter_map(|s| parse_forwarded_addr(s.trim())),
            );
        }
    } else {
        for line in headers
            .get_all("forwarded")
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            for elem in line.split(',') {
                for pair in elem.split(';') {
                    if let Some((k, v)) = pair.trim().split_once('=') {
                        if k.eq_ignore_ascii_case("for") {
                            if let Some(ip) = parse_forwarded_addr(v.trim().trim_matches('"')) {
                                chain.push(ip);
                            }
                        }
                    }
                }
            }
        }
    }
    for ip in chain.iter().rev() {
        let ip = canonical(*ip);
        if !is_trusted(ip, trusted) {
            return ip;
        }
    }
    chain.first().map(|ip| canonical(*ip)).unwrap_or(peer)
}

/// `ip` is in one of the `trusted_proxies` networks (its forwarding headers name the
/// client).
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    trusted.iter().any(|n| n.contains(&ip))
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is; others unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn parse_forwarded_addr(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    // `[v6]:port`, `[v6]` or `v4:port`
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    s.rsplit_once(':').and_then(|(h, _)| h.parse().ok())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http::HeaderValue;

    fn nets(s: &[&str]) -> Vec<IpNet> {
        s.iter().map(|n| n.parse().unwrap()).collect()
    }

    #[test]
    fn request_ids_are_the_clients_when_usable_else_random_hex() {
        let keep = HeaderValue::from_static("abc-123_X.y~");
        let id = RequestId::of_request(Some(&keep));
        assert_eq!(id.as_str(), "abc-123_X.y~");
        assert_eq!(id.header(), &keep);
        let long = "a".repeat(201);
        let bad = [
            HeaderValue::from_static(""),
            HeaderValue::from_static("has space"),
            HeaderValue::from_str(&long).unwrap(),
            HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap(),
        ];
        let mut seen = std::collections::HashSet::new();
        for v in bad.iter().map(Some).chain([None]) {
            let id = RequestId::of_request(v);
            assert_eq!(id.len(), 32, "{id}");
            assert!(
                id.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "{id}"
            );
            assert_eq!(id.header().as_bytes(), id.as_bytes());
            assert!(seen.insert(id.to_string()), "ids repeat: {id}");
        }
        // Every byte value's two digits: 0x00..0xff all appear over many ids.
        let mut digits = std::collections::HashSet::new();
        for _ in 0..2000 {
            let id = RequestId::of_request(None);
            for p in id.as_bytes().chunks(2) {
                digits.insert(p.to_vec());
            }
        }
        assert_eq!(digits.len(), 256);
        assert_eq!(RequestId::from("not valid").as_str(), "-");
    }

    #[test]
    fn client_ip_rules() {
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("1.1.1.1, 2.2.2.2, 10.0.0.5"),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        // untrusted peer: headers ignored
        assert_eq!(client_ip(peer, &h, &[]), peer);
        assert_eq!(client_ip(peer, &h, &nets(&["192.168.0.0/16"])), peer);
        // trusted peer: right-most untrusted
        assert_eq!(
            client_ip(peer, &h, &nets(&["10.0.0.0/8"])),
            "2.2.2.2".parse::<IpAddr>().unwrap()
        );
        // spoofed left-most entries do not win
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("6.6.6.6, 3.3.3.3"),
        );
        assert_eq!(
            client_ip(peer, &h, &nets(&["10.0.0.0/8"])),
            "3.3.3.3".parse::<IpAddr>().unwrap()
        );
        // Forwarded header
        let mut f = HeaderMap::new();
        f.insert(
            "forwarded",
            HeaderValue::from_static("for=\"[2001:db8::1]:4711\";proto=https, for=10.0.0.9"),
        );
        assert_eq!(
            client_ip(peer, &f, &nets(&["10.0.0.0/8"])),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // mapped v6 peer is canonical v4
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(mapped, &HeaderMap::new(), &[]),
            "127.0.0.1".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn query_and_cookie() {
        assert_eq!(
            query_param(Some("a=1&b=x%20y&c=p+q"), "b").as_deref(),
            Some("x y")
        );
        assert_eq!(query_param(Some("a=1&c=p+q"), "c").as_deref(), Some("p q"));
        assert_eq!(query_param(Some("a=1"), "z"), None);
        let mut h = HeaderMap::new();
        h.insert(
            "cookie",
            HeaderValue::from_static("a=1; session=abc; z=\"q\""),
        );
        assert_eq!(cookie(&h, "session"), Some("abc"));
        assert_eq!(cookie(&h, "z"), Some("q"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
