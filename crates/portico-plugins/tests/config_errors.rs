//! The configuration loader's diagnostics, class by class: for each kind of mistake,
//! the message, the key path, the line and column it points at, and the hint.
//!
//! These run the real loader (`portico_config::load_str`) with the real policy
//! catalogue, so policy settings are checked exactly as `portico validate` does.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use portico_config::{load_str, Diagnostic};
use portico_plugins::Catalog;

/// Every problem the loader reports for `yaml` (empty when it is valid).
fn problems(yaml: &str) -> Vec<Diagnostic> {
    match load_str(
        yaml,
        Some(Path::new("test.yaml")),
        PathBuf::from("."),
        &Catalog,
    ) {
        Ok(_) => Vec::new(),
        Err(d) => d.0,
    }
}

fn render(ds: &[Diagnostic]) -> String {
    ds.iter()
        .map(|d| format!("  {d}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// One expected problem.
struct Case {
    /// What the case is about.
    what: &'static str,
    yaml: &'static str,
    /// Key path, as printed (`routes[0].upstream`).
    path: &'static str,
    /// 1-based line and column the problem points at.
    line: usize,
    col: usize,
    /// A part of the message.
    message: &'static str,
    /// The exact hint, if any (e.g. "did you mean `methods`?").
    hint: Option<&'static str>,
}

fn check(cases: &[Case]) {
    let mut failures = Vec::new();
    for c in cases {
        let ds = problems(c.yaml);
        let Some(d) = ds.iter().find(|d| d.path.to_string() == c.path) else {
            failures.push(format!(
                "{}: no problem at `{}`; got:\n{}",
                c.what,
                c.path,
                render(&ds)
            ));
            continue;
        };
        let mut wrong = Vec::new();
        if d.file.as_deref() != Some("test.yaml") {
            wrong.push(format!("file {:?}", d.file));
        }
        match d.pos {
            Some(p) if (p.line, p.col) == (c.line, c.col) => {}
            other => wrong.push(format!("position {other:?}, expected {}:{}", c.line, c.col)),
        }
        if !d.message.contains(c.message) {
            wrong.push(format!(
                "message {:?} does not contain {:?}",
                d.message, c.message
            ));
        }
        if d.hint.as_deref() != c.hint {
            wrong.push(format!("hint {:?}, expected {:?}", d.hint, c.hint));
        }
        if !wrong.is_empty() {
            failures.push(format!("{}: {}\n  ({d})", c.what, wrong.join("; ")));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn unknown_keys_at_every_depth() {
    check(&[
        Case {
            what: "top level",
            yaml: "listn: [\"127.0.0.1:8080\"]\n",
            path: "listn",
            line: 1,
            col: 1,
            message: "unknown key `listn`",
            hint: Some("did you mean `listen`?"),
        },
        Case {
            what: "in a route",
            yaml: "upstreams:\n  users:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\nroutes:\n  - name: r\n    paths: [\"/users\"]\n    methdos: [GET]\n    upstream: users\n",
            path: "routes[0].methdos",
            line: 7,
            col: 5,
            message: "unknown key `methdos`",
            hint: Some("did you mean `methods`?"),
        },
        Case {
            what: "in an upstream's timeouts (flow mapping)",
            yaml: "upstreams:\n  users:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n    timeouts: {conect: 2s}\n",
            path: "upstreams.users.timeouts.conect",
            line: 4,
            col: 16,
            message: "unknown key `conect`",
            hint: Some("did you mean `connect`?"),
        },
        Case {
            what: "four levels down",
            yaml: "upstreams:\n  users:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n    health:\n      passive:\n        consecutive_failure: 5\n",
            path: "upstreams.users.health.passive.consecutive_failure",
            line: 6,
            col: 9,
            message: "unknown key `consecutive_failure`",
            hint: Some("did you mean `consecutive_failures`?"),
        },
        Case {
            what: "in a target",
            yaml: "upstreams:\n  users:\n    targets:\n      - {url: \"http://127.0.0.1:9001\", wieght: 2}\n",
            path: "upstreams.users.targets[0].wieght",
            line: 4,
            col: 40,
            message: "unknown key `wieght`",
            hint: Some("did you mean `weight`?"),
        },
        Case {
            what: "in a policy's settings",
            yaml: "plugins:\n  request-size-limit:\n    max_bdy: 1MiB\n",
            path: "plugins.request-size-limit.max_bdy",
            line: 3,
            col: 5,
            message: "unknown key `max_bdy`",
            hint: Some("did you mean `max_body`?"),
        },
        Case {
            what: "nested in a policy's settings, on a route",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      response-transformer:\n        headers:\n          ad: {x-a: b}\n",
            path: "routes[0].plugins.response-transformer.headers.ad",
            line: 8,
            col: 11,
            message: "unknown key `ad`",
            hint: Some("did you mean `add`?"),
        },
        Case {
            what: "unknown policy",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      teleport: {}\n",
            path: "routes[0].plugins.teleport",
            line: 6,
            col: 7,
            message: "unknown policy `teleport`",
            hint: None,
        },
        Case {
            what: "misspelt global policy",
            yaml: "plugins:\n  request-transfomer: {}\n",
            path: "plugins.request-transfomer",
            line: 2,
            col: 3,
            message: "unknown policy `request-transfomer`",
            hint: Some("did you mean `request-transformer`?"),
        },
        Case {
            what: "a request key outside the grammar",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://a\"}]\n    balance: consistent_hash\n    hash_key: \"headr:x-user\"\n",
            path: "upstreams.u.hash_key",
            line: 5,
            col: 15,
            message: "`headr:x-user` is not a key; use ip, consumer, route, path, header:NAME",
            hint: None,
        },
    ]);
}

#[test]
fn types_and_required_keys() {
    check(&[
        Case {
            what: "a word where a number goes",
            yaml: "workers: many\n",
            path: "workers",
            line: 1,
            col: 10,
            message: "expected an integer, found `many`",
            hint: None,
        },
        Case {
            what: "a string where a list goes",
            yaml: "routes:\n  - name: r\n    paths: \"/\"\n    plugins: {echo: {}}\n",
            path: "routes[0].paths",
            line: 3,
            col: 12,
            message: "expected a list, found `/`",
            hint: None,
        },
        Case {
            what: "yes is not a boolean (YAML 1.2)",
            yaml: "access_log:\n  enabled: yes\n",
            path: "access_log.enabled",
            line: 2,
            col: 12,
            message: "expected `true` or `false`, found `yes`",
            hint: None,
        },
        Case {
            what: "a list where a header value goes",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    headers: {x-v: [1, 2]}\n    plugins: {echo: {}}\n",
            path: "routes[0].headers.x-v",
            line: 4,
            col: 20,
            message: "expected a string, number or boolean, found a list",
            hint: None,
        },
        Case {
            what: "negative weight",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\", weight: -1}]\n",
            path: "upstreams.u.targets[0].weight",
            line: 3,
            col: 51,
            message: "`-1` is too small: the minimum is 0",
            hint: None,
        },
        Case {
            what: "route without paths",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\"}]\nroutes:\n  - name: r\n    upstream: u\n",
            path: "routes[0]",
            line: 5,
            col: 5,
            message: "missing required key `paths`",
            hint: None,
        },
        Case {
            what: "upstream without targets",
            yaml: "upstreams:\n  u:\n    balance: weighted\n",
            path: "upstreams.u.targets",
            line: 3,
            col: 5,
            message: "an upstream needs at least one target (or a `discovery` source)",
            hint: None,
        },
        Case {
            what: "policy without its required setting",
            yaml: "plugins:\n  request-size-limit: {}\n",
            path: "plugins.request-size-limit",
            line: 2,
            col: 23,
            message: "missing required key `max_body`",
            hint: None,
        },
        Case {
            what: "certificate without key",
            yaml: "tls:\n  listen: [\"127.0.0.1:8443\"]\n  certificates:\n    - cert: a.pem\n",
            path: "tls.certificates[0]",
            line: 4,
            col: 7,
            message: "missing required key `key`",
            hint: None,
        },
    ]);
}

#[test]
fn enumerations() {
    check(&[
        Case {
            what: "protocol h3",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    protocol: h3\n",
            path: "upstreams.u.protocol",
            line: 4,
            col: 15,
            message: "`h3` is not one of `auto`, `http1`, `h2`, `h2c`",
            hint: Some("did you mean `h2`?"),
        },
        Case {
            what: "balance typo",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    balance: weigthed\n",
            path: "upstreams.u.balance",
            line: 4,
            col: 14,
            message: "`weigthed` is not one of `weighted`, `round_robin`",
            hint: Some("did you mean `weighted`?"),
        },
        Case {
            what: "unquoted TLS version",
            yaml: "tls:\n  listen: [\"127.0.0.1:8443\"]\n  certificates: [{cert: a.pem, key: a.key}]\n  min_version: 1.3\n",
            path: "tls.min_version",
            line: 4,
            col: 16,
            message: "`1.3` is not one of `1.2`, `1.3`",
            hint: Some("quote it: `\"1.3\"`"),
        },
    ]);
}

#[test]
fn durations_and_sizes() {
    check(&[
        Case {
            what: "unknown unit",
            yaml: "upstreams:\n  u:\n    targets: [{url: \"http://127.0.0.1:1\"}]\n    timeouts: {connect: 2x}\n",
            path: "upstreams.u.timeouts.connect",
            line: 4,
            col: 25,
            message: "`2x` is not a duration; write a number with a unit: ms, s, m, h or d",
            hint: None,
        },
        Case {
            what: "a bare number",
            yaml: "shutdown:\n  grace: 30\n",
            path: "shutdown.grace",
            line: 2,
            col: 10,
            message: "expected a duration such as `2s` or `1m30s`, found `30`",
            hint: None,
        },
        Case {
            what: "route timeout with a space",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    timeouts: {request: 5 s}\n    plugins: {echo: {}}\n",
            path: "routes[0].timeouts.request",
            line: 4,
            col: 25,
            message: "`5 s` is not a duration",
            hint: None,
        },
        Case {
            what: "unknown size unit",
            yaml: "limits:\n  max_header_bytes: 10XB\n",
            path: "limits.max_header_bytes",
            line: 2,
            col: 21,
            message: "`10XB` is not a size; write bytes as a number or with a unit",
            hint: None,
        },
        Case {
            what: "size as a word, in a policy",
            yaml: "plugins:\n  request-size-limit: {max_body: ten}\n",
            path: "plugins.request-size-limit.max_body",
            line: 2,
            col: 34,
            message: "`ten` is not a size",
            hint: None,
        },
    ]);
}

#[test]
fn templates_in_policies() {
    check(&[
        Case {
            what: "unknown namespace",
            yaml: "plugins:\n  request-transformer:\n    headers:\n      add:\n        x-a: \"${nope}\"\n",
            path: "plugins.request-transformer.headers.add.x-a",
            line: 5,
            col: 14,
            message: "unknown template variable `${nope}`; use param.NAME, header.NAME",
            hint: None,
        },
        Case {
            what: "namespace without a name",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      response-transformer:\n        headers: {set: {x-b: \"id=${param.}\"}}\n",
            path: "routes[0].plugins.response-transformer.headers.set.x-b",
            line: 7,
            col: 30,
            message: "`${param.}` needs a name after `param.`",
            hint: None,
        },
        Case {
            what: "unclosed substitution",
            yaml: "plugins:\n  request-transformer:\n    headers:\n      append: {x-c: \"${client_ip\"}\n",
            path: "plugins.request-transformer.headers.append.x-c",
            line: 4,
            col: 21,
            message: "unclosed `${`",
            hint: None,
        },
        Case {
            what: "bad header name in a policy",
            yaml: "plugins:\n  request-transformer:\n    headers:\n      remove: [\"bad header\"]\n",
            path: "plugins.request-transformer.headers.remove[0]",
            line: 4,
            col: 16,
            message: "`bad header` is not a valid header name",
            hint: None,
        },
        Case {
            what: "echo status below 200",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {status: 99}\n",
            path: "routes[0].plugins.echo.status",
            line: 5,
            col: 22,
            message: "99 is not a valid final status",
            hint: None,
        },
    ]);
}

#[test]
fn request_hygiene_policies() {
    check(&[
        Case {
            what: "ip-restriction: a bad CIDR",
            yaml: "plugins:\n  ip-restriction:\n    allow: [\"10.0.0.0/8\", \"10.0.0.0/33\"]\n",
            path: "plugins.ip-restriction.allow[1]",
            line: 3,
            col: 27,
            message: "`10.0.0.0/33` is not an IP address or CIDR range",
            hint: None,
        },
        Case {
            what: "ip-restriction: a host name in deny, on a route",
            yaml: "routes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      ip-restriction:\n        deny:\n          - 192.0.2.0/24\n          - db.internal\n",
            path: "routes[0].plugins.ip-restriction.deny[1]",
            line: 9,
            col: 13,
            message: "`db.internal` is not an IP address or CIDR range",
            hint: None,
        },
        Case {
            what: "ip-restriction: neither allow nor deny",
            yaml: "plugins:\n  ip-restriction: {}\n",
            path: "plugins.ip-restriction",
            line: 2,
            col: 19,
            message: "set `allow`, `deny` or both",
            hint: None,
        },
        Case {
            what: "ip-restriction: only a message",
            yaml: "plugins:\n  ip-restriction:\n    message: go away\n",
            path: "plugins.ip-restriction",
            line: 3,
            col: 5,
            message: "set `allow`, `deny` or both",
            hint: None,
        },
        Case {
            what: "ip-restriction: unknown key",
            yaml: "plugins:\n  ip-restriction: {allow: [127.0.0.1], dney: [10.0.0.0/8]}\n",
            path: "plugins.ip-restriction.dney",
            line: 2,
            col: 40,
            message: "unknown key `dney`",
            hint: Some("did you mean `deny`?"),
        },
        Case {
            what: "cors: an origin with a path",
            yaml: "plugins:\n  cors:\n    origins: [\"https://app.example.com/\"]\n",
            path: "plugins.cors.origins[0]",
            line: 3,
            col: 15,
            message: "an origin has no path",
            hint: None,
        },
        Case {
            what: "cors: a wildcard not leading",
            yaml: "plugins:\n  cors:\n    origins:\n      - https://app.example.com\n      - https://api.*.example.com\n",
            path: "plugins.cors.origins[1]",
            line: 5,
            col: 9,
            message: "a wildcard is only allowed as a leading `*.` label",
            hint: None,
        },
        Case {
            what: "cors: no origins",
            yaml: "plugins:\n  cors: {credentials: true}\n",
            path: "plugins.cors",
            line: 2,
            col: 9,
            message: "missing required key `origins`",
            hint: None,
        },
        Case {
            what: "cors: unknown key",
            yaml: "plugins:\n  cors:\n    origins: [\"*\"]\n    credential: true\n",
            path: "plugins.cors.credential",
            line: 4,
            col: 5,
            message: "unknown key `credential`",
            hint: Some("did you mean `credentials`?"),
        },
        Case {
            what: "cors: max_age without a unit",
            yaml: "plugins:\n  cors: {origins: [\"*\"], max_age: 600}\n",
            path: "plugins.cors.max_age",
            line: 2,
            col: 35,
            message: "expected a duration such as `2s` or `1m30s`, found `600`",
            hint: None,
        },
        Case {
            what: "cors: a lower-case method",
            yaml: "plugins:\n  cors: {origins: [\"*\"], methods: [GET, post]}\n",
            path: "plugins.cors.methods[1]",
            line: 2,
            col: 41,
            message: "methods are upper-case: write `POST`",
            hint: None,
        },
    ]);
}

/// Prefixes a document with an `upstreams:` section of three lines (so the text given
/// starts on line 4).
macro_rules! with_up {
    ($s:literal) => {
        concat!(
            "upstreams:\n  users:\n    targets: [{url: \"http://127.0.0.1:9001\"}]\n",
            $s
        )
    };
}

#[test]
fn routes() {
    check(&[
        Case {
            what: "rewrite uses a capture no path defines",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/users/{id}\"]\n    upstream: users\n    rewrite: \"/v2/users/{uid}\"\n"),
            path: "routes[0].rewrite",
            line: 8,
            col: 14,
            message: "`{uid}` is not captured by any of this route's paths",
            hint: Some("did you mean `id`?"),
        },
        Case {
            what: "rewrite with an unknown template",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/users/{id}\"]\n    upstream: users\n    rewrite: \"/v2/${user}\"\n"),
            path: "routes[0].rewrite",
            line: 8,
            col: 14,
            message: "unknown template variable `${user}`",
            hint: None,
        },
        Case {
            what: "host with a port",
            yaml: with_up!("routes:\n  - name: r\n    hosts: [\"api.example.com:8080\"]\n    paths: [\"/\"]\n    upstream: users\n"),
            path: "routes[0].hosts[0]",
            line: 6,
            col: 13,
            message: "hosts are matched without a port; remove `:PORT`",
            hint: None,
        },
        Case {
            what: "wildcard not leading",
            yaml: with_up!("routes:\n  - name: r\n    hosts: [\"api.*.com\"]\n    paths: [\"/\"]\n    upstream: users\n"),
            path: "routes[0].hosts[0]",
            line: 6,
            col: 13,
            message: "a wildcard is only allowed as a leading `*.` label",
            hint: None,
        },
        Case {
            what: "lower-case method",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/\"]\n    methods: [GET, get]\n    upstream: users\n"),
            path: "routes[0].methods[1]",
            line: 7,
            col: 20,
            message: "methods are upper-case: write `GET`",
            hint: None,
        },
        Case {
            what: "not a method token",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/\"]\n    methods: [\"G ET\"]\n    upstream: users\n"),
            path: "routes[0].methods[0]",
            line: 7,
            col: 15,
            message: "`G ET` is not an HTTP method",
            hint: Some("did you mean `GET`?"),
        },
        Case {
            what: "undefined upstream",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/\"]\n    upstream: userz\n"),
            path: "routes[0].upstream",
            line: 7,
            col: 15,
            message: "upstream `userz` is not defined in `upstreams`",
            hint: Some("did you mean `users`?"),
        },
        Case {
            what: "no upstream and no answering policy",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/\"]\n"),
            path: "routes[0]",
            line: 5,
            col: 5,
            message: "a route needs an `upstream`",
            hint: None,
        },
        Case {
            what: "duplicate route name",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/a\"]\n    upstream: users\n  - name: r\n    paths: [\"/b\"]\n    upstream: users\n"),
            path: "routes[1].name",
            line: 8,
            col: 11,
            message: "route name `r` is used twice",
            hint: None,
        },
        Case {
            what: "path without a leading slash",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"users\"]\n    upstream: users\n"),
            path: "routes[0].paths[0]",
            line: 6,
            col: 13,
            message: "must start with `/`",
            hint: None,
        },
        Case {
            what: "star in the middle",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/a\", \"/a/*/b\"]\n    upstream: users\n"),
            path: "routes[0].paths[1]",
            line: 6,
            col: 19,
            message: "`*` is only allowed as a final `/*` segment",
            hint: None,
        },
        Case {
            what: "capture not a whole segment",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/u/x{id}\"]\n    upstream: users\n"),
            path: "routes[0].paths[0]",
            line: 6,
            col: 13,
            message: "a capture must be a whole segment",
            hint: None,
        },
        Case {
            what: "bad regular expression",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"~^/v[0-9+/\"]\n    upstream: users\n"),
            path: "routes[0].paths[0]",
            line: 6,
            col: 13,
            message: "invalid regular expression",
            hint: None,
        },
        Case {
            what: "bad header name to match",
            yaml: with_up!("routes:\n  - name: r\n    paths: [\"/\"]\n    headers: {\"x bad\": \"1\"}\n    upstream: users\n"),
            path: "routes[0].headers[\"x bad\"]",
            line: 7,
            col: 24,
            message: "`x bad` is not a valid header name",
            hint: None,
        },
    ]);
}

