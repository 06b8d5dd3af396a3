//! The flow log: datapath verdicts and handshake events, enriched with pod names and labels,
//! kept in a bounded ring for `observe` and broadcast to followers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use meshauth_proto::agent::Flow;
use tokio::sync::broadcast;

/// How many records the ring keeps.
const RING: usize = 1000;
/// How many records a slow follower may lag before it skips ahead.
const FOLLOW_BUFFER: usize = 256;

/// The log; cheap to clone.
#[derive(Clone)]
pub struct FlowLog {
    ring: Arc<Mutex<VecDeque<Flow>>>,
    tx: broadcast::Sender<Flow>,
}

impl std::fmt::Debug for FlowLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlowLog").finish_non_exhaustive()
    }
}

impl Default for FlowLog {
    fn default() -> Self {
        FlowLog {
            // Grows as records come (an idle node keeps none).
            ring: Arc::new(Mutex::new(VecDeque::new())),
            tx: broadcast::channel(FOLLOW_BUFFER).0,
        }
    }
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl FlowLog {
    /// Appends a record (the oldest falls out of the ring) and tells followers.
    pub fn push(&self, flow: Flow) {
        {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            if ring.len() == RING {
                ring.pop_front();
            }
            // Only followers need a copy: the channel keeps what it was sent until overwritten.
            if self.tx.receiver_count() > 0 {
                let _ = self.tx.send(flow.clone());
            }
            ring.push_back(flow);
        }
    }

    /// The newest record `pred` accepts, if the ring still holds one.
    pub fn latest(&self, pred: impl Fn(&Flow) -> bool) -> Option<Flow> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter().rev().find(|f| pred(f)).cloned()
    }

    /// The records in the ring, oldest first, and a receiver for what follows.
    pub fn snapshot_and_follow(&self) -> (Vec<Flow>, broadcast::Receiver<Flow>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (ring.iter().cloned().collect(), self.tx.subscribe())
    }
}
