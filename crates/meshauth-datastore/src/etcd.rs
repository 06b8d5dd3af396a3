//! The etcd backend: [`EtcdStore`], for several server replicas sharing one registry, with a
//! change feed of what other replicas changed ([`EtcdStore::watch`],
//! [`EtcdStore::take_changes`]) and leader election ([`EtcdStore::campaign`]).
//!
//! # Layout
//!
//! One key per record under the prefix `P` given to [`EtcdStore::connect`]; values are JSON of
//! private record types (times in Unix seconds, as the SQLite store keeps them). A key segment
//! that is free text has `%` and `/` percent-encoded, so it never spans two segments.
//!
//! | key | value |
//! |---|---|
//! | `P/rev` | the guard (see below); its value names the writer and the last operation |
//! | `P/layout` | the version of this layout, `2` once every pod has its `node_pods` key |
//! | `P/ca/journal` | the CA journal, as given |
//! | `P/tokens/<sha256 of token>` | a join token's node and expiry (never the token) |
//! | `P/nodes/<name>` | a node record |
//! | `P/counters/node_id` | the last node id handed out (ids only grow) |
//! | `P/tunnel_keys/<hex key>` | the node that published this WireGuard key |
//! | `P/specs/<name>` | a node spec |
//! | `P/identities/<id>` | an identity's labels |
//! | `P/identity_labels/<sha256 of labels>` | the identity of a label set |
//! | `P/pods/<ns>/<name>` | a pod's placement |
//! | `P/node_pods/<node>/<ns>/<name>` | the same placement, under the node it is on |
//! | `P/runtime/<node>/<ns>/<name>` | what `node` reported of a pod placed on it |
//! | `P/pod_ips/<ipv4>` | the pod that reported this address |
//! | `P/policies/<key>` | a policy (key and YAML) |
//! | `P/entries/<id>` | a registration entry |
//! | `P/entry_keys/<sha256 of SPIFFE ID, parent, selectors>` | the entry that has them |
//! | `P/elections/<name>/…` | etcd's election keys ([`EtcdStore::campaign`]) |
//!
//! The `tunnel_keys`, `identity_labels`, `pod_ips` and `entry_keys` keys are the SQLite
//! schema's UNIQUE constraints: written in the same transaction as the records they index.
//! Runtime facts live under their node so that an eviction forgets them with one range delete
//! (whatever the number of pods); a `pod_ips` key whose pod no longer has that address is stale
//! and is overwritten by the next pod to report it. `node_pods` repeats each placement under
//! its node, written in the same transaction, so that a node's pods are two range reads
//! ([`Datastore::pods_on_node`]); a store written before that index existed (layout 1) gets it
//! when a replica next connects.
//!
//! # Concurrency: optimistic, on one guard key
//!
//! Every write transaction puts `P/rev`, so that key's `mod_revision` changes with every write
//! to the store. An operation reads what it needs, the guard first (in the same etcd
//! transaction, so at the same revision), decides, then commits one `Txn`: *if*
//! `mod_revision(P/rev)` is still what it read (0 if absent), put/delete its records and the
//! guard; *else* nothing. A failed compare means another writer (thread or replica) committed
//! in between: the operation starts over, after a short random pause, at most
//! [`MAX_ATTEMPTS`] times, then fails with [`StoreError::Conflict`]. Within one process the
//! guarded writes take turns (a local lock), so only other replicas' writes cause conflicts;
//! many threads of one server writing at once made attempts run out. Writes are therefore
//! serializable, as with SQLite's single writer: every check (token unused, id free, key
//! unique...) holds at the moment of the commit. Operations that read nothing (saving the CA
//! journal, putting policies or node specs) commit without a compare but still bump the
//! guard; reads are single linearizable etcd reads. A write whose answer is lost (timeout) may
//! or may not have been applied: the caller gets [`StoreError::Unavailable`].
//!
//! etcd limits a transaction to `--max-txn-ops` operations (128 by default): a
//! [`Datastore::put_policies`] or [`Datastore::rekey_policies`] batch larger than that fails
//! with an error that names the flag.
//!
//! # Change feed
//!
//! One etcd watch on the prefix follows every write, from the revision the store connected
//! at. A revision whose guard value starts with this store's writer id (drawn at random when
//! it connects) is its own write and is left out: the caller that made it knows what changed.
//! Every key another writer put or deleted is mapped to what it changed ([`crate::feed`]): a
//! `nodes` or `specs` key to that node, a `pods` or `runtime` key to that pod, an
//! `identities` key to that identity, a `policies` key to the policies, an `entries` key to
//! that entry, `ca/journal` to the CA journal; the guard, `layout`, the tokens, the counter
//! and the index keys (`tunnel_keys`, `identity_labels`, `node_pods`, `pod_ips`,
//! `entry_keys`, which change with the records they index) and the election keys to nothing.
//! A key outside this layout, or one whose segments do not parse, means that anything may
//! have changed, and so does a watch that etcd compacted from under it. What was changed is
//! gathered for [`EtcdStore::take_changes`] *before* [`EtcdStore::watch`] announces the
//! revision, so a follower woken by the one finds the changes in the other.
//!
//! # Threads
//!
//! The [`Datastore`] trait is synchronous. The client runs on a current-thread Tokio runtime on
//! a thread the store owns (`meshauth-etcd`); each method sends its operation there and waits
//! on a channel, so it works from any thread, inside a Tokio runtime or not. Every etcd request
//! has the timeout given to [`EtcdStore::connect`]; the long-lived streams (the watch, lease
//! renewals) have none, and HTTP/2 keep-alive pings break them when the connection dies. The
//! runtime stops when the store and every [`Leadership`] it made are dropped.
//!
//! # Leader election
//!
//! [`EtcdStore::campaign`] runs etcd's election (`campaign`/`resign`) on a lease kept alive
//! every third of its TTL. A crashed leader's lease expires at most one TTL after its last
//! renewal (etcd looks for expired leases twice a second), and the next candidate leads at once:
//! a crashed leader is replaced within the TTL plus about half a second (1.7 to 1.9 s with a 2 s
//! TTL in the tests). One that resigns ([`Leadership::resign`], which waits for etcd) is
//! replaced at once; dropping a [`Leadership`] resigns in the background, which a process that
//! exits right after may cut short (then the TTL applies). A live leader reports the loss of
//! its office (lease revoked or expired, its key deleted, etcd unreachable) on
//! [`Leadership::is_leader`], and does so a tenth of the TTL *before* etcd could expire the
//! lease, so that two candidates do not both believe they lead (unless a process stalls for
//! longer than that margin).

use std::borrow::Cow;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, KeyValue,
    LeaderKey, ResignOptions, Txn, TxnOp, TxnOpResponse, WatchOptions, WatchStream,
};
use meshauth_policy::{IdentityId, Labels, NodeId, TunnelKey};
use meshauth_spiffe::SpiffeId;
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

use crate::feed::{KeyMeaning, StoreChanges, etcd_key_meaning};
use crate::model::{
    EntryFilter, EntryId, IssuedJoinToken, NewEntry, NodeAttestation, NodeName, NodeRecord,
    NodeSpec, PodRecord, PodRuntime, RegistrationEntry, Selector, from_unix_secs, unix_secs,
};
use crate::sqlite::{normalized, token_hash};
use crate::store::{Datastore, StoreError};

type Result<T> = std::result::Result<T, StoreError>;

/// How many times an operation tries to commit before it gives up with
/// [`StoreError::Conflict`].
pub const MAX_ATTEMPTS: u32 = 32;

/// At most this many expired join tokens are dropped by one [`Datastore::create_join_token`]
/// (the rest by the next ones), so that the transaction stays small.
const PURGE_LIMIT: usize = 32;

/// HTTP/2 keep-alive pings on the connection, so that a dead peer breaks the watch. etcd
/// refuses pings more often than every 5 s by default.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// The registry store on an etcd cluster (see the module doc for the layout and the
/// concurrency scheme).
pub struct EtcdStore {
    inner: Arc<Inner>,
    runner: Arc<Runner>,
    changes: Arc<watch::Sender<u64>>,
    /// What other writers changed since [`EtcdStore::take_changes`] last took it (recorded
    /// before `changes` announces it).
    pending: Arc<Mutex<StoreChanges>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("prefix", &self.inner.prefix)
            .field("timeout", &self.inner.timeout)
            .finish_non_exhaustive()
    }
}

/// The thread and runtime the client runs on. It stops when the last `Arc` of it is dropped.
struct Runner {
    handle: tokio::runtime::Handle,
    /// Dropping it ends the runtime thread's `block_on`.
    _stop: oneshot::Sender<()>,
}