#[test]
fn listeners_proxies_and_upstreams() {
    check(&[
        Case {
            what: "listen address with a bad port",
            yaml: "listen: [\"127.0.0.1:8080\", \"127.0.0.1:80800\"]\n",
            path: "listen[1]",
            line: 1,
            col: 28,
            message: "`127.0.0.1:80800` is not an address; write IP:PORT",
            hint: None,
        },
        Case {
            what: "listen with a host name",
            yaml: "admin:\n  listen: \"localhost:9080\"\n",
            path: "admin.listen",
            line: 2,
            col: 11,
            message: "`localhost:9080` is not an address",
            hint: None,
        },
        Case {
            what: "trusted proxy CIDR with a bad prefix",
            yaml: "trusted_proxies:\n  - 10.0.0.0/8\n  - 10.0.0.0/33\n",
            path: "trusted_proxies[1]",
            line: 3,
            col: 5,
            message: "`10.0.0.0/33` is not an IP address or CIDR range",
            hint: None,
        },
        Case {
            what: "target URL with a path",
            yaml: "upstreams:\n  u:\n    targets:\n      - url: \"http://127.0.0.1:9001/api\"\n",
            path: "upstreams.u.targets[0].url",
            line: 4,
            col: 14,
            message: "a target URL has no path; use `rewrite` on the route",
            hint: None,
        },
        Case {
            what: "target URL without a scheme",
            yaml: "upstreams:\n  u:\n    targets:\n      - url: \"127.0.0.1:9001\"\n",
            path: "upstreams.u.targets[0].url",
            line: 4,
            col: 14,
            message: "a target URL starts with `http://` or `https://`",
            hint: None,
        },
        Case {
            what: "all weights zero",
            yaml: "upstreams:\n  u:\n    targets:\n      - {url: \"http://127.0.0.1:1\", weight: 0}\n      - {url: \"http://127.0.0.1:2\", weight: 0}\n",
            path: "upstreams.u.targets",
            line: 4,
            col: 7,
            message: "every target has weight 0",
            hint: None,
        },
        Case {
            what: "no targets",
            yaml: "upstreams:\n  u:\n    targets: []\n",
            path: "upstreams.u.targets",
            line: 3,
            col: 14,
            message: "an upstream needs at least one target",
            hint: None,
        },
        Case {
            what: "zero workers",
            yaml: "workers: 0\n",
            path: "workers",
            line: 1,
            col: 10,
            message: "workers must be at least 1",
            hint: None,
        },
        Case {
            what: "two default certificates",
            yaml: "tls:\n  listen: [\"127.0.0.1:8443\"]\n  certificates:\n    - {cert: a.pem, key: a.key, default: true}\n    - {cert: b.pem, key: b.key, default: true}\n",
            path: "tls.certificates",
            line: 4,
            col: 5,
            message: "only one certificate can be `default: true`",
            hint: None,
        },
    ]);
}

