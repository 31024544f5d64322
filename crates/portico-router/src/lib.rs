//! Portico's router.
//!
//! Owns: request path normalization and the compiled route table (host map, a segment
//! trie for exact/`{param}`/prefix paths, a `RegexSet` for regex paths, method and
//! header predicates) with a deterministic precedence.
//!
//! Does not own: what happens after a match (the proxy pipeline) or configuration
//! parsing (`portico-config` provides validated [`PathPattern`]s).
#![forbid(unsafe_code)]

mod normalize;
mod table;

pub use normalize::{normalize_path, PathError};
pub use portico_config::pattern::PathPattern;
pub use table::{Match, Params, RouteSpec, Router};

/// Lower-case a `Host` value and drop its port and trailing dot.
pub fn normalize_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let no_port = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |i| &raw[..=i])
    } else {
        raw.rsplit_once(':').map_or(raw, |(h, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                h
            } else {
                raw
            }
        })
    };
    let h = no_port.strip_suffix('.').unwrap_or(no_port);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(h.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(h)
    }
}

#[cfg(test)]
mod tests;