impl Runner {
    fn start() -> Result<Arc<Runner>> {
        let (handle_tx, handle_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("meshauth-etcd".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => {
                        let _ = handle_tx.send(Ok(rt.handle().clone()));
                        rt.block_on(async {
                            let _ = stop_rx.await;
                        });
                    }
                    Err(e) => {
                        let _ = handle_tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| StoreError::Etcd {
                detail: format!("cannot start the etcd client's thread: {e}"),
            })?;
        let handle = handle_rx
            .recv()
            .map_err(|_| "the thread ended at once".to_owned())
            .and_then(|r| r)
            .map_err(|e| StoreError::Etcd {
                detail: format!("cannot start the etcd client's runtime: {e}"),
            })?;
        Ok(Arc::new(Runner {
            handle,
            _stop: stop_tx,
        }))
    }

    /// Runs `fut` on the runtime and waits for its result, from any thread.
    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
        stopped: impl FnOnce() -> StoreError,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().unwrap_or_else(|_| Err(stopped()))
    }
}

/// What every operation needs: the client, where the records are, how long to wait.
struct Inner {
    /// Held by every guarded write of this process, so that its threads never conflict with
    /// one another (only other replicas' writes make an attempt start over).
    writer: tokio::sync::Mutex<()>,
    /// This store's name among the writers (random): the guard's value starts with it, so
    /// that the change feed can leave out this store's own writes.
    writer_id: String,
    client: Client,
    /// Without a trailing `/`.
    prefix: String,
    /// As given, comma-separated, for messages.
    endpoints: String,
    timeout: Duration,
}

// === impl EtcdStore ===

impl EtcdStore {
    /// Connects to the etcd cluster at `endpoints` (`host:port` each; `http://` is assumed)
    /// and keeps the registry under the key prefix `prefix` (e.g. `/meshauth/<trust domain>`).
    /// `timeout` bounds every request. Fails with [`StoreError::Unavailable`] if etcd does not
    /// answer within it, [`StoreError::InvalidConfig`] for an empty endpoint list, prefix or
    /// timeout.
    pub fn connect(endpoints: &[String], prefix: &str, timeout: Duration) -> Result<EtcdStore> {
        if endpoints.is_empty() || endpoints.iter().any(|e| e.trim().is_empty()) {
            return Err(StoreError::InvalidConfig(
                "no etcd endpoint given: name at least one host:port".into(),
            ));
        }
        let prefix = prefix.trim_end_matches('/');
        if prefix.is_empty() {
            return Err(StoreError::InvalidConfig(
                "the key prefix is empty: give one such as /meshauth/<trust domain>".into(),
            ));
        }
        if timeout.is_zero() {
            return Err(StoreError::InvalidConfig(
                "the request timeout is zero: give one such as 5s".into(),
            ));
        }
        let shown = endpoints.join(",");
        let urls: Vec<String> = endpoints
            .iter()
            .map(|e| {
                let e = e.trim();
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        let runner = Runner::start()?;
        let prefix = prefix.to_owned();
        let stopped_endpoints = shown.clone();
        let (inner, revision) = runner.run(
            async move {
                let unavailable = |detail: String| StoreError::Unavailable {
                    endpoints: shown.clone(),
                    detail,
                };
                let options = ConnectOptions::new()
                    .with_connect_timeout(timeout)
                    .with_keep_alive(KEEPALIVE_INTERVAL, timeout)
                    .with_keep_alive_while_idle(true);
                let client =
                    match tokio::time::timeout(timeout, Client::connect(urls, Some(options))).await
                    {
                        Err(_) => return Err(unavailable(format!("no answer within {timeout:?}"))),
                        Ok(Err(etcd_client::Error::InvalidUri(e))) => {
                            return Err(StoreError::InvalidConfig(format!(
                                "an etcd endpoint in {shown} is not host:port ({e})"
                            )));
                        }
                        Ok(Err(e)) => return Err(unavailable(e.to_string())),
                        Ok(Ok(c)) => c,
                    };
                let inner = Inner {
                    writer: tokio::sync::Mutex::new(()),
                    writer_id: format!("{:016x}", random_below(u64::MAX)),
                    client,
                    prefix,
                    endpoints: shown.clone(),
                    timeout,
                };
                // The client connects lazily: one read proves etcd answers.
                let revision = inner.current_revision().await?;
                inner.index_pods_by_node().await?;
                Ok((Arc::new(inner), revision))
            },
            || stopped(&stopped_endpoints),
        )?;
        let changes = Arc::new(watch::channel(u64::try_from(revision).unwrap_or(0)).0);
        let pending = Arc::new(Mutex::new(StoreChanges::default()));
        runner.handle.spawn(watch_changes(
            Arc::clone(&inner),
            Feed {
                changes: Arc::clone(&changes),
                pending: Arc::clone(&pending),
            },
            revision,
        ));
        Ok(EtcdStore {
            inner,
            runner,
            changes,
            pending,
        })
    }

    /// The key prefix the records are under (without a trailing `/`).
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// A receiver notified whenever another writer (another replica, or another
    /// [`EtcdStore`] in this process) changes a record under the prefix; its value is the etcd
    /// revision of the latest such change seen, and [`EtcdStore::take_changes`] says what
    /// changed. This store's own writes are left out: whoever made them knows what changed.
    /// The etcd watch behind it is re-established after errors without missing a change; if
    /// etcd compacted the changes it missed, the receiver is notified anyway and
    /// [`EtcdStore::take_changes`] answers [`StoreChanges::Everything`]. Election keys do not
    /// count as changes.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// What other writers changed since the last call (drained): the records their writes
    /// touched ([`crate::StoreChange`]; an empty set when nothing a follower reads changed,
    /// such as a join token or an index), or [`StoreChanges::Everything`] when that cannot be
    /// told (a key outside the layout, changes lost to an etcd compaction, or more than
    /// 100,000 parts pending). This store's own writes are never in it.
    ///
    /// Order: the changes are recorded before [`EtcdStore::watch`] announces their revision,
    /// so a receiver woken by the watch that then calls this gets at least the changes up to
    /// the revision it was woken for (and perhaps later ones, which it is woken for again).
    pub fn take_changes(&self) -> StoreChanges {
        std::mem::take(&mut *self.pending.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Campaigns for the leadership `name` (one leader among all candidates of that name under
    /// this prefix) as `candidate` (shown by [`EtcdStore::leader`]), on a lease of `ttl`
    /// (whole seconds, at least 1; etcd may raise it to its minimum). Returns at once; the
    /// campaign runs until the [`Leadership`] is resigned or dropped, and starts over after a
    /// loss. See the module doc for how long a crashed leader takes to be replaced.
    pub fn campaign(&self, name: &str, candidate: &str, ttl: Duration) -> Result<Leadership> {
        let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let ttl_secs = i64::try_from(secs.max(1)).map_err(|_| {
            StoreError::InvalidConfig(format!("a lease of {ttl:?} is too long: use minutes"))
        })?;
        let (leading_tx, leading_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel();
        let (done_tx, done_rx) = std::sync::mpsc::sync_channel(1);
        let office = Office {
            inner: Arc::clone(&self.inner),
            name: self.inner.key(&["elections", name]).into_bytes(),
            candidate: candidate.as_bytes().to_vec(),
            ttl_secs,
            leading: leading_tx,
        };
        // The task holds the runtime, so that a dropped leadership still resigns.
        let runner = Arc::clone(&self.runner);
        self.runner.handle.spawn(async move {
            let result = office.run(stop_rx).await;
            let _ = done_tx.send(result);
            drop(runner);
        });
        Ok(Leadership {
            leading: leading_rx,
            stop: Some(stop_tx),
            done: done_rx,
            name: name.to_owned(),
            candidate: candidate.to_owned(),
        })
    }

    /// The candidate value of the current leader of `name`, `None` when nobody leads.
    pub fn leader(&self, name: &str) -> Result<Option<String>> {
        let inner = Arc::clone(&self.inner);
        let key = self.inner.key(&["elections", name]);
        self.run(async move {
            let mut election = inner.client.election_client();
            match tokio::time::timeout(inner.timeout, election.leader(key)).await {
                Err(_) => Err(inner.unavailable(format!("no answer within {:?}", inner.timeout))),
                Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.message().contains("no leader") => {
                    Ok(None)
                }
                Ok(Err(e)) => Err(inner.error(e)),
                Ok(Ok(resp)) => Ok(resp
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
            }
        })
    }

    fn run<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        self.runner.run(fut, || stopped(&self.inner.endpoints))
    }
}

fn stopped(endpoints: &str) -> StoreError {
    StoreError::Unavailable {
        endpoints: endpoints.to_owned(),
        detail: "the etcd client's thread stopped".into(),
    }
}

// === the change feed ===

/// Where [`watch_changes`] publishes what other writers changed.
struct Feed {
    /// The revision of the latest change seen.
    changes: Arc<watch::Sender<u64>>,
    /// What those changes touched, recorded before `changes` announces them.
    pending: Arc<Mutex<StoreChanges>>,
}

impl Feed {
    /// Records what the keys mean, then announces `revision`.
    fn publish(&self, meanings: impl IntoIterator<Item = KeyMeaning>, revision: i64) {
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for meaning in meanings {
                pending.record(meaning);
            }
        }
        self.changes
            .send_replace(u64::try_from(revision).unwrap_or(0));
    }
}

/// Follows every change under the prefix from revision `seen` on, forever (until the runtime
/// stops), and publishes on `feed` what each that another writer made touched, and its
/// revision.
async fn watch_changes(inner: Arc<Inner>, feed: Feed, mut seen: i64) {
    let prefix = inner.dir(&[]);
    let elections = inner.dir(&["elections"]);
    let guard = inner.guard_key();
    let own = format!("{} ", inner.writer_id);
    let mut backoff = Duration::from_millis(100);
    loop {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(seen + 1);
        let mut client = inner.client.watch_client();
        if let Ok(Ok(mut stream)) =
            tokio::time::timeout(inner.timeout, client.watch(prefix.clone(), Some(options))).await
        {
            while let Ok(Some(resp)) = stream.message().await {
                backoff = Duration::from_millis(100);
                if resp.compact_revision() > 0 || resp.canceled() {
                    // The changes since `seen` are gone: start from now, and make every
                    // follower rebuild.
                    feed.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(KeyMeaning::Everything);
                    if let Ok(now) = inner.current_revision().await {
                        seen = now;
                        feed.publish([], now);
                    }
                    break;
                }
                // Every write transaction puts the guard, naming its writer: the revisions
                // whose guard names this store are its own.
                let kvs: Vec<&KeyValue> = resp.events().iter().filter_map(|e| e.kv()).collect();
                let mine: Vec<i64> = kvs
                    .iter()
                    .filter(|kv| {
                        kv.key() == guard.as_bytes() && kv.value().starts_with(own.as_bytes())
                    })
                    .map(|kv| kv.mod_revision())
                    .collect();
                let mut theirs = Vec::new();
                for kv in &kvs {
                    seen = seen.max(kv.mod_revision());
                    if !kv.key().starts_with(elections.as_bytes())
                        && !mine.contains(&kv.mod_revision())
                    {
                        theirs.push(key_meaning(kv.key(), &prefix));
                    }
                }
                if !theirs.is_empty() {
                    feed.publish(theirs, seen);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

// === leader election ===

/// A campaign for a leadership (see [`EtcdStore::campaign`]). Dropping it resigns (in the
/// background); [`Leadership::resign`] waits for that.
#[derive(Debug)]
pub struct Leadership {
    leading: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<Stop>>,
    done: std::sync::mpsc::Receiver<Result<()>>,
    name: String,
    candidate: String,
}

/// How a campaign ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// Give the office up at once: resign and revoke the lease.
    Resign,
    /// Stop renewing the lease and leave the rest to etcd, as a crash would.
    Abandon,
}

impl Leadership {
    /// A receiver of whether this candidate leads: `true` once elected, `false` as soon as the
    /// office is lost (lease revoked or expired, election key deleted, etcd unreachable for
    /// most of the TTL) or given up.
    pub fn is_leader(&self) -> watch::Receiver<bool> {
        self.leading.clone()
    }

    /// Whether this candidate leads now.
    pub fn leading(&self) -> bool {
        *self.leading.borrow()
    }

    /// The leadership's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// This candidate's value.
    pub fn candidate(&self) -> &str {
        &self.candidate
    }

    /// Gives the office up (or leaves the race): resigns and revokes the lease, so that the
    /// next candidate leads at once. Waits for etcd (bounded by the request timeout); an error
    /// means the lease could not be revoked and expires after its TTL instead.
    pub fn resign(mut self) -> Result<()> {
        self.finish(Stop::Resign)
    }

    /// Stops renewing the lease without resigning, as a crashed process would: the office
    /// passes on when the lease expires, within its TTL. For failover drills and tests.
    pub fn abandon(mut self) {
        let _ = self.finish(Stop::Abandon);
    }

    fn finish(&mut self, how: Stop) -> Result<()> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(how);
        }
        self.done.recv().unwrap_or(Ok(()))
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(Stop::Resign);
        }
    }
}

/// The campaign task's state.
struct Office {
    inner: Arc<Inner>,
    /// The election's key (under `P/elections/`).
    name: Vec<u8>,
    candidate: Vec<u8>,
    ttl_secs: i64,
    leading: watch::Sender<bool>,
}

/// How one term (one lease) ended.
enum Term {
    /// Told to stop; the lease and, if elected, the leader key.
    Stopped(Stop, Option<i64>, Option<LeaderKey>),
    /// The lease or the office was lost (or never obtained); the lease, if granted.
    Lost(Option<i64>),
}

impl Office {
    /// Campaigns term after term until told to stop; then resigns as told.
    async fn run(self, mut stop: oneshot::Receiver<Stop>) -> Result<()> {
        let mut backoff = Duration::from_millis(100);
        loop {
            let term = self.term(&mut stop).await;
            self.leading.send_replace(false);
            match term {
                Term::Stopped(Stop::Abandon, _, _) => return Ok(()),
                Term::Stopped(Stop::Resign, lease, key) => return self.step_down(lease, key).await,
                Term::Lost(lease) => {
                    if let Some(lease) = lease {
                        let mut leases = self.inner.client.lease_client();
                        let _ = self.inner.req(leases.revoke(lease)).await;
                    }
                }
            }
            // Between terms there is no lease to give up: told to stop, it is done.
            tokio::select! {
                _ = &mut stop => return Ok(()),
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// One lease: granted, kept alive, campaigned on; until lost or told to stop.
    async fn term(&self, stop: &mut oneshot::Receiver<Stop>) -> Term {
        let inner = &self.inner;
        let mut leases = inner.client.lease_client();
        let granted_at = Instant::now();
        let lease = match inner.req(leases.grant(self.ttl_secs, None)).await {
            Ok(l) => l,
            Err(_) => return Term::Lost(None),
        };
        let id = lease.id();
        let ttl = Duration::from_secs(u64::try_from(lease.ttl()).unwrap_or(1).max(1));
        // Step down this long before etcd could expire the lease.
        let margin = ttl / 10;
        let mut deadline = granted_at + ttl;
        let (mut keeper, mut renewals) = match inner.req(leases.keep_alive(id)).await {
            Ok(k) => k,
            Err(_) => return Term::Lost(Some(id)),
        };
        let mut election = inner.client.election_client();
        let (name, candidate) = (self.name.clone(), self.candidate.clone());
        let mut campaign = Box::pin(async move { election.campaign(name, candidate, id).await });
        let mut elected: Option<LeaderKey> = None;
        let mut own_key: Option<WatchStream> = None;
        let mut sent: VecDeque<Instant> = VecDeque::new();
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                how = &mut *stop => return Term::Stopped(how.unwrap_or(Stop::Resign), Some(id), elected),
                won = &mut campaign, if elected.is_none() => {
                    let Ok(mut won) = won else {
                        return Term::Lost(Some(id));
                    };
                    let at = won.header().map_or(0, |h| h.revision());
                    let Some(key) = won.take_leader() else {
                        return Term::Lost(Some(id));
                    };
                    // Our key deleted (by hand, or by etcd with the lease) ends the office.
                    let mut watcher = inner.client.watch_client();
                    let from = WatchOptions::new().with_start_revision(at + 1);
                    match inner.req(watcher.watch(key.key().to_vec(), Some(from))).await {
                        Ok(w) => own_key = Some(w),
                        Err(_) => return Term::Lost(Some(id)),
                    }
                    elected = Some(key);
                    if Instant::now() + margin < deadline {
                        self.leading.send_replace(true);
                    }
                }
                _ = tick.tick() => {
                    if keeper.keep_alive().await.is_err() {
                        return Term::Lost(Some(id));
                    }
                    sent.push_back(Instant::now());
                }
                renewal = renewals.message() => match renewal {
                    Ok(Some(r)) if r.ttl() > 0 => {
                        if let Some(at) = sent.pop_front() {
                            deadline = at + Duration::from_secs(u64::try_from(r.ttl()).unwrap_or(0));
                        }
                    }
                    // TTL 0: revoked or expired; no message: the stream broke.
                    _ => return Term::Lost(Some(id)),
                },
                deleted = key_deleted(&mut own_key) => if deleted {
                    return Term::Lost(Some(id));
                },
                _ = tokio::time::sleep_until(deadline - margin) => return Term::Lost(Some(id)),
            }
        }
    }

    /// Resigns (if elected) and revokes the lease, which deletes the candidate's key.
    async fn step_down(&self, lease: Option<i64>, key: Option<LeaderKey>) -> Result<()> {
        if let Some(key) = key {
            let mut election = self.inner.client.election_client();
            let _ = self
                .inner
                .req(election.resign(Some(ResignOptions::new().with_leader(key))))
                .await;
        }
        if let Some(lease) = lease {
            let mut leases = self.inner.client.lease_client();
            self.inner.req(leases.revoke(lease)).await?;
        }
        Ok(())
    }
}

/// Waits for the next message of `watch` (forever when there is none): `true` if the key was
/// deleted or the watch broke.
async fn key_deleted(watch: &mut Option<WatchStream>) -> bool {
    let Some(stream) = watch.as_mut() else {
        return std::future::pending().await;
    };
    match stream.message().await {
        Ok(Some(resp)) => {
            resp.canceled()
                || resp
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete)
        }
        _ => true,
    }
}

// === transactions ===

/// What an operation reads.
enum Read {
    Key(String),
    Prefix(String),
}

/// The writes of one operation, committed together. A later write of a key replaces an earlier
/// one (etcd refuses two operations on one key in a transaction).
#[derive(Default)]
struct Writes {
    keys: BTreeMap<String, Option<Vec<u8>>>,
    prefixes: Vec<String>,
}

impl Writes {
    fn put(&mut self, key: String, value: impl Into<Vec<u8>>) {
        self.keys.insert(key, Some(value.into()));
    }

    fn put_json<T: Serialize>(&mut self, key: String, value: &T) {
        self.put(key, json(value));
    }

    fn delete(&mut self, key: String) {
        self.keys.insert(key, None);
    }

    fn delete_prefix(&mut self, prefix: String) {
        self.prefixes.push(prefix);
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.prefixes.is_empty()
    }
}

/// One attempt of an operation: reads (the first one also reads the guard), then a commit
/// conditional on the guard.
struct Tx<'a> {
    inner: &'a Inner,
    guard: Option<i64>,
}

impl Tx<'_> {
    async fn read(&mut self, reads: Vec<Read>) -> Result<Vec<Vec<KeyValue>>> {
        let with_guard = self.guard.is_none();
        let mut all = Vec::with_capacity(reads.len() + 1);
        if with_guard {
            all.push(Read::Key(self.inner.guard_key()));
        }
        all.extend(reads);
        let mut results = self.inner.read(all).await?;
        if with_guard {
            let guard = results.remove(0);
            self.guard = Some(guard.first().map_or(0, KeyValue::mod_revision));
        }
        Ok(results)
    }

    async fn get(&mut self, key: String) -> Result<Option<KeyValue>> {
        Ok(self
            .read(vec![Read::Key(key)])
            .await?
            .pop()
            .and_then(|mut kvs| kvs.pop()))
    }

    async fn get_keys(&mut self, keys: Vec<String>) -> Result<Vec<Option<KeyValue>>> {
        Ok(self
            .read(keys.into_iter().map(Read::Key).collect())
            .await?
            .into_iter()
            .map(|mut kvs| kvs.pop())
            .collect())
    }

    /// Commits `writes` if nothing changed since the first read: `false` if something did.
    async fn commit(self, op: &'static str, writes: Writes) -> Result<bool> {
        if writes.is_empty() {
            return Ok(true);
        }
        let guard = self.guard.unwrap_or(0);
        self.inner.commit(op, writes, Some(guard)).await
    }
}

/// Counts the attempts of one operation.
struct Attempts {
    op: &'static str,
    made: u32,
}

impl Attempts {
    fn new(op: &'static str) -> Self {
        Attempts { op, made: 0 }
    }

    /// After a conflict: waits a little (random, growing) before the next attempt, or fails
    /// once [`MAX_ATTEMPTS`] were made.
    async fn conflicted(&mut self) -> Result<()> {
        self.made += 1;
        if self.made >= MAX_ATTEMPTS {
            return Err(StoreError::Conflict {
                op: self.op,
                attempts: self.made,
            });
        }
        let cap_us = (1000u64 << self.made.min(5)).min(25_000);
        tokio::time::sleep(Duration::from_micros(random_below(cap_us))).await;
        Ok(())
    }
}

fn random_below(n: u64) -> u64 {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 8];
    match ring::rand::SystemRandom::new().fill(&mut b) {
        Ok(()) => u64::from_le_bytes(b) % n.max(1),
        Err(_) => n / 2,
    }
}

// === impl Inner: keys, requests, errors ===

impl Inner {
    /// `P/<parts joined by />`, each part escaped.
    fn key(&self, parts: &[&str]) -> String {
        let mut k = self.prefix.clone();
        for p in parts {
            k.push('/');
            k.push_str(&seg(p));
        }
        k
    }

    /// [`Inner::key`] with a trailing `/`: the range of everything below.
    fn dir(&self, parts: &[&str]) -> String {
        let mut k = self.key(parts);
        k.push('/');
        k
    }

    fn guard_key(&self) -> String {
        self.key(&["rev"])
    }

    fn unavailable(&self, detail: String) -> StoreError {
        StoreError::Unavailable {
            endpoints: self.endpoints.clone(),
            detail,
        }
    }

    fn error(&self, e: etcd_client::Error) -> StoreError {
        use etcd_client::Error as E;
        match e {
            E::TransportError(_) | E::IoError(_) => self.unavailable(e.to_string()),
            E::GRpcStatus(s)
                if matches!(
                    s.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ) =>
            {
                self.unavailable(s.message().to_owned())
            }
            other => {
                let mut detail = other.to_string();
                if detail.contains("too many operations in txn request") {
                    detail.push_str(
                        " (etcd's --max-txn-ops, 128 by default, limits one transaction: raise it, or write fewer records at once)",
                    );
                }
                StoreError::Etcd { detail }
            }
        }
    }

    /// `fut` (one etcd request) within the timeout.
    async fn req<T>(
        &self,
        fut: impl Future<Output = std::result::Result<T, etcd_client::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.timeout, fut).await {
            Err(_) => Err(self.unavailable(format!("no answer within {:?}", self.timeout))),
            Ok(Err(e)) => Err(self.error(e)),
            Ok(Ok(v)) => Ok(v),
        }
    }

    fn tx(&self) -> Tx<'_> {
        Tx {
            inner: self,
            guard: None,
        }
    }

    /// The store's current revision.
    async fn current_revision(&self) -> Result<i64> {
        let mut kv = self.client.kv_client();
        let resp = self.req(kv.get(self.guard_key(), None)).await?;
        Ok(resp.header().map_or(0, |h| h.revision()))
    }

    /// Several reads at one revision (one etcd transaction).
    async fn read(&self, reads: Vec<Read>) -> Result<Vec<Vec<KeyValue>>> {
        let ops: Vec<TxnOp> = reads
            .into_iter()
            .map(|r| match r {
                Read::Key(k) => TxnOp::get(k, None),
                Read::Prefix(p) => TxnOp::get(p, Some(GetOptions::new().with_prefix())),
            })
            .collect();
        let n = ops.len();
        let mut kv = self.client.kv_client();
        let resp = self.req(kv.txn(Txn::new().and_then(ops))).await?;
        let out: Vec<Vec<KeyValue>> = resp
            .op_responses()
            .into_iter()
            .filter_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
                _ => None,
            })
            .collect();
        if out.len() != n {
            return Err(StoreError::Etcd {
                detail: format!("a read of {n} ranges came back with {}", out.len()),
            });
        }
        Ok(out)
    }

