//! The lab as an endpoint source for the agent: the pods `meshauth lab` placed on one node,
//! read from the lab's state file. The agent itself knows nothing of the lab.

use std::time::Duration;

use meshauth_agent::endpoints::{EndpointList, EndpointSource, LocalEndpoint};
use tokio::sync::watch;

/// How often the state file is read; the agent is told only when the pods changed.
const POLL: Duration = Duration::from_millis(200);

/// The pods of one node of a lab.
#[derive(Debug)]
pub(crate) struct LabEndpoints {
    lab: meshauth_lab::Lab,
    node: String,
}

impl LabEndpoints {
    /// The pods of lab `lab` on node `node` (e.g. `n1`).
    pub(crate) fn new(lab: &str, node: &str) -> anyhow::Result<Self> {
        Ok(LabEndpoints {
            lab: meshauth_lab::Lab::new(lab)?,
            node: node.to_owned(),
        })
    }

    fn read(&self) -> EndpointList {
        let state = self
            .lab
            .state()
            .map_err(|e| format!("reading the lab's state: {e}"))?;
        let Some(state) = state else {
            return Ok(vec![]);
        };
        state
            .pods
            .into_iter()
            .filter(|p| p.node == self.node)
            .map(|p| {
                Ok(LocalEndpoint {
                    // Namespace and name bind it to the control plane's pod; its labels are
                    // the control plane's business (`meshauth pod create`), not the node's.
                    namespace: p.namespace,
                    name: p.name,
                    ipv4: p.ip,
                    host_veth: p.host_veth,
                    host_ifindex: p.host_ifindex,
                })
            })
            .collect()
    }
}

impl EndpointSource for LabEndpoints {
    fn watch(self: Box<Self>) -> watch::Receiver<EndpointList> {
        let (tx, rx) = watch::channel(self.read());
        let spawned = std::thread::Builder::new()
            .name("meshauth-lab-source".into())
            .spawn(move || {
                while !tx.is_closed() {
                    std::thread::sleep(POLL);
                    let now = self.read();
                    tx.send_if_modified(|old| {
                        if *old == now {
                            return false;
                        }
                        *old = now;
                        true
                    });
                }
            });
        if let Err(e) = spawned {
            let (tx, rx) = watch::channel(Err(format!("cannot watch the lab: {e}")));
            std::mem::forget(tx);
            return rx;
        }
        rx
    }
}
