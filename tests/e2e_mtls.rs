//! End-to-end tests of mutual TLS: `tls.client_auth` on the HTTPS listener
//! (`optional` and `required`), and the `mtls` policy mapping a verified client
//! certificate to a consumer by common name or subject alternative name.
//!
//! Covers: a certificate from the trusted CA maps to its consumer (`X-Consumer-Name`
//! at the upstream); no certificate on an `optional` listener → 401 with the
//! challenge, while routes without `mtls` still work; a certificate from another CA
//! fails the handshake; a valid certificate naming no consumer → 401, or passes
//! authenticated without a consumer with `require_consumer: false`; `required` mode
//! refuses the handshake without a certificate; a missing CA file is a located
//! configuration error.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use portico_test_support::certs::{Ca, Cert};
use portico_test_support::{client, free_port, Gateway, Upstream};
use serde_json::Value;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_portico"))
}

struct Env {
    _gw: Gateway,
    https: SocketAddr,
    server_ca: Ca,
    _up: Upstream,
}

async fn start(mode: &str, dir: &tempfile::TempDir, client_ca: &Ca) -> Env {
    let up = Upstream::start("up").await;
    let server_ca = Ca::new();
    let server = server_ca.issue(&["gw.test"]);
    std::fs::write(dir.path().join("srv.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("srv.key"), &server.key_pem).unwrap();
    let ca_path = client_ca.write_cert(dir.path(), "clients");
    let https = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let http = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let d = dir.path().display();
    let yaml = format!(
        r#"
listen: ["{http}"]
admin: {{listen: "{admin}"}}
tls:
  listen: ["{https}"]
  certificates: [{{cert: "{d}/srv.crt", key: "{d}/srv.key"}}]
  client_auth: {{ca: "{}", mode: {mode}}}
upstreams:
  up: {{targets: [{{url: "{}"}}]}}
consumers:
  - name: svc-a
    groups: [internal]
    credentials: [{{type: mtls, subject: "client-a"}}]
  - name: svc-b
    credentials: [{{type: mtls, subject: "b.clients.test"}}]
routes:
  - name: strict
    paths: ["/strict"]
    upstream: up
    plugins: {{mtls: {{}}}}
  - name: lenient
    paths: ["/lenient"]
    upstream: up
    plugins: {{mtls: {{require_consumer: false}}}}
  - name: open
    paths: ["/open"]
    upstream: up
"#,
        ca_path.display(),
        up.url()
    );
    let gw = Gateway::start_async(bin(), &yaml, admin).await;
    Env {
        _gw: gw,
        https,
        server_ca,
        _up: up,
    }
}

impl Env {
    fn client(&self, cert: Option<&Cert>) -> reqwest::Client {
        client::tls_client_with(
            &self.server_ca.cert_pem(),
            cert,
            &["http/1.1"],
            &[("gw.test", self.https)],
        )
    }
    fn url(&self, path: &str) -> String {
        format!("https://gw.test:{}{path}", self.https.port())
    }
    async fn get(
        &self,
        cert: Option<&Cert>,
        path: &str,
    ) -> Result<(u16, Value, Option<String>), reqwest::Error> {
        let r = self.client(cert).get(self.url(path)).send().await?;
        let st = r.status().as_u16();
        let challenge = r
            .headers()
            .get("www-authenticate")
            .map(|v| v.to_str().unwrap().to_string());
        let body: Value = r.json().await.unwrap_or(Value::Null);
        Ok((st, body, challenge))
    }
}

#[tokio::test]
async fn optional_client_certificates_map_to_consumers() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Ca::named("Client CA");
    let env = start("optional", &dir, &clients).await;

    // By common name.
    let a = clients.issue_client("client-a");
    let (st, echo, _) = env.get(Some(&a), "/strict").await.unwrap();
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "svc-a");
    assert_eq!(echo["headers"]["x-consumer-groups"], "internal");

    // By subject alternative name (the common name is unknown).
    let b = clients.issue_with(&["b.clients.test"], |p| {
        p.distinguished_name
            .push(rcgen::DnType::CommonName, "unknown-cn");
        p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    });
    let (st, echo, _) = env.get(Some(&b), "/strict").await.unwrap();
    assert_eq!(st, 200, "{echo}");
    assert_eq!(echo["headers"]["x-consumer-name"], "svc-b");

    // No certificate: 401 with the challenge on the mtls route; other routes work.
    let (st, body, challenge) = env.get(None, "/strict").await.unwrap();
    assert_eq!(st, 401, "{body}");
    assert_eq!(challenge.as_deref(), Some("Mutual realm=\"portico\""));
    let (st, _, _) = env.get(None, "/open").await.unwrap();
    assert_eq!(st, 200);

    // A valid certificate that names no consumer.
    let stranger = clients.issue_client("stranger");
    let (st, body, _) = env.get(Some(&stranger), "/strict").await.unwrap();
    assert_eq!(st, 401);
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("does not belong to a consumer"));
    let (st, echo, _) = env.get(Some(&stranger), "/lenient").await.unwrap();
    assert_eq!(st, 200);
    assert!(echo["headers"].get("x-consumer-name").is_none());

    // A certificate from another CA does not get through the handshake.
    let rogue = Ca::named("Rogue CA").issue_client("client-a");
    assert!(env.get(Some(&rogue), "/strict").await.is_err());
}

#[tokio::test]
async fn required_mode_refuses_the_handshake_without_a_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let clients = Ca::named("Client CA");
    let env = start("required", &dir, &clients).await;
    assert!(env.get(None, "/open").await.is_err());
    let a = clients.issue_client("client-a");
    let (st, echo, _) = env.get(Some(&a), "/strict").await.unwrap();
    assert_eq!(st, 200);
    assert_eq!(echo["headers"]["x-consumer-name"], "svc-a");
}

#[test]
fn a_missing_client_ca_is_a_located_error() {
    let dir = tempfile::tempdir().unwrap();
    let server = Ca::new().issue(&["gw.test"]);
    std::fs::write(dir.path().join("s.crt"), &server.cert_pem).unwrap();
    std::fs::write(dir.path().join("s.key"), &server.key_pem).unwrap();
    let f = dir.path().join("c.yaml");
    std::fs::write(
        &f,
        "tls:\n  listen: [\"127.0.0.1:0\"]\n  certificates: [{cert: s.crt, key: s.key}]\n  client_auth: {ca: nope.pem, mode: sometimes}\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("tls.client_auth.mode"), "{err}");
    std::fs::write(
        &f,
        "tls:\n  listen: [\"127.0.0.1:0\"]\n  certificates: [{cert: s.crt, key: s.key}]\n  client_auth: {ca: nope.pem}\n",
    )
    .unwrap();
    let out = std::process::Command::new(bin())
        .args(["validate", f.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("tls.client_auth.ca") && err.contains("nope.pem"),
        "{err}"
    );
}
