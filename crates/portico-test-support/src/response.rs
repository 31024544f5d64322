//! One HTTP response as plain data, for assertions.
//!
//! [`RawResponse::parse`] reads an HTTP/1.1 response off the text a raw socket
//! returned (e.g. from [`raw_http`](crate::client::raw_http)); [`RawResponse::from_reqwest`]
//! turns a `reqwest` response into the same shape, so tests can treat both alike.

use serde_json::Value;

/// A response: status, headers and the (de-chunked) body text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// The status code.
    pub status: u16,
    /// The header fields in the order received, names lower-cased and values trimmed;
    /// a repeated header stays repeated.
    pub headers: Vec<(String, String)>,
    /// The body: de-chunked for `Transfer-Encoding: chunked`, cut to `Content-Length`
    /// when there is one, otherwise everything after the head.
    pub body: String,
}

impl RawResponse {
    /// Parses the first HTTP/1.1 response in `raw`: the status line, the header fields
    /// (a line without `:` is skipped), then the body, which is
    ///
    /// * de-chunked if the last transfer coding is `chunked` (chunk extensions and
    ///   trailers are ignored; a truncated chunk keeps what is there),
    /// * else cut to the first `Content-Length` (or shorter if `raw` is shorter),
    /// * else the rest of `raw` (a body delimited by the connection closing).
    ///
    /// Anything after the first response (e.g. a pipelined second one) is ignored.
    ///
    /// # Panics
    /// If `raw` holds no complete head (no empty line) or the status line has no
    /// numeric status code; the message quotes what was there.
    pub fn parse(raw: &str) -> RawResponse {
        let (head, rest) = raw
            .split_once("\r\n\r\n")
            .unwrap_or_else(|| panic!("no complete response head in {raw:?}"));
        let mut lines = head.split("\r\n");
        let status_line = lines.next().unwrap_or_default();
        let status: u16 = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?} in {raw:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut resp = RawResponse {
            status,
            headers,
            body: String::new(),
        };
        resp.body = if resp.is_chunked() {
            dechunk(rest)
        } else if let Some(n) = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            rest.get(..n).unwrap_or(rest).to_owned()
        } else {
            rest.to_owned()
        };
        resp
    }

    /// Reads a `reqwest` response to its end. Header values that are not visible ASCII
    /// become `""`; values of a repeated header come together, in the order `reqwest`
    /// keeps them.
    ///
    /// # Panics
    /// If reading the body fails.
    pub async fn from_reqwest(resp: reqwest::Response) -> RawResponse {
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let body = resp
            .text()
            .await
            .unwrap_or_else(|e| panic!("reading the body of a {status} response: {e}"));
        RawResponse {
            status,
            headers,
            body,
        }
    }

    /// The first value of header `name` (lower-case), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Every value of header `name` (lower-case), in order; empty if there is none.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    /// The body parsed as JSON, or the body text as a JSON string if it is not JSON
    /// (so assertions on an unexpected body still show it).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|_| Value::String(self.body.clone()))
    }

    /// Whether the last transfer coding (over all `Transfer-Encoding` fields) is `chunked`.
    fn is_chunked(&self) -> bool {
        self.header_all("transfer-encoding")
            .last()
            .and_then(|v| v.rsplit(',').next())
            .is_some_and(|c| c.trim().eq_ignore_ascii_case("chunked"))
    }
}

/// Decodes a chunked body; stops at the last chunk or where the input ends.
fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size_line, rest)) = s.split_once("\r\n") {
        let size = size_line.split(';').next().unwrap_or_default().trim();
        let n = usize::from_str_radix(size, 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(rest.get(..n).unwrap_or(rest));
        s = rest.get(n + 2..).unwrap_or("");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunked_body_is_dechunked() {
        let r = RawResponse::parse(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n\
             5\r\n{\"a\":\r\na;ext=1\r\n[1, 2, 3]}\r\n0\r\nX-Trailer: t\r\n\r\n",
        );
        assert_eq!(r.status, 200);
        assert_eq!(r.body, "{\"a\":[1, 2, 3]}");
        assert_eq!(r.json(), serde_json::json!({"a": [1, 2, 3]}));
        assert_eq!(r.header("content-type"), Some("application/json"));
        assert_eq!(r.header("x-trailer"), None);
    }

    #[test]
    fn chunked_only_when_it_is_the_last_coding() {
        let r = RawResponse::parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: Chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        assert_eq!(r.body, "abc");
        let r = RawResponse::parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        assert_eq!(r.body, "3\r\nabc\r\n0\r\n\r\n");
    }

    #[test]
    fn content_length_cuts_the_body() {
        let r = RawResponse::parse(
            "HTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nhello\
             HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        );
        assert_eq!(r.status, 404);
        assert_eq!(r.body, "hello");
        assert_eq!(r.json(), Value::String("hello".into()));
        // A body cut short by the connection is kept as it is.
        let r = RawResponse::parse("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc");
        assert_eq!(r.body, "abc");
    }

    #[test]
    fn body_until_close_without_length() {
        let r = RawResponse::parse("HTTP/1.0 500 Oops\r\nConnection: close\r\n\r\n{\"x\": 1}");
        assert_eq!(r.status, 500);
        assert_eq!(r.json()["x"], 1);
        let r = RawResponse::parse("HTTP/1.1 204 No Content\r\n\r\n");
        assert_eq!(r.body, "");
        assert_eq!(r.json(), Value::String(String::new()));
    }

    #[test]
    fn repeated_headers_are_kept_in_order_with_lower_case_names() {
        let r = RawResponse::parse(
            "HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nX-Other:  v \r\nset-cookie: b=2\r\n\
             SET-COOKIE:c=3\r\nno colon here\r\nContent-Length: 0\r\n\r\n",
        );
        assert_eq!(r.header("set-cookie"), Some("a=1"));
        assert_eq!(r.header_all("set-cookie"), ["a=1", "b=2", "c=3"]);
        assert_eq!(r.header("x-other"), Some("v"));
        assert_eq!(r.header("missing"), None);
        assert!(r.header_all("missing").is_empty());
        let names: Vec<&str> = r.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            [
                "set-cookie",
                "x-other",
                "set-cookie",
                "set-cookie",
                "content-length"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "no complete response head")]
    fn an_incomplete_head_panics() {
        RawResponse::parse("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n");
    }

    #[test]
    #[should_panic(expected = "bad status line")]
    fn a_bad_status_line_panics() {
        RawResponse::parse("garbage\r\n\r\n");
    }
}
