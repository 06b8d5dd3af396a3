//! Readiness as a set of named conditions, each ready or not ready for a stated reason.
//!
//! A process is ready when every condition it registered is ready. Conditions start not ready,
//! so a part that never reports keeps the process unready (fail closed), and `/readyz` says which
//! condition holds it back and why:
//!
//! ```
//! let readiness = meshauth_telemetry::Readiness::new();
//! let sync = readiness.register("sync");
//! assert!(!readiness.is_ready());
//! sync.set_not_ready("waiting for the first sync with the server");
//! assert_eq!(readiness.report(), "sync: waiting for the first sync with the server\n");
//! sync.set_ready();
//! assert!(readiness.is_ready());
//! ```

use std::fmt;

use tokio::sync::watch;

/// The reason a freshly registered condition is not ready.
pub const NOT_YET_REPORTED: &str = "not yet reported";

/// The readiness of a process: named conditions, shared by every clone.
///
/// Ready iff every registered condition is ready (vacuously ready with none). Conditions are
/// never removed: dropping every [`ReadyHandle`] of one leaves it as it was last set.
#[derive(Clone)]
pub struct Readiness {
    state: watch::Sender<Vec<Condition>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    name: &'static str,
    /// `None` when ready; otherwise why not.
    not_ready: Option<String>,
}

/// Sets one condition of a [`Readiness`]. Cheap to clone; every clone sets the same condition.
#[derive(Clone)]
pub struct ReadyHandle {
    readiness: Readiness,
    index: usize,
    name: &'static str,
}

impl Default for Readiness {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for Readiness {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let state = self.state.borrow();
        let mut map = f.debug_map();
        for c in state.iter() {
            map.entry(&c.name, &c.not_ready.as_deref().unwrap_or("ready"));
        }
        map.finish()
    }
}

impl fmt::Debug for ReadyHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReadyHandle")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

impl Readiness {
    /// No conditions yet: ready until one is registered.
    pub fn new() -> Self {
        Readiness {
            state: watch::Sender::new(Vec::new()),
        }
    }

    /// Registers the condition `name`, not ready ([`NOT_YET_REPORTED`]) until its handle says
    /// otherwise. Registering a name again returns a handle to the same condition and leaves its
    /// state as it is.
    pub fn register(&self, name: &'static str) -> ReadyHandle {
        let mut index = 0;
        self.state.send_if_modified(|conditions| {
            if let Some(i) = conditions.iter().position(|c| c.name == name) {
                index = i;
                return false;
            }
            index = conditions.len();
            conditions.push(Condition {
                name,
                not_ready: Some(NOT_YET_REPORTED.to_owned()),
            });
            true
        });
        ReadyHandle {
            readiness: self.clone(),
            index,
            name,
        }
    }

    /// Whether every registered condition is ready.
    pub fn is_ready(&self) -> bool {
        self.state.borrow().iter().all(|c| c.not_ready.is_none())
    }

    /// The conditions that are not ready, in registration order, with their reasons.
    pub fn not_ready(&self) -> Vec<(&'static str, String)> {
        self.state
            .borrow()
            .iter()
            .filter_map(|c| c.not_ready.clone().map(|r| (c.name, r)))
            .collect()
    }

    /// The `/readyz` body: `ready` when ready, else one `name: reason` line per condition that
    /// is not ready.
    pub fn report(&self) -> String {
        let not_ready = self.not_ready();
        if not_ready.is_empty() {
            return "ready\n".to_owned();
        }
        not_ready
            .iter()
            .map(|(name, reason)| format!("{name}: {reason}\n"))
            .collect()
    }

    /// Completes once every registered condition is ready (at once if they are).
    pub async fn wait_ready(&self) {
        let mut rx = self.state.subscribe();
        // The sender is `self`, alive for as long as this borrow: `wait_for` cannot fail.
        let _ = rx
            .wait_for(|conditions| conditions.iter().all(|c| c.not_ready.is_none()))
            .await;
    }

    fn set(&self, index: usize, not_ready: Option<String>) {
        self.state.send_if_modified(|conditions| {
            let Some(c) = conditions.get_mut(index) else {
                return false;
            };
            if c.not_ready == not_ready {
                return false;
            }
            match (&c.not_ready, &not_ready) {
                (Some(_), None) => tracing::info!(condition = c.name, "ready"),
                (None, Some(reason)) => {
                    tracing::warn!(condition = c.name, reason = %reason, "not ready");
                }
                _ => {}
            }
            c.not_ready = not_ready;
            true
        });
    }
}

impl ReadyHandle {
    /// The condition's name.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Marks the condition ready.
    pub fn set_ready(&self) {
        self.readiness.set(self.index, None);
    }

    /// Marks the condition not ready because of `reason` (kept to one line: line breaks become
    /// spaces).
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason: String = reason.into();
        let reason = if reason.contains(['\n', '\r']) {
            reason.replace(['\n', '\r'], " ")
        } else {
            reason
        };
        self.readiness.set(self.index, Some(reason));
    }

    /// Whether this condition is ready now.
    pub fn is_ready(&self) -> bool {
        self.readiness
            .state
            .borrow()
            .get(self.index)
            .is_some_and(|c| c.not_ready.is_none())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn ready_iff_every_condition_is_ready() {
        let r = Readiness::new();
        assert!(r.is_ready(), "no conditions: ready");
        let a = r.register("a");
        let b = r.register("b");
        assert!(!r.is_ready(), "new conditions start not ready");
        assert_eq!(r.report(), "a: not yet reported\nb: not yet reported\n");
        a.set_ready();
        assert!(!r.is_ready());
        assert_eq!(r.not_ready(), vec![("b", NOT_YET_REPORTED.to_owned())]);
        b.set_ready();
        assert!(r.is_ready());
        assert_eq!(r.report(), "ready\n");
        b.set_not_ready("disk\nfull");
        assert_eq!(r.report(), "b: disk full\n", "one line per condition");
        assert!(a.is_ready() && !b.is_ready());
    }

    #[test]
    fn registering_a_name_again_shares_the_condition() {
        let r = Readiness::new();
        let first = r.register("store");
        first.set_ready();
        let second = r.register("store");
        assert!(second.is_ready(), "state is kept");
        second.set_not_ready("locked");
        assert!(!first.is_ready());
        assert_eq!(r.not_ready().len(), 1);
        drop((first, second));
        assert_eq!(
            r.report(),
            "store: locked\n",
            "dropping handles changes nothing"
        );
    }

    #[tokio::test]
    async fn wait_ready_completes_when_the_last_condition_is_ready() {
        let r = Readiness::new();
        let a = r.register("a");
        let waiter = tokio::spawn({
            let r = r.clone();
            async move { r.wait_ready().await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        a.set_ready();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("wait_ready completes")
            .expect("no panic");
    }
}
