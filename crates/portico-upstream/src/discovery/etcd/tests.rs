#![allow(clippy::unwrap_used)]

use super::*;

const HTTP: DiscoveredScheme = DiscoveredScheme::Http;

fn url(e: &Result<Endpoint, String>) -> (&str, u32) {
    let e = e.as_ref().unwrap();
    (e.url.as_str(), e.weight)
}

#[test]
fn values_are_host_port_urls_or_json() {
    assert_eq!(
        url(&parse_value(b"10.0.0.5:8080", HTTP, 1)),
        ("http://10.0.0.5:8080", 1)
    );
    assert_eq!(
        url(&parse_value(b"10.0.0.5:8080", DiscoveredScheme::Https, 2)),
        ("https://10.0.0.5:8080", 2)
    );
    assert_eq!(
        url(&parse_value(b" api.internal:81\n", HTTP, 1)),
        ("http://api.internal:81", 1)
    );
    assert_eq!(
        url(&parse_value(b"https://10.0.0.5", HTTP, 1)),
        ("https://10.0.0.5:443", 1)
    );
    assert_eq!(
        url(&parse_value(b"http://10.0.0.5:9000/", HTTP, 1)),
        ("http://10.0.0.5:9000", 1)
    );
    assert_eq!(
        url(&parse_value(b"[::1]:8080", HTTP, 1)),
        ("http://[::1]:8080", 1)
    );
    assert_eq!(
        url(&parse_value(b"http://[::1]:8080", HTTP, 1)),
        ("http://[::1]:8080", 1)
    );
    assert_eq!(
        url(&parse_value(
            br#"{"url": "http://10.0.0.5:8080", "weight": 3}"#,
            HTTP,
            1
        )),
        ("http://10.0.0.5:8080", 3)
    );
    assert_eq!(
        url(&parse_value(
            br#"{"url": "10.0.0.5:8080", "zone": "a"}"#,
            HTTP,
            4
        )),
        ("http://10.0.0.5:8080", 4)
    );
}

#[test]
fn bad_values_say_what_is_wrong() {
    for (v, says) in [
        (&b"10.0.0.5"[..], "no port"),
        (b"", "neither"),
        (b"ftp://10.0.0.5:21", "http"),
        (b"http://10.0.0.5:80/api", "no path"),
        (b"user@10.0.0.5:80", "neither"),
        (br#"{"weight": 2}"#, "url"),
        (br#"{"url": "10.0.0.5:80", "weight": -1}"#, "weight"),
        (b"\xff\xfe", "UTF-8"),
    ] {
        let e = parse_value(v, HTTP, 1).unwrap_err();
        assert!(e.contains(says), "{:?}: {e}", String::from_utf8_lossy(v));
    }
}

#[test]
fn range_end_is_the_prefix_plus_one() {
    assert_eq!(range_end(b"/services/users/"), b"/services/users0");
    assert_eq!(range_end(b"a\xff"), b"b");
    assert_eq!(range_end(b"\xff\xff"), vec![0]);
}

fn kv(key: &str, value: &str) -> Kv {
    Kv {
        key: B64.encode(key),
        value: B64.encode(value),
    }
}

fn events(json: serde_json::Value) -> Vec<Event> {
    serde_json::from_value(json).unwrap()
}

fn urls(t: &Targets) -> Vec<String> {
    t.endpoints().into_iter().map(|e| e.url).collect()
}

#[test]
fn watch_events_put_replace_and_delete() {
    let mut t = Targets::default();
    put(&mut t, &kv("/s/a", "10.0.0.1:80"), HTTP, 1).unwrap();
    put(&mut t, &kv("/s/b", "10.0.0.2:80"), HTTP, 1).unwrap();
    // As the gateway sends them: PUT is the default type and left out; empty values
    // are left out too.
    let evs = events(serde_json::json!([
        {"kv": {"key": B64.encode("/s/c"), "value": B64.encode("10.0.0.3:80"), "mod_revision": "7"}},
        {"type": "DELETE", "kv": {"key": B64.encode("/s/a"), "mod_revision": "8"}},
        {"type": "PUT", "kv": {"key": B64.encode("/s/b"), "value": B64.encode(r#"{"url":"10.0.0.2:81","weight":5}"#)}},
    ]));
    assert!(apply(&mut t, &evs, HTTP, 1).is_empty());
    assert_eq!(urls(&t), ["http://10.0.0.2:81", "http://10.0.0.3:80"]);
    assert_eq!(t.endpoints()[0].weight, 5);
}

#[test]
fn a_bad_value_drops_its_key_and_names_it() {
    let mut t = Targets::default();
    put(&mut t, &kv("/s/a", "10.0.0.1:80"), HTTP, 1).unwrap();
    let evs = events(serde_json::json!([
        {"kv": {"key": B64.encode("/s/a"), "value": B64.encode("not a target")}},
        {"kv": {"key": B64.encode("/s/b")}},
    ]));
    let bad = apply(&mut t, &evs, HTTP, 1);
    assert_eq!(bad.len(), 2);
    assert_eq!(bad[0].0, "/s/a");
    assert_eq!(bad[1].0, "/s/b");
    assert!(t.endpoints().is_empty());
}

#[test]
fn watch_messages_parse_as_the_gateway_sends_them() {
    let m: WatchMessage = serde_json::from_str(
        r#"{"result":{"header":{"cluster_id":"1","revision":"12"},"canceled":true,"compact_revision":"9"}}"#,
    )
    .unwrap();
    let r = m.result.unwrap();
    assert!(r.canceled);
    assert_eq!(r.compact_revision, 9);
    let l: RangeResponse =
        serde_json::from_str(r#"{"header":{"revision":"5"},"count":"0"}"#).unwrap();
    assert_eq!(l.header.unwrap().revision, 5);
    assert!(l.kvs.is_empty());
    let e: WatchMessage =
        serde_json::from_str(r#"{"error":{"grpc_code":14,"message":"x"}}"#).unwrap();
    assert!(e.result.is_none());
}
