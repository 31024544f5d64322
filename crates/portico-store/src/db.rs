//! The SQLite store: consumers and credentials made through the admin API.
//!
//! Calls are synchronous (SQLite is an in-process library); async callers run them
//! on the blocking pool. The data plane never reads the store per request: it reads
//! the [`ConsumerIndex`](crate::index::ConsumerIndex) built from it.

use std::path::{Path, PathBuf};

use parking_lot::Mutex;
use rusqlite::{params, Connection, OptionalExtension};
use serde_json::{Map, Value};

/// A store failure: the file could not be opened or a statement failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store {path}: cannot create its directory: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("store: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("store: a stored value is corrupt: {0}")]
    Corrupt(String),
}

/// The kind of a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredKind {
    KeyAuth,
    BasicAuth,
    Jwt,
    Mtls,
    HmacAuth,
}

impl CredKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CredKind::KeyAuth => "key-auth",
            CredKind::BasicAuth => "basic-auth",
            CredKind::Jwt => "jwt",
            CredKind::Mtls => "mtls",
            CredKind::HmacAuth => "hmac-auth",
        }
    }

    pub fn parse(s: &str) -> Option<CredKind> {
        Some(match s {
            "key-auth" => CredKind::KeyAuth,
            "basic-auth" => CredKind::BasicAuth,
            "jwt" => CredKind::Jwt,
            "mtls" => CredKind::Mtls,
            "hmac-auth" => CredKind::HmacAuth,
            _ => return None,
        })
    }

    pub const ALL: [&'static str; 5] = ["key-auth", "basic-auth", "jwt", "mtls", "hmac-auth"];
}

/// A consumer row.
#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerRow {
    pub name: String,
    pub groups: Vec<String>,
    pub metadata: Map<String, Value>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// A credential row. `lookup` is what a request is matched by: the hex SHA-256 of an
/// API key, a user name, a JWT subject or a certificate subject. `secret` is the
/// Argon2id PHC string of a password (basic-auth), or the shared secret of an HMAC
/// key (hmac-auth: a signature cannot be checked against a hash).
#[derive(Clone, PartialEq)]
pub struct CredRow {
    pub id: String,
    pub consumer: String,
    pub kind: CredKind,
    pub lookup: String,
    pub secret: Option<String>,
    /// What an admin may see: a key's first characters, a user name, a subject.
    pub display: String,
    pub created_at: i64,
    pub expires_at: Option<i64>,
}

/// `Debug` without the secret: a credential row may end up in a log line.
impl std::fmt::Debug for CredRow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredRow")
            .field("id", &self.id)
            .field("consumer", &self.consumer)
            .field("kind", &self.kind)
            .field("display", &self.display)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

