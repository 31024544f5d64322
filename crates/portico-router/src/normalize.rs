//! Request path normalization, applied before routing so that rules cannot be
//! bypassed with `/%61dmin/`, `/x/../admin/` or `//admin`.
//!
//! Steps: percent-decode unreserved characters (`A-Z a-z 0-9 - . _ ~`), upper-case the
//! hex of every other escape, remove dot segments (RFC 3986 §5.2.4), merge repeated
//! slashes. An encoded slash (`%2F`) stays encoded. Invalid escapes are an error.

use std::borrow::Cow;

/// Why a path could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathError {
    /// A `%` not followed by two hex digits.
    BadEscape,
    /// The path does not start with `/`.
    NotAbsolute,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Normalize a request path (without the query).
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    let clean = !raw.contains('%') && !raw.contains("//") && !raw.contains("/.");
    if clean {
        return Ok(Cow::Borrowed(raw));
    }
    // 1. escapes
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == b'%' {
            let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) else {
                return Err(PathError::BadEscape);
            };
            let v = h * 16 + l;
            if is_unreserved(v) {
                decoded.push(v as char);
            } else {
                decoded.push('%');
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(h)]));
                decoded.push(char::from(b"0123456789ABCDEF"[usize::from(l)]));
            }
            i += 3;
        } else {
            // `raw` is a &str, so multi-byte characters are copied whole below.
            let ch_len = utf8_len(b);
            decoded.push_str(&raw[i..i + ch_len]);
            i += ch_len;
        }
    }
    // 2. dot segments and repeated slashes
    let mut out: Vec<&str> = Vec::new();
    let trailing = decoded.ends_with('/') || decoded.ends_with("/.") || decoded.ends_with("/..");
    for seg in decoded.split('/').skip(1) {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if trailing || out.is_empty() {
        path.push('/');
    }
    Ok(Cow::Owned(path))
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xF0..=0xFF => 4,
        0xE0..=0xEF => 3,
        0xC0..=0xDF => 2,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize_path(s)
            .map(|c| c.into_owned())
            .unwrap_or_else(|e| format!("{e:?}"))
    }

    #[test]
    fn table() {
        let cases = [
            ("/", "/"),
            ("/users/42", "/users/42"),
            ("/%61dmin/", "/admin/"),
            ("/%61dmin", "/admin"),
            ("/x/../admin/", "/admin/"),
            ("/x/%2e%2e/admin", "/admin"),
            ("//admin//x", "/admin/x"),
            ("/a/./b/.", "/a/b/"),
            ("/a/b/..", "/a/"),
            ("/../..", "/"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2Fb", "/a%2Fb"),
            ("/caf%C3%A9", "/caf%C3%A9"),
            ("/café/..", "/"),
            ("/a%zz", "BadEscape"),
            ("/a%2", "BadEscape"),
            ("admin", "NotAbsolute"),
            ("/.well-known/x", "/.well-known/x"),
        ];
        for (input, want) in cases {
            assert_eq!(n(input), want, "normalizing {input}");
        }
    }
}
