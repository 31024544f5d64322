//! End-to-end tests of the `portico` command line: `--version`, `validate` (every
//! example is valid; an invalid file prints every problem with file, line, column, key
//! path and hint, and exits 1), `schema` (a valid JSON Schema that every example
//! satisfies, and `examples/full.yaml` uses every key of), JSON configuration files,
//! `run` refusing an invalid file, and the examples doing what their comments say
//! (quick start routes and transforms, the TLS example's certificates by SNI, `rewrite`
//! templates as documented in docs/configuration.md).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use portico_test_support::{free_port, http_client, Gateway, Upstream};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_portico");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .canonicalize()
        .unwrap()
}

/// Every configuration file in `examples/`.
fn examples() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json")
        })
        .collect();
    v.sort();
    let names: Vec<String> = v
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for must in ["quickstart.yaml", "full.yaml"] {
        assert!(
            names.iter().any(|n| n == must),
            "examples/{must} missing: {names:?}"
        );
    }
    v
}

/// What a finished `portico` command printed.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `portico args...` in `cwd`, killing it if it runs for more than 30 s.
fn portico_in(cwd: &Path, args: &[&str]) -> Out {
    let dir = Scratch::new();
    let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("`portico {}` did not finish within 30 s", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Out {
        code: status.code(),
        stdout: std::fs::read_to_string(&out_path).unwrap(),
        stderr: std::fs::read_to_string(&err_path).unwrap(),
    }
}

fn portico(args: &[&str]) -> Out {
    portico_in(&std::env::temp_dir(), args)
}

/// A temporary directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "portico-cli-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn version_is_printed() {
    for flag in ["--version", "-V"] {
        let out = portico(&[flag]);
        assert_eq!(out.code, Some(0), "{out}");
        assert_eq!(
            out.stdout.trim(),
            format!("portico {}", env!("CARGO_PKG_VERSION")),
            "{out}"
        );
    }
}

#[test]
fn every_example_is_valid() {
    // Run from an unrelated directory: relative paths (certificates) resolve against
    // the configuration file's directory, not the working directory.
    let elsewhere = Scratch::new();
    for file in examples() {
        let f = file.to_str().unwrap();
        let out = portico_in(elsewhere.path(), &["validate", f]);
        assert_eq!(out.code, Some(0), "{f}: {out}");
        assert!(out.stdout.contains("configuration is valid"), "{f}: {out}");
        assert!(out.stderr.is_empty(), "{f}: {out}");
    }
}

