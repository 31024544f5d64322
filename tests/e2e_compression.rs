//! End-to-end compression: the real `portico` binary compressing real upstream
//! answers with gzip, brotli and zstd as clients ask (docs/traffic.md, "compression").

#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use portico_test_support::upstream::{handler, BoxBody};
use portico_test_support::{http_client, LocalGateway, Upstream};

const BIN: &str = env!("CARGO_BIN_EXE_portico");

fn json_doc() -> String {
    let items: Vec<String> = (0..400)
        .map(|i| format!("{{\"id\": {i}, \"name\": \"item number {i}\"}}"))
        .collect();
    format!("{{\"items\": [{}]}}", items.join(", "))
}

/// `/json` a 20 KB JSON document with a strong ETag, `/small` a tiny one, `/png` bytes
/// typed image/png, `/gz` an already gzip-encoded answer, `/stream` text in two chunks
/// with the second held until the test releases it.
async fn upstream(release: Arc<tokio::sync::Notify>) -> Upstream {
    Upstream::start_with(
        "u",
        handler(move |req| {
            let release = release.clone();
            async move {
                let path = req.uri().path().to_string();
                let resp = http::Response::builder();
                let full = |b: Vec<u8>| -> BoxBody {
                    http_body_util::Full::new(Bytes::from(b))
                        .map_err(|e| match e {})
                        .boxed()
                };
                match path.as_str() {
                    "/json" => resp
                        .header("content-type", "application/json")
                        .header("etag", "\"v1\"")
                        .body(full(json_doc().into_bytes())),
                    "/small" => resp
                        .header("content-type", "application/json")
                        .body(full(b"{\"ok\": true}".to_vec())),
                    "/png" => resp
                        .header("content-type", "image/png")
                        .body(full(vec![7u8; 20_000])),
                    "/gz" => resp
                        .header("content-type", "text/plain")
                        .header("content-encoding", "gzip")
                        .body(full(gzip(b"already compressed"))),
                    _ => {
                        let chunks = futures_util::stream::unfold(0, move |n| {
                            let release = release.clone();
                            async move {
                                match n {
                                    0 => Some((
                                        Ok::<_, portico_test_support::upstream::BoxError>(
                                            Frame::data(Bytes::from("first chunk ".repeat(200))),
                                        ),
                                        1,
                                    )),
                                    1 => {
                                        release.notified().await;
                                        Some((Ok(Frame::data(Bytes::from("second chunk"))), 2))
                                    }
                                    _ => None,
                                }
                            }
                        });
                        resp.header("content-type", "text/plain")
                            .body(StreamBody::new(chunks).boxed())
                    }
                }
                .unwrap()
            }
        }),
    )
    .await
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).unwrap();
    e.finish().unwrap()
}

