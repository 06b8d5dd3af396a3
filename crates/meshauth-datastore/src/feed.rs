//! What another writer changed in a shared store ([`StoreChanges`]), as the etcd change feed
//! reports it ([`crate::EtcdStore::take_changes`]), and what each etcd key means for it.
//!
//! A follower of the store (the server's cluster view) reads again only the records that
//! changed, as it does for its own writes. The meaning of a key follows the layout in the
//! [`crate::etcd`] module doc; a key that is not in that layout, or whose segments do not
//! parse, means "anything may have changed" ([`StoreChanges::Everything`]): a full re-read
//! is always correct, only slower.

use std::collections::BTreeSet;

use meshauth_policy::IdentityId;

use crate::model::{EntryId, NodeName};

/// More parts than this pending at once are taken as [`StoreChanges::Everything`] (a re-read
/// of everything is then cheaper than one of each part, and memory stays bounded).
pub(crate) const PENDING_LIMIT: usize = 100_000;

/// One record (or group of records) another writer changed: the follower reads it again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum StoreChange {
    /// The CA journal was saved (perhaps rotated).
    CaJournal,
    /// A node's record or spec changed (attested, renewed, bound, banned, evicted, new key or
    /// address).
    Node(NodeName),
    /// A pod's placement or what its node reported of it changed (or it was deleted).
    Pod {
        /// Its namespace.
        namespace: String,
        /// Its name.
        name: String,
    },
    /// An identity was allocated.
    Identity(IdentityId),
    /// A policy was put, re-keyed or deleted.
    Policies,
    /// A registration entry was created, updated or deleted.
    Entry(EntryId),
}

/// What changed since the follower last asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreChanges {
    /// Anything may have changed: read the whole store again.
    Everything,
    /// These parts changed (none: nothing the follower reads).
    Parts(BTreeSet<StoreChange>),
}

impl Default for StoreChanges {
    /// Nothing changed.
    fn default() -> Self {
        StoreChanges::Parts(BTreeSet::new())
    }
}

impl StoreChanges {
    /// Adds what one key's write means; past [`PENDING_LIMIT`] parts, everything changed.
    pub(crate) fn record(&mut self, meaning: KeyMeaning) {
        let part = match meaning {
            KeyMeaning::Nothing => return,
            KeyMeaning::Everything => {
                *self = StoreChanges::Everything;
                return;
            }
            KeyMeaning::Part(part) => part,
        };
        let StoreChanges::Parts(parts) = self else {
            return;
        };
        if parts.len() >= PENDING_LIMIT {
            *self = StoreChanges::Everything;
        } else {
            parts.insert(part);
        }
    }
}

/// What a write (put or delete) of one key means for a follower.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum KeyMeaning {
    /// This part changed.
    Part(StoreChange),
    /// Nothing a follower reads (an index, a counter, a token, the guard...).
    Nothing,
    /// Unknown: anything may have changed.
    Everything,
}

/// What the etcd key `P/<key>` means, `key` being what follows the prefix and its `/` (e.g.
/// `pods/default/web-1`). Pure; see the [`crate::etcd`] module doc for the layout.
pub(crate) fn etcd_key_meaning(key: &str) -> KeyMeaning {
    let segments: Vec<&str> = key.split('/').collect();
    meaning_of(&segments).unwrap_or(KeyMeaning::Everything)
}

/// `None` when the key is not in the layout or a segment does not parse.
fn meaning_of(segments: &[&str]) -> Option<KeyMeaning> {
    let part = |p: StoreChange| Some(KeyMeaning::Part(p));
    match segments {
        ["rev" | "layout"] => Some(KeyMeaning::Nothing),
        // Indexes and bookkeeping: the records they go with change with them (a node's
        // `tunnel_keys` key with its record, a pod's `node_pods` key with its placement...).
        [
            "tokens" | "counters" | "tunnel_keys" | "identity_labels" | "node_pods" | "pod_ips"
            | "entry_keys" | "elections",
            _,
            ..,
        ] => Some(KeyMeaning::Nothing),
        ["ca", "journal"] => part(StoreChange::CaJournal),
        ["nodes" | "specs", name] => part(StoreChange::Node(unescape(name)?.parse().ok()?)),
        ["pods", namespace, name] => part(pod(namespace, name)?),
        ["runtime", node, namespace, name] => {
            unescape(node)?.parse::<NodeName>().ok()?;
            part(pod(namespace, name)?)
        }
        ["identities", id] => {
            if id.is_empty() || !id.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            part(StoreChange::Identity(IdentityId::new(id.parse().ok()?)))
        }
        ["policies", key] => {
            unescape(key)?;
            part(StoreChange::Policies)
        }
        ["entries", id] => part(StoreChange::Entry(unescape(id)?.parse::<EntryId>().ok()?)),
        _ => None,
    }
}

