//! The SQLite implementation of the registry store.
//!
//! One file (`meshauth.db` in the server's data dir), created with mode 0600 because it holds the
//! CA private keys; WAL journal; schema versioned with `PRAGMA user_version`. Calls are short and
//! synchronous behind a mutex: the server's write rate is operator- and node-driven (tokens,
//! attestations, entries), not per-request.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use meshauth_policy::{IdentityId, Labels, NodeId, TunnelKey};
use meshauth_spiffe::SpiffeId;
use rusqlite::{Connection, OptionalExtension, Row, TransactionBehavior, params};

use crate::model::{
    EntryFilter, EntryId, IssuedJoinToken, NewEntry, NodeAttestation, NodeName, NodeRecord,
    NodeSpec, PodRecord, PodRuntime, RegistrationEntry, Selector, from_unix_secs, random_hex,
    unix_secs,
};

use crate::store::StoreError;

type Result<T> = std::result::Result<T, StoreError>;

/// Schema migrations, applied in order; `user_version` counts the applied ones.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE ca_journal (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    journal TEXT NOT NULL
);
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    expires_at INTEGER NOT NULL
);
CREATE TABLE nodes (
    node_id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    serial TEXT NOT NULL,
    previous_serial TEXT,
    svid_not_after INTEGER NOT NULL,
    banned INTEGER NOT NULL DEFAULT 0,
    attested_at INTEGER NOT NULL
);
CREATE TABLE entries (
    id TEXT PRIMARY KEY,
    spiffe_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    selectors TEXT NOT NULL,
    x509_svid_ttl INTEGER,
    dns_names TEXT NOT NULL,
    revision INTEGER NOT NULL
);
CREATE INDEX entries_by_parent ON entries (parent_id);
"#,
    r#"
CREATE TABLE identities (
    id INTEGER PRIMARY KEY,
    labels TEXT NOT NULL UNIQUE
);
CREATE TABLE endpoints (
    node TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    ipv4 TEXT NOT NULL,
    identity INTEGER NOT NULL,
    PRIMARY KEY (node, name)
);
CREATE TABLE policies (
    name TEXT PRIMARY KEY,
    yaml TEXT NOT NULL
);
ALTER TABLE nodes ADD COLUMN address TEXT;
"#,
    // Placement comes from the control plane: pods are created through the admin API; a node
    // only reports their runtime facts, inside the pod range bound to it.
    r#"
DROP TABLE endpoints;
CREATE TABLE pods (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    labels TEXT NOT NULL,
    node TEXT NOT NULL,
    identity INTEGER NOT NULL,
    ipv4 TEXT,
    interface TEXT,
    PRIMARY KEY (namespace, name)
);
CREATE UNIQUE INDEX pods_by_ipv4 ON pods (ipv4) WHERE ipv4 IS NOT NULL;
CREATE TABLE node_specs (
    name TEXT PRIMARY KEY,
    address TEXT,
    pod_range TEXT NOT NULL
);
"#,
    // How each node attested (join token or x509pop): whether it can attest again by itself.
    r#"
ALTER TABLE nodes ADD COLUMN attestation TEXT NOT NULL DEFAULT 'join_token';
"#,
    // The WireGuard public key each node published over its attested connection (base64).
    r#"
ALTER TABLE nodes ADD COLUMN tunnel_key TEXT;
"#,
    // A node's pods are read without a scan of every pod (SVID signing, the server's view).
    r#"
CREATE INDEX pods_by_node ON pods (node);
"#,
];

/// The registry store on one SQLite file.
#[derive(Debug)]
pub struct Store {
    conn: Mutex<Connection>,
}

// === impl Store ===

impl Store {
    /// Opens (creating if needed, mode 0600) the database file and brings its schema up to date.
    pub fn open(path: &Path) -> Result<Store> {
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Self::migrate(conn)
    }

