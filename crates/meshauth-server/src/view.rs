//! The cluster view that sync streams serve: one in-memory snapshot of what agents may see,
//! rebuilt once per change (not once per stream), and the deltas between snapshots.
//!
//! A change costs one rebuild (a read of the store and a diff against the previous view) plus,
//! for each stream, work in proportion to the delta: a stream sends its node the shared parts
//! that changed (identities, endpoints, nodes, policies, the bundle) and only its own node's
//! entries. A stream that fell further behind than the deltas kept sends the whole state again.
//!
//! - [`ClusterView`]: a snapshot, in wire form, keyed as agents key it.
//! - [`ViewDelta`]: what changed from one snapshot to the next.
//! - [`Cursor`]: one stream's position; decides what its node gets next (pure, tested here).
//! - [`ViewFeed`]: the builder task's output that streams subscribe to.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use meshauth_datastore::{NodeName, StoreError};
use meshauth_proto::node::{
    Bundle, ClusterNode, Endpoint, Entry, Identity, PolicyDocument, SyncRemoved, SyncResponse,
};
use meshauth_telemetry::CancellationToken;
use tokio::sync::watch;

use crate::registry::{ClusterState, Registry, RegistryError};

/// How many deltas are kept for streams that are behind; further behind gets the whole state.
pub const KEPT_DELTAS: usize = 256;

/// How a node stands in the view: its stream goes on only while it is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Usable,
    Banned,
}

/// One snapshot of what agents may see, in wire form.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    revision: u64,
    bundle: Bundle,
    identities: BTreeMap<u32, Identity>,
    endpoints: BTreeMap<String, Endpoint>,
    nodes: BTreeMap<String, ClusterNode>,
    policies: BTreeMap<String, PolicyDocument>,
    /// Entries by parent SPIFFE ID, then by entry ID.
    entries: BTreeMap<String, BTreeMap<String, Entry>>,
    standing: BTreeMap<NodeName, Standing>,
}

