//! Portico's store and identity data.
//!
//! Owns: the SQLite store (consumers, credentials, `quota` usage of local mode), secrets (API key
//! generation and digests, Argon2id password hashes), the [`ConsumerIndex`] the data
//! plane authenticates against, and [`Identity`], the handle that keeps the index
//! current: rebuilt and swapped on every admin write, on a configuration reload and
//! when another process sharing the store file commits a change.
//!
//! Does not own: the authentication policies (`portico-plugins`) or the admin API's
//! HTTP surface (`portico-admin`).
#![forbid(unsafe_code)]

pub mod db;
pub mod index;
pub mod secret;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use parking_lot::Mutex;
use portico_config::identity::{
    check_group, check_hmac_secret, check_key, check_key_id, check_name, check_subject,
    check_username, jwt_lookup, parse_time,
};
use portico_config::{ConsumerDecl, CredentialDecl};
use serde_json::{Map, Value};

pub use db::{ConsumerRow, CredKind, CredRow, QuotaRow, Store, StoreError};
pub use index::{Consumer, ConsumerIndex, KeyEntry, KeyLookup, Source, UserEntry};
use secret::{digest_hex, key_digest, KeyDigest};

/// What an admin sees of a JWT credential.
fn jwt_display(issuer: Option<&str>, subject: &str) -> String {
    match issuer {
        Some(i) => format!("{subject} (issuer {i})"),
        None => subject.to_string(),
    }
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Consumers declared in the configuration file, with their secrets hashed.
#[derive(Default)]
pub struct Declared {
    entries: Vec<(ConsumerRow, Vec<CredRow>)>,
    /// Argon2id hashes by (user name, SHA-256 of the password), so a reload does not
    /// hash unchanged passwords again.
    phc: HashMap<(String, KeyDigest), String>,
}

impl Declared {
    /// Hash the secrets of the declared consumers (reusing `prev`'s password hashes).
    pub fn compile(decls: &[ConsumerDecl], prev: Option<&Declared>) -> Result<Declared, String> {
        let mut out = Declared::default();
        for c in decls {
            let row = ConsumerRow {
                name: c.name.clone(),
                groups: c.groups.clone(),
                metadata: c
                    .metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                created_at: 0,
                updated_at: 0,
            };
            let mut creds = Vec::with_capacity(c.credentials.len());
            for (i, cred) in c.credentials.iter().enumerate() {
                let id = format!("file:{}:{i}", c.name);
                let (kind, lookup, secret, display, expires_at) = match cred {
                    CredentialDecl::KeyAuth { key, expires_at } => (
                        CredKind::KeyAuth,
                        digest_hex(&key_digest(key.0.as_bytes())),
                        None,
                        secret::key_hint(&key.0),
                        expires_at.as_deref().map(parse_time).transpose()?,
                    ),
                    CredentialDecl::BasicAuth { username, password } => {
                        let phc = if secret::is_phc(&password.0) {
                            password.0.clone()
                        } else {
                            let k = (username.clone(), key_digest(password.0.as_bytes()));
                            match prev.and_then(|p| p.phc.get(&k)) {
                                Some(h) => h.clone(),
                                None => {
                                    let h = secret::hash_password(&password.0)?;
                                    out.phc.insert(k.clone(), h.clone());
                                    h
                                }
                            }
                        };
                        if !secret::is_phc(&password.0) {
                            out.phc.insert(
                                (username.clone(), key_digest(password.0.as_bytes())),
                                phc.clone(),
                            );
                        }
                        (
                            CredKind::BasicAuth,
                            username.clone(),
                            Some(phc),
                            username.clone(),
                            None,
                        )
                    }
                    CredentialDecl::Jwt { subject, issuer } => (
                        CredKind::Jwt,
                        jwt_lookup(issuer.as_deref(), subject),
                        None,
                        jwt_display(issuer.as_deref(), subject),
                        None,
                    ),
                    CredentialDecl::Mtls { subject } => {
                        (CredKind::Mtls, subject.clone(), None, subject.clone(), None)
                    }
                    CredentialDecl::HmacAuth { key_id, secret } => (
                        CredKind::HmacAuth,
                        key_id.clone(),
                        Some(secret.0.clone()),
                        key_id.clone(),
                        None,
                    ),
                };
                creds.push(CredRow {
                    id,
                    consumer: c.name.clone(),
                    kind,
                    lookup,
                    secret,
                    display,
                    created_at: 0,
                    expires_at,
                });
            }
            out.entries.push((row, creds));
        }
        Ok(out)
    }

    fn has(&self, name: &str) -> bool {
        self.entries.iter().any(|(c, _)| c.name == name)
    }
}

/// Why an admin change was refused.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    DeclaredInFile(String),
    #[error("there is no store (the gateway runs without one)")]
    NoStore,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A credential to create through the admin API.
#[derive(Debug)]
pub enum NewCredential {
    /// `key`: None makes one; `expires_at` in Unix seconds.
    KeyAuth {
        key: Option<String>,
        expires_at: Option<i64>,
    },
    BasicAuth {
        username: String,
        password: String,
    },
    Jwt {
        subject: String,
        issuer: Option<String>,
    },
    Mtls {
        subject: String,
    },
    /// `key_id` None: a random one; `secret` None: 256 random bits made here (returned
    /// once).
    HmacAuth {
        key_id: Option<String>,
        secret: Option<String>,
    },
}

/// The handle the gateway, its policies and the admin API share.
pub struct Identity {
    index: ArcSwap<ConsumerIndex>,
    store: Option<Store>,
    declared: Mutex<Arc<Declared>>,
    /// The store's `data_version` read just before the last rebuild read the rows: a
    /// commit by another process after that read changes it.
    seen_version: parking_lot::Mutex<Option<i64>>,
}

impl Identity {
    /// No store, no consumers (validation, tests of unrelated parts).
    pub fn detached() -> Identity {
        Identity {
            index: ArcSwap::from_pointee(ConsumerIndex::default()),
            store: None,
            declared: Mutex::new(Arc::new(Declared::default())),
            seen_version: parking_lot::Mutex::new(None),
        }
    }

    /// Open the store and build the index from it and the declared consumers.
    pub fn open(path: &Path, declared: Declared) -> Result<Identity, StoreError> {
        let id = Identity {
            index: ArcSwap::from_pointee(ConsumerIndex::default()),
            store: Some(Store::open(path)?),
            declared: Mutex::new(Arc::new(declared)),
            seen_version: parking_lot::Mutex::new(None),
        };
        id.rebuild()?;
        Ok(id)
    }

    /// The current index (cheap: an atomic load).
    pub fn index(&self) -> arc_swap::Guard<Arc<ConsumerIndex>> {
        self.index.load()
    }

    pub fn store(&self) -> Option<&Store> {
        self.store.as_ref()
    }

    /// The declared consumers now in force (for hashing the next ones).
    pub fn declared(&self) -> Arc<Declared> {
        self.declared.lock().clone()
    }

    /// Replace the declared consumers (configuration reload) and rebuild.
    pub fn set_declared(&self, d: Declared) -> Result<(), StoreError> {
        let mut g = self.declared.lock();
        *g = Arc::new(d);
        self.rebuild_locked(&g)
    }

    /// Rebuild the index from the store and the declared consumers.
    pub fn rebuild(&self) -> Result<(), StoreError> {
        let g = self.declared.lock();
        self.rebuild_locked(&g)
    }

    fn rebuild_locked(&self, declared: &Declared) -> Result<(), StoreError> {
        let (consumers, creds) = match &self.store {
            Some(s) => match s.snapshot() {
                Ok((version, consumers, creds)) => {
                    *self.seen_version.lock() = Some(version);
                    (consumers, creds)
                }
                Err(e) => {
                    // The next poll rebuilds again: a committed change (a revocation)
                    // must not stay unapplied because one read failed.
                    *self.seen_version.lock() = None;
                    return Err(e);
                }
            },
            None => (Vec::new(), Vec::new()),
        };
        self.index.store(Arc::new(ConsumerIndex::build(
            &declared.entries,
            consumers,
            creds,
        )));
        Ok(())
    }

    /// Rebuild when another process sharing the store file commits a change
    /// (checked every `every`; stops when the identity is dropped).
    pub fn watch(self: &Arc<Self>, every: Duration) {
        if self.store.is_none() {
            return;
        }
        let weak: Weak<Identity> = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(id) = weak.upgrade() else { return };
                let r = tokio::task::spawn_blocking(move || id.refresh_if_changed()).await;
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot re-read the store"),
                    Err(_) => return,
                }
            }
        });
    }

    /// Rebuild when the store changed since the last rebuild read it.
    pub fn refresh_if_changed(&self) -> Result<(), StoreError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let v = store.data_version()?;
        if *self.seen_version.lock() != Some(v) {
            self.rebuild()?;
        }
        Ok(())
    }

    fn writable(&self, name: &str) -> Result<&Store, Refusal> {
        if self.declared.lock().has(name) {
            return Err(Refusal::DeclaredInFile(format!(
                "consumer `{name}` is declared in the configuration file; change it there"
            )));
        }
        self.store.as_ref().ok_or(Refusal::NoStore)
    }

    /// Create a consumer in the store.
    pub fn create_consumer(
        &self,
        name: &str,
        groups: Vec<String>,
        metadata: Map<String, Value>,
    ) -> Result<ConsumerRow, Refusal> {
        check_name(name).map_err(Refusal::Invalid)?;
        check_groups(&groups)?;
        let store = self.writable(name)?;
        let now = now_secs();
        let row = ConsumerRow {
            name: name.to_string(),
            groups,
            metadata,
            created_at: now,
            updated_at: now,
        };
        if !store.insert_consumer(&row)? {
            return Err(Refusal::Conflict(format!(
                "consumer `{name}` already exists"
            )));
        }
        self.rebuild()?;
        Ok(row)
    }

    /// Change a stored consumer's groups and/or metadata.
    pub fn update_consumer(
        &self,
        name: &str,
        groups: Option<Vec<String>>,
        metadata: Option<Map<String, Value>>,
    ) -> Result<ConsumerRow, Refusal> {
        let store = self.writable(name)?;
        let mut row = store
            .consumer(name)?
            .ok_or_else(|| Refusal::NotFound(format!("no consumer named `{name}`")))?;
        if let Some(g) = groups {
            check_groups(&g)?;
            row.groups = g;
        }
        if let Some(m) = metadata {
            row.metadata = m;
        }
        row.updated_at = now_secs();
        if !store.update_consumer(&row)? {
            return Err(Refusal::NotFound(format!("no consumer named `{name}`")));
        }
        self.rebuild()?;
        Ok(row)
    }

    /// Delete a stored consumer and its credentials.
    pub fn delete_consumer(&self, name: &str) -> Result<(), Refusal> {
        let store = self.writable(name)?;
        if !store.delete_consumer(name)? {
            return Err(Refusal::NotFound(format!("no consumer named `{name}`")));
        }
        self.rebuild()?;
        Ok(())
    }

    /// Add a credential to a stored consumer. Returns the row and, for a generated
    /// or given API key, the key itself (shown once, never stored).
    pub fn add_credential(
        &self,
        consumer: &str,
        new: NewCredential,
    ) -> Result<(CredRow, Option<String>), Refusal> {
        let store = self.writable(consumer)?;
        if store.consumer(consumer)?.is_none() {
            return Err(Refusal::NotFound(format!("no consumer named `{consumer}`")));
        }
        let now = now_secs();
        let (kind, lookup, secret, display, expires_at, plain) = match new {
            NewCredential::KeyAuth { key, expires_at } => {
                let key = match key {
                    Some(k) => {
                        check_key(&k).map_err(Refusal::Invalid)?;
                        k
                    }
                    None => secret::generate_key(),
                };
                if expires_at.is_some_and(|t| t <= now) {
                    return Err(Refusal::Invalid("`expires_at` is in the past".into()));
                }
                let lookup = digest_hex(&key_digest(key.as_bytes()));
                (
                    CredKind::KeyAuth,
                    lookup,
                    None,
                    secret::key_hint(&key),
                    expires_at,
                    Some(key),
                )
            }
            NewCredential::BasicAuth { username, password } => {
                check_username(&username).map_err(Refusal::Invalid)?;
                if password.chars().count() < 8 {
                    return Err(Refusal::Invalid(
                        "a password has at least 8 characters".into(),
                    ));
                }
                let phc = secret::hash_password(&password).map_err(Refusal::Invalid)?;
                (
                    CredKind::BasicAuth,
                    username.clone(),
                    Some(phc),
                    username,
                    None,
                    None,
                )
            }
            NewCredential::Jwt { subject, issuer } => {
                check_subject(&subject).map_err(|e| Refusal::Invalid(format!("`subject`: {e}")))?;
                if let Some(Err(e)) = issuer.as_deref().map(check_subject) {
                    return Err(Refusal::Invalid(format!("`issuer`: {e}")));
                }
                (
                    CredKind::Jwt,
                    jwt_lookup(issuer.as_deref(), &subject),
                    None,
                    jwt_display(issuer.as_deref(), &subject),
                    None,
                    None,
                )
            }
            NewCredential::HmacAuth { key_id, secret } => {
                let key_id = key_id.unwrap_or_else(secret::new_id);
                check_key_id(&key_id).map_err(Refusal::Invalid)?;
                let (secret, shown) = match secret {
                    Some(s) => {
                        check_hmac_secret(&s).map_err(Refusal::Invalid)?;
                        (s, None)
                    }
                    None => {
                        let s = secret::generate_secret();
                        (s.clone(), Some(s))
                    }
                };
                (
                    CredKind::HmacAuth,
                    key_id.clone(),
                    Some(secret),
                    key_id,
                    None,
                    shown,
                )
            }
            NewCredential::Mtls { subject } => {
                if subject.is_empty() {
                    return Err(Refusal::Invalid("`subject` is empty".into()));
                }
                (CredKind::Mtls, subject.clone(), None, subject, None, None)
            }
        };
        let taken = || {
            Refusal::Conflict(format!(
                "this {} credential already belongs to a consumer",
                kind.as_str()
            ))
        };
        if self.index().has_lookup(kind, &lookup) {
            return Err(taken());
        }
        let row = CredRow {
            id: secret::new_id(),
            consumer: consumer.to_string(),
            kind,
            lookup,
            secret,
            display,
            created_at: now,
            expires_at,
        };
        if !store.insert_credential(&row)? {
            return Err(taken());
        }
        self.rebuild()?;
        Ok((row, plain))
    }

    /// Delete (revoke) a credential of a stored consumer.
    pub fn delete_credential(&self, consumer: &str, id: &str) -> Result<(), Refusal> {
        let store = self.writable(consumer)?;
        if !store.delete_credential(consumer, id)? {
            return Err(Refusal::NotFound(format!(
                "consumer `{consumer}` has no credential `{id}`"
            )));
        }
        self.rebuild()?;
        Ok(())
    }
}

fn check_groups(groups: &[String]) -> Result<(), Refusal> {
    for g in groups {
        check_group(g).map_err(Refusal::Invalid)?;
    }
    Ok(())
}
