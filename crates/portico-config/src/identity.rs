//! Rules for consumers and credentials shared by the file and the admin API, so both
//! refuse the same things with the same words.

use std::collections::HashSet;

use crate::diag::{Diagnostic, KeyPath};
use crate::model::{ConsumerDecl, CredentialDecl};

/// Shortest API key accepted from a file or an admin call.
pub const MIN_KEY_LEN: usize = 16;

/// A consumer name: 1–128 of letters, digits, `.`, `_`, `-`, `@`.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 128 {
        return Err("a consumer name has 1 to 128 characters".into());
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@')))
    {
        return Err(format!(
            "`{c}` is not allowed in a consumer name (letters, digits, `.`, `_`, `-`, `@`)"
        ));
    }
    Ok(())
}

/// A group name: 1–64 visible ASCII characters without `,` (groups travel upstream
/// comma-separated).
pub fn check_group(g: &str) -> Result<(), String> {
    if g.is_empty() || g.len() > 64 || !g.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(format!(
            "`{g}` is not a valid group (1 to 64 visible ASCII characters, no comma)"
        ));
    }
    Ok(())
}

/// An API key given by a person (file or admin call).
pub fn check_key(key: &str) -> Result<(), String> {
    if key.len() < MIN_KEY_LEN {
        return Err(format!(
            "an API key has at least {MIN_KEY_LEN} characters; this one has {}",
            key.len()
        ));
    }
    if !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("an API key is visible ASCII only (no spaces or control characters)".into());
    }
    Ok(())
}

/// A basic-auth user name: 1–128 visible characters without `:` (RFC 7617).
pub fn check_username(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > 128 || u.contains(':') || u.chars().any(char::is_control) {
        return Err("a user name has 1 to 128 characters and no `:`".into());
    }
    Ok(())
}

/// An HMAC key id: 1–128 visible ASCII characters without `"` or `\\` (it is a
/// structured-field string in `Signature-Input`).
pub fn check_key_id(k: &str) -> Result<(), String> {
    if k.is_empty()
        || k.len() > 128
        || !k
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\')
    {
        return Err("a key id has 1 to 128 visible ASCII characters, without `\"` or `\\`".into());
    }
    Ok(())
}

/// An HMAC secret: at least 16 bytes (128 bits).
pub fn check_hmac_secret(s: &str) -> Result<(), String> {
    if s.len() < MIN_KEY_LEN {
        return Err(format!(
            "an HMAC secret has at least {MIN_KEY_LEN} characters; this one has {}",
            s.len()
        ));
    }
    Ok(())
}

/// A JWT subject or issuer: not empty, no line breaks.
pub fn check_subject(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("it is empty".into());
    }
    if s.contains(['\n', '\r']) {
        return Err("it contains a line break".into());
    }
    Ok(())
}

/// How a JWT credential is looked up: the subject, or `issuer`, a line feed and the
/// subject when the credential names its issuer.
pub fn jwt_lookup(issuer: Option<&str>, subject: &str) -> String {
    match issuer {
        Some(i) => format!("{i}\n{subject}"),
        None => subject.to_string(),
    }
}

/// An RFC 3339 time, as Unix seconds.
pub fn parse_time(s: &str) -> Result<i64, String> {
    s.parse::<jiff::Timestamp>()
        .map(|t| t.as_second())
        .map_err(|e| format!("`{s}` is not an RFC 3339 time such as 2027-01-31T00:00:00Z: {e}"))
}

pub(crate) fn check_consumers(list: &[ConsumerDecl], root: &KeyPath, diags: &mut Vec<Diagnostic>) {
    let mut names = HashSet::new();
    let mut keys = HashSet::new();
    let mut users = HashSet::new();
    let mut subjects: HashSet<String> = HashSet::new();
    let mut certs = HashSet::new();
    let mut key_ids = HashSet::new();
    for (i, c) in list.iter().enumerate() {
        let p = root.index(i);
        if c.name.starts_with('\0') {
            continue; // already reported: it did not parse
        }
        if let Err(e) = check_name(&c.name) {
            diags.push(Diagnostic::new(p.key("name"), e));
        } else if !names.insert(c.name.as_str()) {
            diags.push(Diagnostic::new(
                p.key("name"),
                format!("a consumer named `{}` is already declared", c.name),
            ));
        }
        for (j, g) in c.groups.iter().enumerate() {
            if let Err(e) = check_group(g) {
                diags.push(Diagnostic::new(p.key("groups").index(j), e));
            }
        }
        for (j, cred) in c.credentials.iter().enumerate() {
            let cp = p.key("credentials").index(j);
            if matches!(cred, CredentialDecl::Jwt { subject, .. } if subject.starts_with('\0')) {
                continue; // already reported: it did not parse
            }
            match cred {
                CredentialDecl::KeyAuth { key, expires_at } => {
                    if let Err(e) = check_key(&key.0) {
                        diags.push(Diagnostic::new(cp.key("key"), e));
                    } else if !keys.insert(key.0.as_str()) {
                        diags.push(Diagnostic::new(
                            cp.key("key"),
                            "this API key is already declared (keys must be unique)",
                        ));
                    }
                    if let Some(t) = expires_at {
                        if let Err(e) = parse_time(t) {
                            diags.push(Diagnostic::new(cp.key("expires_at"), e));
                        }
                    }
                }
                CredentialDecl::BasicAuth { username, password } => {
                    if let Err(e) = check_username(username) {
                        diags.push(Diagnostic::new(cp.key("username"), e));
                    } else if !users.insert(username.as_str()) {
                        diags.push(Diagnostic::new(
                            cp.key("username"),
                            format!("the user name `{username}` is already declared"),
                        ));
                    }
                    if password.0.is_empty() {
                        diags.push(Diagnostic::new(cp.key("password"), "the password is empty"));
                    }
                }
                CredentialDecl::Jwt { subject, issuer } => {
                    if let Err(e) = check_subject(subject) {
                        diags.push(Diagnostic::new(cp.key("subject"), e));
                    } else if let Some(Err(e)) = issuer.as_deref().map(check_subject) {
                        diags.push(Diagnostic::new(cp.key("issuer"), e));
                    } else if !subjects.insert(jwt_lookup(issuer.as_deref(), subject)) {
                        diags.push(Diagnostic::new(
                            cp.key("subject"),
                            format!("the JWT subject `{subject}` already belongs to a consumer"),
                        ));
                    }
                }
                CredentialDecl::HmacAuth { key_id, secret } => {
                    if let Err(e) = check_key_id(key_id) {
                        diags.push(Diagnostic::new(cp.key("key_id"), e));
                    } else if !key_ids.insert(key_id.as_str()) {
                        diags.push(Diagnostic::new(
                            cp.key("key_id"),
                            format!("the HMAC key id `{key_id}` already belongs to a consumer"),
                        ));
                    }
                    if let Err(e) = check_hmac_secret(&secret.0) {
                        diags.push(Diagnostic::new(cp.key("secret"), e));
                    }
                }
                CredentialDecl::Mtls { subject } => {
                    if subject.is_empty() {
                        diags.push(Diagnostic::new(cp.key("subject"), "the subject is empty"));
                    } else if !certs.insert(subject.as_str()) {
                        diags.push(Diagnostic::new(
                            cp.key("subject"),
                            format!(
                                "the certificate subject `{subject}` already belongs to a consumer"
                            ),
                        ));
                    }
                }
            }
        }
    }
}
