//! The headers the gateway sets on every upstream request (`Host`, `X-Forwarded-*`,
//! `X-Request-Id`), kept beside the request instead of inserted into its header map:
//! the map of a parsed request has no spare room, and growing it costs more than the
//! rest of the header work. The HTTP/1.1 encoder writes these fields in place of the
//! client's; for HTTP/2, or before policies that edit the upstream request, they are
//! applied to the map ([`Overlay::apply`]).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What happens to one header.
#[derive(Clone, Debug, Default)]
pub enum Field {
    /// Whatever the request carries is sent.
    #[default]
    Keep,
    /// Sent with this value, replacing the request's.
    Set(HeaderValue),
    /// Not sent.
    Remove,
}

impl Field {
    pub(crate) fn overrides(&self) -> bool {
        !matches!(self, Field::Keep)
    }
}

/// The gateway's own upstream request headers.
#[derive(Clone, Debug, Default)]
pub struct Overlay {
    pub host: Field,
    pub forwarded_for: Field,
    pub forwarded_proto: Field,
    pub forwarded_host: Field,
    pub request_id: Field,
}

impl Overlay {
    fn fields(&self) -> [(&HeaderName, &Field); 5] {
        [
            (&header::HOST, &self.host),
            (&X_FORWARDED_FOR, &self.forwarded_for),
            (&X_FORWARDED_PROTO, &self.forwarded_proto),
            (&X_FORWARDED_HOST, &self.forwarded_host),
            (&X_REQUEST_ID, &self.request_id),
        ]
    }

    /// Whether the request's own `name` header is replaced or removed.
    pub fn overrides(&self, name: &HeaderName) -> bool {
        self.fields()
            .iter()
            .any(|(n, f)| f.overrides() && *n == name)
    }

    /// Move every field into `h`, leaving the overlay empty (all [`Field::Keep`]).
    pub fn apply(&mut self, h: &mut HeaderMap) {
        let fields = [
            (&header::HOST, std::mem::take(&mut self.host)),
            (&X_FORWARDED_FOR, std::mem::take(&mut self.forwarded_for)),
            (
                &X_FORWARDED_PROTO,
                std::mem::take(&mut self.forwarded_proto),
            ),
            (&X_FORWARDED_HOST, std::mem::take(&mut self.forwarded_host)),
            (&X_REQUEST_ID, std::mem::take(&mut self.request_id)),
        ];
        for (n, f) in fields {
            match f {
                Field::Keep => {}
                Field::Set(v) => {
                    h.insert(n, v);
                }
                Field::Remove => {
                    h.remove(n);
                }
            }
        }
    }

    /// Each set field as `name: value\r\n`.
    pub(crate) fn encode(&self, buf: &mut bytes::BytesMut) {
        for (n, f) in self.fields() {
            if let Field::Set(v) = f {
                buf.extend_from_slice(n.as_str().as_bytes());
                buf.extend_from_slice(b": ");
                buf.extend_from_slice(v.as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Bytes [`Overlay::encode`] writes, at most.
    pub(crate) fn encoded_len(&self) -> usize {
        self.fields()
            .iter()
            .map(|(n, f)| match f {
                Field::Set(v) => n.as_str().len() + v.len() + 4,
                _ => 0,
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apply_sets_removes_and_keeps() {
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_HOST, HeaderValue::from_static("client"));
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("from-client"));
        let mut o = Overlay {
            host: Field::Set(HeaderValue::from_static("target")),
            forwarded_host: Field::Remove,
            ..Overlay::default()
        };
        assert!(o.overrides(&header::HOST));
        assert!(o.overrides(&X_FORWARDED_HOST));
        assert!(!o.overrides(&X_REQUEST_ID));
        o.apply(&mut h);
        assert_eq!(
            h.get(header::HOST).map(|v| v.as_bytes()),
            Some(&b"target"[..])
        );
        assert!(h.get(&X_FORWARDED_HOST).is_none());
        assert_eq!(
            h.get(&X_REQUEST_ID).map(|v| v.as_bytes()),
            Some(&b"from-client"[..])
        );
        assert!(!o.overrides(&header::HOST), "applied: the overlay is empty");
    }
}
