//! The consumer index: what authentication policies look credentials up in. Built
//! from the declared consumers and the store; immutable once built; replaced whole.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use http::HeaderValue;
use serde_json::{Map, Value};

use crate::db::{ConsumerRow, CredKind, CredRow};
use crate::secret::{digest_from_hex, key_digest, KeyDigest};

/// Where a consumer was declared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The configuration file: read-only through the admin API.
    File,
    /// The store (the admin API).
    Store,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::File => "file",
            Source::Store => "store",
        }
    }
}

/// An authenticated caller.
#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    pub groups: Vec<String>,
    pub metadata: Map<String, Value>,
    pub source: Source,
    /// Unix seconds (0 for consumers declared in the file).
    pub created_at: i64,
    pub updated_at: i64,
    /// `name` as a header value, made once.
    pub name_header: HeaderValue,
    /// The groups comma-separated as a header value (None without groups).
    pub groups_header: Option<HeaderValue>,
}

impl Consumer {
    pub fn new(
        name: String,
        groups: Vec<String>,
        metadata: Map<String, Value>,
        source: Source,
    ) -> Consumer {
        let name_header = HeaderValue::from_str(&name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-name"));
        let groups_header = if groups.is_empty() {
            None
        } else {
            HeaderValue::from_str(&groups.join(", ")).ok()
        };
        Consumer {
            name,
            groups,
            metadata,
            source,
            created_at: 0,
            updated_at: 0,
            name_header,
            groups_header,
        }
    }

    pub fn in_group(&self, g: &str) -> bool {
        self.groups.iter().any(|x| x == g)
    }
}

/// An API key in the index.
#[derive(Debug, Clone)]
pub struct KeyEntry {
    pub consumer: Arc<Consumer>,
    pub credential: Arc<str>,
    /// Unix seconds after which the key is refused.
    pub expires_at: Option<i64>,
}

/// A basic-auth user in the index.
#[derive(Clone)]
pub struct UserEntry {
    pub consumer: Arc<Consumer>,
    /// Argon2id PHC string.
    pub phc: Arc<str>,
}

/// An HMAC key in the index.
#[derive(Clone)]
pub struct HmacEntry {
    pub consumer: Arc<Consumer>,
    pub secret: Arc<[u8]>,
}

// `Debug` without the hash or the secret.
impl std::fmt::Debug for UserEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserEntry")
            .field("consumer", &self.consumer.name)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for HmacEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HmacEntry")
            .field("consumer", &self.consumer.name)
            .finish_non_exhaustive()
    }
}

/// What an API key lookup found.
#[derive(Debug)]
pub enum KeyLookup<'a> {
    Valid(&'a KeyEntry),
    Expired(&'a KeyEntry),
    Unknown,
}

/// The digests are uniformly random already: the first 8 bytes are the hash.
#[derive(Default)]
pub struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 ^= u64::from(*b) << (i * 8);
        }
    }
}

type DigestMap<V> = HashMap<KeyDigest, V, BuildHasherDefault<DigestHasher>>;

/// Consumers and credentials, ready for per-request lookups.
#[derive(Default)]
pub struct ConsumerIndex {
    consumers: HashMap<String, Arc<Consumer>>,
    keys: DigestMap<KeyEntry>,
    users: HashMap<String, UserEntry>,
    jwt: HashMap<String, Arc<Consumer>>,
    mtls: HashMap<String, Arc<Consumer>>,
    hmac: HashMap<String, HmacEntry>,
    /// Credentials by consumer, for the admin API.
    credentials: HashMap<String, Vec<CredRow>>,
}

impl ConsumerIndex {
    /// Build from declared consumers (which win any conflict) and stored ones.
    pub fn build(
        declared: &[(ConsumerRow, Vec<CredRow>)],
        stored: Vec<ConsumerRow>,
        stored_creds: Vec<CredRow>,
    ) -> ConsumerIndex {
        let mut ix = ConsumerIndex::default();
        for (c, creds) in declared {
            ix.add_consumer(c.clone(), Source::File);
            for cr in creds {
                ix.add_credential(cr.clone());
            }
        }
        for c in stored {
            if ix.consumers.contains_key(&c.name) {
                tracing::warn!(consumer = %c.name, "a stored consumer has the name of one declared in the file; the file's wins");
                continue;
            }
            ix.add_consumer(c, Source::Store);
        }
        for cr in stored_creds {
            if ix
                .consumers
                .get(&cr.consumer)
                .is_some_and(|c| c.source == Source::Store)
            {
                ix.add_credential(cr);
            }
        }
        ix
    }

