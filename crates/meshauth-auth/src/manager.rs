//! The auth manager: from "this pair needs authentication" to an auth entry, and back out.
//!
//! - [`AuthManager::request`] is called for every auth-required event. It never blocks and
//!   never spawns: requests for a pair already queued, in flight, or authenticated for longer
//!   than the re-authentication margin are dropped (de-duplication); a full queue drops the
//!   request and counts the overflow (the datapath will signal again).
//! - A fixed pool of workers takes requests from the bounded queue, runs the handshake, and
//!   writes the entry with the expiry the handshake returned. Failures are retried with
//!   exponential backoff, as long as something still asks for the pair.
//! - [`AuthManager::tick`] re-authenticates entries that expire within the margin (before they
//!   lapse: certificate rotation must not fail a single packet) and sweeps expired ones.
//! - [`AuthManager::revoke`] removes entries at once when what justified them goes away.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use meshauth_policy::AuthKey;
use tokio::sync::mpsc;

use crate::handshake::Reason;

/// Runs one handshake for a pair; returns the entry's expiry.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates `key.local` with `key.remote` on `key.remote_node`.
    fn authenticate(&self, key: AuthKey)
    -> impl Future<Output = Result<SystemTime, Reason>> + Send;
}

/// Where entries go (the datapath's auth map, or a fake in tests).
pub trait AuthTable: Send + 'static {
    /// Writes an entry.
    fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), String>;
    /// Removes an entry (missing is fine).
    fn remove(&mut self, key: AuthKey) -> Result<(), String>;
}

/// Sizes and timings.
#[derive(Debug, Clone, Copy)]
pub struct ManagerConfig {
    /// Pending handshakes at most.
    pub queue: usize,
    /// Concurrent handshakes.
    pub workers: usize,
    /// Re-authenticate when an entry has less than this left.
    pub reauth_margin: Duration,
    /// First retry delay.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            queue: 1024,
            workers: 4,
            reauth_margin: Duration::from_secs(60),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// Counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Handshakes that succeeded.
    pub succeeded: u64,
    /// Handshakes that failed, by reason.
    pub failed: HashMap<String, u64>,
    /// Requests dropped because the queue was full.
    pub overflow: u64,
    /// Entries removed by revocation.
    pub revoked: u64,
    /// Entries removed because they expired.
    pub expired: u64,
}

/// A written entry: when it expires, and when to re-authenticate it.
#[derive(Clone, Copy)]
struct Tracked {
    expires: SystemTime,
    renew_at: SystemTime,
}

struct State<T> {
    table: T,
    /// Queued or in flight.
    pending: HashSet<AuthKey>,
    /// Written entries.
    entries: HashMap<AuthKey, Tracked>,
    /// Consecutive failures per pair (for backoff).
    failures: HashMap<AuthKey, u32>,
    stats: ManagerStats,
}

/// The auth manager; cheap to clone.
pub struct AuthManager<T> {
    state: Arc<Mutex<State<T>>>,
    queue: mpsc::Sender<AuthKey>,
    config: ManagerConfig,
}

impl<T> Clone for AuthManager<T> {
    fn clone(&self) -> Self {
        AuthManager {
            state: Arc::clone(&self.state),
            queue: self.queue.clone(),
            config: self.config,
        }
    }
}

impl<T: AuthTable> AuthManager<T> {
    /// Starts `config.workers` workers running handshakes with `auth`, writing to `table`.
    pub fn start<A: Authenticator>(config: ManagerConfig, auth: A, table: T) -> Self {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let state = Arc::new(Mutex::new(State {
            table,
            pending: HashSet::new(),
            entries: HashMap::new(),
            failures: HashMap::new(),
            stats: ManagerStats::default(),
        }));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let auth = Arc::new(auth);
        let me = AuthManager {
            state,
            queue: tx,
            config,
        };
        for _ in 0..config.workers.max(1) {
            let (me, rx, auth) = (me.clone(), Arc::clone(&rx), Arc::clone(&auth));
            tokio::spawn(async move {
                loop {
                    let key = { rx.lock().await.recv().await };
                    let Some(key) = key else { return };
                    me.run_one(&*auth, key).await;
                }
            });
        }
        me
    }

    /// Tracks an entry valid from `now` until `expires`. It is re-authenticated the configured
    /// margin before expiry, but no earlier than two thirds into its lifetime (short-lived
    /// SVIDs give short-lived entries).
    fn track(&self, st: &mut State<T>, key: AuthKey, expires: SystemTime, now: SystemTime) {
        let life = expires.duration_since(now).unwrap_or_default();
        let margin = self.config.reauth_margin.min(life / 3);
        let renew_at = expires.checked_sub(margin).unwrap_or(expires);
        st.entries.insert(key, Tracked { expires, renew_at });
    }

