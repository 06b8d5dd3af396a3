//! Numeric identities for label sets.
//!
//! Reserved (below [`IdentityId::FIRST_ALLOCATED`] = 256): 0 unknown, 1 host, 2 world,
//! 3 unmanaged, 6 remote-node. Every distinct label set gets the next free number from 256 on
//! and keeps it: the allocator is restored from the pairs the server stored, so numbers are
//! stable across restarts and deterministic for a given history. Label-set identities stay
//! below [`IdentityId::FIRST_LOCAL`] (16,777,216): the numbers from there on are node-local
//! (CIDR prefixes, [`crate::cidr::CidrIdentities`]).
//!
//! The namespace is part of a pod's label set (`io.kubernetes.pod.namespace=<ns>`, see
//! [`Labels::with_namespace`]), so the same labels in two namespaces are two identities.

use std::collections::BTreeMap;

use crate::IdentityId;
use crate::labels::Labels;

/// Hands out identities.
#[derive(Debug, Clone, Default)]
pub struct IdentityAllocator {
    by_labels: BTreeMap<Labels, IdentityId>,
    next: u32,
}

/// Why a restore failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocatorError {
    /// A stored number is in the reserved range.
    #[error("identity {0} is reserved; allocated identities start at 256")]
    Reserved(IdentityId),
    /// Two label sets share a number.
    #[error("identity {0} is stored twice")]
    Duplicate(IdentityId),
    /// A stored number is at or above [`IdentityId::FIRST_LOCAL`] (node-local numbers).
    #[error("identity {0} is not below 16777216, where node-local identities start")]
    Local(IdentityId),
    /// No numbers left.
    #[error("no identity numbers left")]
    Exhausted,
}

impl IdentityAllocator {
    /// An empty allocator.
    pub fn new() -> Self {
        IdentityAllocator {
            by_labels: BTreeMap::new(),
            next: IdentityId::FIRST_ALLOCATED,
        }
    }

    /// Restores from stored pairs.
    pub fn restore(
        pairs: impl IntoIterator<Item = (Labels, IdentityId)>,
    ) -> Result<Self, AllocatorError> {
        let mut a = Self::new();
        let mut seen = std::collections::BTreeSet::new();
        for (labels, id) in pairs {
            if id.is_reserved() {
                return Err(AllocatorError::Reserved(id));
            }
            if id.get() >= IdentityId::FIRST_LOCAL {
                return Err(AllocatorError::Local(id));
            }
            if !seen.insert(id) {
                return Err(AllocatorError::Duplicate(id));
            }
            a.next = a.next.max(id.get().saturating_add(1));
            a.by_labels.insert(labels, id);
        }
        Ok(a)
    }

    /// The identity of `labels`, allocating one if new. Returns it and whether it is new.
    pub fn allocate(&mut self, labels: &Labels) -> Result<(IdentityId, bool), AllocatorError> {
        if let Some(id) = self.by_labels.get(labels) {
            return Ok((*id, false));
        }
        if self.next >= IdentityId::FIRST_LOCAL {
            return Err(AllocatorError::Exhausted);
        }
        let id = IdentityId::new(self.next);
        self.next += 1;
        self.by_labels.insert(labels.clone(), id);
        Ok((id, true))
    }

    /// The identity of `labels`, if allocated.
    pub fn get(&self, labels: &Labels) -> Option<IdentityId> {
        self.by_labels.get(labels).copied()
    }

    /// Every allocation.
    pub fn iter(&self) -> impl Iterator<Item = (&Labels, IdentityId)> {
        self.by_labels.iter().map(|(l, id)| (l, *id))
    }
}

/// The SPIFFE ID path of an identity: `/identity/<id>`.
pub fn spiffe_path(id: IdentityId) -> String {
    format!("/identity/{id}")
}

/// The SPIFFE ID of an identity in a trust domain: `spiffe://<trust_domain>/identity/<id>`.
/// The trust domain is taken as given (the spiffe crate validates it).
pub fn spiffe_id(trust_domain: &str, id: IdentityId) -> String {
    format!("spiffe://{trust_domain}{}", spiffe_path(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stable_and_restorable() {
        let mut a = IdentityAllocator::new();
        let web: Labels = "app=web".parse().unwrap();
        let db: Labels = "app=db".parse().unwrap();
        let (w, new) = a.allocate(&web).unwrap();
        assert!(new && w == IdentityId::new(256));
        assert_eq!(a.allocate(&web).unwrap(), (w, false));
        let (d, _) = a.allocate(&db).unwrap();
        assert_eq!(d, IdentityId::new(257));
        // Same labels written with a source prefix are the same set.
        assert_eq!(a.get(&"k8s:app=web".parse().unwrap()), Some(w));

        let mut b = IdentityAllocator::restore(a.iter().map(|(l, id)| (l.clone(), id))).unwrap();
        assert_eq!(b.get(&db), Some(d));
        assert_eq!(
            b.allocate(&"app=x".parse().unwrap()).unwrap().0,
            IdentityId::new(258)
        );
        assert!(IdentityAllocator::restore([(web.clone(), IdentityId::new(2))]).is_err());
        assert!(
            IdentityAllocator::restore([
                (web.clone(), IdentityId::new(300)),
                (db.clone(), IdentityId::new(300))
            ])
            .is_err()
        );
        // The node-local range is never stored nor handed out.
        assert_eq!(
            IdentityAllocator::restore([(web.clone(), IdentityId::new(IdentityId::FIRST_LOCAL))])
                .unwrap_err(),
            AllocatorError::Local(IdentityId::new(1 << 24))
        );
        let mut full =
            IdentityAllocator::restore([(web, IdentityId::new(IdentityId::FIRST_LOCAL - 1))])
                .unwrap();
        assert_eq!(full.allocate(&db).unwrap_err(), AllocatorError::Exhausted);
        assert_eq!(spiffe_path(w), "/identity/256");
        assert_eq!(
            spiffe_id("example.org", d),
            "spiffe://example.org/identity/257"
        );
    }
}
