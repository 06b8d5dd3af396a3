//! The agent's end of the sync stream: the server sends the whole state first, then deltas
//! (see `SyncResponse` in node.proto); this keeps the whole state and brings it up to date, so
//! that the rest of the agent always works from the whole state. A whole state sent in pages
//! is put together first: the agent acts on none of it before its last page.

use std::collections::BTreeMap;

use meshauth_proto::node::SyncResponse;

/// A message that does not fit what the agent holds; the stream is dropped and the next one
/// starts from the whole state.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SyncError {
    /// A delta arrived before any whole state.
    #[error("the server sent a sync delta before the whole state; reconnecting")]
    DeltaFirst,
    /// A delta for another revision than the one held.
    #[error(
        "the server sent a sync delta for revision {base}, but this agent holds revision {held}; reconnecting"
    )]
    WrongBase {
        /// The revision the delta applies to.
        base: u64,
        /// The revision held.
        held: u64,
    },
}

/// The whole state as of the last message of the current stream.
#[derive(Debug, Default)]
pub struct SyncState {
    held: Option<SyncResponse>,
    /// The pages of a whole state that has not arrived in full yet.
    arriving: Option<SyncResponse>,
}

impl SyncState {
    /// Takes `msg` (the whole state or a page of it, or a delta against what is held) and
    /// returns the whole state after it; `None` while the pages of a whole state are still
    /// arriving (what was held before stays in force until then).
    pub fn absorb(&mut self, msg: SyncResponse) -> Result<Option<&SyncResponse>, SyncError> {
        if !msg.delta {
            if msg.more {
                self.arriving = Some(msg);
                return Ok(None);
            }
            self.arriving = None;
            return Ok(Some(self.held.insert(msg)));
        }
        if let Some(arriving) = self.arriving.as_mut() {
            let more = msg.more;
            apply(arriving, msg)?;
            if more {
                return Ok(None);
            }
            let mut whole = self.arriving.take().unwrap_or_default();
            whole.more = false;
            return Ok(Some(self.held.insert(whole)));
        }
        let held = self.held.as_mut().ok_or(SyncError::DeltaFirst)?;
        apply(held, msg)?;
        Ok(Some(held))
    }
}

/// Applies the delta `msg` to `held`, if it applies to `held`'s revision.
fn apply(held: &mut SyncResponse, msg: SyncResponse) -> Result<(), SyncError> {
    if held.revision != msg.base_revision {
        return Err(SyncError::WrongBase {
            base: msg.base_revision,
            held: held.revision,
        });
    }
    let removed = msg.removed.unwrap_or_default();
    merge(&mut held.entries, msg.entries, &removed.entries, |e| {
        e.id.clone()
    });
    merge(
        &mut held.identities,
        msg.identities,
        &removed.identities,
        |i| i.id,
    );
    merge(
        &mut held.endpoints,
        msg.endpoints,
        &removed.endpoints,
        |e| format!("{}/{}", e.namespace, e.name),
    );
    merge(&mut held.nodes, msg.nodes, &removed.nodes, |n| {
        n.name.clone()
    });
    merge(&mut held.policies, msg.policies, &removed.policies, |p| {
        p.name.clone()
    });
    if msg.bundle.is_some() {
        held.bundle = msg.bundle;
    }
    held.revision = msg.revision;
    Ok(())
}