    fn add_consumer(&mut self, c: ConsumerRow, source: Source) {
        let name = c.name.clone();
        let mut consumer = Consumer::new(c.name, c.groups, c.metadata, source);
        consumer.created_at = c.created_at;
        consumer.updated_at = c.updated_at;
        self.consumers.insert(name, Arc::new(consumer));
    }

    fn add_credential(&mut self, cr: CredRow) {
        let Some(consumer) = self.consumers.get(&cr.consumer).cloned() else {
            return;
        };
        let taken = match cr.kind {
            CredKind::KeyAuth => match digest_from_hex(&cr.lookup) {
                Some(d) if !self.keys.contains_key(&d) => {
                    self.keys.insert(
                        d,
                        KeyEntry {
                            consumer,
                            credential: Arc::from(cr.id.as_str()),
                            expires_at: cr.expires_at,
                        },
                    );
                    false
                }
                _ => true,
            },
            CredKind::BasicAuth => match &cr.secret {
                Some(phc) if !self.users.contains_key(&cr.lookup) => {
                    self.users.insert(
                        cr.lookup.clone(),
                        UserEntry {
                            consumer,
                            phc: Arc::from(phc.as_str()),
                        },
                    );
                    false
                }
                _ => true,
            },
            CredKind::Jwt => insert_new(&mut self.jwt, &cr.lookup, consumer),
            CredKind::Mtls => insert_new(&mut self.mtls, &cr.lookup, consumer),
            CredKind::HmacAuth => match &cr.secret {
                Some(secret) if !self.hmac.contains_key(&cr.lookup) => {
                    self.hmac.insert(
                        cr.lookup.clone(),
                        HmacEntry {
                            consumer,
                            secret: Arc::from(secret.as_bytes()),
                        },
                    );
                    false
                }
                _ => true,
            },
        };
        if taken {
            tracing::warn!(consumer = %cr.consumer, credential = %cr.id, kind = cr.kind.as_str(),
                "a stored credential repeats one declared in the file; it is ignored");
            return;
        }
        self.credentials
            .entry(cr.consumer.clone())
            .or_default()
            .push(cr);
    }

    /// Look up an API key as sent by a client; `now` in Unix seconds.
    pub fn key(&self, key: &[u8], now: i64) -> KeyLookup<'_> {
        match self.keys.get(&key_digest(key)) {
            Some(e) if e.expires_at.is_some_and(|t| now >= t) => KeyLookup::Expired(e),
            Some(e) => KeyLookup::Valid(e),
            None => KeyLookup::Unknown,
        }
    }

    pub fn user(&self, username: &str) -> Option<&UserEntry> {
        self.users.get(username)
    }

    /// The consumer of a JWT credential without an issuer.
    pub fn jwt_subject(&self, subject: &str) -> Option<&Arc<Consumer>> {
        self.jwt.get(subject)
    }

    /// The consumer of a token: a credential naming this issuer and subject first,
    /// then one naming the subject alone (which any trusted issuer maps).
    pub fn jwt_consumer(&self, issuer: Option<&str>, subject: &str) -> Option<&Arc<Consumer>> {
        if let Some(i) = issuer {
            if let Some(c) = self
                .jwt
                .get(&portico_config::identity::jwt_lookup(Some(i), subject))
            {
                return Some(c);
            }
        }
        self.jwt.get(subject)
    }

    pub fn hmac_key(&self, key_id: &str) -> Option<&HmacEntry> {
        self.hmac.get(key_id)
    }

    pub fn cert_subject(&self, subject: &str) -> Option<&Arc<Consumer>> {
        self.mtls.get(subject)
    }

    pub fn consumer(&self, name: &str) -> Option<&Arc<Consumer>> {
        self.consumers.get(name)
    }

    /// Every consumer, by name.
    pub fn consumers(&self) -> Vec<&Arc<Consumer>> {
        let mut v: Vec<&Arc<Consumer>> = self.consumers.values().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// The credentials of a consumer (without secrets worth anything: digests and
    /// PHC strings only).
    pub fn credentials_of(&self, name: &str) -> &[CredRow] {
        self.credentials.get(name).map_or(&[], Vec::as_slice)
    }

    /// Whether a credential of this kind and lookup value exists (for refusing
    /// duplicates before they reach the store).
    pub fn has_lookup(&self, kind: CredKind, lookup: &str) -> bool {
        match kind {
            CredKind::KeyAuth => {
                digest_from_hex(lookup).is_some_and(|d| self.keys.contains_key(&d))
            }
            CredKind::BasicAuth => self.users.contains_key(lookup),
            CredKind::Jwt => self.jwt.contains_key(lookup),
            CredKind::Mtls => self.mtls.contains_key(lookup),
            CredKind::HmacAuth => self.hmac.contains_key(lookup),
        }
    }
}

