//! The cluster view that sync streams serve: one in-memory snapshot of what agents may see,
//! made once per burst of changes (not once per stream), and the deltas between snapshots.
//!
//! A change costs work in proportion to the change, not to the cluster:
//! - the registry reports what each change touched ([`Change`]: a pod, a node, an entry, the
//!   policies, the bundle, a new identity); the builder reads just those parts again and
//!   applies them to a copy of the last view ([`ClusterView::apply`]). The maps are persistent
//!   (`imbl`), so the copy is O(1) and the diff that makes the delta skips what they share;
//! - each stream sends its node the shared parts that changed (identities, endpoints, nodes,
//!   policies, the bundle) and only its own node's entries.
//!
//! Other replicas' changes arrive the same way: the etcd change feed maps the keys another
//! replica wrote to the parts they touched. The whole store is read only for the first view,
//! after an update failed, and when the feed cannot say what changed (etcd compacted the
//! changes it missed, or a key it does not know). A stream that fell further behind than the
//! deltas kept sends the whole state again.
//!
//! - [`Change`]: what one registry change touched.
//! - [`ClusterView`]: a snapshot, in wire form, keyed as agents key it.
//! - [`ViewSource`]: where the parts that changed are read again (the registry's store).
//! - [`ViewDelta`]: what changed from one snapshot to the next.
//! - [`Cursor`]: one stream's position; decides what its node gets next (pure, tested here).
//! - [`ViewFeed`]: the builder task's output that streams subscribe to.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use imbl::OrdMap;
use imbl::ordmap::DiffItem;
use meshauth_datastore::{
    EntryId, NodeName, NodeRecord, NodeSpec, PodRecord, RegistrationEntry, StoreError,
};
use meshauth_policy::{IdentityId, Labels};
use meshauth_proto::node::{
    Bundle, ClusterNode, Endpoint, Entry, Identity, PolicyDocument, SyncRemoved, SyncResponse,
};
use meshauth_spiffe::X509Bundle;
use meshauth_telemetry::CancellationToken;
use tokio::sync::watch;

use crate::metrics::ViewBuild;
use crate::registry::{ClusterState, Registry, RegistryError};

/// How many deltas are kept for streams that are behind; further behind gets the whole state.
pub const KEPT_DELTAS: usize = 256;

/// A whole state larger than this goes out in pages of about this size (`more` in
/// node.proto). tonic encodes a stream's messages into one buffer that keeps the capacity of
/// the largest message for as long as the stream lasts: unpaged, a whole state of 30,000
/// endpoints (1.25 MiB) kept about 2 MiB per stream, 1.9 GB for 1,000 streams.
pub const PAGE_BYTES: usize = 64 * 1024;

/// What one registry change touched: the builder reads that part again. Applying a change
/// twice, or one that changed nothing, is harmless.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Change {
    /// The CA rotated: the bundle.
    Bundle,
    /// A new identity and its labels (an identity never changes once allocated).
    Identity(IdentityId, Labels),
    /// A pod was placed, re-placed, reported, withdrawn or deleted.
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// A node attested, was bound, published its key, was banned or evicted (its pods'
    /// endpoints follow it).
    Node(NodeName),
    /// An entry was created, updated or deleted.
    Entry(EntryId),
    /// Policies were applied or deleted.
    Policies,
}

/// What the builder takes in at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changed {
    /// Anything may have changed: read the whole store.
    Everything,
    /// These parts changed.
    Parts(BTreeSet<Change>),
}

/// More parts than this at once are taken as [`Changed::Everything`] (reading the whole store
/// is then cheaper, and memory stays bounded).
pub const CHANGED_LIMIT: usize = 100_000;

impl Changed {
    /// Nothing changed yet.
    pub fn nothing() -> Changed {
        Changed::Parts(BTreeSet::new())
    }

    /// Adds `change`; past [`CHANGED_LIMIT`] parts, everything changed.
    pub fn record(&mut self, change: Change) {
        if let Changed::Parts(parts) = self {
            if parts.len() >= CHANGED_LIMIT {
                *self = Changed::Everything;
            } else {
                parts.insert(change);
            }
        }
    }
}

/// Where the builder reads again what changed. The registry answers from its store.
pub trait ViewSource {
    /// The whole state (for a full build).
    fn state(&self) -> Result<ClusterState, RegistryError>;
    /// The trust bundle.
    fn bundle(&self) -> X509Bundle;
    /// One pod, if it exists.
    fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>, RegistryError>;
    /// The pods placed on `node`.
    fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>, RegistryError>;
    /// One node's record, if it attested and was not evicted.
    fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>, RegistryError>;
    /// What is bound to one node (address, pod range), if anything.
    fn node_spec(&self, node: &NodeName) -> Result<Option<NodeSpec>, RegistryError>;
    /// One entry, if it exists.
    fn entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, RegistryError>;
    /// Every policy document (key, YAML).
    fn policies(&self) -> Result<Vec<(String, String)>, RegistryError>;
}

/// How a node stands in the view: its stream goes on only while it is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Usable,
    Banned,
}

/// One snapshot of what agents may see, in wire form. Cloning it is O(1).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    revision: u64,
    bundle: Bundle,
    identities: OrdMap<u32, Identity>,
    endpoints: OrdMap<String, Endpoint>,
    nodes: OrdMap<String, ClusterNode>,
    policies: OrdMap<String, PolicyDocument>,
    /// Entries by parent SPIFFE ID, then by entry ID (no empty inner map).
    entries: OrdMap<String, OrdMap<String, Entry>>,
    /// The parent of each entry, by entry ID.
    entry_parents: OrdMap<String, String>,
    /// Every node record's standing (banned ones included).
    standing: OrdMap<NodeName, Standing>,
    /// Every node record's ID (banned ones included).
    node_ids: OrdMap<NodeName, u32>,
}

/// Inserts `value` unless `map` holds an equal one (an equal value left in place keeps the
/// structure shared with earlier views, which the diff skips).
fn put<K: Ord + Clone, V: Clone + PartialEq>(map: &mut OrdMap<K, V>, key: K, value: V) {
    if map.get(&key) != Some(&value) {
        map.insert(key, value);
    }
}