    /// Everything under `P/<parts>/`.
    async fn list(&self, parts: &[&str]) -> Result<Vec<KeyValue>> {
        Ok(self
            .read(vec![Read::Prefix(self.dir(parts))])
            .await?
            .pop()
            .unwrap_or_default())
    }

    async fn get(&self, key: String) -> Result<Option<KeyValue>> {
        Ok(self
            .read(vec![Read::Key(key)])
            .await?
            .pop()
            .and_then(|mut kvs| kvs.pop()))
    }

    /// Commits `writes` and bumps the guard; if `guard` is given, only if the guard's
    /// `mod_revision` is still that (`false` otherwise).
    async fn commit(&self, op: &'static str, writes: Writes, guard: Option<i64>) -> Result<bool> {
        let guard_key = self.guard_key();
        let mut ops: Vec<TxnOp> = writes
            .prefixes
            .into_iter()
            .map(|p| TxnOp::delete(p, Some(DeleteOptions::new().with_prefix())))
            .collect();
        for (k, v) in writes.keys {
            ops.push(match v {
                Some(v) => TxnOp::put(k, v, None),
                None => TxnOp::delete(k, None),
            });
        }
        ops.push(TxnOp::put(
            guard_key.clone(),
            format!("{} {op}", self.writer_id),
            None,
        ));
        let mut txn = Txn::new();
        if let Some(g) = guard {
            txn = txn.when(vec![Compare::mod_revision(guard_key, CompareOp::Equal, g)]);
        }
        let mut kv = self.client.kv_client();
        let resp = self.req(kv.txn(txn.and_then(ops))).await?;
        Ok(resp.succeeded())
    }