fn decode(encoding: &str, b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    match encoding {
        "gzip" => {
            flate2::read::GzDecoder::new(b)
                .read_to_end(&mut out)
                .unwrap();
        }
        "br" => {
            brotli::Decompressor::new(b, 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        "zstd" => out = zstd::stream::decode_all(b).unwrap(),
        other => panic!("unexpected encoding {other}"),
    }
    out
}

async fn start(up: &Upstream, settings: &str) -> LocalGateway {
    LocalGateway::start(
        Path::new(BIN),
        &format!(
            "upstreams:\n  u:\n    targets: [{{url: \"{}\"}}]\nroutes:\n  - name: r\n    paths: [\"/*\"]\n    upstream: u\n    plugins:\n      compression: {settings}\n",
            up.url()
        ),
    )
    .await
}

async fn fetch(
    env: &LocalGateway,
    path: &str,
    accept: Option<&str>,
) -> (StatusCode, http::HeaderMap, Bytes) {
    let mut req = http_client().get(format!("http://{}{path}", env.addr));
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    let r = req.send().await.unwrap();
    (r.status(), r.headers().clone(), r.bytes().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn each_encoding_is_negotiated_and_decodes_to_the_original() {
    let up = upstream(Arc::new(tokio::sync::Notify::new())).await;
    let env = start(&up, "{}").await;
    for (accept, want) in [
        ("gzip", "gzip"),
        ("br", "br"),
        ("zstd", "zstd"),
        ("gzip, deflate, br, zstd", "br"),
        ("gzip;q=1.0, br;q=0.5", "gzip"),
        ("*", "br"),
    ] {
        let (status, h, body) = fetch(&env, "/json", Some(accept)).await;
        assert_eq!(status, 200);
        assert_eq!(h["content-encoding"], want, "{accept}");
        assert!(h.get("content-length").is_none() || h["content-length"] != "20000");
        assert_eq!(h["vary"], "accept-encoding");
        assert_eq!(h["etag"], "W/\"v1\"", "a strong ETag becomes weak");
        assert!(
            body.len() < json_doc().len() / 3,
            "{accept}: {} bytes",
            body.len()
        );
        assert_eq!(decode(want, &body), json_doc().into_bytes(), "{accept}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn what_is_not_compressed() {
    let up = upstream(Arc::new(tokio::sync::Notify::new())).await;
    let env = start(&up, "{min_size: 1KiB, algorithms: [gzip]}").await;
    // The client does not ask (the answer still varies by Accept-Encoding).
    let (_, h, body) = fetch(&env, "/json", None).await;
    assert!(h.get("content-encoding").is_none());
    assert_eq!(h["vary"], "accept-encoding");
    assert_eq!(body, json_doc().into_bytes());
    // Only encodings we do not offer.
    let (_, h, _) = fetch(&env, "/json", Some("br, zstd")).await;
    assert!(h.get("content-encoding").is_none());
    // Below min_size.
    let (_, h, body) = fetch(&env, "/small", Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
    assert_eq!(&body[..], b"{\"ok\": true}");
    // A type not in the list.
    let (_, h, body) = fetch(&env, "/png", Some("gzip")).await;
    assert!(h.get("content-encoding").is_none());
    assert_eq!(body.len(), 20_000);
    // Already encoded: passed as it is, not compressed twice.
    let (_, h, body) = fetch(&env, "/gz", Some("gzip")).await;
    assert_eq!(h["content-encoding"], "gzip");
    assert_eq!(decode("gzip", &body), b"already compressed");
    // HEAD.
    let r = http_client()
        .head(format!("http://{}/json", env.addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("content-encoding").is_none());
    // The gateway's own answers are compressed too when large enough; this one is not.
    let bad = LocalGateway::start(
        Path::new(BIN),
        "routes:\n  - name: r\n    paths: [\"/*\"]\n    plugins:\n      compression: {min_size: 10}\n      echo: {}\n",
    )
    .await;
    let (_, h, body) = fetch(&bad, "/x", Some("gzip")).await;
    assert_eq!(h["content-encoding"], "gzip", "{h:?}");
    let v: serde_json::Value = serde_json::from_slice(&decode("gzip", &body)).unwrap();
    assert_eq!(v["path"], "/x");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_answer_is_compressed_as_it_streams() {
    let release = Arc::new(tokio::sync::Notify::new());
    let up = upstream(release.clone()).await;
    let env = start(&up, "{algorithms: [gzip]}").await;
    let r = http_client()
        .get(format!("http://{}/stream", env.addr))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-encoding"], "gzip");
    let mut stream = r.bytes_stream();
    use futures_util::StreamExt;
    // The first chunk arrives while the upstream still holds the second.
    let first = tokio::time::timeout(std::time::Duration::from_secs(10), stream.next())
        .await
        .expect("the first compressed chunk must arrive before the upstream finishes")
        .unwrap()
        .unwrap();
    assert!(!first.is_empty());
    release.notify_one();
    let mut all = first.to_vec();
    while let Some(c) = stream.next().await {
        all.extend_from_slice(&c.unwrap());
    }
    let plain = String::from_utf8(decode("gzip", &all)).unwrap();
    assert!(plain.starts_with("first chunk first chunk"));
    assert!(plain.ends_with("second chunk"));
}

#[test]
fn bad_compression_settings_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.yaml");
    std::fs::write(
        &path,
        "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      compression: {algorithms: [], content_types: [json]}\n",
    )
    .unwrap();
    let out = std::process::Command::new(BIN)
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("compression.algorithms: give at least one of gzip, br, zstd"),
        "{err}"
    );
    assert!(
        err.contains("compression.content_types[0]: `json` is not a media type"),
        "{err}"
    );
}
