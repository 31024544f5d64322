//! Secrets: API key generation, key digests, Argon2id password hashes, random ids.

use argon2::password_hash::{PasswordHasher, PasswordVerifier};
use argon2::Argon2;
use aws_lc_rs::digest;
use aws_lc_rs::rand::{SecureRandom, SystemRandom};

/// Prefix of the API keys the gateway generates (recognisable in logs and scanners).
pub const KEY_PREFIX: &str = "pk_";

/// A SHA-256 digest of an API key: what the index and the store keep.
pub type KeyDigest = [u8; 32];

fn random<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    // The system CSPRNG failing leaves no safe way to make a secret: refuse loudly.
    if SystemRandom::new().fill(&mut b).is_err() {
        panic!("the system random number generator failed");
    }
    b
}

fn hex(b: &[u8]) -> String {
    const H: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(H[usize::from(x >> 4)] as char);
        s.push(H[usize::from(x & 15)] as char);
    }
    s
}

/// A new API key: `pk_` and 160 random bits as 40 hex digits.
pub fn generate_key() -> String {
    format!("{KEY_PREFIX}{}", hex(&random::<20>()))
}

/// A new HMAC secret: 256 random bits as 64 hex digits.
pub fn generate_secret() -> String {
    hex(&random::<32>())
}

/// A new credential id: 128 random bits as hex.
pub fn new_id() -> String {
    hex(&random::<16>())
}

/// The digest an API key is stored and looked up by.
pub fn key_digest(key: &[u8]) -> KeyDigest {
    let d = digest::digest(&digest::SHA256, key);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

pub fn digest_hex(d: &KeyDigest) -> String {
    hex(d)
}

pub fn digest_from_hex(s: &str) -> Option<KeyDigest> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// What an admin sees of a key: its prefix and first characters.
/// Generated keys show their prefix and 4 of their 40 random digits; a key chosen by
/// hand (16 characters or more) shows only its first 3 characters.
pub fn key_hint(key: &str) -> String {
    let generated = key.starts_with(KEY_PREFIX) && key.len() == KEY_PREFIX.len() + 40;
    let shown = if generated { KEY_PREFIX.len() + 4 } else { 3 };
    let n = key.char_indices().nth(shown).map_or(key.len(), |(i, _)| i);
    format!("{}…", &key[..n])
}

/// An Argon2id PHC string for a password (OWASP parameters: 19 MiB, 2 passes).
pub fn hash_password(password: &str) -> Result<String, String> {
    Argon2::default()
        .hash_password(password.as_bytes())
        .map(|h| h.to_string())
        .map_err(|e| format!("cannot hash the password: {e}"))
}

/// Whether `phc` is an Argon2 PHC string this build can verify.
pub fn is_phc(s: &str) -> bool {
    s.starts_with("$argon2id$") || s.starts_with("$argon2i$") || s.starts_with("$argon2d$")
}

/// Check a password against its PHC string (slow on purpose: tens of milliseconds).
pub fn verify_password(password: &str, phc: &str) -> bool {
    Argon2::default()
        .verify_password(password.as_bytes(), phc)
        .is_ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn keys_and_digests() {
        let a = generate_key();
        let b = generate_key();
        assert!(a.starts_with("pk_") && a.len() == 43 && a != b);
        let d = key_digest(a.as_bytes());
        assert_eq!(digest_from_hex(&digest_hex(&d)), Some(d));
        assert_eq!(digest_from_hex("zz"), None);
        assert_eq!(key_hint(&a), format!("{}…", &a[..7]));
        assert_eq!(key_hint("my-own-key-0123456789"), "my-…");
        assert_eq!(new_id().len(), 32);
    }

    #[test]
    fn passwords() {
        let h = hash_password("s3cret").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(is_phc(&h));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cret!", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }
}