    /// Commits writes that depend on no read.
    async fn commit_blind(&self, op: &'static str, writes: Writes) -> Result<()> {
        if !writes.is_empty() {
            self.commit(op, writes, None).await?;
        }
        Ok(())
    }
}

/// What a write of the etcd key `key` (under `prefix`, which ends with `/`) means for a
/// follower: a key outside the prefix or not UTF-8 means everything.
fn key_meaning(key: &[u8], prefix: &str) -> KeyMeaning {
    key.strip_prefix(prefix.as_bytes())
        .and_then(|k| std::str::from_utf8(k).ok())
        .map_or(KeyMeaning::Everything, etcd_key_meaning)
}

/// A free-text key segment: `%` and `/` percent-encoded.
fn seg(s: &str) -> Cow<'_, str> {
    if s.contains(['%', '/']) {
        Cow::Owned(s.replace('%', "%25").replace('/', "%2F"))
    } else {
        Cow::Borrowed(s)
    }
}

fn json<T: Serialize>(value: &T) -> Vec<u8> {
    // The record types are plain structs of strings, numbers and maps with string keys.
    serde_json::to_vec(value).unwrap_or_default()
}

fn key_text(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.key()).into_owned()
}

fn corrupt(kv: &KeyValue, detail: impl std::fmt::Display) -> StoreError {
    StoreError::CorruptKey {
        key: key_text(kv),
        detail: detail.to_string(),
    }
}

fn decode<T: DeserializeOwned>(kv: &KeyValue) -> Result<T> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(kv, e))
}

fn text(kv: &KeyValue) -> Result<&str> {
    std::str::from_utf8(kv.value()).map_err(|e| corrupt(kv, e))
}

fn sha256_hex(data: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, data)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// === records ===

#[derive(Serialize, Deserialize)]
struct TokenRow {
    node: String,
    expires_at: i64,
}

#[derive(Serialize, Deserialize)]
struct NodeRow {
    name: String,
    node_id: u32,
    serial: String,
    previous_serial: Option<String>,
    svid_not_after: i64,
    banned: bool,
    attested_at: i64,
    address: Option<IpAddr>,
    /// `join_token` or `x509pop`, as SQLite keeps it.
    attestation: String,
    /// Standard base64.
    tunnel_key: Option<String>,
}

impl NodeRow {
    fn of(r: &NodeRecord) -> Self {
        NodeRow {
            name: r.name.to_string(),
            node_id: r.node_id.get(),
            serial: r.serial.clone(),
            previous_serial: r.previous_serial.clone(),
            svid_not_after: unix_secs(r.svid_not_after),
            banned: r.banned,
            attested_at: unix_secs(r.attested_at),
            address: r.address,
            attestation: r.attestation.as_str().to_owned(),
            tunnel_key: r.tunnel_key.map(|k| k.to_string()),
        }
    }

    fn record(self, kv: &KeyValue) -> Result<NodeRecord> {
        Ok(NodeRecord {
            name: self.name.parse().map_err(|e| corrupt(kv, e))?,
            node_id: NodeId::new(self.node_id),
            serial: self.serial,
            previous_serial: self.previous_serial,
            svid_not_after: from_unix_secs(self.svid_not_after),
            banned: self.banned,
            address: self.address,
            attested_at: from_unix_secs(self.attested_at),
            attestation: self.attestation.parse().map_err(|e| corrupt(kv, e))?,
            tunnel_key: self
                .tunnel_key
                .map(|k| k.parse::<TunnelKey>())
                .transpose()
                .map_err(|e| corrupt(kv, format!("tunnel key: {e}")))?,
        })
    }
}

fn node_of(kv: &KeyValue) -> Result<NodeRecord> {
    decode::<NodeRow>(kv)?.record(kv)
}

#[derive(Serialize, Deserialize)]
struct SpecRow {
    name: String,
    address: Option<IpAddr>,
    pod_range: String,
}

fn spec_of(kv: &KeyValue) -> Result<NodeSpec> {
    let row: SpecRow = decode(kv)?;
    Ok(NodeSpec {
        name: row.name.parse().map_err(|e| corrupt(kv, e))?,
        address: row.address,
        pod_range: row.pod_range.parse().map_err(|e: String| corrupt(kv, e))?,
    })
}

#[derive(Serialize, Deserialize)]
struct IdentityRow {
    id: u32,
    labels: BTreeMap<String, String>,
}

fn label_map(labels: &Labels) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

fn labels_of(kv: &KeyValue, map: BTreeMap<String, String>) -> Result<Labels> {
    Labels::from_pairs(map).map_err(|e| corrupt(kv, e))
}

#[derive(Serialize, Deserialize)]
struct PodRow {
    namespace: String,
    name: String,
    labels: BTreeMap<String, String>,
    node: String,
    identity: u32,
}

impl PodRow {
    /// The pod stored at etcd key `key`, with what its node reported.
    fn record(self, key: &str, runtime: Option<PodRuntime>) -> Result<PodRecord> {
        let corrupt = |detail: String| StoreError::CorruptKey {
            key: key.to_owned(),
            detail,
        };
        Ok(PodRecord {
            labels: Labels::from_pairs(self.labels).map_err(|e| corrupt(e.to_string()))?,
            node: self
                .node
                .parse::<NodeName>()
                .map_err(|e| corrupt(e.to_string()))?,
            identity: IdentityId::new(self.identity),
            namespace: self.namespace,
            name: self.name,
            runtime,
        })
    }
}

#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
struct RuntimeRow {
    namespace: String,
    name: String,
    node: String,
    ipv4: Ipv4Addr,
    interface: String,
}