fn cluster_node(record: &NodeRecord, spec: Option<&NodeSpec>) -> ClusterNode {
    ClusterNode {
        name: record.name.to_string(),
        node_id: record.node_id.get(),
        address: record.address.map(|a| a.to_string()).unwrap_or_default(),
        pod_range: spec.map(|s| s.pod_range.to_string()).unwrap_or_default(),
        tunnel_key: record
            .tunnel_key
            .map(|k| k.as_bytes().to_vec())
            .unwrap_or_default(),
    }
}

impl ClusterView {
    /// The view of `state`, at `revision`.
    pub fn build(revision: u64, state: &ClusterState) -> ClusterView {
        let specs: BTreeMap<&NodeName, &NodeSpec> =
            state.node_specs.iter().map(|s| (&s.name, s)).collect();
        let mut view = ClusterView {
            revision,
            bundle: crate::node_api::bundle_msg(&state.bundle),
            ..ClusterView::default()
        };
        for n in &state.nodes {
            view.set_node(&n.name, Some(n), specs.get(&n.name).copied());
        }
        for (id, labels) in &state.identities {
            view.identities
                .insert(id.get(), crate::node_api::identity_msg(*id, labels));
        }
        for p in &state.pods {
            view.set_pod(&p.namespace, &p.name, Some(p));
        }
        view.set_policies(&state.policies);
        for e in &state.entries {
            view.set_entry(&e.id, Some(e));
        }
        view
    }

    /// This view with `changes` read again from `source`, at `revision`.
    pub fn apply(
        &self,
        revision: u64,
        changes: &BTreeSet<Change>,
        source: &dyn ViewSource,
    ) -> Result<ClusterView, RegistryError> {
        let mut next = self.clone();
        next.revision = revision;
        for change in changes {
            match change {
                Change::Bundle => next.bundle = crate::node_api::bundle_msg(&source.bundle()),
                Change::Identity(id, labels) => put(
                    &mut next.identities,
                    id.get(),
                    crate::node_api::identity_msg(*id, labels),
                ),
                Change::Pod { namespace, name } => {
                    let pod = source.pod(namespace, name)?;
                    next.set_pod(namespace, name, pod.as_ref());
                }
                Change::Node(node) => {
                    let record = source.node(node)?;
                    let spec = source.node_spec(node)?;
                    next.set_node(node, record.as_ref(), spec.as_ref());
                    // Its pods' endpoints carry its ID and vanish while it is banned.
                    for pod in source.pods_on_node(node)? {
                        next.set_pod(&pod.namespace, &pod.name, Some(&pod));
                    }
                }
                Change::Entry(id) => {
                    let entry = source.entry(id)?;
                    next.set_entry(id, entry.as_ref());
                }
                Change::Policies => next.set_policies(&source.policies()?),
            }
        }
        Ok(next)
    }

    /// Sets (or, with `None`, removes) a node's record.
    fn set_node(&mut self, name: &NodeName, record: Option<&NodeRecord>, spec: Option<&NodeSpec>) {
        match record {
            Some(r) => {
                put(&mut self.node_ids, name.clone(), r.node_id.get());
                let standing = if r.banned {
                    Standing::Banned
                } else {
                    Standing::Usable
                };
                put(&mut self.standing, name.clone(), standing);
                if r.banned {
                    self.nodes.remove(name.as_str());
                } else {
                    put(&mut self.nodes, name.to_string(), cluster_node(r, spec));
                }
            }
            None => {
                self.node_ids.remove(name);
                self.standing.remove(name);
                self.nodes.remove(name.as_str());
            }
        }
    }

    /// Sets (or, with `None`, removes) a pod's endpoint: none while its node is banned.
    fn set_pod(&mut self, namespace: &str, name: &str, pod: Option<&PodRecord>) {
        let key = endpoint_key(namespace, name);
        match pod.filter(|p| self.standing.get(&p.node) != Some(&Standing::Banned)) {
            Some(p) => {
                let node_id = self.node_ids.get(&p.node).copied().unwrap_or(0);
                put(
                    &mut self.endpoints,
                    key,
                    crate::node_api::endpoint_msg(p, node_id),
                );
            }
            None => {
                self.endpoints.remove(&key);
            }
        }
    }

    /// Sets (or, with `None`, removes) an entry, under its parent.
    fn set_entry(&mut self, id: &EntryId, entry: Option<&RegistrationEntry>) {
        let id = id.to_string();
        if let Some(parent) = self.entry_parents.remove(&id)
            && let Some(of_parent) = self.entries.get_mut(&parent)
        {
            of_parent.remove(&id);
            if of_parent.is_empty() {
                self.entries.remove(&parent);
            }
        }
        if let Some(e) = entry {
            let parent = e.parent_id.to_string();
            self.entry_parents.insert(id.clone(), parent.clone());
            let mut of_parent = self.entries.get(&parent).cloned().unwrap_or_default();
            of_parent.insert(id, crate::node_api::entry_msg(e));
            put(&mut self.entries, parent, of_parent);
        }
    }

    /// Sets the policies to `docs` (key, YAML).
    fn set_policies(&mut self, docs: &[(String, String)]) {
        let keys: BTreeSet<&str> = docs.iter().map(|(k, _)| k.as_str()).collect();
        let gone: Vec<String> = self
            .policies
            .keys()
            .filter(|k| !keys.contains(k.as_str()))
            .cloned()
            .collect();
        for k in gone {
            self.policies.remove(&k);
        }
        for (key, yaml) in docs {
            put(
                &mut self.policies,
                key.clone(),
                crate::admin_api::policy_document(key.clone(), yaml.clone()),
            );
        }
    }

    /// The revision this view was built at.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether `node` may be served: the same refusals as the store's `usable_node`.
    fn check(&self, node: &NodeName) -> Result<(), RegistryError> {
        match self.standing.get(node) {
            Some(Standing::Usable) => Ok(()),
            Some(Standing::Banned) => Err(StoreError::NodeBanned(node.clone()).into()),
            None => Err(StoreError::NodeNotFound(node.clone()).into()),
        }
    }