/// The store.
pub struct Store {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS consumers (
    name TEXT PRIMARY KEY,
    groups TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS credentials (
    id TEXT PRIMARY KEY,
    consumer TEXT NOT NULL REFERENCES consumers(name) ON DELETE CASCADE,
    type TEXT NOT NULL,
    lookup TEXT NOT NULL,
    secret TEXT,
    display TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    UNIQUE (type, lookup)
);
CREATE INDEX IF NOT EXISTS credentials_consumer ON credentials(consumer);
";

/// Schema changes after [`SCHEMA`], in order: the database's `user_version` is the
/// number of steps applied. Append new steps; never edit an applied one.
const MIGRATIONS: &[&str] = &[
    // 1: `quota` usage (local mode): what each key used of each limit in a period.
    "
CREATE TABLE IF NOT EXISTS quota_usage (
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    limit_name TEXT NOT NULL,
    period_start INTEGER NOT NULL,
    period_end INTEGER NOT NULL,
    used INTEGER NOT NULL,
    PRIMARY KEY (scope, key, limit_name, period_start)
);
CREATE INDEX IF NOT EXISTS quota_usage_end ON quota_usage(period_end);
",
];

/// Apply the migration steps the file has not seen yet, each in its own transaction.
fn migrate(conn: &mut Connection) -> rusqlite::Result<()> {
    let applied: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    for (i, step) in MIGRATIONS.iter().enumerate() {
        let version = i as i64 + 1;
        if version <= applied {
            continue;
        }
        let tx = conn.transaction()?;
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", version)?;
        tx.commit()?;
    }
    Ok(())
}

/// What a key used of one `quota` limit in one period (local mode's saved counts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuotaRow {
    /// `global` or `route:NAME`.
    pub scope: String,
    pub key: String,
    pub limit: String,
    /// Unix seconds.
    pub period_start: i64,
    pub period_end: i64,
    pub used: u64,
}

impl Store {
    /// Open (creating when missing) the store file.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
                path: path.to_path_buf(),
                source,
            })?;
        }
        let open = || -> rusqlite::Result<Connection> {
            let mut conn = Connection::open(path)?;
            conn.busy_timeout(std::time::Duration::from_secs(5))?;
            conn.pragma_update(None, "journal_mode", "WAL")?;
            conn.pragma_update(None, "foreign_keys", "ON")?;
            conn.execute_batch(SCHEMA)?;
            migrate(&mut conn)?;
            Ok(conn)
        };
        let conn = open().map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Store {
            conn: Mutex::new(conn),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A number that changes when another connection (another gateway process
    /// sharing the file) commits a change.
    pub fn data_version(&self) -> Result<i64, StoreError> {
        let c = self.conn.lock();
        Ok(c.query_row("PRAGMA data_version", [], |r| r.get(0))?)
    }

    pub fn consumers(&self) -> Result<Vec<ConsumerRow>, StoreError> {
        read_consumers(&self.conn.lock())
    }

    /// Every consumer and credential, and the `data_version` they were read at, in one
    /// read transaction (so a change by another process is seen whole or not at all).
    pub fn snapshot(&self) -> Result<(i64, Vec<ConsumerRow>, Vec<CredRow>), StoreError> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        let version: i64 = tx.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        let consumers = read_consumers(&tx)?;
        let creds = read_credentials(&tx, None)?;
        tx.commit()?;
        Ok((version, consumers, creds))
    }

    pub fn consumer(&self, name: &str) -> Result<Option<ConsumerRow>, StoreError> {
        let c = self.conn.lock();
        let row = c
            .query_row(
                "SELECT name, groups, metadata, created_at, updated_at FROM consumers WHERE name = ?1",
                [name],
                consumer_from_row,
            )
            .optional()?;
        row.map(parse_consumer).transpose()
    }

    /// Insert a consumer; false when the name is taken.
    pub fn insert_consumer(&self, row: &ConsumerRow) -> Result<bool, StoreError> {
        let c = self.conn.lock();
        let n = c.execute(
            "INSERT INTO consumers (name, groups, metadata, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT(name) DO NOTHING",
            params![
                row.name,
                to_json(&row.groups),
                Value::Object(row.metadata.clone()).to_string(),
                row.created_at,
                row.updated_at
            ],
        )?;
        Ok(n == 1)
    }

    /// Replace a consumer's groups and metadata; false when there is no such consumer.
    pub fn update_consumer(&self, row: &ConsumerRow) -> Result<bool, StoreError> {
        let c = self.conn.lock();
        let n = c.execute(
            "UPDATE consumers SET groups = ?2, metadata = ?3, updated_at = ?4 WHERE name = ?1",
            params![
                row.name,
                to_json(&row.groups),
                Value::Object(row.metadata.clone()).to_string(),
                row.updated_at
            ],
        )?;
        Ok(n == 1)
    }

    /// Delete a consumer and its credentials; false when there is no such consumer.
    pub fn delete_consumer(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.conn.lock();
        Ok(c.execute("DELETE FROM consumers WHERE name = ?1", [name])? == 1)
    }

    pub fn credentials(&self, consumer: Option<&str>) -> Result<Vec<CredRow>, StoreError> {
        read_credentials(&self.conn.lock(), consumer)
    }

    /// Insert a credential; false when its lookup value is taken by another credential
    /// of the same kind.
    pub fn insert_credential(&self, row: &CredRow) -> Result<bool, StoreError> {
        let c = self.conn.lock();
        let n = c.execute(
            "INSERT INTO credentials (id, consumer, type, lookup, secret, display, created_at, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT DO NOTHING",
            params![
                row.id,
                row.consumer,
                row.kind.as_str(),
                row.lookup,
                row.secret,
                row.display,
                row.created_at,
                row.expires_at
            ],
        )?;
        Ok(n == 1)
    }

    /// Delete (revoke) a credential of a consumer; false when there is none.
    pub fn delete_credential(&self, consumer: &str, id: &str) -> Result<bool, StoreError> {
        let c = self.conn.lock();
        Ok(c.execute(
            "DELETE FROM credentials WHERE consumer = ?1 AND id = ?2",
            [consumer, id],
        )? == 1)
    }
}