/// `held` without the items whose key is in `removed`, with `put` replacing the items of the
/// same key; sorted by key.
fn merge<T, K: Ord>(held: &mut Vec<T>, put: Vec<T>, removed: &[K], key: impl Fn(&T) -> K) {
    let mut by_key: BTreeMap<K, T> = std::mem::take(held)
        .into_iter()
        .map(|t| (key(&t), t))
        .collect();
    for k in removed {
        by_key.remove(k);
    }
    for t in put {
        by_key.insert(key(&t), t);
    }
    *held = by_key.into_values().collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use meshauth_proto::node::{Bundle, Endpoint, PolicyDocument, SyncRemoved};

    fn policy(name: &str, yaml: &str) -> PolicyDocument {
        PolicyDocument {
            name: name.into(),
            yaml: yaml.into(),
            namespace: String::new(),
        }
    }

    fn pod(ns: &str, name: &str, ip: &str) -> Endpoint {
        Endpoint {
            namespace: ns.into(),
            name: name.into(),
            ipv4: ip.into(),
            ..Endpoint::default()
        }
    }

    fn full() -> SyncResponse {
        SyncResponse {
            bundle: Some(Bundle {
                sequence: 1,
                ..Bundle::default()
            }),
            policies: vec![policy("a", "1"), policy("b", "1")],
            endpoints: vec![
                pod("default", "x", "10.0.0.1"),
                pod("prod", "x", "10.0.0.2"),
            ],
            revision: 3,
            ..SyncResponse::default()
        }
    }

    #[test]
    fn a_delta_replaces_adds_and_removes_by_key_and_keeps_the_bundle_when_absent() {
        let mut s = SyncState::default();
        s.absorb(full()).expect("whole state");
        let delta = SyncResponse {
            policies: vec![policy("b", "2"), policy("c", "1")],
            endpoints: vec![pod("prod", "x", "10.0.0.9")],
            revision: 7,
            delta: true,
            base_revision: 3,
            removed: Some(SyncRemoved {
                policies: vec!["a".into()],
                endpoints: vec!["default/x".into()],
                ..SyncRemoved::default()
            }),
            ..SyncResponse::default()
        };
        let held = s
            .absorb(delta)
            .expect("applies to revision 3")
            .expect("nothing arriving");
        assert_eq!(held.policies, vec![policy("b", "2"), policy("c", "1")]);
        assert_eq!(held.endpoints, vec![pod("prod", "x", "10.0.0.9")]);
        assert_eq!(held.bundle.as_ref().map(|b| b.sequence), Some(1));
        assert_eq!(held.revision, 7);
    }

    #[test]
    fn a_delta_for_another_revision_or_before_the_whole_state_is_refused() {
        let mut s = SyncState::default();
        let delta = SyncResponse {
            delta: true,
            base_revision: 3,
            revision: 4,
            ..SyncResponse::default()
        };
        assert_eq!(s.absorb(delta.clone()), Err(SyncError::DeltaFirst));
        s.absorb(SyncResponse {
            revision: 2,
            ..full()
        })
        .expect("whole state");
        assert_eq!(
            s.absorb(delta).map(|h| h.map(|h| h.revision)),
            Err(SyncError::WrongBase { base: 3, held: 2 })
        );
    }

    #[test]
    fn a_whole_state_replaces_everything_held() {
        let mut s = SyncState::default();
        s.absorb(full()).expect("whole state");
        let next = SyncResponse {
            policies: vec![policy("z", "1")],
            revision: 1,
            ..SyncResponse::default()
        };
        let held = s.absorb(next.clone()).expect("whole state");
        assert_eq!(held, Some(&next));
    }

    #[test]
    fn a_whole_state_in_pages_counts_once_its_last_page_arrived() {
        let mut s = SyncState::default();
        s.absorb(full()).expect("whole state");
        let page = |endpoints: Vec<Endpoint>, more: bool| SyncResponse {
            endpoints,
            revision: 9,
            delta: true,
            base_revision: 9,
            more,
            ..SyncResponse::default()
        };
        let first = SyncResponse {
            policies: vec![policy("z", "1")],
            endpoints: vec![pod("a", "1", "10.0.1.1")],
            revision: 9,
            more: true,
            ..SyncResponse::default()
        };
        assert_eq!(s.absorb(first), Ok(None), "first page");
        assert_eq!(
            s.absorb(page(vec![pod("a", "2", "10.0.1.2")], true)),
            Ok(None),
            "a middle page"
        );
        let held = s
            .absorb(page(vec![pod("a", "3", "10.0.1.3")], false))
            .expect("last page")
            .expect("the whole state");
        assert_eq!(held.revision, 9);
        assert!(!held.more && !held.delta);
        assert_eq!(held.policies, vec![policy("z", "1")]);
        assert_eq!(
            held.endpoints,
            vec![
                pod("a", "1", "10.0.1.1"),
                pod("a", "2", "10.0.1.2"),
                pod("a", "3", "10.0.1.3")
            ],
            "every page's endpoints, and none of the state before"
        );
        // Deltas go on from there.
        let delta = SyncResponse {
            delta: true,
            base_revision: 9,
            revision: 10,
            policies: vec![policy("y", "1")],
            ..SyncResponse::default()
        };
        let held = s.absorb(delta).expect("applies").expect("nothing arriving");
        assert_eq!(held.policies.len(), 2);
    }

    #[test]
    fn a_page_for_another_revision_is_refused() {
        let mut s = SyncState::default();
        let first = SyncResponse {
            revision: 9,
            more: true,
            ..full()
        };
        assert_eq!(s.absorb(first), Ok(None));
        let stray = SyncResponse {
            delta: true,
            base_revision: 8,
            revision: 9,
            ..SyncResponse::default()
        };
        assert_eq!(
            s.absorb(stray).map(|h| h.cloned()),
            Err(SyncError::WrongBase { base: 8, held: 9 })
        );
    }
}