    /// The whole state for the node whose SPIFFE ID is `parent`, in pages of about
    /// [`PAGE_BYTES`] (one page when it is smaller).
    fn full(&self, parent: &str) -> Vec<SyncResponse> {
        let mut pages = Pages::new(self.revision, self.bundle.clone());
        if let Some(entries) = self.entries.get(parent) {
            for e in entries.values() {
                pages.add(e, |m| &mut m.entries);
            }
        }
        for i in self.identities.values() {
            pages.add(i, |m| &mut m.identities);
        }
        for n in self.nodes.values() {
            pages.add(n, |m| &mut m.nodes);
        }
        for p in self.policies.values() {
            pages.add(p, |m| &mut m.policies);
        }
        for e in self.endpoints.values() {
            pages.add(e, |m| &mut m.endpoints);
        }
        pages.done()
    }
}

/// The bytes `more: true` adds to a message (tag and value).
const MORE_BYTES: usize = 2;

/// A whole state cut into pages (see `more` in node.proto): the first is the whole-state
/// message, the others deltas from its revision to the same one that only add items.
struct Pages {
    revision: u64,
    pages: Vec<SyncResponse>,
    /// The encoded size of the last page so far.
    size: usize,
}

impl Pages {
    fn new(revision: u64, bundle: Bundle) -> Pages {
        let first = SyncResponse {
            bundle: Some(bundle),
            revision,
            ..SyncResponse::default()
        };
        Pages {
            revision,
            size: prost::Message::encoded_len(&first) + MORE_BYTES,
            pages: vec![first],
        }
    }

    /// Adds `item` to the list `field` picks, on a new page if the last one is full.
    fn add<T: prost::Message + Clone>(
        &mut self,
        item: &T,
        field: impl Fn(&mut SyncResponse) -> &mut Vec<T>,
    ) {
        // The item's bytes, its length prefix and its tag (one byte for these fields).
        let len = item.encoded_len();
        let len = len + prost::encoding::encoded_len_varint(len as u64) + 1;
        if self.size + len > PAGE_BYTES {
            let page = SyncResponse {
                revision: self.revision,
                delta: true,
                base_revision: self.revision,
                ..SyncResponse::default()
            };
            self.size = prost::Message::encoded_len(&page) + MORE_BYTES;
            self.pages.push(page);
        }
        if let Some(page) = self.pages.last_mut() {
            field(page).push(item.clone());
        }
        self.size += len;
    }

    /// The pages, each but the last marked `more`.
    fn done(mut self) -> Vec<SyncResponse> {
        let last = self.pages.len().saturating_sub(1);
        for page in &mut self.pages[..last] {
            page.more = true;
        }
        self.pages
    }
}

/// The key agents know an endpoint by.
pub fn endpoint_key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// What changed in one keyed collection: items added or replaced, and keys removed.
#[derive(Debug, Clone, PartialEq)]
struct Changes<K: Ord, V> {
    put: BTreeMap<K, V>,
    removed: BTreeSet<K>,
}

impl<K: Ord, V> Default for Changes<K, V> {
    fn default() -> Self {
        Changes {
            put: BTreeMap::new(),
            removed: BTreeSet::new(),
        }
    }
}

impl<K: Ord + Clone, V: Clone + PartialEq> Changes<K, V> {
    /// What turns `old` into `new` (visiting only what the two do not share).
    fn between(old: &OrdMap<K, V>, new: &OrdMap<K, V>) -> Self {
        let mut c = Changes::default();
        for item in old.diff(new) {
            match item {
                DiffItem::Add(k, v) | DiffItem::Update { new: (k, v), .. } => {
                    c.put.insert(k.clone(), v.clone());
                }
                DiffItem::Remove(k, _) => {
                    c.removed.insert(k.clone());
                }
            }
        }
        c
    }

    /// These changes followed by `later`'s.
    fn then(&mut self, later: &Changes<K, V>) {
        for k in &later.removed {
            self.put.remove(k);
            self.removed.insert(k.clone());
        }
        for (k, v) in &later.put {
            self.removed.remove(k);
            self.put.insert(k.clone(), v.clone());
        }
    }

    fn is_empty(&self) -> bool {
        self.put.is_empty() && self.removed.is_empty()
    }
}

/// What changed from the view at `base` to the view at `revision`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewDelta {
    base: u64,
    revision: u64,
    bundle: Option<Bundle>,
    identities: Changes<u32, Identity>,
    endpoints: Changes<String, Endpoint>,
    nodes: Changes<String, ClusterNode>,
    policies: Changes<String, PolicyDocument>,
    /// Entry changes by parent SPIFFE ID: a stream reads only its node's.
    entries: BTreeMap<String, Changes<String, Entry>>,
}

impl ViewDelta {
    /// What turns `old` into `new`.
    pub fn between(old: &ClusterView, new: &ClusterView) -> ViewDelta {
        let empty = OrdMap::new();
        let entries = old
            .entries
            .diff(&new.entries)
            .filter_map(|item| {
                let (parent, c) = match item {
                    DiffItem::Add(p, n) => (p, Changes::between(&empty, n)),
                    DiffItem::Update {
                        old: (p, o),
                        new: (_, n),
                    } => (p, Changes::between(o, n)),
                    DiffItem::Remove(p, o) => (p, Changes::between(o, &empty)),
                };
                (!c.is_empty()).then(|| (parent.clone(), c))
            })
            .collect();
        ViewDelta {
            base: old.revision,
            revision: new.revision,
            bundle: (old.bundle != new.bundle).then(|| new.bundle.clone()),
            identities: Changes::between(&old.identities, &new.identities),
            endpoints: Changes::between(&old.endpoints, &new.endpoints),
            nodes: Changes::between(&old.nodes, &new.nodes),
            policies: Changes::between(&old.policies, &new.policies),
            entries,
        }
    }

