//! Cache keys. A key is `ROUTE US URL US METHOD US EXTRAS`, where `US` is the unit
//! separator (0x1f), `URL` is `host[:port]` + the normalized path + `?` + the query
//! with its parameters sorted, and `EXTRAS` holds the values of `key_headers` and,
//! with `per_consumer`, the consumer. A response that varies (`Vary`) is stored under
//! the key + RS (0x1e) + the values of the request headers it names.
//!
//! The layout lets the purge API find entries by route, URL or path prefix without an
//! index: [`parse`] splits a key back into its parts.

use http::{HeaderMap, HeaderName};

pub const US: char = '\u{1f}';
pub const RS: char = '\u{1e}';

/// The URL part of a key: lowercased host, path, and the query with its parameters
/// (`name=value` pairs, as sent) in sorted order; empty parameters are dropped.
pub fn url(host: &str, path: &str, query: Option<&str>) -> String {
    let mut out = String::with_capacity(host.len() + path.len() + query.map_or(0, str::len) + 1);
    for c in host.chars() {
        out.push(c.to_ascii_lowercase());
    }
    out.push_str(path);
    if let Some(q) = query {
        let mut pairs: Vec<&str> = q.split('&').filter(|p| !p.is_empty()).collect();
        if !pairs.is_empty() {
            pairs.sort_unstable();
            out.push('?');
            for (i, p) in pairs.iter().enumerate() {
                if i > 0 {
                    out.push('&');
                }
                out.push_str(p);
            }
        }
    }
    out
}

/// The primary key of a request.
pub fn primary(
    route: &str,
    url: &str,
    method: &str,
    key_headers: &[HeaderName],
    headers: &HeaderMap,
    consumer: Option<&str>,
) -> String {
    let mut k = String::with_capacity(route.len() + url.len() + method.len() + 8);
    k.push_str(route);
    k.push(US);
    k.push_str(url);
    k.push(US);
    k.push_str(method);
    k.push(US);
    for n in key_headers {
        push_header(&mut k, n, headers);
    }
    if let Some(c) = consumer {
        k.push('@');
        k.push_str(c);
    }
    k
}

/// The key of the variant of `primary` a request selects, given the response's `Vary`.
pub fn variant(primary: &str, vary: &[HeaderName], headers: &HeaderMap) -> String {
    let mut k = String::with_capacity(primary.len() + 32);
    k.push_str(primary);
    k.push(RS);
    for n in vary {
        push_header(&mut k, n, headers);
    }
    k
}

/// `name=v1, v2;` with the field's values joined; whitespace around values trimmed.
/// Control characters (which cannot separate key parts in a valid header value, but
/// could in an obsolete one) are replaced.
fn push_header(k: &mut String, n: &HeaderName, headers: &HeaderMap) {
    k.push_str(n.as_str());
    k.push('=');
    for (i, v) in headers.get_all(n).iter().enumerate() {
        if i > 0 {
            k.push_str(", ");
        }
        for c in String::from_utf8_lossy(v.as_bytes()).trim().chars() {
            k.push(if c.is_control() { '?' } else { c });
        }
    }
    k.push(';');
}

/// The parts of a key the purge API filters on.
pub struct Parts<'a> {
    pub route: &'a str,
    pub url: &'a str,
    /// The URL's path (without the query).
    pub path: &'a str,
}

pub fn parse(key: &str) -> Option<Parts<'_>> {
    let mut it = key.splitn(3, US);
    let route = it.next()?;
    let url = it.next()?;
    it.next()?;
    let at = url.find('/')?;
    let path = url[at..].split('?').next().unwrap_or("");
    Some(Parts { route, url, path })
}

/// The header names of a `Vary` field, lowercased and sorted; `None` for `Vary: *`
/// (never stored) or a name that is not a header name.
pub fn vary_names(h: &HeaderMap) -> Option<Vec<HeaderName>> {
    let mut out: Vec<HeaderName> = Vec::new();
    for v in h.get_all(http::header::VARY) {
        for n in v.to_str().ok()?.split(',') {
            let n = n.trim();
            if n.is_empty() {
                continue;
            }
            if n == "*" {
                return None;
            }
            out.push(HeaderName::from_bytes(n.as_bytes()).ok()?);
        }
    }
    out.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    out.dedup();
    Some(out)
}