impl ClusterView {
    /// The view of `state`, at `revision`.
    pub fn build(revision: u64, state: &ClusterState) -> ClusterView {
        let node_ids: HashMap<&NodeName, u32> = state
            .nodes
            .iter()
            .map(|n| (&n.name, n.node_id.get()))
            .collect();
        let ranges: HashMap<&NodeName, String> = state
            .node_specs
            .iter()
            .map(|s| (&s.name, s.pod_range.to_string()))
            .collect();
        let mut entries: BTreeMap<String, BTreeMap<String, Entry>> = BTreeMap::new();
        for e in &state.entries {
            entries
                .entry(e.parent_id.to_string())
                .or_default()
                .insert(e.id.to_string(), crate::node_api::entry_msg(e));
        }
        ClusterView {
            revision,
            bundle: crate::node_api::bundle_msg(&state.bundle),
            identities: state
                .identities
                .iter()
                .map(|(id, l)| (id.get(), crate::node_api::identity_msg(*id, l)))
                .collect(),
            endpoints: state
                .pods
                .iter()
                .map(|p| {
                    let node_id = node_ids.get(&p.node).copied().unwrap_or(0);
                    (
                        endpoint_key(&p.namespace, &p.name),
                        crate::node_api::endpoint_msg(p, node_id),
                    )
                })
                .collect(),
            nodes: state
                .nodes
                .iter()
                .filter(|n| !n.banned)
                .map(|n| {
                    let msg = ClusterNode {
                        name: n.name.to_string(),
                        node_id: n.node_id.get(),
                        address: n.address.map(|a| a.to_string()).unwrap_or_default(),
                        pod_range: ranges.get(&n.name).cloned().unwrap_or_default(),
                        tunnel_key: n
                            .tunnel_key
                            .map(|k| k.as_bytes().to_vec())
                            .unwrap_or_default(),
                    };
                    (msg.name.clone(), msg)
                })
                .collect(),
            policies: state
                .policies
                .iter()
                .map(|(key, yaml)| {
                    (
                        key.clone(),
                        crate::admin_api::policy_document(key.clone(), yaml.clone()),
                    )
                })
                .collect(),
            entries,
            standing: state
                .nodes
                .iter()
                .map(|n| {
                    let s = if n.banned {
                        Standing::Banned
                    } else {
                        Standing::Usable
                    };
                    (n.name.clone(), s)
                })
                .collect(),
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

    /// The whole state for the node whose SPIFFE ID is `parent`.
    fn full(&self, parent: &str) -> SyncResponse {
        SyncResponse {
            bundle: Some(self.bundle.clone()),
            entries: self
                .entries
                .get(parent)
                .map(|e| e.values().cloned().collect())
                .unwrap_or_default(),
            identities: self.identities.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            nodes: self.nodes.values().cloned().collect(),
            policies: self.policies.values().cloned().collect(),
            revision: self.revision,
            delta: false,
            base_revision: 0,
            removed: None,
        }
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
    /// What turns `old` into `new`.
    fn between(old: &BTreeMap<K, V>, new: &BTreeMap<K, V>) -> Self {
        let put = new
            .iter()
            .filter(|(k, v)| old.get(*k) != Some(*v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let removed = old
            .keys()
            .filter(|k| !new.contains_key(*k))
            .cloned()
            .collect();
        Changes { put, removed }
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
        let parents: BTreeSet<&String> = old.entries.keys().chain(new.entries.keys()).collect();
        let empty = BTreeMap::new();
        let entries = parents
            .into_iter()
            .filter_map(|p| {
                let c = Changes::between(
                    old.entries.get(p).unwrap_or(&empty),
                    new.entries.get(p).unwrap_or(&empty),
                );
                (!c.is_empty()).then(|| (p.clone(), c))
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
    /// The whole state (first message, or the stream fell behind the deltas kept).
    Full(SyncResponse),
    /// What changed since the last message.
    Delta(SyncResponse),
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
        Ok(Next::Delta(delta.message(sent)))
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

    /// Rebuilds the view on every change of `registry` until `token` is cancelled. Changes
    /// that arrive during a rebuild are taken together by the next one.
    pub async fn run(
        &self,
        registry: Arc<Registry>,
        token: CancellationToken,
    ) -> anyhow::Result<()> {
        let mut changes = registry.subscribe();
        loop {
            let revision = *changes.borrow_and_update();
            let started = Instant::now();
            let reg = Arc::clone(&registry);
            let state =
                tokio::task::spawn_blocking(move || reg.cluster_state(SystemTime::now())).await?;
            match state {
                Ok(state) => {
                    let view = ClusterView::build(revision, &state);
                    let current = Arc::clone(&self.tx.borrow());
                    let next = if current.built {
                        current.next(view)
                    } else {
                        Published::first(view)
                    };
                    self.tx.send_replace(Arc::new(next));
                    registry.metrics().view_built(started.elapsed(), revision);
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in_ms = RETRY.as_millis() as u64, "cannot read the store to rebuild the cluster view");
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
            apply(s, m);
        }
        // An entry of n2: n1's stream sends nothing.
        let mut v2 = v1.clone();
        v2.revision = 2;
        v2.entries
            .entry(N2.into())
            .or_default()
            .insert("e2".into(), entry("e2", N2));
        p = p.next(v2.clone());
        assert_eq!(c1.next(&p).expect("usable"), Next::Nothing);
        let Next::Delta(m) = c2.next(&p).expect("usable") else {
            panic!("n2 gets its entry");
        };
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
        assert_eq!(m.base_revision, 1);
        assert!(m.entries.is_empty(), "not n2's entry");
        apply(&mut s1, m);
        let Next::Delta(m) = c2.next(&p).expect("usable") else {
            panic!("n2 gets the policy");
        };
        apply(&mut s2, m);
        assert_eq!(s1.as_ref().map(|s| s.policies.len()), Some(1));
        assert_eq!(s2.as_ref().map(|s| s.entries.len()), Some(1));
        // What each agent holds equals the whole state a new stream would get.
        for (s, parent) in [(&s1, N1), (&s2, N2)] {
            let full = v3.full(parent);
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
}
