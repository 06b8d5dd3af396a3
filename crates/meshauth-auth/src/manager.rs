//! The auth manager: from "this pair needs authentication" to an auth entry, and back out.
//!
//! # Requests
//! [`AuthManager::request`] is called for every auth-required event. It never blocks and never
//! spawns. A request is dropped when the pair is queued or in a handshake, or authenticated and
//! not yet due for re-authentication (de-duplication). A request for a pair that failed and
//! whose retry is not due yet only records that the pair was asked for. Otherwise the pair goes
//! into a bounded queue; a full queue drops it and counts the overflow (the datapath signals
//! again).
//!
//! # Handshakes
//! A fixed pool of workers takes pairs from the queue, runs the [`Authenticator`] and writes the
//! entry with the expiry it returned. Workers end when the last [`AuthManager`] handle is
//! dropped. Every result (and every `test-always-fail` refusal) is also reported as an
//! [`Outcome`] on the optional channel of [`ManagerHooks`], for the agent's flow log and
//! metrics; the manager never waits on that channel: when it is full the outcome is dropped
//! and counted in [`ManagerStats::outcomes_dropped`].
//!
//! # Retries
//! A failure schedules the pair's next attempt: [`ManagerConfig::retry_min`], doubling with
//! each consecutive failure, at most [`ManagerConfig::retry_max`]. The schedule is state
//! ([`RetryState`]), not tasks: [`AuthManager::tick`] queues a pair whose retry is due if it was
//! asked for since its last attempt (a request arriving after the retry is due queues it at
//! once), and forgets pairs nobody asked for during [`ManagerConfig::forget_after`] (their next
//! failure starts the schedule again). However often the datapath signals, a pair gets at most
//! one handshake per backoff step.
//!
//! # `test-always-fail`
//! A pair whose policy says `authentication.mode: test-always-fail`
//! ([`AuthType::TestAlwaysFail`]) never reaches the authenticator and never gets an entry:
//! [`AuthManager::request`] fails it at once with [`Reason::TestAlwaysFail`], on the same
//! backoff schedule as handshake failures, and [`AuthManager::record`] and
//! [`AuthManager::adopt`] refuse it.
//!
//! # Expiry and revocation
//! [`AuthManager::tick`] re-authenticates entries due for it (the configured margin before
//! expiry, or two thirds into their lifetime if that comes first, so that certificate rotation
//! never fails a packet) and sweeps expired ones. [`AuthManager::revoke`] removes entries at once
//! when what justified them goes away; a pair revoked during its handshake is not written.
//!
//! # Time
//! Every time the manager uses comes from the [`Clock`] it is started with or from the `now`
//! arguments of [`AuthManager::request`] and [`AuthManager::tick`], which callers read from the
//! same clock. Production uses [`Clock::system`]; tests drive a [`ManualClock`]. Time arithmetic
//! is checked: a time that would overflow falls back instead of panicking.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use meshauth_policy::{AuthKey, AuthType};
use tokio::sync::mpsc;

use crate::handshake::Reason;

/// Runs one handshake for a pair; returns the entry's expiry.
pub trait Authenticator: Send + Sync + 'static {
    /// Authenticates `key.local` with `key.remote` on `key.remote_node`.
    fn authenticate(&self, key: AuthKey)
    -> impl Future<Output = Result<SystemTime, Reason>> + Send;
}

/// Why an [`AuthTable`] operation failed (logged by the manager, which carries on).
pub type TableError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Where entries go (the datapath's auth map, or a fake in tests).
pub trait AuthTable: Send + 'static {
    /// Writes an entry (replacing one with the same key).
    fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), TableError>;
    /// Removes an entry (missing is fine).
    fn remove(&mut self, key: AuthKey) -> Result<(), TableError>;
}

/// Where the manager reads the time; cheap to clone.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    /// The system's wall clock (`SystemTime::now`).
    pub fn system() -> Self {
        Clock(Arc::new(SystemTime::now))
    }

    /// A clock that calls `now`.
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Clock(Arc::new(now))
    }

    /// The current time.
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clock")
    }
}

/// A clock that moves only when told to (tests); cheap to clone, clones share the time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    /// A clock showing `start`.
    pub fn new(start: SystemTime) -> Self {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    fn lock(&self) -> MutexGuard<'_, SystemTime> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The time it shows.
    pub fn now(&self) -> SystemTime {
        *self.lock()
    }

    /// Sets the time (backwards too).
    pub fn set(&self, to: SystemTime) {
        *self.lock() = to;
    }

    /// Moves the time forward by `by` and returns the new time; a time that would overflow
    /// leaves the clock unchanged.
    pub fn advance(&self, by: Duration) -> SystemTime {
        let mut now = self.lock();
        if let Some(later) = now.checked_add(by) {
            *now = later;
        }
        *now
    }

    /// A [`Clock`] reading this one.
    pub fn clock(&self) -> Clock {
        let me = self.clone();
        Clock::from_fn(move || me.now())
    }
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
    /// Delay after a first failure before the pair is tried again.
    pub retry_min: Duration,
    /// Longest delay between attempts of a failing pair.
    pub retry_max: Duration,
    /// A failing pair nobody asked for during this long is forgotten (its next failure starts
    /// the backoff at `retry_min` again). Should be several times `retry_max`: a shorter one
    /// may forget a pair before its retry is due.
    pub forget_after: Duration,
}

impl Default for ManagerConfig {
    fn default() -> Self {
        ManagerConfig {
            queue: 1024,
            workers: 4,
            reauth_margin: Duration::from_secs(60),
            retry_min: Duration::from_millis(200),
            retry_max: Duration::from_secs(30),
            forget_after: Duration::from_secs(120),
        }
    }
}

