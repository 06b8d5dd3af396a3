//! Where a node's endpoints come from: the [`EndpointSource`] the agent is given (the lab's
//! pods; a CNI plugin later). A source reports runtime facts only (which interface, which
//! address); what a pod is (its labels, its identity) and where it may run comes from the
//! control plane, through the sync stream. The agent enforces only endpoints the control plane
//! placed on this node.

use std::net::Ipv4Addr;

use tokio::sync::watch;

/// A workload endpoint running on this node, as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalEndpoint {
    /// The pod's namespace.
    pub namespace: String,
    /// The pod's name.
    pub name: String,
    /// Its address.
    pub ipv4: Ipv4Addr,
    /// The node side of its veth.
    pub host_veth: String,
    /// That veth's index.
    pub host_ifindex: u32,
}

/// What a source reports: the endpoints on this node now, or why it cannot say.
pub type EndpointList = Result<Vec<LocalEndpoint>, String>;

/// A source of the endpoints on this node. Enforcement reconciles whenever the list changes;
/// an `Err` keeps what is enforced and makes the agent not ready, with the message.
pub trait EndpointSource: Send + 'static {
    /// Starts watching: the receiver always holds the latest list and is notified on change.
    fn watch(self: Box<Self>) -> watch::Receiver<EndpointList>;
}

/// A fixed list, for tests and for nodes whose endpoints never change.
#[derive(Debug, Clone, Default)]
pub struct StaticEndpoints(pub Vec<LocalEndpoint>);

impl EndpointSource for StaticEndpoints {
    fn watch(self: Box<Self>) -> watch::Receiver<EndpointList> {
        let (tx, rx) = watch::channel(Ok(self.0));
        // Keep the sender alive: a closed channel would read as "the source went away".
        std::mem::forget(tx);
        rx
    }
}