#[test]
fn yaml_syntax() {
    check(&[
        Case {
            what: "duplicate key",
            yaml: "routes:\n  - name: r\n    paths: [\"/a\"]\n    paths: [\"/b\"]\n    plugins: {echo: {}}\n",
            path: "routes[0].paths",
            line: 4,
            col: 5,
            message: "duplicate key `paths`",
            hint: Some("first written at line 3"),
        },
        Case {
            what: "unclosed flow sequence",
            yaml: "listen: [\"127.0.0.1:8080\"\nadmin:\n  listen: \"127.0.0.1:9080\"\n",
            path: "",
            line: 2,
            col: 1,
            message: "invalid YAML",
            hint: None,
        },
        Case {
            what: "a second colon on one line",
            yaml: "admin:\n  listen: host: 9080\n",
            path: "",
            line: 2,
            col: 15,
            message: "invalid YAML: mapping values are not allowed in this context",
            hint: None,
        },
        Case {
            what: "a key indented one space too few",
            yaml: "routes:\n  - name: a\n   paths: [\"/\"]\n",
            path: "",
            line: 3,
            col: 4,
            message: "invalid YAML",
            hint: None,
        },
    ]);
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = "\
listen: [\"127.0.0.1:80800\"]
upstreams:
  users:
    targets:
      - url: \"http://127.0.0.1:9001\"
    timeouts: {connect: 2x}
routes:
  - name: a
    paths: [\"/a\"]
    methdos: [GET]
    upstream: users
  - name: a
    paths: [\"/b/{id\"]
    upstream: userz
    plugins:
      key-auht: {}
      request-size-limit: {max_body: ten}
";
    let ds = problems(yaml);
    let got: Vec<(String, usize, usize)> = ds
        .iter()
        .map(|d| {
            let p = d.pos.unwrap();
            (d.path.to_string(), p.line, p.col)
        })
        .collect();
    let want: Vec<(String, usize, usize)> = [
        ("listen[0]", 1, 10),
        ("upstreams.users.timeouts.connect", 6, 25),
        ("routes[0].methdos", 10, 5),
        ("routes[1].name", 12, 11),
        ("routes[1].paths[0]", 13, 13),
        ("routes[1].upstream", 14, 15),
        ("routes[1].plugins.key-auht", 16, 7),
        ("routes[1].plugins.request-size-limit.max_body", 17, 38),
    ]
    .iter()
    .map(|(p, l, c)| (p.to_string(), *l, *c))
    .collect();
    assert_eq!(got, want, "\n{}", render(&ds));
}

#[test]
fn disabling_a_policy_needs_no_settings() {
    // `enabled: false` on a route removes the global policy; its required settings
    // (here `max_body`) are not needed for that.
    let yaml = "plugins:\n  request-size-limit: {max_body: 1MiB}\nroutes:\n  - name: r\n    paths: [\"/\"]\n    plugins:\n      echo: {}\n      request-size-limit: {enabled: false}\n";
    let ds = problems(yaml);
    assert!(ds.is_empty(), "\n{}", render(&ds));
    // ... but a typo next to it is still caught.
    let ds = problems("plugins:\n  request-size-limit: {enabled: false, max_bdy: 1}\n");
    assert_eq!(ds.len(), 1, "\n{}", render(&ds));
    assert_eq!(ds[0].hint.as_deref(), Some("did you mean `max_body`?"));
}

#[test]
fn valid_files_have_no_problems() {
    for yaml in [
        "",
        "# only a comment\n",
        "{}",
        "listen: [\"127.0.0.1:8080\", \"[::1]:8080\"]\nroutes:\n  - name: demo\n    paths: [\"/*\"]\n    plugins:\n      echo:\n",
        portico_config::DEFAULT_CONFIG,
    ] {
        let ds = problems(yaml);
        assert!(ds.is_empty(), "{yaml:?}:\n{}", render(&ds));
    }
}

#[test]
fn request_keys() {
    use portico_config::grammar::KeySpec;
    for ok in [
        "\"ip\"",
        "\"consumer\"",
        "[\"route\", \"path\"]",
        "[\"header:X-Api-Key\", \"query:page\", \"cookie:s\", \"jwt_claim:sub\"]",
    ] {
        assert!(serde_json::from_str::<KeySpec>(ok).is_ok(), "{ok}");
    }
    for (bad, msg) in [
        (
            "\"ipp\"",
            "`ipp` is not a key; use ip, consumer, route, path, header:NAME",
        ),
        ("\"header:\"", "`header:` is not a key"),
        ("[\"ip\", \"cookies:x\"]", "`cookies:x` is not a key"),
        ("[]", "a key needs at least one part"),
    ] {
        let err = serde_json::from_str::<KeySpec>(bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains(msg), "{bad}: {err}");
    }
}

#[test]
fn response_templates_cannot_use_the_request_and_custom_methods_are_checked() {
    let text = "upstreams:\n  u: {targets: [{url: \"http://127.0.0.1:1\"}]}\nroutes:\n  - name: r\n    paths: [\"/\"]\n    methods: [PSOT, PURGE]\n    upstream: u\n    plugins:\n      response-transformer: {headers: {set: {x-a: \"${header.x}\"}}}\n";
    let err = portico_config::load_str(
        text,
        None,
        std::path::PathBuf::from("."),
        &portico_plugins::Catalog,
    )
    .expect_err("must be rejected");
    let all = err.to_string();
    assert!(
        all.contains("routes[0].methods[0]: unknown method `PSOT` (did you mean `POST`?)"),
        "{all}"
    );
    assert!(!all.contains("PURGE"), "custom methods stay allowed: {all}");
    assert!(
        all.contains(
            "routes[0].plugins.response-transformer.headers.set.x-a: response templates cannot use"
        ),
        "{all}"
    );
}

#[test]
fn discovery_sources() {
    check(&[
        Case {
            what: "A records without a port",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns: {name: api.internal, record: a}\n",
            path: "upstreams.u.discovery.dns.port",
            line: 4,
            col: 12,
            message: "A/AAAA records carry no port: set `port` (or use `record: srv`)",
            hint: None,
        },
        Case {
            what: "record type typo",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns: {name: _http._tcp.api.internal, record: srvv}\n",
            path: "upstreams.u.discovery.dns.record",
            line: 4,
            col: 52,
            message: "`srvv` is not one of `a`, `aaaa`, `a_aaaa`, `srv`",
            hint: Some("did you mean `srv`?"),
        },
        Case {
            what: "a URL as the DNS name",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns: {name: \"http://api.internal\", port: 80}\n",
            path: "upstreams.u.discovery.dns.name",
            line: 4,
            col: 19,
            message: "`http://api.internal` is not a DNS name",
            hint: None,
        },
        Case {
            what: "a resolver by name",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns:\n        name: api.internal\n        port: 8080\n        resolver: \"localhost:53\"\n",
            path: "upstreams.u.discovery.dns.resolver",
            line: 7,
            col: 19,
            message: "`localhost:53` is not an address like `127.0.0.1:53`",
            hint: None,
        },
        Case {
            what: "TTL bounds crossed",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns: {name: api.internal, port: 80, min_ttl: 10m, max_ttl: 1m}\n",
            path: "upstreams.u.discovery.dns.min_ttl",
            line: 4,
            col: 52,
            message: "`min_ttl` is above `max_ttl`",
            hint: None,
        },
        Case {
            what: "an etcd endpoint without scheme",
            yaml: "upstreams:\n  u:\n    discovery:\n      etcd:\n        endpoints: [\"127.0.0.1:2379\"]\n        prefix: /services/u/\n",
            path: "upstreams.u.discovery.etcd.endpoints[0]",
            line: 5,
            col: 21,
            message: "`127.0.0.1:2379` must start with http:// or https://",
            hint: None,
        },
        Case {
            what: "an empty etcd prefix",
            yaml: "upstreams:\n  u:\n    discovery:\n      etcd: {endpoints: [\"http://127.0.0.1:2379\"], prefix: \"\"}\n",
            path: "upstreams.u.discovery.etcd.prefix",
            line: 4,
            col: 60,
            message: "the key prefix is empty",
            hint: None,
        },
        Case {
            what: "an etcd username without password",
            yaml: "upstreams:\n  u:\n    discovery:\n      etcd:\n        endpoints: [\"http://127.0.0.1:2379\"]\n        prefix: /services/u/\n        username: portico\n",
            path: "upstreams.u.discovery.etcd",
            line: 5,
            col: 9,
            message: "`username` is set but `password` is missing",
            hint: None,
        },
        Case {
            what: "an etcd key typo",
            yaml: "upstreams:\n  u:\n    discovery:\n      etcd: {endpoints: [\"http://127.0.0.1:2379\"], prefix: /s/, pasword: x}\n",
            path: "upstreams.u.discovery.etcd.pasword",
            line: 4,
            col: 65,
            message: "unknown key `pasword`",
            hint: Some("did you mean `password`?"),
        },
        Case {
            what: "two sources in one upstream",
            yaml: "upstreams:\n  u:\n    discovery:\n      dns: {name: api.internal, port: 80}\n      etcd: {endpoints: [\"http://127.0.0.1:2379\"], prefix: /s/}\n",
            path: "upstreams.u.discovery",
            line: 4,
            col: 7,
            message: "`discovery` takes one source, found dns and etcd",
            hint: None,
        },
    ]);
}