    /// The part of this delta the node whose SPIFFE ID is `parent` sees.
    fn for_node(&self, parent: &str) -> ViewDelta {
        ViewDelta {
            base: self.base,
            revision: self.revision,
            bundle: self.bundle.clone(),
            identities: self.identities.clone(),
            endpoints: self.endpoints.clone(),
            nodes: self.nodes.clone(),
            policies: self.policies.clone(),
            entries: self
                .entries
                .get(parent)
                .map(|c| BTreeMap::from([(parent.to_owned(), c.clone())]))
                .unwrap_or_default(),
        }
    }

    /// This delta followed by `later` (whose base is this one's revision).
    fn then(&mut self, later: &ViewDelta) {
        self.revision = later.revision;
        if later.bundle.is_some() {
            self.bundle.clone_from(&later.bundle);
        }
        self.identities.then(&later.identities);
        self.endpoints.then(&later.endpoints);
        self.nodes.then(&later.nodes);
        self.policies.then(&later.policies);
        for (parent, c) in &later.entries {
            self.entries.entry(parent.clone()).or_default().then(c);
        }
    }

    fn is_empty(&self) -> bool {
        self.bundle.is_none()
            && self.identities.is_empty()
            && self.endpoints.is_empty()
            && self.nodes.is_empty()
            && self.policies.is_empty()
            && self.entries.values().all(Changes::is_empty)
    }

    /// The wire message of this (per-node) delta, applying to the agent's `base`.
    fn message(&self, base: u64) -> SyncResponse {
        let entries = self.entries.values().next();
        SyncResponse {
            bundle: self.bundle.clone(),
            entries: entries
                .map(|c| c.put.values().cloned().collect())
                .unwrap_or_default(),
            identities: self.identities.put.values().cloned().collect(),
            endpoints: self.endpoints.put.values().cloned().collect(),
            nodes: self.nodes.put.values().cloned().collect(),
            policies: self.policies.put.values().cloned().collect(),
            revision: self.revision,
            delta: true,
            base_revision: base,
            more: false,
            removed: Some(SyncRemoved {
                entries: entries
                    .map(|c| c.removed.iter().cloned().collect())
                    .unwrap_or_default(),
                identities: self.identities.removed.iter().copied().collect(),
                endpoints: self.endpoints.removed.iter().cloned().collect(),
                nodes: self.nodes.removed.iter().cloned().collect(),
                policies: self.policies.removed.iter().cloned().collect(),
            }),
        }
    }
}

/// A view with the deltas that led to it, as the builder publishes it.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// Whether a view was built yet (the default, before the first build, has nothing).
    built: bool,
    view: Arc<ClusterView>,
    /// The latest deltas, oldest first; the last one's revision is the view's.
    deltas: VecDeque<Arc<ViewDelta>>,
}

impl Published {
    /// The first view, with no history.
    pub fn first(view: ClusterView) -> Published {
        Published {
            built: true,
            view: Arc::new(view),
            deltas: VecDeque::new(),
        }
    }

    /// The next one: `view`, with the delta from this one's.
    pub fn next(&self, view: ClusterView) -> Published {
        let delta = Arc::new(ViewDelta::between(&self.view, &view));
        let mut deltas = self.deltas.clone();
        if deltas.len() == KEPT_DELTAS {
            deltas.pop_front();
        }
        deltas.push_back(delta);
        Published {
            built: true,
            view: Arc::new(view),
            deltas,
        }
    }

    /// The view.
    pub fn view(&self) -> &ClusterView {
        &self.view
    }
}

/// What one stream sends next.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Nothing changed for this node.
    Nothing,
    /// The whole state (first message, or the stream fell behind the deltas kept), in pages
    /// to send in order.
    Full(Vec<SyncResponse>),
    /// What changed since the last message.
    Delta(Box<SyncResponse>),
}

/// One sync stream's position in the feed: what its agent holds.
#[derive(Debug, Clone)]
pub struct Cursor {
    node: NodeName,
    parent: String,
    /// The revision of the last message sent (what the agent holds).
    sent: Option<u64>,
    /// The latest revision looked at: nothing for this node changed between `sent` and it.
    seen: u64,
}

impl Cursor {
    /// A stream of `node`, whose SPIFFE ID is `parent`, that has sent nothing yet.
    pub fn new(node: NodeName, parent: String) -> Cursor {
        Cursor {
            node,
            parent,
            sent: None,
            seen: 0,
        }
    }

    /// What to send to bring the agent to `published`; an error ends the stream (the node was
    /// banned or evicted).
    pub fn next(&mut self, published: &Published) -> Result<Next, RegistryError> {
        let view = &published.view;
        view.check(&self.node)?;
        let Some(sent) = self.sent else {
            return Ok(self.full(view));
        };
        if view.revision <= self.seen {
            return Ok(Next::Nothing);
        }
        let mut chain = published
            .deltas
            .iter()
            .skip_while(|d| d.revision <= self.seen);
        let Some(first) = chain.next().filter(|d| d.base == self.seen) else {
            // Further behind than the deltas kept.
            return Ok(self.full(view));
        };
        let mut delta = first.for_node(&self.parent);
        for d in chain {
            delta.then(&d.for_node(&self.parent));
        }
        self.seen = view.revision;
        if delta.is_empty() {
            return Ok(Next::Nothing);
        }
        self.sent = Some(view.revision);
        Ok(Next::Delta(Box::new(delta.message(sent))))
    }

    fn full(&mut self, view: &ClusterView) -> Next {
        self.sent = Some(view.revision);
        self.seen = view.revision;
        Next::Full(view.full(&self.parent))
    }
}

/// The published views: the builder task writes, sync streams read.
#[derive(Debug, Clone)]
pub struct ViewFeed {
    tx: Arc<watch::Sender<Arc<Published>>>,
}

impl Default for ViewFeed {
    fn default() -> Self {
        Self::new()
    }
}

/// How long the builder waits before retrying a rebuild that failed (a store error).
const RETRY: Duration = Duration::from_secs(1);

impl ViewFeed {
    /// A feed with nothing built yet (revision 0, no nodes: streams wait for the first build).
    pub fn new() -> ViewFeed {
        ViewFeed {
            tx: Arc::new(watch::Sender::new(Arc::new(Published::default()))),
        }
    }