/// The result of one attempt to authenticate a pair, as reported on
/// [`ManagerHooks::outcomes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// The pair.
    pub key: AuthKey,
    /// When the attempt ended (manager clock).
    pub at: SystemTime,
    /// The entry's expiry, or why the attempt failed. A success is written unless the pair was
    /// revoked during its handshake.
    pub result: Result<SystemTime, Reason>,
    /// After a failure: the earliest time of the next attempt.
    pub retry_at: Option<SystemTime>,
}

/// What the manager is connected to besides its authenticator and table.
#[derive(Debug, Clone, Default)]
pub struct ManagerHooks {
    /// Where the manager reads the time (default: the system clock).
    pub clock: Clock,
    /// Where every [`Outcome`] is sent, without waiting: when the channel is full (or closed)
    /// the outcome is dropped and counted in [`ManagerStats::outcomes_dropped`]. `None`: not
    /// reported.
    pub outcomes: Option<mpsc::Sender<Outcome>>,
}

/// Counters, for metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManagerStats {
    /// Handshakes that succeeded, and pairs recorded from a peer's handshake.
    pub succeeded: u64,
    /// Attempts that failed, by reason (`test-always-fail` refusals included).
    pub failed: HashMap<Reason, u64>,
    /// Requests dropped because the queue was full.
    pub overflow: u64,
    /// Entries removed by revocation.
    pub revoked: u64,
    /// Entries removed because they expired.
    pub expired: u64,
    /// Failing pairs forgotten because nobody asked for them.
    pub forgotten: u64,
    /// Outcomes not reported because their channel was full or closed.
    pub outcomes_dropped: u64,
    /// [`AuthManager::record`] and [`AuthManager::adopt`] calls refused (`test-always-fail`).
    pub refused: u64,
}

/// The backoff state of a pair whose last attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryState {
    /// Consecutive failures.
    pub attempts: u32,
    /// The earliest time of the next attempt.
    pub next_at: SystemTime,
    /// The latest request for the pair (or its latest failure, if later).
    pub last_requested: SystemTime,
    /// Whether the pair was asked for since its last attempt: only then is a due retry queued.
    pub asked: bool,
}

/// The delay after the `attempts`-th consecutive failure: `min` doubling, at most `max`.
fn backoff(min: Duration, max: Duration, attempts: u32) -> Duration {
    min.saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1)))
        .min(max)
}

/// A written entry: when it expires, and when to re-authenticate it, in milliseconds since
/// the Unix epoch (16 bytes instead of two 16-byte `SystemTime`s: a node may track 100,000
/// entries).
#[derive(Clone, Copy)]
struct Tracked {
    expires_ms: u64,
    renew_at_ms: u64,
}

impl Tracked {
    fn expires(self) -> SystemTime {
        from_ms(self.expires_ms)
    }

    fn renew_at(self) -> SystemTime {
        from_ms(self.renew_at_ms)
    }
}

/// Milliseconds since the Unix epoch, rounded down (so an entry is taken to expire up to a
/// millisecond early, never late); 0 before the epoch.
fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH
        .checked_add(Duration::from_millis(ms))
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The written entries, by key. Pair entries (nearly all of them) are kept under their pair
/// alone, half the size of an [`AuthKey`] with room for a connection, so that a node's 100,000
/// pair entries cost what they did before per-connection keys existed.
#[derive(Default)]
struct Entries {
    pairs: HashMap<PairKey, Tracked>,
    connections: HashMap<AuthKey, Tracked>,
}

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct PairKey {
    local: meshauth_policy::IdentityId,
    remote: meshauth_policy::IdentityId,
    remote_node: meshauth_policy::NodeId,
    auth_type: AuthType,
}

impl PairKey {
    fn of(k: &AuthKey) -> Option<PairKey> {
        k.connection.is_none().then_some(PairKey {
            local: k.local,
            remote: k.remote,
            remote_node: k.remote_node,
            auth_type: k.auth_type,
        })
    }

    fn key(self) -> AuthKey {
        AuthKey {
            local: self.local,
            remote: self.remote,
            remote_node: self.remote_node,
            auth_type: self.auth_type,
            connection: None,
        }
    }
}

impl Entries {
    fn insert(&mut self, k: AuthKey, t: Tracked) {
        match PairKey::of(&k) {
            Some(p) => self.pairs.insert(p, t),
            None => self.connections.insert(k, t),
        };
    }
    fn get(&self, k: &AuthKey) -> Option<&Tracked> {
        match PairKey::of(k) {
            Some(p) => self.pairs.get(&p),
            None => self.connections.get(k),
        }
    }
    fn remove(&mut self, k: &AuthKey) -> Option<Tracked> {
        match PairKey::of(k) {
            Some(p) => self.pairs.remove(&p),
            None => self.connections.remove(k),
        }
    }
    fn contains_key(&self, k: &AuthKey) -> bool {
        self.get(k).is_some()
    }
    fn len(&self) -> usize {
        self.pairs.len() + self.connections.len()
    }
    fn reserve(&mut self, additional: usize) {
        self.pairs.reserve(additional);
    }
    fn iter(&self) -> impl Iterator<Item = (AuthKey, &Tracked)> + '_ {
        self.pairs
            .iter()
            .map(|(p, t)| (p.key(), t))
            .chain(self.connections.iter().map(|(k, t)| (*k, t)))
    }
    fn keys(&self) -> impl Iterator<Item = AuthKey> + '_ {
        self.iter().map(|(k, _)| k)
    }
}

struct State<T> {
    table: T,
    /// Queued or in a handshake.
    pending: HashSet<AuthKey>,
    /// Pending pairs revoked since they were queued: not written when they succeed.
    cancelled: HashSet<AuthKey>,
    /// Written entries.
    entries: Entries,
    /// Pairs whose last attempt failed.
    retry: HashMap<AuthKey, RetryState>,
    stats: ManagerStats,
}

/// What the handles and the workers share.
struct Inner<T> {
    state: Mutex<State<T>>,
    config: ManagerConfig,
    clock: Clock,
    outcomes: Option<mpsc::Sender<Outcome>>,
}