/// Every property name the schema defines anywhere (config keys and policy settings).
fn schema_property_names(schema: &Value, out: &mut BTreeSet<String>) {
    match schema {
        Value::Object(m) => {
            if let Some(Value::Object(props)) = m.get("properties") {
                out.extend(props.keys().cloned());
            }
            for v in m.values() {
                schema_property_names(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| schema_property_names(v, out)),
        _ => {}
    }
}

/// Every mapping key used anywhere in a document.
fn document_keys(doc: &Value, out: &mut BTreeSet<String>) {
    match doc {
        Value::Object(m) => {
            out.extend(m.keys().cloned());
            m.values().for_each(|v| document_keys(v, out));
        }
        Value::Array(a) => a.iter().for_each(|v| document_keys(v, out)),
        _ => {}
    }
}

fn read_example(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    portico_config::yaml::parse(&text)
        .unwrap_or_else(|d| panic!("{}: {d}", path.display()))
        .0
}

#[test]
fn schema_is_valid_and_describes_every_example() {
    let out = portico(&["schema"]);
    assert_eq!(out.code, Some(0), "{out}");
    let schema: Value = serde_json::from_str(&out.stdout).unwrap();
    assert!(
        schema["$schema"]
            .as_str()
            .is_some_and(|s| s.contains("2020-12")),
        "{}",
        schema["$schema"]
    );
    jsonschema::meta::validate(&schema).unwrap();
    let validator = jsonschema::validator_for(&schema).unwrap();

    // The policies are part of it, with their settings.
    let policies = &schema["properties"]["plugins"]["properties"];
    for p in [
        "echo",
        "request-transformer",
        "response-transformer",
        "request-size-limit",
    ] {
        assert!(
            policies[p].is_object(),
            "policy {p} missing from the schema"
        );
    }
    assert!(policies["request-size-limit"]["properties"]["max_body"].is_object());

    for file in examples() {
        let doc = read_example(&file);
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{}: {e}", e.instance_path().as_str()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} does not match the schema:\n{}",
            file.display(),
            errors.join("\n")
        );
    }

    // It is strict: a misspelt key or an unknown policy does not pass.
    for bad in [
        r#"{"routes": [{"name": "a", "paths": ["/"], "methdos": ["GET"]}]}"#,
        r#"{"plugins": {"key-auht": {}}}"#,
        r#"{"upstreams": {"u": {"targets": [{"url": "http://a"}], "protocol": "h3"}}}"#,
    ] {
        let doc: Value = serde_json::from_str(bad).unwrap();
        assert!(!validator.is_valid(&doc), "schema accepted {bad}");
    }

    // examples/full.yaml uses every key the schema knows (config and policy settings).
    let mut defined = BTreeSet::new();
    schema_property_names(&schema, &mut defined);
    let mut used = BTreeSet::new();
    document_keys(&read_example(&examples_dir().join("full.yaml")), &mut used);
    let unused: Vec<&String> = defined.difference(&used).collect();
    assert!(
        unused.is_empty(),
        "keys never used in examples/full.yaml: {unused:?}"
    );
}

/// A file with many problems at once; `(key path, line, column, message part, hint)`.
const BAD: &str = r#"listen: ["127.0.0.1:80800"]
upstreams:
  users:
    targets:
      - url: "http://127.0.0.1:9001"
    timeouts: {connect: 2x}
routes:
  - name: users
    paths: ["/users"]
    methdos: [GET]
    upstream: users
  - name: users
    paths: ["/users/{id"]
    upstream: userz
    plugins:
      key-auht: {}
      request-size-limit: {max_body: ten}
"#;

const BAD_PROBLEMS: &[(&str, usize, usize, &str, Option<&str>)] = &[
    (
        "listen[0]",
        1,
        10,
        "`127.0.0.1:80800` is not an address",
        None,
    ),
    (
        "upstreams.users.timeouts.connect",
        6,
        25,
        "`2x` is not a duration",
        None,
    ),
    (
        "routes[0].methdos",
        10,
        5,
        "unknown key `methdos`",
        Some("did you mean `methods`?"),
    ),
    (
        "routes[1].name",
        12,
        11,
        "route name `users` is used twice",
        None,
    ),
    (
        "routes[1].paths[0]",
        13,
        13,
        "a capture must be a whole segment",
        None,
    ),
    (
        "routes[1].upstream",
        14,
        15,
        "upstream `userz` is not defined",
        Some("did you mean `users`?"),
    ),
    (
        "routes[1].plugins.key-auht",
        16,
        7,
        "unknown policy `key-auht`",
        Some("did you mean `key-auth`?"),
    ),
    (
        "routes[1].plugins.request-size-limit.max_body",
        17,
        38,
        "`ten` is not a size",
        None,
    ),
];

/// Asserts that `stderr` holds exactly one `error:` line per expected problem, each
/// `FILE:LINE:COL: PATH: MESSAGE (HINT)`, in file order, and the count at the end.
fn assert_problems(stderr: &str, file: &str) {
    let lines: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(
        lines.len(),
        BAD_PROBLEMS.len(),
        "expected {} problems:\n{stderr}",
        BAD_PROBLEMS.len()
    );
    for (line, (path, l, c, msg, hint)) in lines.iter().zip(BAD_PROBLEMS) {
        let prefix = format!("error: {file}:{l}:{c}: {path}: ");
        assert!(
            line.starts_with(&prefix),
            "expected `{prefix}...`, got `{line}`\n{stderr}"
        );
        assert!(line.contains(msg), "`{line}` lacks `{msg}`");
        match hint {
            Some(h) => assert!(line.ends_with(&format!(" ({h})")), "`{line}` lacks `({h})`"),
            None => assert!(!line.contains("did you mean"), "`{line}` has a hint"),
        }
    }
    assert!(
        stderr.contains(&format!("{} problems found", BAD_PROBLEMS.len())),
        "{stderr}"
    );
}

#[test]
fn invalid_file_prints_every_problem_and_exits_1() {
    let dir = Scratch::new();
    let file = dir.write("bad.yaml", BAD);
    let f = file.to_str().unwrap();
    let out = portico(&["validate", f]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stdout.is_empty(), "{out}");
    assert_problems(&out.stderr, f);

    // A relative file name is printed as given.
    let out = portico_in(dir.path(), &["validate", "bad.yaml"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert_problems(&out.stderr, "bad.yaml");
}

#[test]
fn yaml_syntax_errors_have_a_position() {
    let dir = Scratch::new();
    for (text, line, col) in [
        ("admin:\n  listen: 127.0.0.1: 9080\n", 2, 20),
        ("routes:\n  - name: a\n   paths: [\"/\"]\n", 3, 4),
    ] {
        let f = dir.write("syntax.yaml", text);
        let f = f.to_str().unwrap();
        let out = portico(&["validate", f]);
        assert_eq!(out.code, Some(1), "{out}");
        assert!(
            out.stderr
                .contains(&format!("error: {f}:{line}:{col}: invalid YAML")),
            "expected a YAML error at {line}:{col}: {out}"
        );
    }
    // Duplicate keys are refused, pointing at the second one.
    let f = dir.write(
        "dup.yaml",
        "routes:\n  - name: a\n    paths: [\"/a\"]\n    plugins: {echo: {}}\n    paths: [\"/b\"]\n",
    );
    let f = f.to_str().unwrap();
    let out = portico(&["validate", f]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains(&format!(
            "error: {f}:5:5: routes[0].paths: duplicate key `paths` (first written at line 3)"
        )),
        "{out}"
    );
}

#[test]
fn missing_files_are_problems_too() {
    let out = portico(&["validate", "/nonexistent/portico.yaml"]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr
            .contains("/nonexistent/portico.yaml: cannot read the file"),
        "{out}"
    );

    // Certificate files are checked too, relative to the configuration file.
    let dir = Scratch::new();
    let f = dir.write(
        "tls.yaml",
        "tls:\n  listen: [\"127.0.0.1:8443\"]\n  certificates:\n    - {cert: certs/missing.pem, key: certs/missing.key}\nroutes:\n  - {name: a, paths: [\"/\"], plugins: {echo: {}}}\n",
    );
    let f = f.to_str().unwrap();
    let out = portico(&["validate", f]);
    assert_eq!(out.code, Some(1), "{out}");
    let want = format!("error: {f}:4:14: tls.certificates[0].cert: cannot read ");
    assert!(out.stderr.contains(&want), "expected `{want}`: {out}");
    assert!(out.stderr.contains("certs/missing.pem"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn run_refuses_an_invalid_file() {
    let mut gw = Gateway::spawn(bin(), BAD);
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(20)));
    let status = status.unwrap_or_else(|| panic!("still running with an invalid file"));
    assert!(!status.success(), "exited with {status}");
    let stderr = gw.stderr();
    let file = gw.config_path().to_str().unwrap().to_string();
    for (path, line, col, msg, _) in BAD_PROBLEMS {
        let want = format!("{file}:{line}:{col}: {path}: ");
        assert!(
            stderr.lines().any(|l| l.contains(&want) && l.contains(msg)),
            "`{want}{msg}` missing:\n{stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn json_configuration_files_work() {
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let json = format!(
        r#"{{
  "listen": ["127.0.0.1:{port}"],
  "admin": {{"listen": "{admin}"}},
  "routes": [
    {{
      "name": "hello-json",
      "paths": ["/hello/{{name}}"],
      "methods": ["GET"],
      "plugins": {{"echo": {{"message": "from a JSON file"}}}}
    }}
  ]
}}
"#
    );
    let dir = Scratch::new();
    let file = dir.write("portico.json", &json);
    let f = file.to_str().unwrap().to_string();
    let out = portico(&["validate", &f]);
    assert_eq!(out.code, Some(0), "{out}");

    let gw = {
        let f = f.clone();
        tokio::task::spawn_blocking(move || {
            Gateway::start_with_args(bin(), &["run", "--config", &f], None, admin)
        })
        .await
        .unwrap()
    };
    let resp = http_client()
        .get(format!("http://127.0.0.1:{port}/hello/json"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["route"], "hello-json", "{body}");
    assert_eq!(body["params"]["name"], "json", "{body}");
    assert_eq!(body["message"], "from a JSON file", "{body}");
    drop(gw);

    // Problems in JSON files are located like in YAML ones.
    let bad = json.replace(r#""methods": ["GET"]"#, r#""methods": ["get"]"#);
    let file = dir.write("bad.json", &bad);
    let f = file.to_str().unwrap();
    let out = portico(&["validate", f]);
    assert_eq!(out.code, Some(1), "{out}");
    let want =
        format!("error: {f}:8:19: routes[0].methods[0]: methods are upper-case: write `GET`");
    assert!(out.stderr.contains(&want), "expected `{want}`: {out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn quickstart_example_does_what_it_says() {
    // examples/quickstart.yaml on ephemeral ports, with an echo upstream in place of
    // the server on 127.0.0.1:9001.
    let up = Upstream::start("backend").await;
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let text = std::fs::read_to_string(examples_dir().join("quickstart.yaml")).unwrap();
    for addr in ["127.0.0.1:8080", "127.0.0.1:9080", "127.0.0.1:9001"] {
        assert!(text.contains(addr), "quickstart.yaml no longer uses {addr}");
    }
    let yaml = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"))
        .replace("127.0.0.1:9080", &admin.to_string())
        .replace("127.0.0.1:9001", &up.addr().to_string());
    let _gw = Gateway::start_async(bin(), &yaml, admin).await;
    let client = http_client();
    let base = format!("http://127.0.0.1:{port}");

    // `/api/*` with strip_prefix: the upstream sees the path without `/api`.
    let r = client
        .get(format!("{base}/api/users?x=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/users", "{seen}");
    assert_eq!(seen["query"], "x=1", "{seen}");
    // The global request-transformer adds its headers to every proxied request.
    assert_eq!(seen["headers"]["x-gateway"], "portico", "{seen}");
    assert_eq!(seen["headers"]["x-client-ip"], "127.0.0.1", "{seen}");

    // `{id}` capture reused by `rewrite`.
    let r = client
        .get(format!("{base}/users/42/profile"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/v2/profiles/42", "{seen}");
    // ... GET only.
    let r = client
        .post(format!("{base}/users/42/profile"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert_eq!(r.headers()["allow"], "GET");

    // `/hello` is answered by the echo policy.
    let r = client.get(format!("{base}/hello")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["route"], "hello", "{body}");
    assert_eq!(body["message"], "hello from Portico", "{body}");

    // Anything else: the standard 404.
    let r = client.get(format!("{base}/nope")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_route", "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn rewrite_templates_see_the_request() {
    // docs/configuration.md: `rewrite` takes `{NAME}` captures and every `${...}`
    // namespace; the client's query string is appended unchanged.
    let up = Upstream::start("search").await;
    let port = free_port();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let yaml = format!(
        r#"listen: ["127.0.0.1:{port}"]
admin: {{listen: "{admin}"}}
upstreams:
  search: {{targets: [{{url: "{}"}}]}}
routes:
  - name: search
    paths: ["/search/{{term}}"]
    upstream: search
    rewrite: "/v1/${{header.x-tenant}}/find/{{term}}/page-${{query.page}}/${{route.name}}"
"#,
        up.url()
    );
    let _gw = Gateway::start_async(bin(), &yaml, admin).await;
    let r = http_client()
        .get(format!("http://127.0.0.1:{port}/search/cats?page=2"))
        .header("x-tenant", "acme")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(seen["path"], "/v1/acme/find/cats/page-2/search", "{seen}");
    assert_eq!(seen["query"], "page=2", "{seen}");

    // A substituted header or query value stays inside its segment: `/`, `?`, `#`
    // and spaces are percent-encoded (the query value is decoded first), so a client
    // cannot steer the upstream path or add a query.
    let r = http_client()
        .get(format!(
            "http://127.0.0.1:{port}/search/cats?page=a%20b%2F..%2Fc"
        ))
        .header("x-tenant", "../admin?role=root#x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen: Value = r.json().await.unwrap();
    assert_eq!(
        seen["path"], "/v1/..%2Fadmin%3Frole%3Droot%23x/find/cats/page-a%20b%2F..%2Fc/search",
        "{seen}"
    );
    assert_eq!(seen["query"], "page=a%20b%2F..%2Fc", "{seen}");

    // A value that is a whole dot segment would climb out of `/v1/`: refused.
    let r = http_client()
        .get(format!("http://127.0.0.1:{port}/search/cats?page=1"))
        .header("x-tenant", "..")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "bad_request", "{body}");
    assert_eq!(
        up.hits(),
        2,
        "the refused request never reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_example_serves_its_certificates_by_sni() {
    // examples/tls.yaml on ephemeral ports, with its throwaway certificates.
    let (http, https) = (free_port(), free_port());
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let dir = examples_dir();
    let text = std::fs::read_to_string(dir.join("tls.yaml")).unwrap();
    let yaml = text
        .replace("127.0.0.1:8080", &format!("127.0.0.1:{http}"))
        .replace("127.0.0.1:8443", &format!("127.0.0.1:{https}"))
        .replace("127.0.0.1:9080", &admin.to_string())
        .replace("certs/", &format!("{}/certs/", dir.display()));
    let _gw = Gateway::start_async(bin(), &yaml, admin).await;
    let ca = std::fs::read_to_string(dir.join("certs/ca.pem")).unwrap();
    let addr: SocketAddr = format!("127.0.0.1:{https}").parse().unwrap();
    let client = portico_test_support::tls_client(
        &ca,
        &[
            ("api.example.com", addr),
            ("www.example.org", addr),
            ("localhost", addr),
        ],
    );
    for (host, route) in [
        ("api.example.com", "api"),
        ("www.example.org", "api"),
        ("localhost", "everything-else"),
    ] {
        let r = client
            .get(format!("https://{host}:{https}/x"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{host}: {e:?}"));
        assert_eq!(r.status(), 200, "{host}");
        assert_eq!(r.version(), http::Version::HTTP_2, "{host}: ALPN h2");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["route"], route, "{host}: {body}");
    }
}