/// The pod of the (escaped) segments `namespace` and `name`.
fn pod(namespace: &str, name: &str) -> Option<StoreChange> {
    Some(StoreChange::Pod {
        namespace: unescape(namespace)?,
        name: unescape(name)?,
    })
}

/// The inverse of the etcd store's segment escaping (`%` as `%25`, `/` as `%2F`): `None` for
/// any other `%` sequence.
fn unescape(segment: &str) -> Option<String> {
    let mut out = String::with_capacity(segment.len());
    let mut rest = segment;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        if let Some(r) = after.strip_prefix("%25") {
            out.push('%');
            rest = r;
        } else if let Some(r) = after.strip_prefix("%2F") {
            out.push('/');
            rest = r;
        } else {
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(p: StoreChange) -> KeyMeaning {
        KeyMeaning::Part(p)
    }

    fn node(s: &str) -> NodeName {
        s.parse().expect("node name")
    }

    fn pod_part(namespace: &str, name: &str) -> KeyMeaning {
        part(StoreChange::Pod {
            namespace: namespace.into(),
            name: name.into(),
        })
    }

    const ENTRY: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn every_record_key_names_its_part() {
        let entry: EntryId = ENTRY.parse().expect("entry id");
        for (key, want) in [
            ("ca/journal", part(StoreChange::CaJournal)),
            ("nodes/n1", part(StoreChange::Node(node("n1")))),
            ("specs/n-2.x", part(StoreChange::Node(node("n-2.x")))),
            ("pods/default/web-1", pod_part("default", "web-1")),
            ("runtime/n1/default/web-1", pod_part("default", "web-1")),
            (
                "identities/256",
                part(StoreChange::Identity(IdentityId::new(256))),
            ),
            ("policies/default%2Fallow-web", part(StoreChange::Policies)),
            (&format!("entries/{ENTRY}"), part(StoreChange::Entry(entry))),
        ] {
            assert_eq!(etcd_key_meaning(key), want, "{key}");
        }
    }

    #[test]
    fn indexes_and_bookkeeping_mean_nothing() {
        for key in [
            "rev",
            "layout",
            "tokens/ab12",
            "counters/node_id",
            "tunnel_keys/00ff",
            "identity_labels/ab12",
            "node_pods/n1/default/web-1",
            "pod_ips/10.200.1.10",
            "entry_keys/ab12",
            "elections/ca-leader/694d7c5a1b2c3d4e",
        ] {
            assert_eq!(etcd_key_meaning(key), KeyMeaning::Nothing, "{key}");
        }
    }

    #[test]
    fn escaped_segments_are_read_back() {
        assert_eq!(
            etcd_key_meaning("pods/a%2Fb/100%25"),
            pod_part("a/b", "100%")
        );
        assert_eq!(etcd_key_meaning("pods/%252F/x"), pod_part("%2F", "x"));
        assert_eq!(
            etcd_key_meaning("runtime/n1/ns/a%2F%2F"),
            pod_part("ns", "a//")
        );
        assert_eq!(unescape("plain"), Some("plain".into()));
        assert_eq!(unescape(""), Some(String::new()));
    }

    #[test]
    fn unknown_or_unparsable_keys_mean_everything() {
        for key in [
            "",
            "nodes",
            "something/new",
            "ca/other",
            "ca/journal/x",
            "rev/x",
            "tokens",
            "nodes/Bad_Name!",
            "nodes/..",
            "nodes/a/b",
            "specs/",
            "pods/default",
            "pods/default/web/extra",
            "pods/bad%41/x",
            "pods/x/bad%2f",
            "pods/x/trailing%",
            "policies/bad%",
            "policies/a/b",
            "runtime/Bad!/default/web",
            "runtime/n1/default",
            "identities/",
            "identities/x1",
            "identities/+1",
            "identities/4294967296",
            "entries/ABCDEF",
            "entries/0123",
        ] {
            assert_eq!(etcd_key_meaning(key), KeyMeaning::Everything, "{key:?}");
        }
    }

    #[test]
    fn recorded_changes_are_bounded() {
        let mut c = StoreChanges::default();
        c.record(KeyMeaning::Nothing);
        assert_eq!(c, StoreChanges::default());
        c.record(part(StoreChange::Policies));
        c.record(part(StoreChange::Policies));
        assert_eq!(
            c,
            StoreChanges::Parts([StoreChange::Policies].into_iter().collect())
        );
        c.record(KeyMeaning::Everything);
        assert_eq!(c, StoreChanges::Everything);
        c.record(part(StoreChange::CaJournal));
        assert_eq!(c, StoreChanges::Everything, "everything stays everything");

        let mut c = StoreChanges::default();
        for i in 0..u32::try_from(PENDING_LIMIT).expect("limit") {
            c.record(part(StoreChange::Identity(IdentityId::new(i))));
        }
        assert!(matches!(&c, StoreChanges::Parts(p) if p.len() == PENDING_LIMIT));
        c.record(part(StoreChange::CaJournal));
        assert_eq!(c, StoreChanges::Everything, "past the limit");
    }
}