    /// A receiver of every view published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Published>> {
        self.tx.subscribe()
    }

    /// Waits until the view covers `revision` (at most `limit`): a stream opened right after
    /// its node attested must see the node.
    pub async fn wait_for(
        rx: &mut watch::Receiver<Arc<Published>>,
        revision: u64,
        limit: Duration,
    ) -> Option<Arc<Published>> {
        let ready = rx.wait_for(|p| p.built && p.view.revision >= revision);
        match tokio::time::timeout(limit, ready).await {
            Ok(Ok(p)) => Some(Arc::clone(&p)),
            _ => None,
        }
    }

    /// Makes a new view on every change of `registry` until `token` is cancelled: the last
    /// one with what changed read again, or the whole store when the registry cannot say what
    /// changed. Changes that arrive meanwhile are taken together by the next one.
    pub async fn run(
        &self,
        registry: Arc<Registry>,
        token: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut changes = registry.subscribe();
        loop {
            let revision = *changes.borrow_and_update();
            // Taken after the revision: every change counted in it is among these (a change is
            // recorded before it is counted).
            let taken = registry.take_changes();
            let started = Instant::now();
            let reg = Arc::clone(&registry);
            let current = Arc::clone(&self.tx.borrow());
            let made = tokio::task::spawn_blocking(move || {
                let source = reg.view_source(SystemTime::now());
                let (view, kind) = match (&taken, current.built) {
                    (Changed::Parts(parts), true) => (
                        current.view.apply(revision, parts, &source)?,
                        ViewBuild::Incremental,
                    ),
                    _ => (
                        ClusterView::build(revision, &source.state()?),
                        ViewBuild::Full,
                    ),
                };
                let next = if current.built {
                    current.next(view)
                } else {
                    Published::first(view)
                };
                Ok::<_, RegistryError>((next, kind))
            })
            .await?;
            match made {
                Ok((next, kind)) => {
                    self.tx.send_replace(Arc::new(next));
                    registry
                        .metrics()
                        .view_built(kind, started.elapsed(), revision);
                }
                Err(e) => {
                    // What was taken is lost: the next view is read from the whole store.
                    registry.view_failed();
                    tracing::warn!(error = %e, retry_in_ms = RETRY.as_millis() as u64, "cannot read the store to make the cluster view");
                    tokio::select! {
                        () = tokio::time::sleep(RETRY) => continue,
                        () = token.cancelled() => return Ok(()),
                    }
                }
            }
            tokio::select! {
                changed = changes.changed() => changed?,
                () = token.cancelled() => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeName {
        name.parse().expect("node name")
    }

    fn view(revision: u64) -> ClusterView {
        let mut v = ClusterView {
            revision,
            ..ClusterView::default()
        };
        v.standing.insert(node("n1"), Standing::Usable);
        v.standing.insert(node("n2"), Standing::Usable);
        v
    }

    fn policy(name: &str, yaml: &str) -> PolicyDocument {
        PolicyDocument {
            name: name.into(),
            yaml: yaml.into(),
            namespace: String::new(),
        }
    }

    fn entry(id: &str, parent: &str) -> Entry {
        Entry {
            id: id.into(),
            parent_id: parent.into(),
            spiffe_id: format!("spiffe://td/{id}"),
            ..Entry::default()
        }
    }

    /// The one page of a small whole state.
    fn single(mut pages: Vec<SyncResponse>) -> SyncResponse {
        assert_eq!(pages.len(), 1, "a small whole state is one message");
        let page = pages.remove(0);
        assert!(!page.more && !page.delta);
        page
    }

    const N1: &str = "spiffe://td/node/n1";
    const N2: &str = "spiffe://td/node/n2";

    /// Applies `msg` to `state` as an agent does.
    fn apply(state: &mut Option<SyncResponse>, msg: SyncResponse) {
        if !msg.delta {
            *state = Some(msg);
            return;
        }
        let s = state.as_mut().expect("a delta after a full message");
        assert_eq!(
            s.revision, msg.base_revision,
            "delta applies to what the agent holds"
        );
        let removed = msg.removed.unwrap_or_default();
        s.policies.retain(|p| !removed.policies.contains(&p.name));
        for p in msg.policies {
            s.policies.retain(|q| q.name != p.name);
            s.policies.push(p);
        }
        s.entries.retain(|e| !removed.entries.contains(&e.id));
        for e in msg.entries {
            s.entries.retain(|q| q.id != e.id);
            s.entries.push(e);
        }
        s.revision = msg.revision;
    }

    #[test]
    fn first_message_is_the_whole_state_then_deltas_only() {
        let mut v1 = view(1);
        v1.policies.insert("a".into(), policy("a", "1"));
        let mut p = Published::first(v1.clone());
        let mut c = Cursor::new(node("n1"), N1.into());
        let Next::Full(first) = c.next(&p).expect("usable") else {
            panic!("first message must be full");
        };
        let first = single(first);
        assert_eq!(first.policies.len(), 1);
        assert_eq!(c.next(&p).expect("usable"), Next::Nothing);

        let mut v2 = v1.clone();
        v2.revision = 2;
        v2.policies.insert("b".into(), policy("b", "2"));
        v2.policies.remove("a");
        p = p.next(v2);
        let Next::Delta(d) = c.next(&p).expect("usable") else {
            panic!("a change after the first message is a delta");
        };
        let d = *d;
        assert_eq!(d.base_revision, 1);
        assert_eq!(d.revision, 2);
        assert_eq!(d.policies, vec![policy("b", "2")]);
        assert_eq!(d.removed.expect("removed").policies, vec!["a".to_owned()]);
        assert!(d.bundle.is_none(), "an unchanged bundle is not resent");
    }

    #[test]
    fn a_node_gets_only_its_own_entries_and_skips_other_nodes_changes() {
        let v1 = view(1);
        let mut p = Published::first(v1.clone());
        let mut c1 = Cursor::new(node("n1"), N1.into());
        let mut c2 = Cursor::new(node("n2"), N2.into());
        let (mut s1, mut s2) = (None, None);
        for (c, s) in [(&mut c1, &mut s1), (&mut c2, &mut s2)] {
            let Next::Full(m) = c.next(&p).expect("usable") else {
                panic!("full first");
            };
            let m = single(m);
            apply(s, m);
        }
        // An entry of n2: n1's stream sends nothing.
        let mut v2 = v1.clone();
        v2.revision = 2;
        v2.entries
            .insert(N2.into(), OrdMap::unit("e2".to_owned(), entry("e2", N2)));
        p = p.next(v2.clone());
        assert_eq!(c1.next(&p).expect("usable"), Next::Nothing);
        let Next::Delta(m) = c2.next(&p).expect("usable") else {
            panic!("n2 gets its entry");
        };
        let m = *m;
        assert_eq!(m.entries, vec![entry("e2", N2)]);
        apply(&mut s2, m);
        // Then a policy: n1's delta applies to revision 1 (what it holds), not 2.
        let mut v3 = v2.clone();
        v3.revision = 3;
        v3.policies.insert("p".into(), policy("p", "x"));
        p = p.next(v3.clone());
        let Next::Delta(m) = c1.next(&p).expect("usable") else {
            panic!("n1 gets the policy");
        };
        let m = *m;
        assert_eq!(m.base_revision, 1);
        assert!(m.entries.is_empty(), "not n2's entry");
        apply(&mut s1, m);
        let Next::Delta(m) = c2.next(&p).expect("usable") else {
            panic!("n2 gets the policy");
        };
        let m = *m;
        apply(&mut s2, m);
        assert_eq!(s1.as_ref().map(|s| s.policies.len()), Some(1));
        assert_eq!(s2.as_ref().map(|s| s.entries.len()), Some(1));
        // What each agent holds equals the whole state a new stream would get.
        for (s, parent) in [(&s1, N1), (&s2, N2)] {
            let full = single(v3.full(parent));
            let held = s.as_ref().expect("state");
            assert_eq!(held.policies, full.policies);
            assert_eq!(held.entries, full.entries);
            assert_eq!(held.revision, full.revision);
        }
    }

    #[test]
    fn deltas_missed_while_busy_are_composed_and_a_stream_too_far_behind_gets_the_whole_state() {
        let v = view(1);
        let mut p = Published::first(v.clone());
        let mut c = Cursor::new(node("n1"), N1.into());
        let mut held = None;
        let Next::Full(m) = c.next(&p).expect("usable") else {
            panic!("full first");
        };
        let m = single(m);
        apply(&mut held, m);
        // Three changes before the stream looks again: added, changed, another removed.
        let mut cur = v.clone();
        for (rev, name, yaml) in [(2, "a", "1"), (3, "a", "2"), (4, "b", "3")] {
            cur.revision = rev;
            cur.policies.insert(name.into(), policy(name, yaml));
            p = p.next(cur.clone());
        }
        cur.revision = 5;
        cur.policies.remove("b");
        p = p.next(cur.clone());
        let Next::Delta(m) = c.next(&p).expect("usable") else {
            panic!("composed delta");
        };
        let m = *m;
        assert_eq!((m.base_revision, m.revision), (1, 5));
        assert_eq!(m.policies, vec![policy("a", "2")]);
        apply(&mut held, m);
        assert_eq!(
            held.as_ref().map(|h| h.policies.clone()),
            Some(vec![policy("a", "2")])
        );
        // Fall behind by more than the deltas kept.
        for i in 0..=KEPT_DELTAS as u64 {
            cur.revision = 6 + i;
            cur.policies.insert("a".into(), policy("a", &i.to_string()));
            p = p.next(cur.clone());
        }
        assert!(matches!(c.next(&p).expect("usable"), Next::Full(_)));
    }

    #[test]
    fn a_banned_or_evicted_node_is_refused() {
        let mut v = view(1);
        v.standing.insert(node("n1"), Standing::Banned);
        v.standing.remove(&node("n2"));
        let p = Published::first(v);
        let banned = Cursor::new(node("n1"), N1.into()).next(&p);
        assert!(matches!(
            banned,
            Err(RegistryError::Store(StoreError::NodeBanned(_)))
        ));
        let gone = Cursor::new(node("n2"), N2.into()).next(&p);
        assert!(matches!(
            gone,
            Err(RegistryError::Store(StoreError::NodeNotFound(_)))
        ));
    }

    #[test]
    fn a_large_whole_state_comes_in_pages_that_add_up_to_it() {
        let mut v = view(7);
        for i in 0..5_000u32 {
            let name = format!("pod-{i:05}");
            v.endpoints.insert(
                endpoint_key("default", &name),
                Endpoint {
                    namespace: "default".into(),
                    name,
                    node: "n1".into(),
                    ipv4: format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255),
                    identity: 256 + i % 300,
                    ..Endpoint::default()
                },
            );
        }
        for i in 0..300u32 {
            v.identities.insert(
                256 + i,
                Identity {
                    id: 256 + i,
                    ..Identity::default()
                },
            );
        }
        let mut mine = OrdMap::new();
        mine.insert("e1".to_owned(), entry("e1", N1));
        v.entries.insert(N1.to_owned(), mine);
        v.policies.insert("a".into(), policy("a", "1"));
        let p = Published::first(v.clone());
        let mut c = Cursor::new(node("n1"), N1.into());
        let Next::Full(pages) = c.next(&p).expect("usable") else {
            panic!("first message must be full");
        };
        assert!(pages.len() > 2, "{} pages", pages.len());
        for (i, page) in pages.iter().enumerate() {
            assert!(
                prost::Message::encoded_len(page) <= PAGE_BYTES,
                "page {i} is {} bytes",
                prost::Message::encoded_len(page)
            );
            assert_eq!(page.more, i + 1 < pages.len(), "page {i}: more");
            assert_eq!(page.revision, 7);
            if i == 0 {
                assert!(!page.delta && page.bundle.is_some());
            } else {
                assert!(page.delta && page.base_revision == 7 && page.bundle.is_none());
                assert!(page.removed.is_none(), "continuations only add");
            }
        }
        // Together they are the whole state, each item once, in the view's order.
        let all = |f: fn(&SyncResponse) -> usize| pages.iter().map(f).sum::<usize>();
        assert_eq!(all(|m| m.endpoints.len()), 5_000);
        assert_eq!(all(|m| m.identities.len()), 300);
        assert_eq!(all(|m| m.entries.len()), 1);
        assert_eq!(all(|m| m.policies.len()), 1);
        let endpoints: Vec<Endpoint> = pages.iter().flat_map(|m| m.endpoints.clone()).collect();
        assert_eq!(endpoints, v.endpoints.values().cloned().collect::<Vec<_>>());
        // Then the stream goes on with deltas against that revision.
        assert_eq!(c.next(&p).expect("usable"), Next::Nothing);
    }

    #[test]
    fn too_many_changes_at_once_are_everything() {
        let mut c = Changed::nothing();
        for i in 0..CHANGED_LIMIT {
            c.record(Change::Pod {
                namespace: "default".into(),
                name: i.to_string(),
            });
        }
        assert!(matches!(&c, Changed::Parts(p) if p.len() == CHANGED_LIMIT));
        c.record(Change::Policies);
        assert_eq!(c, Changed::Everything);
        c.record(Change::Bundle);
        assert_eq!(c, Changed::Everything, "everything stays everything");
    }

    #[test]
    fn an_unchanged_rebuild_is_an_empty_delta() {
        let mut v = view(1);
        v.policies.insert("a".into(), policy("a", "1"));
        let p = Published::first(v.clone());
        let mut c = Cursor::new(node("n1"), N1.into());
        let _ = c.next(&p).expect("usable");
        v.revision = 2;
        let p = p.next(v);
        assert_eq!(c.next(&p).expect("usable"), Next::Nothing);
    }

    // --- incremental views: applying what changed equals building from the whole state ---

    use std::net::{IpAddr, Ipv4Addr};

    use meshauth_datastore::{Ipv4Range, NodeAttestation, PodRuntime};
    use meshauth_policy::NodeId;
    use proptest::prelude::*;
    use rustls::pki_types::CertificateDer;

    const NODES: u8 = 4;
    const PODS: u8 = 8;
    const ENTRIES: u8 = 4;
    const POLICIES: u8 = 3;

    /// The whole state, as the store holds it (pods of banned nodes included).
    #[derive(Debug, Clone)]
    struct Model {
        bundle_sequence: u64,
        identities: BTreeMap<IdentityId, Labels>,
        nodes: BTreeMap<NodeName, NodeRecord>,
        specs: BTreeMap<NodeName, NodeSpec>,
        pods: BTreeMap<(String, String), PodRecord>,
        entries: BTreeMap<EntryId, RegistrationEntry>,
        policies: BTreeMap<String, String>,
    }

    fn node_name(i: u8) -> NodeName {
        node(&format!("n{i}"))
    }

    fn entry_id(i: u8) -> EntryId {
        format!("{i:032x}").parse().expect("entry id")
    }

    fn labels(k: u8) -> Labels {
        Labels::from_pairs([("app", format!("a{k}"))]).expect("labels")
    }

    impl Model {
        fn new() -> Model {
            Model {
                bundle_sequence: 1,
                identities: BTreeMap::new(),
                nodes: BTreeMap::new(),
                specs: BTreeMap::new(),
                pods: BTreeMap::new(),
                entries: BTreeMap::new(),
                policies: BTreeMap::new(),
            }
        }

        fn bundle(&self) -> X509Bundle {
            X509Bundle {
                trust_domain: "td".parse().expect("trust domain"),
                authorities: vec![CertificateDer::from(vec![
                    1,
                    (self.bundle_sequence % 256) as u8,
                ])],
                sequence: self.bundle_sequence,
                refresh_hint: None,
            }
        }

        fn banned(&self, n: &NodeName) -> bool {
            self.nodes.get(n).is_some_and(|r| r.banned)
        }

        /// Applies `op`; returns what it touched, as the registry reports it.
        fn apply(&mut self, op: &Op) -> Option<Change> {
            let now = SystemTime::UNIX_EPOCH;
            Some(match *op {
                Op::Attest(i) => {
                    let name = node_name(i);
                    let record = NodeRecord {
                        name: name.clone(),
                        node_id: NodeId::new(u32::from(i) + 1),
                        serial: "01".into(),
                        previous_serial: None,
                        svid_not_after: now,
                        banned: false,
                        address: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, i))),
                        attested_at: now,
                        attestation: NodeAttestation::JoinToken,
                        tunnel_key: None,
                    };
                    self.nodes.entry(name.clone()).or_insert(record);
                    Change::Node(name)
                }
                Op::Bind(i, octet) => {
                    let name = node_name(i);
                    self.specs.insert(
                        name.clone(),
                        NodeSpec {
                            name: name.clone(),
                            address: None,
                            pod_range: Ipv4Range {
                                base: Ipv4Addr::new(10, 1, octet, 0),
                                prefix: 24,
                            },
                        },
                    );
                    Change::Node(name)
                }
                Op::Ban(i) => {
                    let name = node_name(i);
                    self.nodes.get_mut(&name)?.banned = true;
                    Change::Node(name)
                }
                Op::Evict(i) => {
                    let name = node_name(i);
                    self.nodes.remove(&name)?;
                    for p in self.pods.values_mut().filter(|p| p.node == name) {
                        p.runtime = None;
                    }
                    Change::Node(name)
                }
                Op::Identity(k) => {
                    let id = IdentityId::new(256 + u32::from(k));
                    if self.identities.contains_key(&id) {
                        return None;
                    }
                    self.identities.insert(id, labels(k));
                    Change::Identity(id, labels(k))
                }
                Op::Place(j, i, k) => {
                    let key = ("default".to_owned(), format!("p{j}"));
                    let node = node_name(i);
                    let runtime = self
                        .pods
                        .get(&key)
                        .filter(|p| p.node == node)
                        .and_then(|p| p.runtime.clone());
                    self.pods.insert(
                        key.clone(),
                        PodRecord {
                            namespace: key.0.clone(),
                            name: key.1.clone(),
                            labels: labels(k),
                            node,
                            identity: IdentityId::new(256 + u32::from(k)),
                            runtime,
                        },
                    );
                    Change::Pod {
                        namespace: key.0,
                        name: key.1,
                    }
                }
                Op::Report(j, host) => {
                    let key = ("default".to_owned(), format!("p{j}"));
                    self.pods.get_mut(&key)?.runtime = Some(PodRuntime {
                        ipv4: Ipv4Addr::new(10, 2, j, host),
                        interface: format!("eth{host}"),
                    });
                    Change::Pod {
                        namespace: key.0,
                        name: key.1,
                    }
                }
                Op::DeletePod(j) => {
                    let key = ("default".to_owned(), format!("p{j}"));
                    self.pods.remove(&key)?;
                    Change::Pod {
                        namespace: key.0,
                        name: key.1,
                    }
                }
                Op::PutEntry(e, i, rev) => {
                    let id = entry_id(e);
                    self.entries.insert(
                        id.clone(),
                        RegistrationEntry {
                            id: id.clone(),
                            spiffe_id: format!("spiffe://td/w{e}").parse().expect("id"),
                            parent_id: format!("spiffe://td/node/n{i}").parse().expect("id"),
                            selectors: Vec::new(),
                            x509_svid_ttl: None,
                            dns_names: Vec::new(),
                            revision: u64::from(rev),
                        },
                    );
                    Change::Entry(id)
                }
                Op::DeleteEntry(e) => {
                    let id = entry_id(e);
                    self.entries.remove(&id)?;
                    Change::Entry(id)
                }
                Op::Policy(k, yaml) => {
                    let key = format!("default/pol{k}");
                    match yaml {
                        Some(y) => self.policies.insert(key, format!("v{y}")),
                        None => self.policies.remove(&key),
                    };
                    Change::Policies
                }
                Op::Rotate => {
                    self.bundle_sequence += 1;
                    Change::Bundle
                }
            })
        }
    }

    impl ViewSource for Model {
        fn state(&self) -> Result<ClusterState, RegistryError> {
            Ok(ClusterState {
                bundle: self.bundle(),
                entries: self.entries.values().cloned().collect(),
                identities: self
                    .identities
                    .iter()
                    .map(|(id, l)| (*id, l.clone()))
                    .collect(),
                // As `Registry::cluster_state`: a banned node's pods are left out.
                pods: self
                    .pods
                    .values()
                    .filter(|p| !self.banned(&p.node))
                    .cloned()
                    .collect(),
                nodes: self.nodes.values().cloned().collect(),
                node_specs: self.specs.values().cloned().collect(),
                policies: self
                    .policies
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
            })
        }

        fn bundle(&self) -> X509Bundle {
            Model::bundle(self)
        }

        fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodRecord>, RegistryError> {
            Ok(self
                .pods
                .get(&(namespace.to_owned(), name.to_owned()))
                .cloned())
        }

        fn pods_on_node(&self, node: &NodeName) -> Result<Vec<PodRecord>, RegistryError> {
            Ok(self
                .pods
                .values()
                .filter(|p| p.node == *node)
                .cloned()
                .collect())
        }

        fn node(&self, node: &NodeName) -> Result<Option<NodeRecord>, RegistryError> {
            Ok(self.nodes.get(node).cloned())
        }

        fn node_spec(&self, node: &NodeName) -> Result<Option<NodeSpec>, RegistryError> {
            Ok(self.specs.get(node).cloned())
        }

        fn entry(&self, id: &EntryId) -> Result<Option<RegistrationEntry>, RegistryError> {
            Ok(self.entries.get(id).cloned())
        }

        fn policies(&self) -> Result<Vec<(String, String)>, RegistryError> {
            Ok(self
                .policies
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }
    }

    /// One registry operation on the model.
    #[derive(Debug, Clone)]
    enum Op {
        Attest(u8),
        Bind(u8, u8),
        Ban(u8),
        Evict(u8),
        Identity(u8),
        Place(u8, u8, u8),
        Report(u8, u8),
        DeletePod(u8),
        PutEntry(u8, u8, u8),
        DeleteEntry(u8),
        Policy(u8, Option<u8>),
        Rotate,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..NODES).prop_map(Op::Attest),
            (0..NODES, 0..3u8).prop_map(|(i, o)| Op::Bind(i, o)),
            (0..NODES).prop_map(Op::Ban),
            (0..NODES).prop_map(Op::Evict),
            (0..4u8).prop_map(Op::Identity),
            (0..PODS, 0..NODES, 0..4u8).prop_map(|(j, i, k)| Op::Place(j, i, k)),
            (0..PODS, 1..3u8).prop_map(|(j, h)| Op::Report(j, h)),
            (0..PODS).prop_map(Op::DeletePod),
            (0..ENTRIES, 0..NODES, 0..3u8).prop_map(|(e, i, r)| Op::PutEntry(e, i, r)),
            (0..ENTRIES).prop_map(Op::DeleteEntry),
            (0..POLICIES, proptest::option::of(0..3u8)).prop_map(|(k, y)| Op::Policy(k, y)),
            Just(Op::Rotate),
        ]
    }

    proptest! {
        /// The contract of incremental views: after any sequence of changes, in bursts of any
        /// size, the view made by applying what each burst touched is the view built from the
        /// whole state, and so is every delta streams send.
        #[test]
        fn applying_what_changed_equals_building_from_the_whole_state(
            bursts in proptest::collection::vec(proptest::collection::vec(op(), 1..6), 1..25),
        ) {
            let mut model = Model::new();
            let mut revision = 0;
            let mut built = ClusterView::build(revision, &model.state().expect("state"));
            let mut published = Published::first(built.clone());
            for burst in &bursts {
                let mut changes = BTreeSet::new();
                for op in burst {
                    changes.extend(model.apply(op));
                }
                revision += 1;
                let applied = published.view().apply(revision, &changes, &model).expect("apply");
                let rebuilt = ClusterView::build(revision, &model.state().expect("state"));
                prop_assert_eq!(&applied, &rebuilt, "after {:?}", burst);
                prop_assert_eq!(
                    ViewDelta::between(published.view(), &applied),
                    ViewDelta::between(&built, &rebuilt)
                );
                published = published.next(applied);
                built = rebuilt;
            }
        }
    }
}