    /// Opens the database file of an initialized data dir: it must exist, be a SQLite file with
    /// meshauth's schema, and pass SQLite's quick integrity check. Never creates anything.
    pub fn open_existing(path: &Path) -> Result<Store> {
        let shown = path.display().to_string();
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StoreError::Missing { path: shown });
            }
            Err(source) => {
                return Err(StoreError::Open {
                    path: shown,
                    source,
                });
            }
        };
        if meta.len() == 0 {
            return Err(StoreError::Empty { path: shown });
        }
        let damaged = |detail: String| StoreError::Damaged {
            path: shown.clone(),
            detail,
        };
        let conn = Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| damaged(e.to_string()))?;
        let version: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(|e| damaged(e.to_string()))?;
        if version == 0 {
            return Err(damaged("no meshauth schema in it".into()));
        }
        let check: String = conn
            .pragma_query_value(None, "quick_check", |r| r.get(0))
            .map_err(|e| damaged(e.to_string()))?;
        if check != "ok" {
            return Err(damaged(format!("SQLite's integrity check: {check}")));
        }
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(Duration::from_secs(5))?;
        Self::migrate(conn)
    }

    /// Reads every row through the same decoding the server uses, so that a damaged row stops
    /// startup (or `server check`) instead of failing a request later. Returns how many rows
    /// each table holds.
    pub fn check(&self) -> Result<Vec<(&'static str, usize)>> {
        let journal = self.load_ca_journal()?;
        Ok(vec![
            ("ca_journal", usize::from(journal.is_some())),
            ("nodes", self.nodes()?.len()),
            ("node_specs", self.node_specs()?.len()),
            ("identities", self.identities()?.len()),
            ("pods", self.pods()?.len()),
            ("policies", self.policies()?.len()),
            ("entries", self.list_entries(&EntryFilter::default())?.len()),
        ])
    }

    /// A store in memory, for tests of other components.
    pub fn in_memory() -> Result<Store> {
        Self::migrate(Connection::open_in_memory()?)
    }

    fn migrate(mut conn: Connection) -> Result<Store> {
        let version: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        let supported = MIGRATIONS.len() as i64;
        if version > supported {
            return Err(StoreError::SchemaTooNew {
                found: version,
                supported,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(Store {
            conn: Mutex::new(conn),
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll
        // back), so a poisoned lock is safe to reuse.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    // --- CA journal ---

    /// The CA journal (JSON written by the CA crate), if one was saved.
    pub fn load_ca_journal(&self) -> Result<Option<String>> {
        Ok(self
            .conn()
            .query_row("SELECT journal FROM ca_journal WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// Replaces the CA journal.
    pub fn save_ca_journal(&self, journal: &str) -> Result<()> {
        self.conn().execute(
            "INSERT INTO ca_journal (id, journal) VALUES (1, ?1)
             ON CONFLICT (id) DO UPDATE SET journal = excluded.journal",
            params![journal],
        )?;
        Ok(())
    }

    // --- join tokens ---

    /// Creates a single-use join token for `node`, valid for `ttl` from `now`. Only a hash of
    /// the token is stored, so a copy of the database cannot be used to attest.
    pub fn create_join_token(
        &self,
        node: &NodeName,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJoinToken> {
        let expires_at = now.checked_add(ttl).ok_or(StoreError::LifetimeOutOfRange {
            secs: ttl.as_secs(),
        })?;
        let token = random_hex(16);
        let conn = self.conn();
        conn.execute(
            "DELETE FROM join_tokens WHERE expires_at < ?1",
            params![unix_secs(now)],
        )?;
        conn.execute(
            "INSERT INTO join_tokens (token_hash, node_name, expires_at) VALUES (?1, ?2, ?3)",
            params![token_hash(&token), node.as_str(), unix_secs(expires_at)],
        )?;
        Ok(IssuedJoinToken {
            token,
            node: node.clone(),
            expires_at,
        })
    }

    /// Consumes a join token presented by `node`: it is deleted whatever the outcome, so it
    /// works at most once.
    pub fn consume_join_token(&self, token: &str, node: &NodeName, now: SystemTime) -> Result<()> {
        let row: Option<(String, i64)> = self
            .conn()
            .query_row(
                "DELETE FROM join_tokens WHERE token_hash = ?1 RETURNING node_name, expires_at",
                params![token_hash(token)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let Some((name, expires_at)) = row else {
            return Err(StoreError::TokenUnknown);
        };
        if from_unix_secs(expires_at) < now {
            return Err(StoreError::TokenExpired);
        }
        let expected: NodeName = name.parse().map_err(|e| corrupt("join_tokens", e))?;
        if expected != *node {
            return Err(StoreError::TokenWrongNode {
                expected,
                presented: node.clone(),
            });
        }
        Ok(())
    }

    // --- nodes ---

    /// Records a successful attestation (new node, or re-attestation of an evicted or known
    /// one) with its new SVID. Refuses banned nodes. Keeps the node id of a known node.
    pub fn record_attestation(
        &self,
        node: &NodeName,
        how: NodeAttestation,
        serial: &str,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        let conn = self.conn();
        let banned: Option<bool> = conn
            .query_row(
                "SELECT banned FROM nodes WHERE name = ?1",
                params![node.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        if banned == Some(true) {
            return Err(StoreError::NodeBanned(node.clone()));
        }
        conn.execute(
            "INSERT INTO nodes (name, serial, svid_not_after, attested_at, attestation) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (name) DO UPDATE SET serial = excluded.serial, previous_serial = NULL,
                 svid_not_after = excluded.svid_not_after, attestation = excluded.attestation",
            params![node.as_str(), serial, unix_secs(not_after), unix_secs(now), how.as_str()],
        )?;
        drop(conn);
        self.node(node)?
            .ok_or_else(|| StoreError::NodeNotFound(node.clone()))
    }

    /// Records a renewed node SVID. The node must exist and not be banned. `proven`, the serial
    /// the node authenticated the renewal with, stays acceptable beside the new one (see
    /// [`NodeRecord::accepts_serial`]) until the node renews with the new one: a renewal whose
    /// answer was lost, or that the node could not save, never locks the node out.
    pub fn record_renewal(
        &self,
        node: &NodeName,
        proven: &str,
        serial: &str,
        not_after: SystemTime,
    ) -> Result<NodeRecord> {
        let record = self.usable_node(node)?;
        // The serial kept beside the new one is the one the node proved it holds (it
        // authenticated this renewal with it), not blindly the last issued: a node that could
        // not save its renewed SVID (a full disk) and renews again with the old one is never
        // locked out, and drops the old one only once it used the new one.
        self.conn().execute(
            "UPDATE nodes SET previous_serial = ?2, serial = ?3, svid_not_after = ?4 WHERE name = ?1",
            params![node.as_str(), proven, serial, unix_secs(not_after)],
        )?;
        Ok(NodeRecord {
            previous_serial: Some(proven.to_owned()),
            serial: serial.to_owned(),
            svid_not_after: not_after,
            ..record
        })
    }

    /// The node, if it exists and is not banned; otherwise the error to give it.
    pub fn usable_node(&self, node: &NodeName) -> Result<NodeRecord> {
        match self.node(node)? {
            None => Err(StoreError::NodeNotFound(node.clone())),
            Some(r) if r.banned => Err(StoreError::NodeBanned(node.clone())),
            Some(r) => Ok(r),
        }
    }

    /// One node.
    pub fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        self.conn()
            .query_row(
                "SELECT name, node_id, serial, previous_serial, svid_not_after, banned, attested_at, address, attestation, tunnel_key
                 FROM nodes WHERE name = ?1",
                params![node.as_str()],
                node_row,
            )
            .optional()?
            .transpose()
    }

    /// Every node, by name.
    pub fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(
            "SELECT name, node_id, serial, previous_serial, svid_not_after, banned, attested_at, address, attestation, tunnel_key
             FROM nodes ORDER BY name",
        )?;
        let rows = stmt.query_map([], node_row)?;
        rows.map(|r| r?).collect()
    }

    /// Bans a node: it keeps its record but is refused from now on.
    pub fn ban_node(&self, node: &NodeName) -> Result<NodeRecord> {
        let n = self.conn().execute(
            "UPDATE nodes SET banned = 1 WHERE name = ?1",
            params![node.as_str()],
        )?;
        if n == 0 {
            return Err(StoreError::NodeNotFound(node.clone()));
        }
        self.node(node)?
            .ok_or_else(|| StoreError::NodeNotFound(node.clone()))
    }

    /// Deletes a node and what it reported about its pods (the pods stay placed on it): its SVID
    /// no longer renews; it may attest again with a new token.
    pub fn evict_node(&self, node: &NodeName) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let n = tx.execute("DELETE FROM nodes WHERE name = ?1", params![node.as_str()])?;
        if n == 0 {
            return Err(StoreError::NodeNotFound(node.clone()));
        }
        tx.execute(
            "UPDATE pods SET ipv4 = NULL, interface = NULL WHERE node = ?1",
            params![node.as_str()],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// What is bound to node `name`, if anything.
    pub fn node_spec(&self, name: &NodeName) -> Result<Option<NodeSpec>> {
        Ok(self.node_specs()?.into_iter().find(|s| s.name == *name))
    }

    /// Every node spec, by name.
    pub fn node_specs(&self) -> Result<Vec<NodeSpec>> {
        let conn = self.conn();
        let mut stmt =
            conn.prepare("SELECT name, address, pod_range FROM node_specs ORDER BY name")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<String>>(1)?,
                r.get::<_, String>(2)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (name, address, range) = row?;
            out.push(NodeSpec {
                name: name.parse().map_err(|e| corrupt("node_specs", e))?,
                address: address
                    .map(|a| a.parse())
                    .transpose()
                    .map_err(|e| corrupt("node_specs", e))?,
                pod_range: range
                    .parse()
                    .map_err(|e: String| corrupt("node_specs", e))?,
            });
        }
        Ok(out)
    }

    /// Binds (or re-binds) a node's address and pod range.
    pub fn put_node_spec(&self, spec: &NodeSpec) -> Result<()> {
        self.conn().execute(
            "INSERT INTO node_specs (name, address, pod_range) VALUES (?1, ?2, ?3)
             ON CONFLICT (name) DO UPDATE SET address = excluded.address,
                 pod_range = excluded.pod_range",
            params![
                spec.name.as_str(),
                spec.address.map(|a| a.to_string()),
                spec.pod_range.to_string()
            ],
        )?;
        Ok(())
    }

    /// Records the address other agents reach `node` on.
    pub fn set_node_address(&self, node: &NodeName, address: std::net::IpAddr) -> Result<()> {
        self.conn().execute(
            "UPDATE nodes SET address = ?2 WHERE name = ?1",
            params![node.as_str(), address.to_string()],
        )?;
        Ok(())
    }

    /// Records the WireGuard public key `node` published. Refused when another node has
    /// published the same key: a node must not be able to make peers confuse it with another
    /// (or, by copying a key, cut another node's tunnels).
    pub fn set_node_tunnel_key(&self, node: &NodeName, key: TunnelKey) -> Result<bool> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let text = key.to_string();
        let owner: Option<String> = tx
            .query_row(
                "SELECT name FROM nodes WHERE tunnel_key = ?1 AND name != ?2",
                params![text, node.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        if let Some(owner) = owner {
            return Err(StoreError::DuplicateTunnelKey {
                node: node.clone(),
                owner,
            });
        }
        let changed = tx.execute(
            "UPDATE nodes SET tunnel_key = ?2 WHERE name = ?1 AND tunnel_key IS NOT ?2",
            params![node.as_str(), text],
        )?;
        tx.commit()?;
        Ok(changed > 0)
    }

    // --- identities, endpoints, policies ---

    /// Every allocated identity.
    pub fn identities(&self) -> Result<Vec<(IdentityId, Labels)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT id, labels FROM identities ORDER BY id")?;
        let rows = stmt.query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?;
        let mut out = Vec::new();
        for row in rows {
            let (id, labels) = row?;
            out.push((
                IdentityId::new(u32::try_from(id).map_err(|e| corrupt("identities", e))?),
                labels_from_json(&labels)?,
            ));
        }
        Ok(out)
    }

    /// Records an allocated identity.
    pub fn insert_identity(&self, id: IdentityId, labels: &Labels) -> Result<()> {
        self.conn().execute(
            "INSERT INTO identities (id, labels) VALUES (?1, ?2)",
            params![i64::from(id.get()), labels_json(labels)],
        )?;
        Ok(())
    }

    /// Places a pod (or replaces its labels, identity and node). Its runtime facts are kept
    /// only if it stays on the same node. A runtime address another pod has is
    /// [`StoreError::AddressInUse`].
    pub fn put_pod(&self, pod: &PodRecord) -> Result<()> {
        let (ipv4, interface) = match &pod.runtime {
            Some(r) => (Some(r.ipv4.to_string()), Some(r.interface.clone())),
            None => (None, None),
        };
        let conn = self.conn();
        let done = conn.execute(
            "INSERT INTO pods (namespace, name, labels, node, identity, ipv4, interface)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (namespace, name) DO UPDATE SET labels = excluded.labels,
                 identity = excluded.identity,
                 ipv4 = CASE WHEN node = excluded.node THEN ipv4 ELSE NULL END,
                 interface = CASE WHEN node = excluded.node THEN interface ELSE NULL END,
                 node = excluded.node",
            params![
                pod.namespace,
                pod.name,
                labels_json(&pod.labels),
                pod.node.as_str(),
                i64::from(pod.identity.get()),
                ipv4,
                interface
            ],
        );
        address_checked(&conn, done, pod.runtime.as_ref())?;
        Ok(())
    }

    /// Records (or, with `None`, clears) what a pod's node reported. The address is unique in
    /// the cluster: a second pod reporting it is [`StoreError::AddressInUse`].
    pub fn set_pod_runtime(
        &self,
        namespace: &str,
        name: &str,
        runtime: Option<&PodRuntime>,
    ) -> Result<bool> {
        let conn = self.conn();
        let done = conn.execute(
            "UPDATE pods SET ipv4 = ?3, interface = ?4 WHERE namespace = ?1 AND name = ?2",
            params![
                namespace,
                name,
                runtime.map(|r| r.ipv4.to_string()),
                runtime.map(|r| r.interface.clone())
            ],
        );
        Ok(address_checked(&conn, done, runtime)? > 0)
    }

    /// Removes a pod; false when there was none.
    pub fn delete_pod(&self, namespace: &str, name: &str) -> Result<bool> {
        Ok(self.conn().execute(
            "DELETE FROM pods WHERE namespace = ?1 AND name = ?2",
            params![namespace, name],
        )? > 0)
    }

    /// Every pod, by namespace then name.
    pub fn pods(&self) -> Result<Vec<PodRecord>> {
        self.pods_where("1", &[])
    }

    /// One pod, `None` if there is none.
    pub fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>> {
        Ok(self
            .pods_where("namespace = ?1 AND name = ?2", &[namespace, name])?
            .pop())
    }

    /// The pods placed on `node`, by namespace then name (read through an index).
    pub fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>> {
        self.pods_where("node = ?1", &[node.as_str()])
    }

    /// The pods passing the SQL condition `filter` (on the `pods` table), by namespace then
    /// name.
    fn pods_where(&self, filter: &str, params: &[&str]) -> Result<Vec<PodRecord>> {
        let conn = self.conn();
        let mut stmt = conn.prepare(&format!(
            "SELECT namespace, name, labels, node, identity, ipv4, interface FROM pods
             WHERE {filter} ORDER BY namespace, name"
        ))?;
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (namespace, name, labels, node, identity, ipv4, interface) = row?;
            let key = format!("{namespace}/{name}");
            let c = |what: &str, e: &dyn std::fmt::Display| {
                corrupt("pods", format!("pod {key}, {what}: {e}"))
            };
            let runtime = match (ipv4, interface) {
                (Some(ip), Some(interface)) => Some(PodRuntime {
                    ipv4: ip.parse().map_err(|e| c("ipv4", &e))?,
                    interface,
                }),
                _ => None,
            };
            out.push(PodRecord {
                labels: labels_from_json(&labels).map_err(|e| c("labels", &e))?,
                node: node.parse().map_err(|e| c("node", &e))?,
                identity: IdentityId::new(u32::try_from(identity).map_err(|e| c("identity", &e))?),
                namespace,
                name,
                runtime,
            });
        }
        Ok(out)
    }

    /// Stores policies (key, YAML document) in one transaction, replacing those with the same
    /// key. The key is the policy's `namespace/name` (a `CiliumNetworkPolicy`) or `name` (a
    /// clusterwide policy); names cannot contain `/`, so the two never collide.
    pub fn put_policies(&self, docs: &[(String, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (key, yaml) in docs {
            tx.execute(
                "INSERT INTO policies (name, yaml) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET yaml = excluded.yaml",
                params![key, yaml],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Moves stored policies to new keys (and documents) in one transaction: each
    /// `(old key, new key, YAML)` deletes the old row and stores the new one (replacing a row
    /// that already has the new key).
    pub fn rekey_policies(&self, moves: &[(String, String, String)]) -> Result<()> {
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        for (old, new, yaml) in moves {
            tx.execute("DELETE FROM policies WHERE name = ?1", params![old])?;
            tx.execute(
                "INSERT INTO policies (name, yaml) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET yaml = excluded.yaml",
                params![new, yaml],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Deletes the policy with key `key`.
    pub fn delete_policy(&self, key: &str) -> Result<()> {
        if self
            .conn()
            .execute("DELETE FROM policies WHERE name = ?1", params![key])?
            == 0
        {
            return Err(StoreError::PolicyNotFound(key.to_owned()));
        }
        Ok(())
    }

    /// Every policy (key, YAML), by key.
    pub fn policies(&self) -> Result<Vec<(String, String)>> {
        let conn = self.conn();
        let mut stmt = conn.prepare("SELECT name, yaml FROM policies ORDER BY name")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    // --- registration entries ---

    /// Creates an entry with a fresh id and revision 1. Refuses a duplicate: an entry with the
    /// same SPIFFE ID, parent ID and selector set (order and repeats do not count).
    pub fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry> {
        let entry = RegistrationEntry {
            id: EntryId::random(),
            spiffe_id: new.spiffe_id,
            parent_id: new.parent_id,
            selectors: normalized(new.selectors),
            x509_svid_ttl: new.x509_svid_ttl,
            dns_names: new.dns_names,
            revision: 1,
        };
        // The check and the insert are one write transaction, so two creations of the same
        // entry cannot both pass (not even from two connections to the file).
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        refuse_duplicate(
            &tx,
            &entry.spiffe_id,
            &entry.parent_id,
            &entry.selectors,
            None,
        )?;
        tx.execute(
            "INSERT INTO entries (id, spiffe_id, parent_id, selectors, x509_svid_ttl, dns_names, revision)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                entry.id.as_str(),
                entry.spiffe_id.to_string(),
                entry.parent_id.to_string(),
                selectors_json(&entry.selectors),
                entry.x509_svid_ttl.map(|d| d.as_secs() as i64),
                dns_json(&entry.dns_names),
                entry.revision as i64,
            ],
        )?;
        tx.commit()?;
        Ok(entry)
    }

    /// Replaces the fields of entry `id`, bumping its revision. Refuses to make it a duplicate
    /// of another entry (see [`Store::create_entry`]).
    pub fn update_entry(&self, id: &EntryId, new: NewEntry) -> Result<RegistrationEntry> {
        let selectors = normalized(new.selectors);
        let mut conn = self.conn();
        let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
        refuse_duplicate(&tx, &new.spiffe_id, &new.parent_id, &selectors, Some(id))?;
        let revision: Option<i64> = tx
            .query_row(
                "UPDATE entries SET spiffe_id = ?2, parent_id = ?3, selectors = ?4,
                     x509_svid_ttl = ?5, dns_names = ?6, revision = revision + 1
                 WHERE id = ?1 RETURNING revision",
                params![
                    id.as_str(),
                    new.spiffe_id.to_string(),
                    new.parent_id.to_string(),
                    selectors_json(&selectors),
                    new.x509_svid_ttl.map(|d| d.as_secs() as i64),
                    dns_json(&new.dns_names),
                ],
                |r| r.get(0),
            )
            .optional()?;
        let revision = revision.ok_or_else(|| StoreError::EntryNotFound(id.clone()))?;
        tx.commit()?;
        Ok(RegistrationEntry {
            id: id.clone(),
            spiffe_id: new.spiffe_id,
            parent_id: new.parent_id,
            selectors,
            x509_svid_ttl: new.x509_svid_ttl,
            dns_names: new.dns_names,
            revision: revision as u64,
        })
    }

    /// Deletes entry `id`.
    pub fn delete_entry(&self, id: &EntryId) -> Result<()> {
        let n = self
            .conn()
            .execute("DELETE FROM entries WHERE id = ?1", params![id.as_str()])?;
        if n == 0 {
            return Err(StoreError::EntryNotFound(id.clone()));
        }
        Ok(())
    }

    /// One entry.
    pub fn entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        self.conn()
            .query_row(
                &format!("{ENTRY_SELECT} WHERE id = ?1"),
                params![id.as_str()],
                entry_row,
            )
            .optional()?
            .ok_or_else(|| StoreError::EntryNotFound(id.clone()))?
    }

    /// The entries passing `filter`, sorted by SPIFFE ID then id.
    pub fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let conn = self.conn();
        let mut stmt = match &filter.parent_id {
            Some(_) => conn.prepare(&format!(
                "{ENTRY_SELECT} WHERE parent_id = ?1 ORDER BY spiffe_id, id"
            ))?,
            None => conn.prepare(&format!("{ENTRY_SELECT} ORDER BY spiffe_id, id"))?,
        };
        let rows = match &filter.parent_id {
            Some(p) => stmt.query_map(params![p.to_string()], entry_row)?,
            None => stmt.query_map([], entry_row)?,
        };
        let mut out = Vec::new();
        for row in rows {
            let entry = row??;
            if filter.matches(&entry) {
                out.push(entry);
            }
        }
        Ok(out)
    }

    /// How many entries exist.
    pub fn count_entries(&self) -> Result<u64> {
        Ok(self
            .conn()
            .query_row("SELECT COUNT(*) FROM entries", [], |r| r.get::<_, i64>(0))?
            as u64)
    }
}

/// [`StoreError::DuplicateEntry`] if an entry other than `except` has exactly these fields
/// (`selectors` normalized, so that their JSON is canonical).
fn refuse_duplicate(
    conn: &Connection,
    spiffe_id: &SpiffeId,
    parent_id: &SpiffeId,
    selectors: &[Selector],
    except: Option<&EntryId>,
) -> Result<()> {
    let existing: Option<String> = conn
        .query_row(
            "SELECT id FROM entries
             WHERE spiffe_id = ?1 AND parent_id = ?2 AND selectors = ?3 AND id IS NOT ?4
             LIMIT 1",
            params![
                spiffe_id.to_string(),
                parent_id.to_string(),
                selectors_json(selectors),
                except.map(EntryId::as_str),
            ],
            |r| r.get(0),
        )
        .optional()?;
    match existing {
        None => Ok(()),
        Some(id) => Err(StoreError::DuplicateEntry {
            existing: id.parse().map_err(|e| corrupt("entries", e))?,
        }),
    }
}

const ENTRY_SELECT: &str =
    "SELECT id, spiffe_id, parent_id, selectors, x509_svid_ttl, dns_names, revision FROM entries";

/// The result of a write that may set a pod address: a broken uniqueness of the address
/// (`pods_by_ipv4`) becomes [`StoreError::AddressInUse`], naming the pod that has it.
fn address_checked(
    conn: &Connection,
    done: rusqlite::Result<usize>,
    runtime: Option<&PodRuntime>,
) -> Result<usize> {
    match (done, runtime) {
        (Err(rusqlite::Error::SqliteFailure(e, detail)), Some(rt))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            let owner: Option<String> = conn
                .query_row(
                    "SELECT namespace || '/' || name FROM pods WHERE ipv4 = ?1",
                    [rt.ipv4.to_string()],
                    |r| r.get(0),
                )
                .optional()?;
            match owner {
                Some(pod) => Err(StoreError::AddressInUse { ipv4: rt.ipv4, pod }),
                None => Err(rusqlite::Error::SqliteFailure(e, detail).into()),
            }
        }
        (done, _) => Ok(done?),
    }
}

fn labels_json(labels: &Labels) -> String {
    let map: serde_json::Map<String, serde_json::Value> = labels
        .iter()
        .map(|(k, v)| (k.to_owned(), serde_json::Value::from(v)))
        .collect();
    serde_json::Value::Object(map).to_string()
}

fn labels_from_json(text: &str) -> Result<Labels> {
    let map: std::collections::BTreeMap<String, String> =
        serde_json::from_str(text).map_err(|e| corrupt("labels", e))?;
    Labels::from_pairs(map).map_err(|e| corrupt("labels", e))
}

/// The hex SHA-256 of a join token: what both backends store instead of the token.
pub(crate) fn token_hash(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: e.to_string(),
    }
}

/// Selectors sorted, repeats dropped: the canonical form both backends store.
pub(crate) fn normalized(mut selectors: Vec<Selector>) -> Vec<Selector> {
    selectors.sort();
    selectors.dedup();
    selectors
}

fn selectors_json(selectors: &[Selector]) -> String {
    let texts: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    serde_json::Value::from(texts).to_string()
}

fn dns_json(names: &[String]) -> String {
    serde_json::Value::from(names.to_vec()).to_string()
}

fn node_row(r: &Row<'_>) -> rusqlite::Result<Result<NodeRecord>> {
    let name: String = r.get(0)?;
    let node_id: i64 = r.get(1)?;
    let serial: String = r.get(2)?;
    let previous_serial: Option<String> = r.get(3)?;
    let not_after: i64 = r.get(4)?;
    let banned: bool = r.get(5)?;
    let attested_at: i64 = r.get(6)?;
    let address: Option<String> = r.get(7)?;
    let attestation: String = r.get(8)?;
    let tunnel_key: Option<String> = r.get(9)?;
    Ok((|| {
        Ok(NodeRecord {
            name: name.parse().map_err(|e| corrupt("nodes", e))?,
            node_id: NodeId::new(u32::try_from(node_id).map_err(|e| corrupt("nodes", e))?),
            serial,
            previous_serial,
            svid_not_after: from_unix_secs(not_after),
            banned,
            attested_at: from_unix_secs(attested_at),
            address: address.and_then(|a| a.parse().ok()),
            attestation: attestation.parse().map_err(|e| corrupt("nodes", e))?,
            tunnel_key: tunnel_key
                .map(|k| k.parse::<TunnelKey>())
                .transpose()
                .map_err(|e| corrupt("nodes", format!("node {name}: tunnel key: {e}")))?,
        })
    })())
}

fn entry_row(r: &Row<'_>) -> rusqlite::Result<Result<RegistrationEntry>> {
    let id: String = r.get(0)?;
    let spiffe_id: String = r.get(1)?;
    let parent_id: String = r.get(2)?;
    let selectors: String = r.get(3)?;
    let ttl: Option<i64> = r.get(4)?;
    let dns: String = r.get(5)?;
    let revision: i64 = r.get(6)?;
    Ok((|| {
        let c = |e: &dyn std::fmt::Display| corrupt("entries", format!("entry {id}: {e}"));
        let selector_texts: Vec<String> = serde_json::from_str(&selectors).map_err(|e| c(&e))?;
        Ok(RegistrationEntry {
            id: id.parse().map_err(|e| c(&e))?,
            spiffe_id: spiffe_id.parse::<SpiffeId>().map_err(|e| c(&e))?,
            parent_id: parent_id.parse::<SpiffeId>().map_err(|e| c(&e))?,
            selectors: selector_texts
                .iter()
                .map(|s| s.parse::<Selector>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|e| c(&e))?,
            x509_svid_ttl: ttl.map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0))),
            dns_names: serde_json::from_str(&dns).map_err(|e| c(&e))?,
            revision: u64::try_from(revision).map_err(|e| c(&e))?,
        })
    })())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        s.parse().unwrap()
    }

    fn node(s: &str) -> NodeName {
        s.parse().unwrap()
    }

    fn new_entry(spiffe: &str, parent: &str) -> NewEntry {
        NewEntry {
            spiffe_id: id(spiffe),
            parent_id: id(parent),
            selectors: vec![
                "unix:uid:1000".parse().unwrap(),
                "unix:gid:0".parse().unwrap(),
            ],
            x509_svid_ttl: Some(Duration::from_secs(300)),
            dns_names: vec!["web.local".into()],
        }
    }

    #[test]
    fn an_attestation_method_no_version_wrote_is_a_damaged_row() {
        // The behaviour of every method is tested against both backends in
        // tests/conformance.rs; what stays here needs SQLite itself.
        let store = Store::in_memory().unwrap();
        let now = SystemTime::now();
        store
            .record_attestation(&node("a"), NodeAttestation::JoinToken, "01", now, now)
            .unwrap();
        store
            .conn()
            .execute("UPDATE nodes SET attestation = 'psk' WHERE name = 'a'", [])
            .unwrap();
        let e = store.nodes().unwrap_err().to_string();
        assert!(e.contains("nodes") && e.contains("psk"), "{e}");
    }

    #[test]
    fn file_survives_reopen_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshauth.db");
        let now = SystemTime::now();
        {
            let store = Store::open(&path).unwrap();
            store.save_ca_journal("{\"v\":1}").unwrap();
            store
                .record_attestation(&node("n1"), NodeAttestation::JoinToken, "aa", now, now)
                .unwrap();
            store
                .create_entry(new_entry("spiffe://td/web", "spiffe://td/node/n1"))
                .unwrap();
        }
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let store = Store::open(&path).unwrap();
        assert_eq!(
            store.load_ca_journal().unwrap().as_deref(),
            Some("{\"v\":1}")
        );
        assert_eq!(store.nodes().unwrap().len(), 1);
        assert_eq!(store.count_entries().unwrap(), 1);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("meshauth.db");
        Store::open(&path).unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::SchemaTooNew { found: 99, .. })
        ));
    }
}