impl Store {
    /// The saved `quota` usage of a scope whose period has not ended at `now`.
    pub fn quota_rows(&self, scope: &str, now: i64) -> Result<Vec<QuotaRow>, StoreError> {
        let c = self.conn.lock();
        let mut st = c.prepare(
            "SELECT scope, key, limit_name, period_start, period_end, used FROM quota_usage
             WHERE scope = ?1 AND period_end > ?2",
        )?;
        let rows = st.query_map(params![scope, now], |r| {
            Ok(QuotaRow {
                scope: r.get(0)?,
                key: r.get(1)?,
                limit: r.get(2)?,
                period_start: r.get(3)?,
                period_end: r.get(4)?,
                used: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Save `rows` (replacing the count of the same scope, key, limit and period) and
    /// forget the periods that ended before `now`, in one transaction.
    pub fn save_quota_rows(&self, rows: &[QuotaRow], now: i64) -> Result<(), StoreError> {
        let mut c = self.conn.lock();
        let tx = c.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO quota_usage (scope, key, limit_name, period_start, period_end, used)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (scope, key, limit_name, period_start)
                 DO UPDATE SET used = excluded.used, period_end = excluded.period_end",
            )?;
            for r in rows {
                st.execute(params![
                    r.scope,
                    r.key,
                    r.limit,
                    r.period_start,
                    r.period_end,
                    i64::try_from(r.used).unwrap_or(i64::MAX)
                ])?;
            }
            tx.execute("DELETE FROM quota_usage WHERE period_end <= ?1", [now])?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Forget every saved count of `key` in `scope`; how many rows went.
    pub fn delete_quota_rows(&self, scope: &str, key: &str) -> Result<usize, StoreError> {
        let c = self.conn.lock();
        Ok(c.execute(
            "DELETE FROM quota_usage WHERE scope = ?1 AND key = ?2",
            [scope, key],
        )?)
    }
}

fn read_consumers(c: &Connection) -> Result<Vec<ConsumerRow>, StoreError> {
    let mut st = c.prepare(
        "SELECT name, groups, metadata, created_at, updated_at FROM consumers ORDER BY name",
    )?;
    let rows = st.query_map([], consumer_from_row)?;
    rows.map(|r| r.map_err(StoreError::from).and_then(parse_consumer))
        .collect()
}

fn read_credentials(c: &Connection, consumer: Option<&str>) -> Result<Vec<CredRow>, StoreError> {
    let sql = "SELECT id, consumer, type, lookup, secret, display, created_at, expires_at
               FROM credentials WHERE ?1 IS NULL OR consumer = ?1 ORDER BY created_at, id";
    let mut st = c.prepare(sql)?;
    let rows = st.query_map([consumer], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, Option<String>>(4)?,
            r.get::<_, String>(5)?,
            r.get::<_, i64>(6)?,
            r.get::<_, Option<i64>>(7)?,
        ))
    })?;
    let mut out = Vec::new();
    for r in rows {
        let (id, consumer, kind, lookup, secret, display, created_at, expires_at) = r?;
        let kind = CredKind::parse(&kind)
            .ok_or_else(|| StoreError::Corrupt(format!("credential {id}: type `{kind}`")))?;
        out.push(CredRow {
            id,
            consumer,
            kind,
            lookup,
            secret,
            display,
            created_at,
            expires_at,
        });
    }
    Ok(out)
}

type RawConsumer = (String, String, String, i64, i64);

fn consumer_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawConsumer> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn parse_consumer(
    (name, groups, metadata, created_at, updated_at): RawConsumer,
) -> Result<ConsumerRow, StoreError> {
    let groups: Vec<String> = serde_json::from_str(&groups)
        .map_err(|e| StoreError::Corrupt(format!("consumer {name}: groups: {e}")))?;
    let metadata: Map<String, Value> = serde_json::from_str(&metadata)
        .map_err(|e| StoreError::Corrupt(format!("consumer {name}: metadata: {e}")))?;
    Ok(ConsumerRow {
        name,
        groups,
        metadata,
        created_at,
        updated_at,
    })
}

fn to_json(groups: &[String]) -> String {
    Value::Array(groups.iter().cloned().map(Value::String).collect()).to_string()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn consumer(name: &str) -> ConsumerRow {
        ConsumerRow {
            name: name.into(),
            groups: vec!["gold".into()],
            metadata: Map::new(),
            created_at: 1,
            updated_at: 1,
        }
    }

    fn cred(id: &str, consumer: &str, lookup: &str) -> CredRow {
        CredRow {
            id: id.into(),
            consumer: consumer.into(),
            kind: CredKind::KeyAuth,
            lookup: lookup.into(),
            secret: None,
            display: "pk_…".into(),
            created_at: 1,
            expires_at: None,
        }
    }

    #[test]
    fn round_trip_and_cascade() {
        let dir = std::env::temp_dir().join(format!("portico-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let s = Store::open(&dir.join("sub/p.db")).unwrap();
        assert!(s.insert_consumer(&consumer("alice")).unwrap());
        assert!(!s.insert_consumer(&consumer("alice")).unwrap());
        assert!(s.insert_credential(&cred("c1", "alice", "aa")).unwrap());
        // the same key twice is refused
        assert!(!s.insert_credential(&cred("c2", "alice", "aa")).unwrap());
        // no credential for a consumer that does not exist
        assert!(s.insert_credential(&cred("c3", "bob", "bb")).is_err());
        let mut c = consumer("alice");
        c.groups = vec!["silver".into()];
        c.metadata.insert("tier".into(), Value::from(2));
        assert!(s.update_consumer(&c).unwrap());
        assert_eq!(s.consumer("alice").unwrap().unwrap().groups, vec!["silver"]);
        assert_eq!(s.credentials(Some("alice")).unwrap().len(), 1);
        // a second connection to the file sees the change, and data_version moves
        let other = Store::open(&dir.join("sub/p.db")).unwrap();
        let v = s.data_version().unwrap();
        assert!(other.delete_consumer("alice").unwrap());
        assert_ne!(s.data_version().unwrap(), v);
        assert!(s.credentials(None).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quota_rows_migrate_save_and_prune() {
        let dir = std::env::temp_dir().join(format!("portico-store-q-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("q.db");
        std::fs::create_dir_all(&dir).unwrap();
        // A file made before the quota table existed (no migration applied yet).
        {
            let c = Connection::open(&path).unwrap();
            c.execute_batch(SCHEMA).unwrap();
        }
        let s = Store::open(&path).unwrap();
        let v: i64 = s
            .conn
            .lock()
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, MIGRATIONS.len() as i64);
        let row = |key: &str, start: i64, used: u64| QuotaRow {
            scope: "route:a".into(),
            key: key.into(),
            limit: "requests-per-day".into(),
            period_start: start,
            period_end: start + 86400,
            used,
        };
        s.save_quota_rows(&[row("alice", 0, 3), row("bob", 0, 1)], 10)
            .unwrap();
        s.save_quota_rows(&[row("alice", 0, 5)], 10).unwrap();
        let mut got = s.quota_rows("route:a", 10).unwrap();
        got.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(got, vec![row("alice", 0, 5), row("bob", 0, 1)]);
        assert!(s.quota_rows("route:b", 10).unwrap().is_empty());
        // Reopening applies nothing twice and keeps the rows.
        drop(s);
        let s = Store::open(&path).unwrap();
        assert_eq!(s.quota_rows("route:a", 10).unwrap().len(), 2);
        assert_eq!(s.delete_quota_rows("route:a", "alice").unwrap(), 1);
        assert_eq!(s.delete_quota_rows("route:a", "alice").unwrap(), 0);
        // Ended periods are pruned on the next save.
        s.save_quota_rows(&[row("carol", 86400, 1)], 86400).unwrap();
        let got = s.quota_rows("route:a", 0).unwrap();
        assert_eq!(got, vec![row("carol", 86400, 1)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