impl RuntimeRow {
    /// What the node reported.
    fn facts(self) -> PodRuntime {
        PodRuntime {
            ipv4: self.ipv4,
            interface: self.interface,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct PodIpRow {
    namespace: String,
    name: String,
    node: String,
}

#[derive(Serialize, Deserialize)]
struct PolicyRow {
    key: String,
    yaml: String,
}

#[derive(Serialize, Deserialize)]
struct EntryRow {
    id: String,
    spiffe_id: String,
    parent_id: String,
    selectors: Vec<String>,
    x509_svid_ttl: Option<u64>,
    dns_names: Vec<String>,
    revision: u64,
}

impl EntryRow {
    fn of(e: &RegistrationEntry) -> Self {
        EntryRow {
            id: e.id.to_string(),
            spiffe_id: e.spiffe_id.to_string(),
            parent_id: e.parent_id.to_string(),
            selectors: e.selectors.iter().map(ToString::to_string).collect(),
            x509_svid_ttl: e.x509_svid_ttl.map(|d| d.as_secs()),
            dns_names: e.dns_names.clone(),
            revision: e.revision,
        }
    }
}

fn entry_of(kv: &KeyValue) -> Result<RegistrationEntry> {
    let row: EntryRow = decode(kv)?;
    let c = |e: &dyn std::fmt::Display| corrupt(kv, e);
    Ok(RegistrationEntry {
        id: row.id.parse().map_err(|e| c(&e))?,
        spiffe_id: row.spiffe_id.parse::<SpiffeId>().map_err(|e| c(&e))?,
        parent_id: row.parent_id.parse::<SpiffeId>().map_err(|e| c(&e))?,
        selectors: row
            .selectors
            .iter()
            .map(|s| s.parse::<Selector>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|e| c(&e))?,
        x509_svid_ttl: row.x509_svid_ttl.map(Duration::from_secs),
        dns_names: row.dns_names,
        revision: row.revision,
    })
}

/// The fields that make an entry unique, hashed: the name of its `entry_keys` key.
fn entry_fields_hash(spiffe_id: &SpiffeId, parent_id: &SpiffeId, selectors: &[Selector]) -> String {
    let texts: Vec<String> = selectors.iter().map(ToString::to_string).collect();
    let fields = serde_json::json!([spiffe_id.to_string(), parent_id.to_string(), texts]);
    sha256_hex(fields.to_string().as_bytes())
}

fn labels_hash(labels: &Labels) -> String {
    sha256_hex(&json(&label_map(labels)))
}

// === impl Inner: the operations ===

impl Inner {
    // --- CA journal ---

    async fn load_ca_journal(&self) -> Result<Option<String>> {
        match self.get(self.key(&["ca", "journal"])).await? {
            None => Ok(None),
            Some(kv) => Ok(Some(text(&kv)?.to_owned())),
        }
    }

    async fn save_ca_journal(&self, journal: String) -> Result<()> {
        let mut w = Writes::default();
        w.put(self.key(&["ca", "journal"]), journal);
        self.commit_blind("save_ca_journal", w).await
    }

    // --- join tokens ---

    async fn create_join_token(
        &self,
        node: NodeName,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJoinToken> {
        let expires_at = now.checked_add(ttl).ok_or(StoreError::LifetimeOutOfRange {
            secs: ttl.as_secs(),
        })?;
        let token = crate::model::random_hex(16);
        let key = self.key(&["tokens", &token_hash(&token)]);
        let row = TokenRow {
            node: node.to_string(),
            expires_at: unix_secs(expires_at),
        };
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("create_join_token");
        loop {
            let mut tx = self.tx();
            let tokens = tx
                .read(vec![Read::Prefix(self.dir(&["tokens"]))])
                .await?
                .pop()
                .unwrap_or_default();
            let mut w = Writes::default();
            let expired = tokens.iter().filter(|kv| {
                // An unreadable token is not this call's business: it stays.
                decode::<TokenRow>(kv).is_ok_and(|t| t.expires_at < unix_secs(now))
            });
            for kv in expired.take(PURGE_LIMIT) {
                w.delete(key_text(kv));
            }
            w.put_json(key.clone(), &row);
            if tx.commit("create_join_token", w).await? {
                return Ok(IssuedJoinToken {
                    token,
                    node,
                    expires_at,
                });
            }
            attempts.conflicted().await?;
        }
    }

    async fn consume_join_token(
        &self,
        token: String,
        node: NodeName,
        now: SystemTime,
    ) -> Result<()> {
        let key = self.key(&["tokens", &token_hash(&token)]);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("consume_join_token");
        let kv = loop {
            let mut tx = self.tx();
            let Some(kv) = tx.get(key.clone()).await? else {
                return Err(StoreError::TokenUnknown);
            };
            let mut w = Writes::default();
            w.delete(key.clone());
            if tx.commit("consume_join_token", w).await? {
                break kv;
            }
            attempts.conflicted().await?;
        };
        // Deleted whatever the outcome: it works at most once.
        let row: TokenRow = decode(&kv)?;
        if from_unix_secs(row.expires_at) < now {
            return Err(StoreError::TokenExpired);
        }
        let expected: NodeName = row.node.parse().map_err(|e| corrupt(&kv, e))?;
        if expected != node {
            return Err(StoreError::TokenWrongNode {
                expected,
                presented: node,
            });
        }
        Ok(())
    }

    // --- nodes ---

    fn node_key(&self, node: &NodeName) -> String {
        self.key(&["nodes", node.as_str()])
    }

    fn tunnel_key_key(&self, key: &TunnelKey) -> String {
        self.key(&["tunnel_keys", &hex(key.as_bytes())])
    }

    async fn record_attestation(
        &self,
        node: NodeName,
        how: NodeAttestation,
        serial: String,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        let key = self.node_key(&node);
        let counter = self.key(&["counters", "node_id"]);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("record_attestation");
        loop {
            let mut tx = self.tx();
            let got = tx.get_keys(vec![key.clone(), counter.clone()]).await?;
            let mut w = Writes::default();
            let record = match got.first().and_then(Option::as_ref) {
                Some(kv) => {
                    let old = node_of(kv)?;
                    if old.banned {
                        return Err(StoreError::NodeBanned(node));
                    }
                    NodeRecord {
                        serial: serial.clone(),
                        previous_serial: None,
                        svid_not_after: from_unix_secs(unix_secs(not_after)),
                        attestation: how,
                        ..old
                    }
                }
                None => {
                    let last = match got.get(1).and_then(Option::as_ref) {
                        None => 0,
                        Some(kv) => text(kv)?.parse::<u32>().map_err(|e| corrupt(kv, e))?,
                    };
                    let id = last.checked_add(1).ok_or_else(|| StoreError::Etcd {
                        detail: "every node id was handed out (2^32 - 1 of them)".into(),
                    })?;
                    w.put(counter.clone(), id.to_string());
                    NodeRecord {
                        name: node.clone(),
                        node_id: NodeId::new(id),
                        serial: serial.clone(),
                        previous_serial: None,
                        svid_not_after: from_unix_secs(unix_secs(not_after)),
                        banned: false,
                        address: None,
                        attested_at: from_unix_secs(unix_secs(now)),
                        attestation: how,
                        tunnel_key: None,
                    }
                }
            };
            w.put_json(key.clone(), &NodeRow::of(&record));
            if tx.commit("record_attestation", w).await? {
                return Ok(record);
            }
            attempts.conflicted().await?;
        }
    }

    async fn record_renewal(
        &self,
        node: NodeName,
        proven: String,
        serial: String,
        not_after: SystemTime,
    ) -> Result<NodeRecord> {
        let key = self.node_key(&node);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("record_renewal");
        loop {
            let mut tx = self.tx();
            let old = match tx.get(key.clone()).await? {
                None => return Err(StoreError::NodeNotFound(node)),
                Some(kv) => node_of(&kv)?,
            };
            if old.banned {
                return Err(StoreError::NodeBanned(node));
            }
            let record = NodeRecord {
                previous_serial: Some(proven.clone()),
                serial: serial.clone(),
                svid_not_after: not_after,
                ..old
            };
            let mut w = Writes::default();
            w.put_json(key.clone(), &NodeRow::of(&record));
            if tx.commit("record_renewal", w).await? {
                return Ok(record);
            }
            attempts.conflicted().await?;
        }
    }

    async fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        self.get(self.node_key(node))
            .await?
            .map(|kv| node_of(&kv))
            .transpose()
    }

    async fn usable_node(&self, node: NodeName) -> Result<NodeRecord> {
        match self.node(&node).await? {
            None => Err(StoreError::NodeNotFound(node)),
            Some(r) if r.banned => Err(StoreError::NodeBanned(node)),
            Some(r) => Ok(r),
        }
    }

    async fn nodes(&self) -> Result<Vec<NodeRecord>> {
        let mut out = self
            .list(&["nodes"])
            .await?
            .iter()
            .map(node_of)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Reads node `node`, changes it with `f` (which may refuse), writes it back: one step.
    async fn update_node(
        &self,
        op: &'static str,
        node: &NodeName,
        mut f: impl FnMut(&mut NodeRecord) -> Result<bool>,
    ) -> Result<Option<NodeRecord>> {
        let key = self.node_key(node);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new(op);
        loop {
            let mut tx = self.tx();
            let Some(kv) = tx.get(key.clone()).await? else {
                return Ok(None);
            };
            let mut record = node_of(&kv)?;
            let mut w = Writes::default();
            if f(&mut record)? {
                w.put_json(key.clone(), &NodeRow::of(&record));
            }
            if tx.commit(op, w).await? {
                return Ok(Some(record));
            }
            attempts.conflicted().await?;
        }
    }

    async fn ban_node(&self, node: NodeName) -> Result<NodeRecord> {
        self.update_node("ban_node", &node, |r| {
            r.banned = true;
            Ok(true)
        })
        .await?
        .ok_or(StoreError::NodeNotFound(node))
    }

    async fn set_node_address(&self, node: NodeName, address: IpAddr) -> Result<()> {
        self.update_node("set_node_address", &node, |r| {
            let changed = r.address != Some(address);
            r.address = Some(address);
            Ok(changed)
        })
        .await?;
        Ok(())
    }

    async fn evict_node(&self, node: NodeName) -> Result<()> {
        let key = self.node_key(&node);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("evict_node");
        loop {
            let mut tx = self.tx();
            let Some(kv) = tx.get(key.clone()).await? else {
                return Err(StoreError::NodeNotFound(node));
            };
            let mut w = Writes::default();
            w.delete(key.clone());
            // An unreadable record is deleted all the same: eviction is how to get rid of it.
            if let Ok(Some(k)) = node_of(&kv).map(|r| r.tunnel_key) {
                w.delete(self.tunnel_key_key(&k));
            }
            // What the node reported of its pods, with one range delete; their `pod_ips` keys
            // become stale.
            w.delete_prefix(self.dir(&["runtime", node.as_str()]));
            if tx.commit("evict_node", w).await? {
                return Ok(());
            }
            attempts.conflicted().await?;
        }
    }

    async fn set_node_tunnel_key(&self, node: NodeName, key: TunnelKey) -> Result<bool> {
        let node_key = self.node_key(&node);
        let index = self.tunnel_key_key(&key);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("set_node_tunnel_key");
        loop {
            let mut tx = self.tx();
            let got = tx.get_keys(vec![index.clone(), node_key.clone()]).await?;
            if let Some(owner_kv) = got.first().and_then(Option::as_ref) {
                let owner = text(owner_kv)?.to_owned();
                if owner != node.as_str() {
                    // The index is written with the records; check the owner still has it
                    // anyway, so that a stale index entry cannot lock a key out forever.
                    let owner_name: NodeName = owner.parse().map_err(|e| corrupt(owner_kv, e))?;
                    let holds = match tx.get(self.node_key(&owner_name)).await? {
                        Some(kv) => node_of(&kv)?.tunnel_key == Some(key),
                        None => false,
                    };
                    if holds {
                        return Err(StoreError::DuplicateTunnelKey { node, owner });
                    }
                }
            }
            let Some(kv) = got.get(1).and_then(Option::as_ref) else {
                return Ok(false);
            };
            let mut record = node_of(kv)?;
            if record.tunnel_key == Some(key) {
                return Ok(false);
            }
            let mut w = Writes::default();
            if let Some(old) = record.tunnel_key {
                w.delete(self.tunnel_key_key(&old));
            }
            record.tunnel_key = Some(key);
            w.put(index.clone(), node.as_str());
            w.put_json(node_key.clone(), &NodeRow::of(&record));
            if tx.commit("set_node_tunnel_key", w).await? {
                return Ok(true);
            }
            attempts.conflicted().await?;
        }
    }

    async fn node_spec(&self, name: &NodeName) -> Result<Option<NodeSpec>> {
        self.get(self.key(&["specs", name.as_str()]))
            .await?
            .map(|kv| spec_of(&kv))
            .transpose()
    }

    async fn node_specs(&self) -> Result<Vec<NodeSpec>> {
        let mut out = self
            .list(&["specs"])
            .await?
            .iter()
            .map(spec_of)
            .collect::<Result<Vec<_>>>()?;
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn put_node_spec(&self, spec: NodeSpec) -> Result<()> {
        let mut w = Writes::default();
        w.put_json(
            self.key(&["specs", spec.name.as_str()]),
            &SpecRow {
                name: spec.name.to_string(),
                address: spec.address,
                pod_range: spec.pod_range.to_string(),
            },
        );
        self.commit_blind("put_node_spec", w).await
    }

    // --- identities ---

    async fn identities(&self) -> Result<Vec<(IdentityId, Labels)>> {
        let mut out = Vec::new();
        for kv in self.list(&["identities"]).await? {
            let row: IdentityRow = decode(&kv)?;
            out.push((IdentityId::new(row.id), labels_of(&kv, row.labels)?));
        }
        out.sort_by_key(|(id, _)| *id);
        Ok(out)
    }

    async fn insert_identity(&self, id: IdentityId, labels: Labels) -> Result<()> {
        let id_key = self.key(&["identities", &id.to_string()]);
        let labels_key = self.key(&["identity_labels", &labels_hash(&labels)]);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("insert_identity");
        loop {
            let mut tx = self.tx();
            let got = tx
                .get_keys(vec![id_key.clone(), labels_key.clone()])
                .await?;
            if let Some(kv) = got.first().and_then(Option::as_ref) {
                let row: IdentityRow = decode(kv)?;
                let stored = labels_of(kv, row.labels)?;
                if stored == labels {
                    // Exactly this pair (a retried write whose answer was lost).
                    return Ok(());
                }
                return Err(StoreError::IdentityTaken {
                    id,
                    labels: stored.to_string(),
                });
            }
            if let Some(kv) = got.get(1).and_then(Option::as_ref) {
                let existing = text(kv)?.parse::<u32>().map_err(|e| corrupt(kv, e))?;
                return Err(StoreError::LabelsTaken {
                    labels: labels.to_string(),
                    existing: IdentityId::new(existing),
                });
            }
            let mut w = Writes::default();
            w.put_json(
                id_key.clone(),
                &IdentityRow {
                    id: id.get(),
                    labels: label_map(&labels),
                },
            );
            w.put(labels_key.clone(), id.to_string());
            if tx.commit("insert_identity", w).await? {
                return Ok(());
            }
            attempts.conflicted().await?;
        }
    }

    // --- pods ---

    fn pod_key(&self, namespace: &str, name: &str) -> String {
        self.key(&["pods", namespace, name])
    }

    fn runtime_key(&self, node: &str, namespace: &str, name: &str) -> String {
        self.key(&["runtime", node, namespace, name])
    }

    fn node_pod_key(&self, node: &str, namespace: &str, name: &str) -> String {
        self.key(&["node_pods", node, namespace, name])
    }

    fn pod_ip_key(&self, ip: Ipv4Addr) -> String {
        self.key(&["pod_ips", &ip.to_string()])
    }

    /// Fails with [`StoreError::AddressInUse`] if a pod other than `namespace/name` has `ip`.
    async fn check_address(
        &self,
        tx: &mut Tx<'_>,
        ip: Ipv4Addr,
        namespace: &str,
        name: &str,
    ) -> Result<()> {
        let Some(kv) = tx.get(self.pod_ip_key(ip)).await? else {
            return Ok(());
        };
        let owner: PodIpRow = decode(&kv)?;
        if owner.namespace == namespace && owner.name == name {
            return Ok(());
        }
        // Stale if the owner no longer reports it (moved, deleted, evicted, readdressed).
        let holds = match tx
            .get(self.runtime_key(&owner.node, &owner.namespace, &owner.name))
            .await?
        {
            Some(kv) => decode::<RuntimeRow>(&kv)?.ipv4 == ip,
            None => false,
        };
        if holds {
            return Err(StoreError::AddressInUse {
                ipv4: ip,
                pod: format!("{}/{}", owner.namespace, owner.name),
            });
        }
        Ok(())
    }

    /// Writes a pod's runtime record and its address's index key.
    fn write_runtime(&self, w: &mut Writes, row: &RuntimeRow) {
        w.put_json(self.runtime_key(&row.node, &row.namespace, &row.name), row);
        w.put_json(
            self.pod_ip_key(row.ipv4),
            &PodIpRow {
                namespace: row.namespace.clone(),
                name: row.name.clone(),
                node: row.node.clone(),
            },
        );
    }

    /// Deletes a pod's runtime record and its address's index key.
    fn clear_runtime(&self, w: &mut Writes, row: &RuntimeRow) {
        w.delete(self.runtime_key(&row.node, &row.namespace, &row.name));
        w.delete(self.pod_ip_key(row.ipv4));
    }

    /// The pod's placement and, if any, its runtime record (under the placement's node).
    async fn read_pod(
        &self,
        tx: &mut Tx<'_>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<(PodRow, Option<RuntimeRow>)>> {
        let Some(kv) = tx.get(self.pod_key(namespace, name)).await? else {
            return Ok(None);
        };
        let pod: PodRow = decode(&kv)?;
        let runtime = tx
            .get(self.runtime_key(&pod.node, namespace, name))
            .await?
            .map(|kv| decode::<RuntimeRow>(&kv))
            .transpose()?;
        Ok(Some((pod, runtime)))
    }

    async fn put_pod(&self, pod: PodRecord) -> Result<()> {
        let key = self.pod_key(&pod.namespace, &pod.name);
        let row = PodRow {
            namespace: pod.namespace.clone(),
            name: pod.name.clone(),
            labels: label_map(&pod.labels),
            node: pod.node.to_string(),
            identity: pod.identity.get(),
        };
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("put_pod");
        loop {
            let mut tx = self.tx();
            let mut w = Writes::default();
            match self.read_pod(&mut tx, &pod.namespace, &pod.name).await? {
                Some((old, runtime)) => {
                    // Runtime facts stay only on the same node.
                    if old.node != row.node {
                        w.delete(self.node_pod_key(&old.node, &old.namespace, &old.name));
                        if let Some(rt) = runtime {
                            self.clear_runtime(&mut w, &rt);
                        }
                    }
                }
                None => {
                    if let Some(rt) = &pod.runtime {
                        self.check_address(&mut tx, rt.ipv4, &pod.namespace, &pod.name)
                            .await?;
                        self.write_runtime(
                            &mut w,
                            &RuntimeRow {
                                namespace: pod.namespace.clone(),
                                name: pod.name.clone(),
                                node: row.node.clone(),
                                ipv4: rt.ipv4,
                                interface: rt.interface.clone(),
                            },
                        );
                    }
                }
            }
            w.put_json(key.clone(), &row);
            w.put_json(
                self.node_pod_key(&row.node, &row.namespace, &row.name),
                &row,
            );
            if tx.commit("put_pod", w).await? {
                return Ok(());
            }
            attempts.conflicted().await?;
        }
    }

    async fn set_pod_runtime(
        &self,
        namespace: String,
        name: String,
        runtime: Option<PodRuntime>,
    ) -> Result<bool> {
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("set_pod_runtime");
        loop {
            let mut tx = self.tx();
            let Some((pod, old)) = self.read_pod(&mut tx, &namespace, &name).await? else {
                return Ok(false);
            };
            let new = runtime.as_ref().map(|rt| RuntimeRow {
                namespace: namespace.clone(),
                name: name.clone(),
                node: pod.node.clone(),
                ipv4: rt.ipv4,
                interface: rt.interface.clone(),
            });
            if new == old {
                return Ok(true);
            }
            let mut w = Writes::default();
            if let Some(old) = &old {
                self.clear_runtime(&mut w, old);
            }
            if let Some(new) = &new {
                self.check_address(&mut tx, new.ipv4, &namespace, &name)
                    .await?;
                self.write_runtime(&mut w, new);
            }
            if tx.commit("set_pod_runtime", w).await? {
                return Ok(true);
            }
            attempts.conflicted().await?;
        }
    }

    async fn delete_pod(&self, namespace: String, name: String) -> Result<bool> {
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("delete_pod");
        loop {
            let mut tx = self.tx();
            let Some((pod, runtime)) = self.read_pod(&mut tx, &namespace, &name).await? else {
                return Ok(false);
            };
            let mut w = Writes::default();
            w.delete(self.pod_key(&namespace, &name));
            w.delete(self.node_pod_key(&pod.node, &namespace, &name));
            if let Some(rt) = &runtime {
                self.clear_runtime(&mut w, rt);
            }
            if tx.commit("delete_pod", w).await? {
                return Ok(true);
            }
            attempts.conflicted().await?;
        }
    }

    async fn pods(&self) -> Result<Vec<PodRecord>> {
        self.pods_from(Read::Prefix(self.dir(&["pods"])), self.dir(&["runtime"]))
            .await
    }

    async fn pod(&self, namespace: String, name: String) -> Result<Option<PodRecord>> {
        let mut tx = self.tx();
        let Some((row, runtime)) = self.read_pod(&mut tx, &namespace, &name).await? else {
            return Ok(None);
        };
        let key = self.pod_key(&namespace, &name);
        Ok(Some(row.record(&key, runtime.map(RuntimeRow::facts))?))
    }

    async fn pods_on_node(&self, node: NodeName) -> Result<Vec<PodRecord>> {
        self.pods_from(
            Read::Prefix(self.dir(&["node_pods", node.as_str()])),
            self.dir(&["runtime", node.as_str()]),
        )
        .await
    }

    /// The pods whose placements `placements` reads, with the runtime facts under the range
    /// `runtimes`, read at one revision; by namespace then name.
    async fn pods_from(&self, placements: Read, runtimes: String) -> Result<Vec<PodRecord>> {
        let mut got = self.read(vec![placements, Read::Prefix(runtimes)]).await?;
        let runtimes = got.pop().unwrap_or_default();
        let pods = got.pop().unwrap_or_default();
        let mut by_pod: BTreeMap<(String, String, String), PodRuntime> = BTreeMap::new();
        for kv in &runtimes {
            let r: RuntimeRow = decode(kv)?;
            by_pod.insert(
                (r.node.clone(), r.namespace.clone(), r.name.clone()),
                r.facts(),
            );
        }
        let mut out = Vec::with_capacity(pods.len());
        for kv in &pods {
            let row: PodRow = decode(kv)?;
            let runtime =
                by_pod.remove(&(row.node.clone(), row.namespace.clone(), row.name.clone()));
            out.push(row.record(&key_text(kv), runtime)?);
        }
        out.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
        Ok(out)
    }

    /// Brings a store of layout 1 (before `node_pods`) to layout 2: writes the `node_pods`
    /// key of every pod that lacks one (and drops those whose pod moved or is gone), a few
    /// at a time within etcd's transaction limit, each batch guarded as any write. Nothing to
    /// do once `P/layout` says 2.
    async fn index_pods_by_node(&self) -> Result<()> {
        /// Writes per transaction, below etcd's default `--max-txn-ops` of 128.
        const BATCH: usize = 100;
        let layout = self.key(&["layout"]);
        if let Some(kv) = self.get(layout.clone()).await?
            && text(&kv)?.trim() == "2"
        {
            return Ok(());
        }
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("index_pods_by_node");
        loop {
            let mut tx = self.tx();
            let mut got = tx
                .read(vec![
                    Read::Prefix(self.dir(&["pods"])),
                    Read::Prefix(self.dir(&["node_pods"])),
                ])
                .await?;
            let indexed = got.pop().unwrap_or_default();
            let pods = got.pop().unwrap_or_default();
            let mut wanted: BTreeMap<String, Vec<u8>> = BTreeMap::new();
            for kv in &pods {
                let row: PodRow = decode(kv)?;
                wanted.insert(
                    self.node_pod_key(&row.node, &row.namespace, &row.name),
                    kv.value().to_vec(),
                );
            }
            let mut w = Writes::default();
            for kv in &indexed {
                let key = key_text(kv);
                match wanted.remove(&key) {
                    Some(value) if value == kv.value() => {}
                    Some(value) => w.put(key, value),
                    None => w.delete(key),
                }
                if w.keys.len() >= BATCH {
                    break;
                }
            }
            for (key, value) in wanted {
                if w.keys.len() >= BATCH {
                    break;
                }
                w.put(key, value);
            }
            let last = w.keys.len() < BATCH;
            if last {
                w.put(layout.clone(), "2");
            }
            if tx.commit("index_pods_by_node", w).await? {
                if last {
                    return Ok(());
                }
            } else {
                attempts.conflicted().await?;
            }
        }
    }

    // --- policies ---

    fn policy_key(&self, key: &str) -> String {
        self.key(&["policies", key])
    }

    fn put_policy(&self, w: &mut Writes, key: &str, yaml: &str) {
        w.put_json(
            self.policy_key(key),
            &PolicyRow {
                key: key.to_owned(),
                yaml: yaml.to_owned(),
            },
        );
    }

    async fn put_policies(&self, docs: Vec<(String, String)>) -> Result<()> {
        let mut w = Writes::default();
        for (key, yaml) in &docs {
            self.put_policy(&mut w, key, yaml);
        }
        self.commit_blind("put_policies", w).await
    }

    async fn rekey_policies(&self, moves: Vec<(String, String, String)>) -> Result<()> {
        let mut w = Writes::default();
        for (old, new, yaml) in &moves {
            w.delete(self.policy_key(old));
            self.put_policy(&mut w, new, yaml);
        }
        self.commit_blind("rekey_policies", w).await
    }

    async fn delete_policy(&self, key: String) -> Result<()> {
        let k = self.policy_key(&key);
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("delete_policy");
        loop {
            let mut tx = self.tx();
            if tx.get(k.clone()).await?.is_none() {
                return Err(StoreError::PolicyNotFound(key));
            }
            let mut w = Writes::default();
            w.delete(k.clone());
            if tx.commit("delete_policy", w).await? {
                return Ok(());
            }
            attempts.conflicted().await?;
        }
    }

    async fn policies(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for kv in self.list(&["policies"]).await? {
            let row: PolicyRow = decode(&kv)?;
            out.push((row.key, row.yaml));
        }
        out.sort();
        Ok(out)
    }

    // --- registration entries ---

    fn entry_key(&self, id: &EntryId) -> String {
        self.key(&["entries", id.as_str()])
    }

    fn entry_fields_key(&self, e: &RegistrationEntry) -> String {
        self.key(&[
            "entry_keys",
            &entry_fields_hash(&e.spiffe_id, &e.parent_id, &e.selectors),
        ])
    }

    /// [`StoreError::DuplicateEntry`] if an entry other than `except` has the fields of `e`.
    async fn refuse_duplicate(
        &self,
        tx: &mut Tx<'_>,
        e: &RegistrationEntry,
        except: Option<&EntryId>,
    ) -> Result<()> {
        let Some(kv) = tx.get(self.entry_fields_key(e)).await? else {
            return Ok(());
        };
        let existing: EntryId = text(&kv)?.parse().map_err(|e| corrupt(&kv, e))?;
        if Some(&existing) == except {
            return Ok(());
        }
        // Written with the entries; checked anyway, so that a stale key cannot block forever.
        let same = match tx.get(self.entry_key(&existing)).await? {
            Some(kv) => {
                let other = entry_of(&kv)?;
                (&other.spiffe_id, &other.parent_id, &other.selectors)
                    == (&e.spiffe_id, &e.parent_id, &e.selectors)
            }
            None => false,
        };
        if same {
            return Err(StoreError::DuplicateEntry { existing });
        }
        Ok(())
    }

    fn write_entry(&self, w: &mut Writes, e: &RegistrationEntry) {
        w.put_json(self.entry_key(&e.id), &EntryRow::of(e));
        w.put(self.entry_fields_key(e), e.id.as_str());
    }

    async fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry> {
        let mut entry = RegistrationEntry {
            id: EntryId::random(),
            spiffe_id: new.spiffe_id,
            parent_id: new.parent_id,
            selectors: normalized(new.selectors),
            x509_svid_ttl: new.x509_svid_ttl,
            dns_names: new.dns_names,
            revision: 1,
        };
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("create_entry");
        loop {
            let mut tx = self.tx();
            self.refuse_duplicate(&mut tx, &entry, None).await?;
            if tx.get(self.entry_key(&entry.id)).await?.is_some() {
                // 128 random bits collided: draw again.
                entry.id = EntryId::random();
                continue;
            }
            let mut w = Writes::default();
            self.write_entry(&mut w, &entry);
            if tx.commit("create_entry", w).await? {
                return Ok(entry);
            }
            attempts.conflicted().await?;
        }
    }

    async fn update_entry(&self, id: EntryId, new: NewEntry) -> Result<RegistrationEntry> {
        let mut entry = RegistrationEntry {
            id: id.clone(),
            spiffe_id: new.spiffe_id,
            parent_id: new.parent_id,
            selectors: normalized(new.selectors),
            x509_svid_ttl: new.x509_svid_ttl,
            dns_names: new.dns_names,
            revision: 0,
        };
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("update_entry");
        loop {
            let mut tx = self.tx();
            self.refuse_duplicate(&mut tx, &entry, Some(&id)).await?;
            let Some(kv) = tx.get(self.entry_key(&id)).await? else {
                return Err(StoreError::EntryNotFound(id));
            };
            let old = entry_of(&kv)?;
            entry.revision = old.revision + 1;
            let mut w = Writes::default();
            w.delete(self.entry_fields_key(&old));
            self.write_entry(&mut w, &entry);
            if tx.commit("update_entry", w).await? {
                return Ok(entry);
            }
            attempts.conflicted().await?;
        }
    }

    async fn delete_entry(&self, id: EntryId) -> Result<()> {
        // One writer at a time in this process: conflicts are left to other replicas.
        let _writer = self.writer.lock().await;
        let mut attempts = Attempts::new("delete_entry");
        loop {
            let mut tx = self.tx();
            let Some(kv) = tx.get(self.entry_key(&id)).await? else {
                return Err(StoreError::EntryNotFound(id));
            };
            let mut w = Writes::default();
            w.delete(self.entry_key(&id));
            if let Ok(old) = entry_of(&kv) {
                let fields = self.entry_fields_key(&old);
                // Only if the key is this entry's (it always is, unless written by hand).
                if let Some(owner) = tx.get(fields.clone()).await?
                    && owner.value() == id.as_str().as_bytes()
                {
                    w.delete(fields);
                }
            }
            if tx.commit("delete_entry", w).await? {
                return Ok(());
            }
            attempts.conflicted().await?;
        }
    }

    async fn entry(&self, id: EntryId) -> Result<RegistrationEntry> {
        match self.get(self.entry_key(&id)).await? {
            None => Err(StoreError::EntryNotFound(id)),
            Some(kv) => entry_of(&kv),
        }
    }

    async fn list_entries(&self, filter: EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let mut out = Vec::new();
        for kv in self.list(&["entries"]).await? {
            let e = entry_of(&kv)?;
            if filter.matches(&e) {
                out.push(e);
            }
        }
        out.sort_by_cached_key(|e| (e.spiffe_id.to_string(), e.id.clone()));
        Ok(out)
    }

    async fn count_entries(&self) -> Result<u64> {
        let mut kv = self.client.kv_client();
        let resp = self
            .req(kv.get(
                self.dir(&["entries"]),
                Some(GetOptions::new().with_prefix().with_count_only()),
            ))
            .await?;
        Ok(u64::try_from(resp.count()).unwrap_or(0))
    }
}

// === impl Datastore ===

/// Runs `Inner::$method($args)` on the store's runtime, with the arguments owned.
macro_rules! on_runtime {
    ($self:ident, $method:ident ( $($arg:ident),* )) => {{
        let inner = Arc::clone(&$self.inner);
        $self.run(async move { inner.$method($($arg),*).await })
    }};
}

impl Datastore for EtcdStore {
    fn kind(&self) -> &'static str {
        "etcd"
    }

    fn load_ca_journal(&self) -> Result<Option<String>> {
        on_runtime!(self, load_ca_journal())
    }

    fn save_ca_journal(&self, journal: &str) -> Result<()> {
        let journal = journal.to_owned();
        on_runtime!(self, save_ca_journal(journal))
    }

    fn create_join_token(
        &self,
        node: &NodeName,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedJoinToken> {
        let node = node.clone();
        on_runtime!(self, create_join_token(node, ttl, now))
    }

    fn consume_join_token(&self, token: &str, node: &NodeName, now: SystemTime) -> Result<()> {
        let (token, node) = (token.to_owned(), node.clone());
        on_runtime!(self, consume_join_token(token, node, now))
    }

    fn record_attestation(
        &self,
        node: &NodeName,
        how: NodeAttestation,
        serial: &str,
        not_after: SystemTime,
        now: SystemTime,
    ) -> Result<NodeRecord> {
        let (node, serial) = (node.clone(), serial.to_owned());
        on_runtime!(self, record_attestation(node, how, serial, not_after, now))
    }

    fn record_renewal(
        &self,
        node: &NodeName,
        proven: &str,
        serial: &str,
        not_after: SystemTime,
    ) -> Result<NodeRecord> {
        let (node, proven, serial) = (node.clone(), proven.to_owned(), serial.to_owned());
        on_runtime!(self, record_renewal(node, proven, serial, not_after))
    }

    fn usable_node(&self, node: &NodeName) -> Result<NodeRecord> {
        let node = node.clone();
        on_runtime!(self, usable_node(node))
    }

    fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>> {
        let inner = Arc::clone(&self.inner);
        let node = node.clone();
        self.run(async move { inner.node(&node).await })
    }

    fn nodes(&self) -> Result<Vec<NodeRecord>> {
        on_runtime!(self, nodes())
    }

    fn ban_node(&self, node: &NodeName) -> Result<NodeRecord> {
        let node = node.clone();
        on_runtime!(self, ban_node(node))
    }

    fn evict_node(&self, node: &NodeName) -> Result<()> {
        let node = node.clone();
        on_runtime!(self, evict_node(node))
    }

    fn node_spec(&self, name: &NodeName) -> Result<Option<NodeSpec>> {
        let inner = Arc::clone(&self.inner);
        let name = name.clone();
        self.run(async move { inner.node_spec(&name).await })
    }

    fn node_specs(&self) -> Result<Vec<NodeSpec>> {
        on_runtime!(self, node_specs())
    }

    fn put_node_spec(&self, spec: &NodeSpec) -> Result<()> {
        let spec = spec.clone();
        on_runtime!(self, put_node_spec(spec))
    }

    fn set_node_address(&self, node: &NodeName, address: IpAddr) -> Result<()> {
        let node = node.clone();
        on_runtime!(self, set_node_address(node, address))
    }

    fn set_node_tunnel_key(&self, node: &NodeName, key: TunnelKey) -> Result<bool> {
        let node = node.clone();
        on_runtime!(self, set_node_tunnel_key(node, key))
    }

    fn identities(&self) -> Result<Vec<(IdentityId, Labels)>> {
        on_runtime!(self, identities())
    }

    fn insert_identity(&self, id: IdentityId, labels: &Labels) -> Result<()> {
        let labels = labels.clone();
        on_runtime!(self, insert_identity(id, labels))
    }

    fn put_pod(&self, pod: &PodRecord) -> Result<()> {
        let pod = pod.clone();
        on_runtime!(self, put_pod(pod))
    }

    fn set_pod_runtime(
        &self,
        namespace: &str,
        name: &str,
        runtime: Option<&PodRuntime>,
    ) -> Result<bool> {
        let (namespace, name, runtime) = (namespace.to_owned(), name.to_owned(), runtime.cloned());
        on_runtime!(self, set_pod_runtime(namespace, name, runtime))
    }

    fn delete_pod(&self, namespace: &str, name: &str) -> Result<bool> {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        on_runtime!(self, delete_pod(namespace, name))
    }

    fn pods(&self) -> Result<Vec<PodRecord>> {
        on_runtime!(self, pods())
    }

    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>> {
        let (namespace, name) = (namespace.to_owned(), name.to_owned());
        on_runtime!(self, pod(namespace, name))
    }

    fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>> {
        let node = node.clone();
        on_runtime!(self, pods_on_node(node))
    }

    fn put_policies(&self, docs: &[(String, String)]) -> Result<()> {
        let docs = docs.to_vec();
        on_runtime!(self, put_policies(docs))
    }

    fn rekey_policies(&self, moves: &[(String, String, String)]) -> Result<()> {
        let moves = moves.to_vec();
        on_runtime!(self, rekey_policies(moves))
    }

    fn delete_policy(&self, key: &str) -> Result<()> {
        let key = key.to_owned();
        on_runtime!(self, delete_policy(key))
    }

    fn policies(&self) -> Result<Vec<(String, String)>> {
        on_runtime!(self, policies())
    }

    fn create_entry(&self, new: NewEntry) -> Result<RegistrationEntry> {
        on_runtime!(self, create_entry(new))
    }

    fn update_entry(&self, id: &EntryId, new: NewEntry) -> Result<RegistrationEntry> {
        let id = id.clone();
        on_runtime!(self, update_entry(id, new))
    }

    fn delete_entry(&self, id: &EntryId) -> Result<()> {
        let id = id.clone();
        on_runtime!(self, delete_entry(id))
    }

    fn entry(&self, id: &EntryId) -> Result<RegistrationEntry> {
        let id = id.clone();
        on_runtime!(self, entry(id))
    }

    fn list_entries(&self, filter: &EntryFilter) -> Result<Vec<RegistrationEntry>> {
        let filter = filter.clone();
        on_runtime!(self, list_entries(filter))
    }

    fn count_entries(&self) -> Result<u64> {
        on_runtime!(self, count_entries())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_segments_never_span_two() {
        assert_eq!(seg("default"), "default");
        assert_eq!(seg("default/b"), "default%2Fb");
        assert_eq!(seg("100%/x"), "100%25%2Fx");
        assert_ne!(seg("a/b"), seg("a%2Fb"), "an escaped text stays distinct");
    }

    #[test]
    fn escaped_keys_mean_what_they_were_written_for() {
        use crate::feed::StoreChange;
        for (namespace, name) in [("default", "web-1"), ("a/b", "100%/x"), ("%2F", "%25")] {
            let key = format!("P/runtime/n1/{}/{}", seg(namespace), seg(name));
            assert_eq!(
                key_meaning(key.as_bytes(), "P/"),
                KeyMeaning::Part(StoreChange::Pod {
                    namespace: namespace.into(),
                    name: name.into(),
                }),
                "{key}"
            );
        }
        assert_eq!(key_meaning(b"P/rev", "P/"), KeyMeaning::Nothing);
        assert_eq!(key_meaning(b"Q/rev", "P/"), KeyMeaning::Everything);
        assert_eq!(key_meaning(b"P/pods/\xff/x", "P/"), KeyMeaning::Everything);
    }

    #[test]
    fn connect_refuses_what_it_cannot_use() {
        let ep = vec!["127.0.0.1:1".to_owned()];
        for (endpoints, prefix, timeout) in [
            (vec![], "/m", Duration::from_secs(1)),
            (vec![" ".to_owned()], "/m", Duration::from_secs(1)),
            (ep.clone(), "/", Duration::from_secs(1)),
            (ep, "/m", Duration::ZERO),
        ] {
            assert!(matches!(
                EtcdStore::connect(&endpoints, prefix, timeout),
                Err(StoreError::InvalidConfig(_))
            ));
        }
    }

    #[test]
    fn entry_field_hashes_differ_by_every_field() {
        let a: SpiffeId = "spiffe://td/a".parse().unwrap();
        let b: SpiffeId = "spiffe://td/b".parse().unwrap();
        let s: Vec<Selector> = vec!["unix:uid:1".parse().unwrap()];
        let h = entry_fields_hash(&a, &b, &s);
        assert_ne!(h, entry_fields_hash(&b, &a, &s));
        assert_ne!(h, entry_fields_hash(&a, &b, &[]));
        assert_eq!(h, entry_fields_hash(&a, &b, &s));
    }
}