/// Reads a manager's entries on demand (see [`AuthManager::entries_reader`]).
#[derive(Clone)]
pub struct EntriesReader(Arc<dyn Fn() -> Vec<(AuthKey, SystemTime)> + Send + Sync>);

impl EntriesReader {
    /// The manager's entries now, with their expiry, in no particular order.
    pub fn read(&self) -> Vec<(AuthKey, SystemTime)> {
        (self.0)()
    }
}

impl std::fmt::Debug for EntriesReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EntriesReader")
    }
}

/// The auth manager; cheap to clone. Its workers end when the last clone is dropped.
pub struct AuthManager<T> {
    inner: Arc<Inner<T>>,
    queue: mpsc::Sender<AuthKey>,
}

impl<T> Clone for AuthManager<T> {
    fn clone(&self) -> Self {
        AuthManager {
            inner: Arc::clone(&self.inner),
            queue: self.queue.clone(),
        }
    }
}

impl<T> std::fmt::Debug for AuthManager<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthManager")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl<T: AuthTable> Inner<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tracks an entry valid from `now` until `expires`. It is re-authenticated the configured
    /// margin before expiry, but no earlier than two thirds into its lifetime (short-lived
    /// SVIDs give short-lived entries).
    fn track(&self, st: &mut State<T>, key: AuthKey, expires: SystemTime, now: SystemTime) {
        let life = expires.duration_since(now).unwrap_or_default();
        let margin = self.config.reauth_margin.min(life / 3);
        let renew_at = expires.checked_sub(margin).unwrap_or(expires);
        st.entries.insert(
            key,
            Tracked {
                expires_ms: to_ms(expires),
                renew_at_ms: to_ms(renew_at),
            },
        );
    }

    /// Writes an authenticated entry to the table and tracks it.
    fn write(&self, st: &mut State<T>, key: AuthKey, expires: SystemTime, now: SystemTime) {
        if let Err(e) = st.table.insert(key, expires) {
            tracing::error!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, error = %e, "cannot write the auth entry");
        }
        self.track(st, key, expires, now);
    }

    /// Counts a failed attempt and schedules the next one.
    fn fail(&self, st: &mut State<T>, key: AuthKey, reason: Reason, now: SystemTime) -> Outcome {
        let counter = st.stats.failed.entry(reason).or_default();
        *counter = counter.saturating_add(1);
        let previous = st.retry.get(&key);
        let attempts = previous.map_or(1, |r| r.attempts.saturating_add(1));
        let last_requested = previous.map_or(now, |r| r.last_requested.max(now));
        let delay = backoff(self.config.retry_min, self.config.retry_max, attempts);
        let next_at = now
            .checked_add(delay)
            .or_else(|| now.checked_add(self.config.retry_max))
            .unwrap_or(now);
        st.retry.insert(
            key,
            RetryState {
                attempts,
                next_at,
                last_requested,
                asked: false,
            },
        );
        tracing::warn!(
            local = %key.local,
            remote = %key.remote,
            remote.node = %key.remote_node,
            reason = ?reason,
            attempts,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "authentication failed"
        );
        Outcome {
            key,
            at: now,
            result: Err(reason),
            retry_at: Some(next_at),
        }
    }

    /// Sends `outcome` if someone listens, never waiting.
    fn report(&self, st: &mut State<T>, outcome: Outcome) {
        if let Some(tx) = &self.outcomes
            && tx.try_send(outcome).is_err()
        {
            st.stats.outcomes_dropped = st.stats.outcomes_dropped.saturating_add(1);
        }
    }

    /// Takes the result of a worker's attempt.
    fn finish(&self, key: AuthKey, result: Result<SystemTime, Reason>) {
        let now = self.clock.now();
        let mut st = self.lock();
        st.pending.remove(&key);
        let cancelled = st.cancelled.remove(&key);
        let outcome = match result {
            Ok(expires) => {
                st.stats.succeeded = st.stats.succeeded.saturating_add(1);
                st.retry.remove(&key);
                if cancelled {
                    tracing::debug!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, "pair revoked during its handshake: not written");
                } else {
                    self.write(&mut st, key, expires, now);
                    tracing::debug!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, "pair authenticated");
                }
                Outcome {
                    key,
                    at: now,
                    result: Ok(expires),
                    retry_at: None,
                }
            }
            Err(reason) => self.fail(&mut st, key, reason, now),
        };
        self.report(&mut st, outcome);
    }
}

impl<T: AuthTable> AuthManager<T> {
    /// Starts `config.workers` workers running handshakes with `auth`, writing to `table`, on
    /// the system clock and without reporting outcomes. Must be called inside a Tokio runtime.
    pub fn start<A: Authenticator>(config: ManagerConfig, auth: A, table: T) -> Self {
        Self::start_with(config, ManagerHooks::default(), auth, table)
    }

    /// Like [`AuthManager::start`], with the clock and outcome channel of `hooks`. Must be
    /// called inside a Tokio runtime.
    pub fn start_with<A: Authenticator>(
        config: ManagerConfig,
        hooks: ManagerHooks,
        auth: A,
        table: T,
    ) -> Self {
        let (tx, rx) = mpsc::channel::<AuthKey>(config.queue.max(1));
        let inner = Arc::new(Inner {
            state: Mutex::new(State {
                table,
                pending: HashSet::new(),
                cancelled: HashSet::new(),
                entries: Entries::default(),
                retry: HashMap::new(),
                stats: ManagerStats::default(),
            }),
            config,
            clock: hooks.clock,
            outcomes: hooks.outcomes,
        });
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let auth = Arc::new(auth);
        for _ in 0..config.workers.max(1) {
            let (inner, rx, auth) = (Arc::clone(&inner), Arc::clone(&rx), Arc::clone(&auth));
            tokio::spawn(async move {
                loop {
                    let key = { rx.lock().await.recv().await };
                    let Some(key) = key else { return };
                    // `request` never queues these; refuse them here too.
                    let result = if key.auth_type == AuthType::TestAlwaysFail {
                        Err(Reason::TestAlwaysFail)
                    } else {
                        auth.authenticate(key).await
                    };
                    inner.finish(key, result);
                }
            });
        }
        AuthManager { inner, queue: tx }
    }