    /// Writes an authenticated entry to the table and tracks it.
    fn write(&self, st: &mut State<T>, key: AuthKey, expires: SystemTime) {
        if let Err(e) = st.table.insert(key, expires) {
            tracing::error!(error = %e, "cannot write the auth entry");
        }
        self.track(st, key, expires, SystemTime::now());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for `key` to be authenticated (de-duplicated, never blocking).
    pub fn request(&self, key: AuthKey, now: SystemTime) {
        let mut st = self.lock();
        if st.pending.contains(&key) {
            return;
        }
        if st.entries.get(&key).is_some_and(|e| now < e.renew_at) {
            return;
        }
        match self.queue.try_send(key) {
            Ok(()) => {
                st.pending.insert(key);
            }
            Err(_) => st.stats.overflow += 1,
        }
    }

    async fn run_one<A: Authenticator>(&self, auth: &A, key: AuthKey) {
        let result = auth.authenticate(key).await;
        let retry = {
            let mut st = self.lock();
            match result {
                Ok(expires) => {
                    st.stats.succeeded += 1;
                    st.failures.remove(&key);
                    self.write(&mut st, key, expires);
                    st.pending.remove(&key);
                    None
                }
                Err(reason) => {
                    *st.stats.failed.entry(format!("{reason:?}")).or_default() += 1;
                    let n = st.failures.entry(key).or_default();
                    *n += 1;
                    let delay = self
                        .config
                        .retry_min
                        .saturating_mul(1u32 << (*n - 1).min(16))
                        .min(self.config.retry_max);
                    st.pending.remove(&key);
                    tracing::warn!(local = %key.local, remote = %key.remote, reason = ?reason, retry_in_ms = delay.as_millis() as u64, "authentication failed");
                    Some(delay)
                }
            }
        };
        if let Some(delay) = retry {
            let me = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                me.request(key, SystemTime::now());
            });
        }
    }

    /// Records a pair authenticated by a peer's handshake (the responder side).
    pub fn record(&self, key: AuthKey, expires: SystemTime) {
        let mut st = self.lock();
        self.write(&mut st, key, expires);
        st.stats.succeeded += 1;
    }

    /// Takes over an entry already in the table (written before a restart): it is tracked,
    /// re-authenticated and revoked like the others.
    pub fn adopt(&self, key: AuthKey, expires: SystemTime) {
        let mut st = self.lock();
        self.track(&mut st, key, expires, SystemTime::now());
    }

    /// Re-authenticates entries expiring within the margin and removes expired ones.
    pub fn tick(&self, now: SystemTime) {
        let (expired, renew): (Vec<AuthKey>, Vec<AuthKey>) = {
            let st = self.lock();
            let expired = st
                .entries
                .iter()
                .filter(|(_, e)| e.expires <= now)
                .map(|(k, _)| *k)
                .collect();
            let renew = st
                .entries
                .iter()
                .filter(|(_, e)| e.renew_at <= now && now < e.expires)
                .map(|(k, _)| *k)
                .collect();
            (expired, renew)
        };
        {
            let mut st = self.lock();
            for k in &expired {
                st.entries.remove(k);
                let _ = st.table.remove(*k);
                st.stats.expired += 1;
            }
        }
        for k in renew {
            self.request(k, now);
        }
    }

    /// Removes at once every entry `which` selects (an endpoint, identity, node or policy went
    /// away). Returns how many.
    pub fn revoke(&self, which: impl Fn(&AuthKey) -> bool) -> usize {
        let mut st = self.lock();
        let gone: Vec<AuthKey> = st.entries.keys().filter(|k| which(k)).copied().collect();
        for k in &gone {
            st.entries.remove(k);
            if let Err(e) = st.table.remove(*k) {
                tracing::error!(error = %e, "cannot remove the auth entry");
            }
        }
        st.stats.revoked += gone.len() as u64;
        gone.len()
    }

    /// How many pairs are queued or in a handshake.
    pub fn pending(&self) -> usize {
        self.lock().pending.len()
    }

    /// The entries written, with their expiry.
    pub fn entries(&self) -> Vec<(AuthKey, SystemTime)> {
        self.lock()
            .entries
            .iter()
            .map(|(k, e)| (*k, e.expires))
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> ManagerStats {
        self.lock().stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use meshauth_policy::{AuthType, IdentityId, NodeId};

    use super::*;

    #[derive(Default, Clone)]
    struct FakeTable(Arc<Mutex<HashMap<AuthKey, SystemTime>>>);

    impl AuthTable for FakeTable {
        fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), String> {
            self.0.lock().unwrap().insert(key, expires);
            Ok(())
        }
        fn remove(&mut self, key: AuthKey) -> Result<(), String> {
            self.0.lock().unwrap().remove(&key);
            Ok(())
        }
    }

    struct FakeAuth {
        calls: Arc<AtomicU32>,
        fail_first: u32,
        ttl: Duration,
        delay: Duration,
    }

    impl Authenticator for FakeAuth {
        async fn authenticate(&self, _key: AuthKey) -> Result<SystemTime, Reason> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(self.delay).await;
            if n < self.fail_first {
                Err(Reason::Unreachable)
            } else {
                Ok(SystemTime::now() + self.ttl)
            }
        }
    }

    fn key(remote: u32) -> AuthKey {
        AuthKey {
            local: IdentityId::new(100),
            remote: IdentityId::new(remote),
            remote_node: NodeId::new(2),
            auth_type: AuthType::Required,
        }
    }

    async fn until(mut f: impl FnMut() -> bool) {
        for _ in 0..200 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("condition not reached in 2 s");
    }

    fn config() -> ManagerConfig {
        ManagerConfig {
            queue: 4,
            workers: 2,
            reauth_margin: Duration::from_millis(300),
            retry_min: Duration::from_millis(20),
            retry_max: Duration::from_millis(100),
        }
    }

    #[tokio::test]
    async fn dedups_writes_and_retries() {
        let calls = Arc::new(AtomicU32::new(0));
        let table = FakeTable::default();
        let auth = FakeAuth {
            calls: Arc::clone(&calls),
            fail_first: 2,
            ttl: Duration::from_secs(60),
            delay: Duration::from_millis(20),
        };
        let m = AuthManager::start(config(), auth, table.clone());
        for _ in 0..10 {
            m.request(key(200), SystemTime::now());
        }
        until(|| table.0.lock().unwrap().contains_key(&key(200))).await;
        assert_eq!(
            calls.load(Ordering::SeqCst),
            3,
            "two failures retried, one success; duplicates dropped"
        );
        let stats = m.stats();
        assert_eq!(
            (stats.succeeded, stats.failed.get("Unreachable").copied()),
            (1, Some(2))
        );
        // An authenticated pair is not requested again.
        m.request(key(200), SystemTime::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(calls.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn bounded_queue_counts_overflow() {
        let calls = Arc::new(AtomicU32::new(0));
        let auth = FakeAuth {
            calls,
            fail_first: 0,
            ttl: Duration::from_secs(60),
            delay: Duration::from_millis(200),
        };
        let m = AuthManager::start(config(), auth, FakeTable::default());
        for r in 0..20 {
            m.request(key(1000 + r), SystemTime::now());
        }
        assert!(m.stats().overflow >= 20 - 4 - 2, "{:?}", m.stats());
    }

    #[tokio::test]
    async fn reauthenticates_before_expiry_revokes_and_sweeps() {
        let calls = Arc::new(AtomicU32::new(0));
        let table = FakeTable::default();
        let auth = FakeAuth {
            calls: Arc::clone(&calls),
            fail_first: 0,
            ttl: Duration::from_millis(900),
            delay: Duration::ZERO,
        };
        let m = AuthManager::start(config(), auth, table.clone());
        m.request(key(200), SystemTime::now());
        m.request(key(300), SystemTime::now());
        until(|| table.0.lock().unwrap().len() == 2).await;
        let first = table.0.lock().unwrap()[&key(200)];
        // Not yet within the margin (a third of the 900 ms lifetime): nothing happens.
        m.tick(SystemTime::now());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(table.0.lock().unwrap()[&key(200)], first);
        // Within the margin: re-authenticated, the entry moves forward without ever lapsing.
        tokio::time::sleep(Duration::from_millis(650)).await;
        m.tick(SystemTime::now());
        until(|| {
            table
                .0
                .lock()
                .unwrap()
                .get(&key(200))
                .is_some_and(|e| *e > first)
        })
        .await;

        assert_eq!(m.revoke(|k| k.remote == IdentityId::new(300)), 1);
        assert!(
            !table.0.lock().unwrap().contains_key(&key(300)),
            "revocation is immediate"
        );
        m.tick(SystemTime::now() + Duration::from_secs(10));
        assert!(
            table.0.lock().unwrap().is_empty(),
            "expired entries are swept"
        );
        assert_eq!(m.stats().revoked, 1);
    }
}