fn insert_new(m: &mut HashMap<String, Arc<Consumer>>, k: &str, c: Arc<Consumer>) -> bool {
    if m.contains_key(k) {
        return true;
    }
    m.insert(k.to_string(), c);
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::secret::digest_hex;

    fn row(name: &str) -> ConsumerRow {
        ConsumerRow {
            name: name.into(),
            groups: vec!["gold".into(), "beta".into()],
            metadata: Map::new(),
            created_at: 0,
            updated_at: 0,
        }
    }

    fn key(id: &str, consumer: &str, key: &str, expires_at: Option<i64>) -> CredRow {
        CredRow {
            id: id.into(),
            consumer: consumer.into(),
            kind: CredKind::KeyAuth,
            lookup: digest_hex(&key_digest(key.as_bytes())),
            secret: None,
            display: String::new(),
            created_at: 0,
            expires_at,
        }
    }

    #[test]
    fn lookups_expiry_and_precedence() {
        let declared = vec![(
            row("alice"),
            vec![key("a1", "alice", "alice-key-0123456789", Some(100))],
        )];
        let stored = vec![row("alice"), row("bob")];
        let creds = vec![
            key("b1", "bob", "bob-key-0123456789ab", None),
            // same key as alice's declared one: ignored
            key("b2", "bob", "alice-key-0123456789", None),
        ];
        let ix = ConsumerIndex::build(&declared, stored, creds);
        assert_eq!(ix.consumer("alice").unwrap().source, Source::File);
        assert_eq!(ix.consumer("bob").unwrap().source, Source::Store);
        match ix.key(b"alice-key-0123456789", 99) {
            KeyLookup::Valid(e) => assert_eq!(e.consumer.name, "alice"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ix.key(b"alice-key-0123456789", 100),
            KeyLookup::Expired(_)
        ));
        match ix.key(b"bob-key-0123456789ab", i64::MAX) {
            KeyLookup::Valid(e) => assert_eq!(e.consumer.name, "bob"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ix.key(b"nope-nope-nope-nope", 0),
            KeyLookup::Unknown
        ));
        assert_eq!(ix.credentials_of("bob").len(), 1);
        let a = ix.consumer("alice").unwrap();
        assert_eq!(a.groups_header.as_ref().unwrap(), "gold, beta");
        assert!(a.in_group("beta") && !a.in_group("gol"));
    }

    #[test]
    fn jwt_subjects_may_be_scoped_to_an_issuer() {
        let jwt = |id: &str, consumer: &str, lookup: String| CredRow {
            id: id.into(),
            consumer: consumer.into(),
            kind: CredKind::Jwt,
            lookup,
            secret: None,
            display: String::new(),
            created_at: 0,
            expires_at: None,
        };
        use portico_config::identity::jwt_lookup;
        let declared = vec![
            (
                row("admin"),
                vec![jwt("j1", "admin", jwt_lookup(Some("https://corp"), "42"))],
            ),
            (
                row("anyone"),
                vec![jwt("j2", "anyone", jwt_lookup(None, "7"))],
            ),
        ];
        let ix = ConsumerIndex::build(&declared, Vec::new(), Vec::new());
        // Subject 42 is admin only when corp issued the token.
        assert_eq!(
            ix.jwt_consumer(Some("https://corp"), "42").unwrap().name,
            "admin"
        );
        assert!(ix.jwt_consumer(Some("https://other-idp"), "42").is_none());
        assert!(ix.jwt_consumer(None, "42").is_none());
        // A credential without an issuer maps any issuer's subject.
        assert_eq!(
            ix.jwt_consumer(Some("https://other-idp"), "7")
                .unwrap()
                .name,
            "anyone"
        );
        assert_eq!(ix.jwt_consumer(None, "7").unwrap().name, "anyone");
    }
}