    /// Asks for `key` to be authenticated (de-duplicated, never blocking). `now` comes from
    /// the manager's clock.
    pub fn request(&self, key: AuthKey, now: SystemTime) {
        let mut st = self.inner.lock();
        self.request_locked(&mut st, key, now);
    }

    fn request_locked(&self, st: &mut State<T>, key: AuthKey, now: SystemTime) {
        if st.pending.contains(&key) {
            return;
        }
        if st.entries.get(&key).is_some_and(|e| now < e.renew_at()) {
            return;
        }
        if let Some(r) = st.retry.get_mut(&key) {
            r.last_requested = r.last_requested.max(now);
            if now < r.next_at {
                r.asked = true;
                return;
            }
        }
        self.attempt(st, key, now);
    }

    /// Starts an attempt for `key`: queues it, or fails it at once if policy says
    /// `test-always-fail`.
    fn attempt(&self, st: &mut State<T>, key: AuthKey, now: SystemTime) {
        if key.auth_type == AuthType::TestAlwaysFail {
            let outcome = self.inner.fail(st, key, Reason::TestAlwaysFail, now);
            self.inner.report(st, outcome);
            return;
        }
        match self.queue.try_send(key) {
            Ok(()) => {
                st.pending.insert(key);
                if let Some(r) = st.retry.get_mut(&key) {
                    r.asked = false;
                }
            }
            Err(_) => {
                st.stats.overflow = st.stats.overflow.saturating_add(1);
                // A due retry stays due: the next tick tries again.
                if let Some(r) = st.retry.get_mut(&key) {
                    r.asked = true;
                }
            }
        }
    }

    /// Records a pair authenticated by a peer's handshake (the responder side). Returns
    /// whether it was written: `test-always-fail` pairs are refused.
    pub fn record(&self, key: AuthKey, expires: SystemTime) -> bool {
        let now = self.inner.clock.now();
        let mut st = self.inner.lock();
        if key.auth_type == AuthType::TestAlwaysFail {
            st.stats.refused = st.stats.refused.saturating_add(1);
            tracing::warn!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, reason = ?Reason::TestAlwaysFail, "not recording a test-always-fail pair");
            return false;
        }
        self.inner.write(&mut st, key, expires, now);
        st.retry.remove(&key);
        st.stats.succeeded = st.stats.succeeded.saturating_add(1);
        true
    }

    /// Makes room for `additional` more entries at once (before adopting many: one allocation
    /// instead of a table that doubles, and frees, its way up).
    pub fn reserve(&self, additional: usize) {
        self.inner.lock().entries.reserve(additional);
    }

    /// Takes over an entry already in the table (written before a restart): it is tracked,
    /// re-authenticated and revoked like the others. Returns whether it was adopted: a
    /// `test-always-fail` entry is refused and removed from the table.
    pub fn adopt(&self, key: AuthKey, expires: SystemTime) -> bool {
        let now = self.inner.clock.now();
        let mut st = self.inner.lock();
        if key.auth_type == AuthType::TestAlwaysFail {
            st.stats.refused = st.stats.refused.saturating_add(1);
            tracing::warn!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, reason = ?Reason::TestAlwaysFail, "removing an inherited test-always-fail entry");
            if let Err(e) = st.table.remove(key) {
                tracing::error!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, error = %e, "cannot remove the auth entry");
            }
            return false;
        }
        self.inner.track(&mut st, key, expires, now);
        true
    }

    /// The periodic pass: removes expired entries, re-authenticates entries due for it, queues
    /// failing pairs whose retry is due and that were asked for since their last attempt, and
    /// forgets failing pairs nobody asked for during `forget_after`.
    pub fn tick(&self, now: SystemTime) {
        let mut st = self.inner.lock();
        let st = &mut *st;
        let now_ms = to_ms(now);

        let expired: Vec<AuthKey> = st
            .entries
            .iter()
            .filter(|(_, e)| e.expires_ms <= now_ms)
            .map(|(k, _)| k)
            .collect();
        for key in expired {
            st.entries.remove(&key);
            if let Err(e) = st.table.remove(key) {
                tracing::error!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, error = %e, "cannot remove the expired auth entry");
            }
            st.stats.expired = st.stats.expired.saturating_add(1);
        }

        let renew: Vec<AuthKey> = st
            .entries
            .iter()
            .filter(|(_, e)| e.renew_at_ms <= now_ms)
            .map(|(k, _)| k)
            .collect();
        for key in renew {
            self.request_locked(st, key, now);
        }

        let due: Vec<AuthKey> = st
            .retry
            .iter()
            .filter(|(k, r)| r.asked && r.next_at <= now && !st.pending.contains(k))
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            self.attempt(st, key, now);
        }

        let forget_after = self.inner.config.forget_after;
        let before = st.retry.len();
        let pending = &st.pending;
        // A request "later" than `now` (a clock stepped back) keeps the pair.
        st.retry.retain(|k, r| {
            pending.contains(k)
                || now
                    .duration_since(r.last_requested)
                    .map_or(true, |idle| idle < forget_after)
        });
        let forgotten = before.saturating_sub(st.retry.len());
        st.stats.forgotten = st
            .stats
            .forgotten
            .saturating_add(u64::try_from(forgotten).unwrap_or(u64::MAX));
    }

    /// Removes at once every entry `which` selects (an endpoint, identity, node or policy went
    /// away); pending pairs it selects are not written when their handshake succeeds, and
    /// failing pairs it selects are forgotten. Returns how many entries were removed.
    pub fn revoke(&self, which: impl Fn(&AuthKey) -> bool) -> usize {
        let mut st = self.inner.lock();
        let st = &mut *st;
        let gone: Vec<AuthKey> = st.entries.keys().filter(|k| which(k)).collect();
        for key in &gone {
            st.entries.remove(key);
            if let Err(e) = st.table.remove(*key) {
                tracing::error!(local = %key.local, remote = %key.remote, remote.node = %key.remote_node, error = %e, "cannot remove the auth entry");
            }
        }
        let cancelled: Vec<AuthKey> = st.pending.iter().filter(|k| which(k)).copied().collect();
        st.cancelled.extend(cancelled);
        st.retry.retain(|k, _| !which(k));
        st.stats.revoked = st
            .stats
            .revoked
            .saturating_add(u64::try_from(gone.len()).unwrap_or(u64::MAX));
        gone.len()
    }

    /// How many pairs are queued or in a handshake.
    pub fn pending(&self) -> usize {
        self.inner.lock().pending.len()
    }

    /// How many failing pairs have a retry scheduled.
    pub fn retrying(&self) -> usize {
        self.inner.lock().retry.len()
    }

    /// The backoff state of `key`, if its last attempt failed.
    pub fn retry_state(&self, key: &AuthKey) -> Option<RetryState> {
        self.inner.lock().retry.get(key).copied()
    }

    /// How many entries are written.
    pub fn len(&self) -> usize {
        self.inner.lock().entries.len()
    }

    /// Whether no entry is written.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Runs `f` with a test of whether a key has an entry, under the manager's lock: no copy of
    /// the entries is made. `f` must not call the manager.
    pub fn with_entries<R>(&self, f: impl FnOnce(&dyn Fn(&AuthKey) -> bool) -> R) -> R {
        let st = self.inner.lock();
        f(&|k: &AuthKey| st.entries.contains_key(k))
    }

    /// The remote identities that have at least one entry.
    pub fn remote_identities(&self) -> std::collections::BTreeSet<meshauth_policy::IdentityId> {
        self.inner.lock().entries.keys().map(|k| k.remote).collect()
    }

    /// A reader of the entries for whoever shows them (the agent's admin API): it copies them
    /// only when called, and finds none once the manager is gone (it keeps no workers alive).
    pub fn entries_reader(&self) -> EntriesReader
    where
        T: Send + 'static,
    {
        let weak = Arc::downgrade(&self.inner);
        EntriesReader(Arc::new(move || {
            weak.upgrade().map_or_else(Vec::new, |inner| {
                inner
                    .lock()
                    .entries
                    .iter()
                    .map(|(k, e)| (k, e.expires()))
                    .collect()
            })
        }))
    }

    /// The entries written, with their expiry.
    pub fn entries(&self) -> Vec<(AuthKey, SystemTime)> {
        self.inner
            .lock()
            .entries
            .iter()
            .map(|(k, e)| (k, e.expires()))
            .collect()
    }

    /// The counters.
    pub fn stats(&self) -> ManagerStats {
        self.inner.lock().stats.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Weak;

    use meshauth_policy::{IdentityId, NodeId};
    use tokio::sync::Semaphore;

    use super::*;

    /// An auth table in memory; clones share it.
    #[derive(Default, Clone)]
    struct FakeTable(Arc<Mutex<HashMap<AuthKey, SystemTime>>>);

    impl FakeTable {
        fn get(&self, key: &AuthKey) -> Option<SystemTime> {
            self.0.lock().unwrap().get(key).copied()
        }
        fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
    }

    impl AuthTable for FakeTable {
        fn insert(&mut self, key: AuthKey, expires: SystemTime) -> Result<(), TableError> {
            self.0.lock().unwrap().insert(key, expires);
            Ok(())
        }
        fn remove(&mut self, key: AuthKey) -> Result<(), TableError> {
            self.0.lock().unwrap().remove(&key);
            Ok(())
        }
    }

    type Respond = dyn Fn(usize, SystemTime) -> Result<SystemTime, Reason> + Send + Sync;

    /// An authenticator that records each call (with the clock's time), optionally waits for
    /// a permit of `gate`, and answers what `respond(call index, now)` says.
    struct Scripted {
        clock: ManualClock,
        calls: Arc<Mutex<Vec<(AuthKey, SystemTime)>>>,
        gate: Option<Arc<Semaphore>>,
        respond: Box<Respond>,
    }

    impl Authenticator for Scripted {
        async fn authenticate(&self, key: AuthKey) -> Result<SystemTime, Reason> {
            let now = self.clock.now();
            let n = {
                let mut calls = self.calls.lock().unwrap();
                calls.push((key, now));
                calls.len() - 1
            };
            if let Some(gate) = &self.gate {
                gate.acquire().await.unwrap().forget();
            }
            (self.respond)(n, now)
        }
    }

    struct Harness {
        m: AuthManager<FakeTable>,
        clock: ManualClock,
        table: FakeTable,
        calls: Arc<Mutex<Vec<(AuthKey, SystemTime)>>>,
        gate: Arc<Semaphore>,
        outcomes: mpsc::Receiver<Outcome>,
    }

    impl Harness {
        fn calls(&self) -> usize {
            self.calls.lock().unwrap().len()
        }
        /// When each handshake started, relative to `T0`.
        fn call_offsets(&self) -> Vec<Duration> {
            self.calls
                .lock()
                .unwrap()
                .iter()
                .map(|(_, at)| at.duration_since(t0()).unwrap())
                .collect()
        }
        fn at(&self, offset: Duration) -> SystemTime {
            let now = t0() + offset;
            self.clock.set(now);
            now
        }
        /// Waits until no handshake is queued or running.
        async fn idle(&self) {
            until(|| self.m.pending() == 0).await;
        }
        fn failed(&self, reason: Reason) -> u64 {
            self.m.stats().failed.get(&reason).copied().unwrap_or(0)
        }
    }

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn config() -> ManagerConfig {
        ManagerConfig {
            queue: 4,
            workers: 2,
            reauth_margin: secs(60),
            retry_min: secs(1),
            retry_max: secs(8),
            forget_after: secs(30),
        }
    }

    /// A manager on a manual clock at `T0`; `outcomes` is the capacity of its outcome channel.
    fn harness(
        config: ManagerConfig,
        gated: bool,
        outcomes: usize,
        respond: impl Fn(usize, SystemTime) -> Result<SystemTime, Reason> + Send + Sync + 'static,
    ) -> Harness {
        let clock = ManualClock::new(t0());
        let table = FakeTable::default();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let (tx, rx) = mpsc::channel(outcomes);
        let auth = Scripted {
            clock: clock.clone(),
            calls: Arc::clone(&calls),
            gate: gated.then(|| Arc::clone(&gate)),
            respond: Box::new(respond),
        };
        let hooks = ManagerHooks {
            clock: clock.clock(),
            outcomes: Some(tx),
        };
        let m = AuthManager::start_with(config, hooks, auth, table.clone());
        Harness {
            m,
            clock,
            table,
            calls,
            gate,
            outcomes: rx,
        }
    }

    fn ttl(ttl: Duration) -> impl Fn(usize, SystemTime) -> Result<SystemTime, Reason> {
        move |_, now| Ok(now + ttl)
    }

    fn always(reason: Reason) -> impl Fn(usize, SystemTime) -> Result<SystemTime, Reason> {
        move |_, _| Err(reason)
    }

    fn key(remote: u32) -> AuthKey {
        AuthKey {
            local: IdentityId::new(100),
            remote: IdentityId::new(remote),
            remote_node: NodeId::new(2),
            auth_type: AuthType::Required,
            connection: None,
        }
    }

    fn always_fail_key(remote: u32) -> AuthKey {
        AuthKey {
            auth_type: AuthType::TestAlwaysFail,
            ..key(remote)
        }
    }

    /// Waits (real time, at most 10 s) for a condition the workers bring about.
    async fn until(mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(
                std::time::Instant::now() < deadline,
                "condition not reached in 10 s"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    #[tokio::test]
    async fn duplicate_requests_queue_one_handshake() {
        let mut h = harness(config(), true, 16, ttl(secs(600)));
        let now = h.clock.now();
        for _ in 0..10 {
            h.m.request(key(200), now);
        }
        assert_eq!(h.m.pending(), 1, "one pair queued, duplicates dropped");
        until(|| h.calls() == 1).await;
        for _ in 0..10 {
            h.m.request(key(200), now);
        }
        assert_eq!(h.m.pending(), 1, "in flight: still one");
        h.gate.add_permits(1);
        h.idle().await;
        assert_eq!(h.table.get(&key(200)), Some(t0() + secs(600)));
        assert_eq!(h.calls(), 1);
        let outcome = h.outcomes.try_recv().unwrap();
        assert_eq!(
            (outcome.key, outcome.result, outcome.retry_at),
            (key(200), Ok(t0() + secs(600)), None)
        );
        // Authenticated and not due for re-authentication: dropped.
        h.m.request(key(200), now);
        assert_eq!(h.m.pending(), 0);
        assert_eq!(h.calls(), 1);
        let stats = h.m.stats();
        assert_eq!((stats.succeeded, stats.overflow), (1, 0));
    }

    #[tokio::test]
    async fn full_queue_counts_overflow() {
        let cfg = ManagerConfig {
            queue: 4,
            workers: 1,
            ..config()
        };
        let h = harness(cfg, true, 64, ttl(secs(600)));
        let now = h.clock.now();
        h.m.request(key(1), now);
        // The only worker holds key 1 in its handshake; the queue is empty.
        until(|| h.calls() == 1).await;
        for r in 2..22 {
            h.m.request(key(r), now);
        }
        let stats = h.m.stats();
        assert_eq!(stats.overflow, 16, "20 requests, room for 4: {stats:?}");
        assert_eq!(h.m.pending(), 5);
        h.gate.add_permits(5);
        h.idle().await;
        assert_eq!(h.table.len(), 5);
        assert_eq!(h.calls(), 5);
    }

    #[tokio::test]
    async fn reauthenticates_before_expiry_without_lapsing() {
        let h = harness(config(), false, 16, ttl(secs(600)));
        h.m.request(key(200), h.clock.now());
        h.idle().await;
        assert_eq!(h.table.get(&key(200)), Some(t0() + secs(600)));
        // The margin is 60 s (less than a third of 600 s): renewal at 540 s.
        h.m.tick(h.at(secs(539)));
        assert_eq!(h.m.pending(), 0, "not yet due");
        h.m.tick(h.at(secs(540)));
        assert_eq!(h.m.pending(), 1, "due: re-authenticating");
        assert_eq!(
            h.table.get(&key(200)),
            Some(t0() + secs(600)),
            "the entry stays while it renews"
        );
        h.idle().await;
        assert_eq!(h.table.get(&key(200)), Some(t0() + secs(540 + 600)));
        assert_eq!(h.call_offsets(), vec![secs(0), secs(540)]);
        h.m.tick(h.at(secs(541)));
        assert_eq!(h.m.pending(), 0, "renewed: not due again");
    }

    #[tokio::test]
    async fn short_lived_entries_renew_two_thirds_into_their_life() {
        let h = harness(config(), false, 16, ttl(secs(90)));
        h.m.request(key(200), h.clock.now());
        h.idle().await;
        // A third of 90 s is less than the 60 s margin: renewal at 60 s.
        h.m.tick(h.at(Duration::from_millis(59_999)));
        assert_eq!(h.m.pending(), 0);
        h.m.tick(h.at(secs(60)));
        assert_eq!(h.m.pending(), 1);
        h.idle().await;
        assert_eq!(h.table.get(&key(200)), Some(t0() + secs(150)));
    }

    #[tokio::test]
    async fn expired_entries_are_swept_when_renewal_keeps_failing() {
        let h = harness(config(), false, 64, |n, now| {
            if n == 0 {
                Ok(now + secs(600))
            } else {
                Err(Reason::Timeout)
            }
        });
        h.m.request(key(200), h.clock.now());
        h.idle().await;
        for s in 540..600 {
            h.m.tick(h.at(secs(s)));
            h.idle().await;
            assert!(
                h.table.get(&key(200)).is_some(),
                "kept until expiry ({s} s)"
            );
        }
        // Renewals at 540, 541, 543, 547, 555 s (backoff 1, 2, 4, 8 s).
        assert_eq!(
            h.call_offsets(),
            [0, 540, 541, 543, 547, 555, 563, 571, 579, 587, 595].map(secs)
        );
        h.m.tick(h.at(secs(600)));
        assert_eq!(h.table.len(), 0, "expired: swept");
        assert!(h.m.entries().is_empty());
        assert_eq!(h.m.stats().expired, 1);
        assert_eq!(h.failed(Reason::Timeout), 10);
    }

    #[tokio::test]
    async fn revocation_is_immediate() {
        let h = harness(config(), false, 16, ttl(secs(600)));
        let now = h.clock.now();
        assert!(h.m.record(key(200), now + secs(600)));
        assert!(h.m.record(key(300), now + secs(600)));
        assert_eq!(h.table.len(), 2);
        assert_eq!(h.m.revoke(|k| k.remote == IdentityId::new(300)), 1);
        assert_eq!(h.table.get(&key(300)), None, "gone at once");
        assert!(h.table.get(&key(200)).is_some());
        assert_eq!(h.m.entries(), vec![(key(200), now + secs(600))]);
        let stats = h.m.stats();
        assert_eq!((stats.revoked, stats.succeeded), (1, 2));
        assert_eq!(h.m.revoke(|_| false), 0);
    }

    #[tokio::test]
    async fn revocation_drops_retries_and_pending_successes() {
        let h = harness(config(), true, 16, ttl(secs(600)));
        let now = h.clock.now();
        h.m.request(key(200), now);
        until(|| h.calls() == 1).await;
        // Revoked during its handshake: the success is not written.
        assert_eq!(h.m.revoke(|k| *k == key(200)), 0);
        h.gate.add_permits(1);
        h.idle().await;
        assert_eq!(h.table.len(), 0);
        assert!(h.m.entries().is_empty());
        // Requested again later: written.
        h.m.request(key(200), now);
        h.gate.add_permits(1);
        h.idle().await;
        assert!(h.table.get(&key(200)).is_some());

        // A failing pair's retry state goes with revocation.
        let f = harness(config(), false, 16, always(Reason::Unreachable));
        f.m.request(key(300), now);
        f.idle().await;
        assert!(f.m.retry_state(&key(300)).is_some());
        f.m.revoke(|k| *k == key(300));
        assert_eq!(f.m.retrying(), 0);
    }

    #[tokio::test]
    async fn failures_back_off_exponentially_while_requests_keep_coming() {
        let mut h = harness(config(), false, 1024, always(Reason::Unreachable));
        // The datapath signals every 100 ms for a minute; the agent ticks as often.
        for step in 0..=600u64 {
            let now = h.at(Duration::from_millis(step * 100));
            h.m.request(key(200), now);
            h.m.tick(now);
            h.idle().await;
        }
        // Retries 1, 2, 4, 8, 8, … s after each failure: 10 handshakes for 1202 calls.
        assert_eq!(
            h.call_offsets(),
            [0, 1, 3, 7, 15, 23, 31, 39, 47, 55].map(secs)
        );
        assert_eq!(h.failed(Reason::Unreachable), 10);
        let r = h.m.retry_state(&key(200)).unwrap();
        assert_eq!((r.attempts, r.next_at), (10, t0() + secs(63)));
        let mut outcomes = Vec::new();
        while let Ok(o) = h.outcomes.try_recv() {
            outcomes.push((o.at, o.result, o.retry_at));
        }
        assert_eq!(outcomes.len(), 10);
        assert_eq!(
            outcomes[2],
            (
                t0() + secs(3),
                Err(Reason::Unreachable),
                Some(t0() + secs(7))
            )
        );
    }

    #[tokio::test]
    async fn retries_wait_for_demand_and_unrequested_pairs_are_forgotten() {
        let h = harness(config(), false, 64, always(Reason::Refused));
        h.m.request(key(200), h.clock.now());
        h.idle().await;
        assert_eq!(h.m.retry_state(&key(200)).unwrap().next_at, t0() + secs(1));
        // Due, but nobody asked since the failure: no handshake.
        h.m.tick(h.at(secs(5)));
        assert_eq!((h.m.pending(), h.calls()), (0, 1));
        // A request after the retry is due goes straight to the queue.
        h.m.request(key(200), h.clock.now());
        assert_eq!(h.m.pending(), 1);
        h.idle().await;
        let r = h.m.retry_state(&key(200)).unwrap();
        assert_eq!((r.attempts, r.next_at), (2, t0() + secs(7)));
        // Last asked for at 5 s; forgotten 30 s later.
        h.m.tick(h.at(Duration::from_millis(34_999)));
        assert_eq!(h.m.retrying(), 1);
        h.m.tick(h.at(secs(35)));
        assert_eq!(h.m.retrying(), 0);
        assert_eq!(h.m.stats().forgotten, 1);
        // Asked for again: a fresh schedule, starting at retry_min.
        h.m.request(key(200), h.at(secs(36)));
        h.idle().await;
        let r = h.m.retry_state(&key(200)).unwrap();
        assert_eq!((r.attempts, r.next_at), (1, t0() + secs(37)));
        assert_eq!(h.calls(), 3);
    }

    #[tokio::test]
    async fn test_always_fail_never_authenticates_and_backs_off() {
        let mut h = harness(config(), false, 1024, ttl(secs(600)));
        let k = always_fail_key(200);
        for step in 0..=600u64 {
            let now = h.at(Duration::from_millis(step * 100));
            h.m.request(k, now);
            h.m.request(k, now);
            h.m.tick(now);
            assert_eq!(h.m.pending(), 0, "never queued");
        }
        tokio::task::yield_now().await;
        assert_eq!(h.calls(), 0, "never reaches the authenticator");
        assert_eq!(h.table.len(), 0);
        assert!(h.m.entries().is_empty());
        // The same schedule as handshake failures: 10 failures in a minute.
        assert_eq!(h.failed(Reason::TestAlwaysFail), 10);
        assert_eq!(h.m.stats().failed.len(), 1);
        let first = h.outcomes.try_recv().unwrap();
        assert_eq!(
            first,
            Outcome {
                key: k,
                at: t0(),
                result: Err(Reason::TestAlwaysFail),
                retry_at: Some(t0() + secs(1)),
            }
        );
    }

    #[tokio::test]
    async fn record_and_adopt_refuse_test_always_fail() {
        let h = harness(config(), false, 16, ttl(secs(600)));
        let k = always_fail_key(200);
        let expires = h.clock.now() + secs(600);
        assert!(!h.m.record(k, expires));
        assert_eq!(h.table.len(), 0);
        // An entry inherited from an earlier run is removed, not tracked.
        h.table.0.lock().unwrap().insert(k, expires);
        assert!(!h.m.adopt(k, expires));
        assert_eq!(h.table.len(), 0);
        assert!(h.m.entries().is_empty());
        assert_eq!(h.m.stats().refused, 2);
        // Adopting an ordinary entry tracks it.
        assert!(h.m.adopt(key(200), expires));
        assert_eq!(h.m.entries(), vec![(key(200), expires)]);
    }

    #[tokio::test]
    async fn a_full_outcome_channel_never_blocks_the_manager() {
        let mut h = harness(config(), false, 1, ttl(secs(600)));
        let now = h.clock.now();
        h.m.request(key(200), now);
        h.idle().await;
        h.m.request(key(300), now);
        h.idle().await;
        h.m.request(always_fail_key(400), now);
        assert_eq!(h.table.len(), 2, "both written");
        assert_eq!(h.m.stats().outcomes_dropped, 2);
        assert_eq!(h.outcomes.try_recv().unwrap().key, key(200));
        assert!(h.outcomes.try_recv().is_err());
    }

    #[tokio::test]
    async fn workers_end_with_the_last_handle() {
        let h = harness(config(), false, 16, ttl(secs(600)));
        let inner: Weak<Inner<FakeTable>> = Arc::downgrade(&h.m.inner);
        let Harness { m, .. } = h;
        let clone = m.clone();
        drop(m);
        assert!(inner.upgrade().is_some(), "a clone is left");
        drop(clone);
        until(|| inner.upgrade().is_none()).await;
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let delays: Vec<Duration> = (1..=6).map(|n| backoff(secs(1), secs(8), n)).collect();
        assert_eq!(delays, [1, 2, 4, 8, 8, 8].map(secs));
        assert_eq!(backoff(secs(1), secs(8), 0), secs(1));
        assert_eq!(backoff(secs(1), secs(8), u32::MAX), secs(8));
        assert_eq!(
            backoff(Duration::MAX, Duration::MAX, u32::MAX),
            Duration::MAX
        );
    }

    #[tokio::test]
    async fn times_at_the_end_of_the_range_do_not_panic() {
        let Some(end) = SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(i64::MAX as u64))
        else {
            return;
        };
        let h = harness(config(), false, 16, ttl(secs(600)));
        h.clock.set(end);
        assert_eq!(
            h.clock.advance(secs(1)),
            end,
            "an overflowing advance is ignored"
        );
        h.m.request(always_fail_key(200), end);
        let r = h.m.retry_state(&always_fail_key(200)).unwrap();
        assert_eq!(
            r.next_at, end,
            "the retry time falls back instead of overflowing"
        );
        assert!(h.m.record(key(300), end));
        h.m.tick(end);
        assert!(h.m.entries().is_empty(), "expired at `end`");
        let start = SystemTime::UNIX_EPOCH;
        h.clock.set(start);
        assert!(h.m.record(key(400), start));
        h.m.tick(start);
        h.m.tick(end);
    }

    #[tokio::test]
    async fn entries_are_read_without_a_copy_and_the_reader_keeps_no_manager_alive() {
        let h = harness(config(), false, 16, ttl(secs(600)));
        h.m.reserve(2);
        assert!(h.m.is_empty());
        assert!(h.m.record(key(200), t0() + secs(600)));
        assert!(h.m.adopt(key(201), t0() + secs(300)));
        assert_eq!(h.m.len(), 2);
        let has = h.m.with_entries(|has| (has(&key(200)), has(&key(202))));
        assert_eq!(has, (true, false));
        assert_eq!(
            h.m.remote_identities().into_iter().collect::<Vec<_>>(),
            vec![IdentityId::new(200), IdentityId::new(201)]
        );
        let reader = h.m.entries_reader();
        let mut read = reader.read();
        read.sort();
        assert_eq!(
            read,
            vec![(key(200), t0() + secs(600)), (key(201), t0() + secs(300))]
        );
        // Times are kept to the millisecond, rounded down: never later than the certificate.
        assert!(h.m.record(key(203), t0() + Duration::from_micros(1_500)));
        let e = h.m.entries().into_iter().find(|(k, _)| *k == key(203));
        assert_eq!(e, Some((key(203), t0() + Duration::from_millis(1))));
        // Once the last handle is gone, the workers end and drop the manager's state.
        drop(h);
        until(|| reader.read().is_empty()).await;
    }
}
