//! Policies as domain types, and parsing them from CiliumNetworkPolicy YAML.
//!
//! Wire types (serde, `deny_unknown_fields`) stay private to this module and become domain types
//! once, in [`parse_policies`]. Fields meshauth does not implement are refused with the field's
//! path and the document, never ignored.
//!
//! # Supported
//! - `CiliumNetworkPolicy` and `CiliumClusterwideNetworkPolicy`, `apiVersion: cilium.io/v2`,
//!   `spec` and `specs`; `metadata.name`, `metadata.namespace`, `metadata.labels` and
//!   `annotations` (accepted; of these meshauth reads only [`AUTH_ANNOTATION`]); `description`
//!   (free text).
//! - `endpointSelector`, `ingress`, `egress`, `ingressDeny`, `egressDeny`.
//! - Peers: `fromEndpoints`/`toEndpoints` (`matchLabels`, `matchExpressions`),
//!   `fromEntities`/`toEntities` (see [`Entity`]), `fromCIDR`/`toCIDR` (a prefix or a single
//!   address), `fromCIDRSet`/`toCIDRSet` (`cidr` with `except`), IPv4 and IPv6 (see
//!   [`crate::cidr`] for how addresses outside the cluster get identities).
//! - Ports: `toPorts` (`port`, `endPort`, `protocol` TCP, UDP, SCTP or ANY; ICMP is accepted and
//!   means every ICMP type), and `icmps` (`fields` of `type`, a number or Cilium's name, and
//!   `family` IPv4 or IPv6), not in the same rule as `toPorts` (as in Cilium). ICMP types take
//!   the place of ports in compiled entries (see [`crate::entry`]).
//! - `authentication.mode`: `required`, `disabled`, `test-always-fail`.
//! - Per-connection authentication (meshauth's own; Cilium never built it): a policy annotated
//!   `meshauth.io/authentication: per-connection` ([`AUTH_ANNOTATION`]) requires, in each of
//!   its rules with `authentication.mode: required`, a fresh authentication for every new
//!   connection instead of once per identity pair ([`AuthMode::PerConnection`]). An annotation,
//!   not a new mode value, so the same YAML still passes Cilium's CRD validation.
//!
//! Refused, with the field named: `toFQDNs`, `toServices`, `toGroups`/`fromGroups`,
//! `toRequires`/`fromRequires`, L7 `rules`, `nodeSelector`, `toNodes`/`fromNodes`,
//! `enableDefaultDeny`, `serverNames`, `listener`, TLS fields, `cidrGroupRef` and
//! `cidrGroupSelector`, named ports, and the entities meshauth has nothing for.
//!
//! # Namespaces (as in Cilium)
//! A pod's namespace is its label `io.kubernetes.pod.namespace` ([`NAMESPACE_LABEL`], added by
//! [`crate::Labels::with_namespace`]). A `CiliumNetworkPolicy` lives in its
//! `metadata.namespace` (`default` when absent, or the namespace given to
//! [`parse_policies_in`]) and applies there, exactly as Cilium translates it:
//! - its `endpointSelector` selects only pods of that namespace (the namespace label is added to
//!   it; naming another namespace there is refused, where Cilium would drop it with a warning);
//! - each `fromEndpoints`/`toEndpoints` selector, the empty one `{}` included, selects only pods
//!   of that namespace, unless the selector itself has a requirement on the namespace label
//!   (in `matchLabels` or `matchExpressions`, e.g. `k8s:io.kubernetes.pod.namespace: ns2`):
//!   then that requirement decides. A selector on Cilium's namespace labels
//!   (`io.cilium.k8s.namespace.labels.*`) is left unscoped too, as Cilium does.
//!
//! A `CiliumClusterwideNetworkPolicy` has no namespace: its `endpointSelector` is taken as
//! written (`{}` selects every endpoint), and each peer selector that does not name the
//! namespace label gets `io.kubernetes.pod.namespace Exists`, as Cilium adds, so that even `{}`
//! selects only pods (label sets with a namespace), never an identity without one.
//! Entities and CIDR peers are not namespaced.
//!
//! # Entities
//! What each entity of `fromEntities`/`toEntities` means for meshauth (details in [`Entity`]):
//! `host` is the node the endpoint runs on (its own addresses, identity 1); `remote-node` the
//! other nodes of the cluster (their addresses, identity 6); `world` everything outside the
//! cluster (identity 2 for addresses no CIDR prefix of the policies contains, and every CIDR
//! prefix identity); `cluster` every workload identity plus host, remote-node and unmanaged;
//! `unmanaged` pods the agent does not manage (identity 3); `all` any peer; `none` nothing.
//! `init`, `health`, `kube-apiserver`, `ingress`, `world-ipv4` and `world-ipv6` are refused,
//! each with the reason. Entities and CIDR peers cannot carry `authentication` (they have no
//! SPIFFE identity), except `none`.
//!
//! Policies are identified by [`PolicyKey`]: (namespace, name) for a `CiliumNetworkPolicy`
//! (`ns/name`), the name alone for a `CiliumClusterwideNetworkPolicy`, so policies of the same
//! name in two namespaces are two policies.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::cidr::{Cidr, CidrRule};
use crate::entry::{AuthType, PortRange, Protocol};
use crate::labels::{
    LabelError, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX, Operator, Requirement, Selector,
    check_namespace,
};

/// The namespace of a `CiliumNetworkPolicy` without `metadata.namespace`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a policy document is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// YAML syntax.
    #[error("document {doc}: YAML error at line {line}, column {column}: {msg}")]
    Yaml {
        /// 1-based document index.
        doc: usize,
        /// 1-based line (0 when unknown).
        line: usize,
        /// 1-based column.
        column: usize,
        /// The parser's message.
        msg: String,
    },
    /// A field or value meshauth does not accept.
    #[error("document {doc} ({name}): {path}: {msg}")]
    Field {
        /// 1-based document index.
        doc: usize,
        /// The policy's name, or `?`.
        name: String,
        /// Where, e.g. `spec.egress[0].toFQDNs`.
        path: String,
        /// What is wrong.
        msg: String,
    },
}

/// Namespaced or clusterwide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum PolicyKind {
    /// `CiliumNetworkPolicy`.
    CiliumNetworkPolicy,
    /// `CiliumClusterwideNetworkPolicy`.
    CiliumClusterwideNetworkPolicy,
}

/// What identifies a policy: (namespace, name) for a `CiliumNetworkPolicy`, the name alone for
/// a `CiliumClusterwideNetworkPolicy`. Written `namespace/name` or `name` ([`fmt::Display`],
/// [`FromStr`]); names cannot contain `/`, so the two forms never collide.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyKey {
    /// The namespace of a `CiliumNetworkPolicy`; `None` for a clusterwide policy.
    pub namespace: Option<String>,
    /// `metadata.name`.
    pub name: String,
}

impl PolicyKey {
    /// The key of a `CiliumNetworkPolicy`.
    pub fn namespaced(namespace: &str, name: &str) -> Self {
        PolicyKey {
            namespace: Some(namespace.to_owned()),
            name: name.to_owned(),
        }
    }

    /// The key of a `CiliumClusterwideNetworkPolicy`.
    pub fn clusterwide(name: &str) -> Self {
        PolicyKey {
            namespace: None,
            name: name.to_owned(),
        }
    }
}

impl fmt::Display for PolicyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.namespace {
            Some(ns) => write!(f, "{ns}/{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

impl FromStr for PolicyKey {
    type Err = String;

    /// `namespace/name` (a `CiliumNetworkPolicy`) or `name` (a clusterwide policy).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (ns, name) = match s.split_once('/') {
            Some((ns, name)) => {
                check_namespace(ns).map_err(|e| e.to_string())?;
                (Some(ns.to_owned()), name)
            }
            None => (None, s),
        };
        check_name(name).map_err(|why| format!("invalid policy key {s:?}: {why}"))?;
        Ok(PolicyKey {
            namespace: ns,
            name: name.to_owned(),
        })
    }
}

impl serde::Serialize for PolicyKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

fn check_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        Err("a policy name has 1 to 253 characters")
    } else if name.contains('/') {
        Err("a policy name cannot contain '/'")
    } else {
        Ok(())
    }
}

/// A reserved entity a rule can name, and what it stands for in meshauth.
///
/// | entity | meshauth |
/// |---|---|
/// | `all` | every peer: a wildcard, any identity |
/// | `world` | outside the cluster: [`crate::IdentityId::WORLD`] (addresses no CIDR prefix of the policies contains, the `/0` entry) and every CIDR prefix identity |
/// | `cluster` | inside the cluster: every workload identity, [`crate::IdentityId::HOST`], [`crate::IdentityId::REMOTE_NODE`] and [`crate::IdentityId::UNMANAGED`] |
/// | `host` | the node the endpoint runs on: its own addresses, [`crate::IdentityId::HOST`] |
/// | `remote-node` | the other nodes of the cluster: their addresses as the agent knows them, [`crate::IdentityId::REMOTE_NODE`] |
/// | `unmanaged` | pods the agent does not manage, [`crate::IdentityId::UNMANAGED`] |
/// | `none` | nothing (Cilium's `none`) |
///
/// Refused, with the reason: `init` (meshauth enforces only endpoints whose identity is known),
/// `health` (no health endpoints), `kube-apiserver` (its addresses are not tracked; use a CIDR),
/// `ingress` (no ingress proxy), `world-ipv4`/`world-ipv6` (one world identity for both
/// families, as Cilium without dual stack; use `world`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Entity {
    /// Everything, inside the cluster or not.
    All,
    /// Outside the cluster.
    World,
    /// The node itself.
    Host,
    /// Every endpoint of the cluster and the nodes.
    Cluster,
    /// The other nodes.
    RemoteNode,
    /// Pods the agent does not manage.
    Unmanaged,
    /// Nothing.
    None,
}

impl Entity {
    /// Cilium's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Entity::All => "all",
            Entity::World => "world",
            Entity::Host => "host",
            Entity::Cluster => "cluster",
            Entity::RemoteNode => "remote-node",
            Entity::Unmanaged => "unmanaged",
            Entity::None => "none",
        }
    }

    /// Why authentication with it can never succeed, if it cannot.
    fn unauthenticatable(self) -> Option<&'static str> {
        match self {
            Entity::World => Some("`world` has no SPIFFE identity"),
            Entity::Host => Some("`host` has no SPIFFE identity"),
            Entity::All => Some("`all` includes world and host, which have no SPIFFE identity"),
            Entity::Cluster => Some("`cluster` includes the host, which has no SPIFFE identity"),
            Entity::RemoteNode => Some("`remote-node` has no SPIFFE identity"),
            Entity::Unmanaged => Some("`unmanaged` pods have no SPIFFE identity"),
            Entity::None => None,
        }
    }
}

/// How a rule treats authentication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthMode {
    /// Not set on the rule.
    Unset,
    /// `disabled`: explicitly none.
    Disabled,
    /// `required`.
    Required,
    /// `required` in a policy annotated [`AUTH_ANNOTATION`]`: per-connection`: a fresh
    /// authentication for every new connection.
    PerConnection,
    /// `test-always-fail`.
    TestAlwaysFail,
}

impl AuthMode {
    /// The datapath requirement.
    pub fn auth_type(self) -> AuthType {
        match self {
            AuthMode::Unset | AuthMode::Disabled => AuthType::None,
            AuthMode::Required => AuthType::Required,
            AuthMode::PerConnection => AuthType::PerConnection,
            AuthMode::TestAlwaysFail => AuthType::TestAlwaysFail,
        }
    }

    /// Whether the rule set `authentication` itself (even to `disabled`): an explicit mode is
    /// never overridden by a broader rule's, an unset one inherits it.
    pub fn is_explicit(self) -> bool {
        self != AuthMode::Unset
    }
}

/// Who a rule is about.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peers {
    /// Endpoints matching any of these selectors, any of these entities, or any of these CIDR
    /// peers.
    Listed {
        /// `fromEndpoints` / `toEndpoints`, already scoped to the policy's namespace (see the
        /// module docs).
        selectors: Vec<Selector>,
        /// `fromEntities` / `toEntities`.
        entities: Vec<Entity>,
        /// `fromCIDR`/`fromCIDRSet` / `toCIDR`/`toCIDRSet`.
        cidrs: Vec<CidrRule>,
    },
    /// The rule names no peer but has ports: every peer, on those ports.
    Any,
    /// The empty rule `{}`: selects the endpoint (default deny) and allows nothing.
    Nothing,
}

/// A port and protocol of `toPorts`, or an ICMP type of `icmps`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PortProtocol {
    /// Ports (`port`..`endPort`, or any when `port` is 0 or absent); for ICMP and ICMPv6 the
    /// ICMP types: one type from `icmps`, every type from `toPorts` with `protocol: ICMP`.
    pub ports: PortRange,
    /// Protocol; `None` is ANY.
    pub protocol: Option<Protocol>,
}

/// An allow or deny rule in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerRule {
    /// The peers.
    pub peers: Peers,
    /// The ports (`toPorts`) or ICMP types (`icmps`); empty means every port and protocol.
    pub ports: Vec<PortProtocol>,
    /// Authentication (allow rules only).
    pub auth: AuthMode,
}

/// One rule of a policy: a selector and its rules per direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Endpoints it applies to; for a `CiliumNetworkPolicy`, with the namespace label added.
    pub endpoint_selector: Selector,
    /// Allowed ingress.
    pub ingress: Vec<PeerRule>,
    /// Allowed egress.
    pub egress: Vec<PeerRule>,
    /// Denied ingress.
    pub ingress_deny: Vec<PeerRule>,
    /// Denied egress.
    pub egress_deny: Vec<PeerRule>,
}

/// A parsed policy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Policy {
    /// `metadata.name`.
    pub name: String,
    /// The namespace of a `CiliumNetworkPolicy` (`metadata.namespace`, `default` when absent);
    /// `None` for a `CiliumClusterwideNetworkPolicy`.
    pub namespace: Option<String>,
    /// Which kind.
    pub kind: PolicyKind,
    /// `spec` and `specs`, in order, with namespaces applied to their selectors.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// What identifies it: `namespace/name`, or `name` for a clusterwide policy.
    pub fn key(&self) -> PolicyKey {
        PolicyKey {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
        }
    }
}

// === wire types ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireDoc {
    api_version: String,
    kind: String,
    metadata: WireMeta,
    #[serde(default)]
    #[allow(
        dead_code,
        reason = "free text; some of Cilium's own examples put it here"
    )]
    description: Option<String>,
    spec: Option<WireRule>,
    specs: Option<Vec<WireRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireMeta {
    name: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireRule {
    endpoint_selector: Option<WireSelector>,
    #[serde(default)]
    #[allow(dead_code, reason = "free text, accepted and not needed")]
    description: Option<String>,
    #[serde(default)]
    ingress: Option<Vec<WireIngress>>,
    #[serde(default)]
    egress: Option<Vec<WireEgress>>,
    #[serde(default)]
    ingress_deny: Option<Vec<WireIngress>>,
    #[serde(default)]
    egress_deny: Option<Vec<WireEgress>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireSelector {
    #[serde(default)]
    match_labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    match_expressions: Option<Vec<WireExpr>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireExpr {
    key: String,
    operator: String,
    #[serde(default)]
    values: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireIngress {
    #[serde(default)]
    from_endpoints: Option<Vec<WireSelector>>,
    #[serde(default)]
    from_entities: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDR")]
    from_cidr: Option<Vec<String>>,
    #[serde(default, rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<WireCidrRule>>,
    #[serde(default)]
    to_ports: Option<Vec<WirePortRule>>,
    #[serde(default)]
    icmps: Option<Vec<WireIcmpRule>>,
    #[serde(default)]
    authentication: Option<WireAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireEgress {
    #[serde(default)]
    to_endpoints: Option<Vec<WireSelector>>,
    #[serde(default)]
    to_entities: Option<Vec<String>>,
    #[serde(default, rename = "toCIDR")]
    to_cidr: Option<Vec<String>>,
    #[serde(default, rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<WireCidrRule>>,
    #[serde(default)]
    to_ports: Option<Vec<WirePortRule>>,
    #[serde(default)]
    icmps: Option<Vec<WireIcmpRule>>,
    #[serde(default)]
    authentication: Option<WireAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireCidrRule {
    #[serde(default)]
    cidr: Option<String>,
    #[serde(default)]
    except: Option<Vec<String>>,
    #[serde(default)]
    cidr_group_ref: Option<serde_yaml::Value>,
    #[serde(default)]
    cidr_group_selector: Option<serde_yaml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIcmpRule {
    #[serde(default)]
    fields: Option<Vec<WireIcmpField>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireIcmpField {
    #[serde(default)]
    family: Option<String>,
    #[serde(rename = "type")]
    icmp_type: serde_yaml::Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WirePortRule {
    #[serde(default)]
    ports: Option<Vec<WirePort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WirePort {
    #[serde(default)]
    port: Option<serde_yaml::Value>,
    #[serde(default)]
    end_port: Option<u32>,
    #[serde(default)]
    protocol: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireAuth {
    mode: String,
}

/// Fields that exist in Cilium's schema but not here, with what to do instead.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("toFQDNs", "DNS-based rules are not supported"),
    ("toServices", "service rules are not supported"),
    ("toGroups", "group rules are not supported"),
    ("fromGroups", "group rules are not supported"),
    ("toRequires", "requires rules are not supported"),
    ("fromRequires", "requires rules are not supported"),
    (
        "rules",
        "L7 rules are not supported; meshauth enforces L3/L4",
    ),
    ("nodeSelector", "node selectors are not supported"),
    ("toNodes", "node rules are not supported"),
    ("fromNodes", "node rules are not supported"),
    ("enableDefaultDeny", "enableDefaultDeny is not supported"),
    ("serverNames", "TLS server names are not supported"),
    ("listener", "L7 listeners are not supported"),
    ("originatingTLS", "TLS interception is not supported"),
    ("terminatingTLS", "TLS interception is not supported"),
];

/// Cilium's ICMP type names (the IANA numbers) for `family: IPv4`.
const ICMP_V4_NAMES: &[(&str, u8)] = &[
    ("EchoReply", 0),
    ("DestinationUnreachable", 3),
    ("Redirect", 5),
    ("Echo", 8),
    ("EchoRequest", 8),
    ("RouterAdvertisement", 9),
    ("RouterSelection", 10),
    ("TimeExceeded", 11),
    ("ParameterProblem", 12),
    ("Timestamp", 13),
    ("TimestampReply", 14),
    ("Photuris", 40),
    ("ExtendedEchoRequest", 42),
    ("ExtendedEchoReply", 43),
];

/// Cilium's ICMPv6 type names (the IANA numbers) for `family: IPv6`.
const ICMP_V6_NAMES: &[(&str, u8)] = &[
    ("DestinationUnreachable", 1),
    ("PacketTooBig", 2),
    ("TimeExceeded", 3),
    ("ParameterProblem", 4),
    ("EchoRequest", 128),
    ("EchoReply", 129),
    ("MulticastListenerQuery", 130),
    ("MulticastListenerReport", 131),
    ("MulticastListenerDone", 132),
    ("RouterSolicitation", 133),
    ("RouterAdvertisement", 134),
    ("NeighborSolicitation", 135),
    ("NeighborAdvertisement", 136),
    ("RedirectMessage", 137),
    ("RouterRenumbering", 138),
    ("ICMPNodeInformationQuery", 139),
    ("ICMPNodeInformationResponse", 140),
    ("InverseNeighborDiscoverySolicitation", 141),
    ("InverseNeighborDiscoveryAdvertisement", 142),
    ("HomeAgentAddressDiscoveryRequest", 144),
    ("HomeAgentAddressDiscoveryReply", 145),
    ("MobilePrefixSolicitation", 146),
    ("MobilePrefixAdvertisement", 147),
    ("DuplicateAddressRequestCodeSuffix", 157),
    ("DuplicateAddressConfirmationCodeSuffix", 158),
    ("ExtendedEchoRequest", 160),
    ("ExtendedEchoReply", 161),
];

struct Ctx {
    doc: usize,
    name: String,
    /// The policy carries [`AUTH_ANNOTATION`]`: per-connection`.
    per_connection: bool,
}

/// The annotation that makes a policy's `authentication.mode: required` rules require a fresh
/// authentication per connection: value `per-connection` (or `per-pair`, the default).
pub const AUTH_ANNOTATION: &str = "meshauth.io/authentication";

impl Ctx {
    fn err(&self, path: &str, msg: impl Into<String>) -> PolicyError {
        PolicyError::Field {
            doc: self.doc,
            name: self.name.clone(),
            path: path.to_owned(),
            msg: msg.into(),
        }
    }
}

/// Where a policy applies.
#[derive(Clone, Copy)]
enum Scope<'a> {
    /// A `CiliumNetworkPolicy` in this namespace.
    Namespace(&'a str),
    /// A `CiliumClusterwideNetworkPolicy`.
    Cluster,
}

fn selector(ctx: &Ctx, path: &str, w: WireSelector) -> Result<Selector, PolicyError> {
    let label_err = |e: LabelError| ctx.err(path, e.to_string());
    let mut match_labels = BTreeMap::new();
    for (k, v) in w.match_labels.unwrap_or_default() {
        match_labels.insert(crate::labels::check_key(&k).map_err(label_err)?, v);
    }
    let mut match_expressions = Vec::new();
    for (i, e) in w
        .match_expressions
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let p = format!("{path}.matchExpressions[{i}]");
        let op: Operator = e
            .operator
            .parse()
            .map_err(|e: LabelError| ctx.err(&p, e.to_string()))?;
        match_expressions.push(
            Requirement::new(&e.key, op, e.values.unwrap_or_default())
                .map_err(|e| ctx.err(&p, e.to_string()))?,
        );
    }
    Ok(Selector {
        match_labels,
        match_expressions,
    })
}

/// A peer selector as Cilium scopes it (see the module docs).
fn scope_peer(mut sel: Selector, scope: Scope<'_>) -> Selector {
    if sel.has_key(NAMESPACE_LABEL) {
        return sel;
    }
    match scope {
        Scope::Namespace(ns) => {
            if !sel.has_key_prefix(NAMESPACE_LABELS_PREFIX) {
                sel.match_labels
                    .insert(NAMESPACE_LABEL.to_owned(), ns.to_owned());
            }
        }
        Scope::Cluster => sel.match_expressions.push(Requirement {
            key: NAMESPACE_LABEL.to_owned(),
            operator: Operator::Exists,
            values: vec![],
        }),
    }
    sel
}

fn entity(ctx: &Ctx, path: &str, s: &str) -> Result<Entity, PolicyError> {
    let why = match s {
        "all" => return Ok(Entity::All),
        "world" => return Ok(Entity::World),
        "host" => return Ok(Entity::Host),
        "cluster" => return Ok(Entity::Cluster),
        "remote-node" => return Ok(Entity::RemoteNode),
        "unmanaged" => return Ok(Entity::Unmanaged),
        "none" => return Ok(Entity::None),
        "init" => {
            "meshauth enforces policy only on endpoints whose identity is known, so no endpoint is ever in the init state"
        }
        "health" => "meshauth runs no health endpoints",
        "kube-apiserver" => {
            "meshauth does not track the Kubernetes API server's addresses; allow them with toCIDR instead"
        }
        "ingress" => "meshauth has no ingress proxy",
        "world-ipv4" | "world-ipv6" => {
            "meshauth has one world identity for both address families (as Cilium without dual stack); use world"
        }
        other => {
            return Err(ctx.err(
                path,
                format!(
                    "entity {other:?} is unknown; use all, world, cluster, host, remote-node, unmanaged or none"
                ),
            ));
        }
    };
    Err(ctx.err(path, format!("entity {s:?} is not supported: {why}")))
}

fn auth(ctx: &Ctx, path: &str, w: Option<WireAuth>) -> Result<AuthMode, PolicyError> {
    match w.as_ref().map(|a| a.mode.as_str()) {
        None => Ok(AuthMode::Unset),
        Some("disabled") => Ok(AuthMode::Disabled),
        Some("required") if ctx.per_connection => Ok(AuthMode::PerConnection),
        Some("required") => Ok(AuthMode::Required),
        Some("test-always-fail") => Ok(AuthMode::TestAlwaysFail),
        Some(other) => Err(ctx.err(
            &format!("{path}.authentication.mode"),
            format!("{other:?} is not a mode; use required, disabled or test-always-fail"),
        )),
    }
}

fn ports(
    ctx: &Ctx,
    path: &str,
    w: Option<Vec<WirePortRule>>,
) -> Result<Vec<PortProtocol>, PolicyError> {
    let mut out = Vec::new();
    for (i, rule) in w.unwrap_or_default().into_iter().enumerate() {
        for (j, p) in rule.ports.unwrap_or_default().into_iter().enumerate() {
            let pp = format!("{path}.toPorts[{i}].ports[{j}]");
            let start: u32 = match &p.port {
                None => 0,
                Some(serde_yaml::Value::Number(n)) => {
                    n.as_u64().map(|n| n as u32).unwrap_or(u32::MAX)
                }
                Some(serde_yaml::Value::String(s)) => s.parse().map_err(|_| {
                    ctx.err(
                        &format!("{pp}.port"),
                        format!("{s:?} is not a port number (named ports are not supported)"),
                    )
                })?,
                Some(_) => u32::MAX,
            };
            if start > 65535 {
                return Err(ctx.err(&format!("{pp}.port"), "a port is a number from 0 to 65535"));
            }
            let end = p.end_port.unwrap_or(start);
            if p.end_port.is_some() && (end > 65535 || end < start) {
                return Err(ctx.err(
                    &format!("{pp}.endPort"),
                    "endPort must be between port and 65535",
                ));
            }
            let protocol = match p.protocol.as_deref() {
                None | Some("ANY") => None,
                Some(s) => Some(
                    s.parse::<Protocol>()
                        .map_err(|e| ctx.err(&format!("{pp}.protocol"), e))?,
                ),
            };
            // ICMP has no ports: `toPorts` with protocol ICMP allows every ICMP type (the port
            // is not a type; `icmps` names types).
            let ports = if start == 0 || protocol.is_some_and(Protocol::is_icmp) {
                PortRange::ANY
            } else {
                PortRange {
                    start: start as u16,
                    end: end as u16,
                }
            };
            out.push(PortProtocol { ports, protocol });
        }
    }
    Ok(out)
}

fn icmp_type(
    ctx: &Ctx,
    path: &str,
    v: &serde_yaml::Value,
    names: &[(&str, u8)],
    family: &str,
) -> Result<u8, PolicyError> {
    let range = || {
        ctx.err(
            path,
            "an ICMP type is a number from 0 to 255 or a name such as EchoRequest",
        )
    };
    match v {
        serde_yaml::Value::Number(n) => n
            .as_u64()
            .and_then(|n| u8::try_from(n).ok())
            .ok_or_else(range),
        serde_yaml::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse::<u8>().map_err(|_| range())
        }
        serde_yaml::Value::String(s) => names
            .iter()
            .find(|(n, _)| n == s)
            .map(|(_, t)| *t)
            .ok_or_else(|| {
                ctx.err(
                    path,
                    format!(
                        "{s:?} is not an ICMP type name for {family}; use a number from 0 to 255 or one of Cilium's names, e.g. EchoRequest"
                    ),
                )
            }),
        _ => Err(range()),
    }
}

fn icmps(
    ctx: &Ctx,
    path: &str,
    w: Option<Vec<WireIcmpRule>>,
) -> Result<Vec<PortProtocol>, PolicyError> {
    let mut out = Vec::new();
    for (i, rule) in w.unwrap_or_default().into_iter().enumerate() {
        let rp = format!("{path}.icmps[{i}]");
        let fields = rule.fields.unwrap_or_default();
        if fields.is_empty() {
            return Err(ctx.err(
                &rp,
                "an icmps entry needs fields, each with a type (and a family, IPv4 by default)",
            ));
        }
        for (j, f) in fields.into_iter().enumerate() {
            let fp = format!("{rp}.fields[{j}]");
            let (protocol, names, family) = match f.family.as_deref() {
                None | Some("IPv4") => (Protocol::Icmp, ICMP_V4_NAMES, "IPv4"),
                Some("IPv6") => (Protocol::Icmpv6, ICMP_V6_NAMES, "IPv6"),
                Some(other) => {
                    return Err(ctx.err(
                        &format!("{fp}.family"),
                        format!("{other:?} is not a family; use IPv4 or IPv6"),
                    ));
                }
            };
            let t = icmp_type(ctx, &format!("{fp}.type"), &f.icmp_type, names, family)?;
            out.push(PortProtocol {
                ports: PortRange::single(u16::from(t)),
                protocol: Some(protocol),
            });
        }
    }
    Ok(out)
}

fn cidr_err(ctx: &Ctx, path: &str, e: crate::cidr::CidrError) -> PolicyError {
    ctx.err(path, e.to_string())
}

fn cidr_rules(
    ctx: &Ctx,
    path: &str,
    names: &Names,
    cidr: Option<Vec<String>>,
    cidr_set: Option<Vec<WireCidrRule>>,
) -> Result<Vec<CidrRule>, PolicyError> {
    let mut out = Vec::new();
    for (i, s) in cidr.unwrap_or_default().iter().enumerate() {
        let p = format!("{path}.{}[{i}]", names.cidr);
        out.push(CidrRule {
            cidr: Cidr::parse_prefix_or_addr(s).map_err(|e| cidr_err(ctx, &p, e))?,
            except: vec![],
        });
    }
    for (i, r) in cidr_set.unwrap_or_default().into_iter().enumerate() {
        let p = format!("{path}.{}[{i}]", names.cidr_set);
        for (field, set) in [
            ("cidrGroupRef", r.cidr_group_ref.is_some()),
            ("cidrGroupSelector", r.cidr_group_selector.is_some()),
        ] {
            if set {
                return Err(ctx.err(
                    &format!("{p}.{field}"),
                    format!(
                        "field `{field}` is not supported: meshauth has no CiliumCIDRGroup objects; list the prefixes in `cidr` (with `except`) instead"
                    ),
                ));
            }
        }
        let Some(c) = r.cidr else {
            return Err(ctx.err(&p, "a CIDR set entry needs `cidr`"));
        };
        let cp = format!("{p}.cidr");
        let cidr = Cidr::parse_prefix(&c).map_err(|e| cidr_err(ctx, &cp, e))?;
        let mut except = Vec::new();
        for (j, e) in r.except.unwrap_or_default().iter().enumerate() {
            let ep = format!("{p}.except[{j}]");
            let x = Cidr::parse_prefix(e).map_err(|err| cidr_err(ctx, &ep, err))?;
            if !cidr.contains(&x) {
                return Err(ctx.err(
                    &ep,
                    format!(
                        "except {x} is not inside the cidr {cidr}; an except must be a prefix of it"
                    ),
                ));
            }
            except.push(x);
        }
        out.push(CidrRule { cidr, except });
    }
    Ok(out)
}

/// The field names of one direction.
struct Names {
    endpoints: &'static str,
    entities: &'static str,
    cidr: &'static str,
    cidr_set: &'static str,
}

const FROM: Names = Names {
    endpoints: "fromEndpoints",
    entities: "fromEntities",
    cidr: "fromCIDR",
    cidr_set: "fromCIDRSet",
};

const TO: Names = Names {
    endpoints: "toEndpoints",
    entities: "toEntities",
    cidr: "toCIDR",
    cidr_set: "toCIDRSet",
};

/// One ingress or egress rule, direction-neutral.
struct WirePeerRule {
    endpoints: Option<Vec<WireSelector>>,
    entities: Option<Vec<String>>,
    cidr: Option<Vec<String>>,
    cidr_set: Option<Vec<WireCidrRule>>,
    to_ports: Option<Vec<WirePortRule>>,
    icmps: Option<Vec<WireIcmpRule>>,
    authentication: Option<WireAuth>,
}

impl From<WireIngress> for WirePeerRule {
    fn from(w: WireIngress) -> Self {
        WirePeerRule {
            endpoints: w.from_endpoints,
            entities: w.from_entities,
            cidr: w.from_cidr,
            cidr_set: w.from_cidr_set,
            to_ports: w.to_ports,
            icmps: w.icmps,
            authentication: w.authentication,
        }
    }
}

impl From<WireEgress> for WirePeerRule {
    fn from(w: WireEgress) -> Self {
        WirePeerRule {
            endpoints: w.to_endpoints,
            entities: w.to_entities,
            cidr: w.to_cidr,
            cidr_set: w.to_cidr_set,
            to_ports: w.to_ports,
            icmps: w.icmps,
            authentication: w.authentication,
        }
    }
}

fn peer_rule(
    ctx: &Ctx,
    path: &str,
    names: &Names,
    scope: Scope<'_>,
    w: WirePeerRule,
    is_deny: bool,
) -> Result<PeerRule, PolicyError> {
    let has_peers =
        w.endpoints.is_some() || w.entities.is_some() || w.cidr.is_some() || w.cidr_set.is_some();
    if w.to_ports.is_some() && w.icmps.is_some() {
        return Err(ctx.err(
            path,
            "icmps and toPorts cannot be in the same rule (as in Cilium); put them in separate rules",
        ));
    }
    let has_ports = w.to_ports.is_some() || w.icmps.is_some();
    let mut sels = Vec::new();
    for (i, s) in w.endpoints.unwrap_or_default().into_iter().enumerate() {
        let sel = selector(ctx, &format!("{path}.{}[{i}]", names.endpoints), s)?;
        sels.push(scope_peer(sel, scope));
    }
    let mut ents = Vec::new();
    for (i, e) in w.entities.unwrap_or_default().iter().enumerate() {
        ents.push(entity(ctx, &format!("{path}.{}[{i}]", names.entities), e)?);
    }
    let cidrs = cidr_rules(ctx, path, names, w.cidr, w.cidr_set)?;
    let auth = auth(ctx, path, w.authentication)?;
    if is_deny && auth != AuthMode::Unset {
        return Err(ctx.err(path, "deny rules cannot carry authentication"));
    }
    if matches!(auth, AuthMode::Required | AuthMode::TestAlwaysFail) {
        if let Some((e, why)) = ents
            .iter()
            .find_map(|e| e.unauthenticatable().map(|why| (e, why)))
        {
            return Err(ctx.err(
                path,
                format!(
                    "authentication with the {} entity can never succeed ({why}): traffic would be \
                     dropped forever; drop `authentication` or name endpoints \
                     (fromEndpoints/toEndpoints) instead",
                    e.name()
                ),
            ));
        }
        if !cidrs.is_empty() {
            return Err(ctx.err(
                path,
                "authentication with CIDR peers can never succeed (addresses outside the cluster \
                 have no SPIFFE identity): traffic would be dropped forever; drop \
                 `authentication` or name endpoints (fromEndpoints/toEndpoints) instead",
            ));
        }
        if !has_peers {
            return Err(ctx.err(
                path,
                "a rule requiring authentication must name its peers (fromEndpoints/toEndpoints): \
                 unlisted peers include world and host, which cannot authenticate",
            ));
        }
    }
    let peers = if has_peers {
        Peers::Listed {
            selectors: sels,
            entities: ents,
            cidrs,
        }
    } else if has_ports {
        Peers::Any
    } else {
        Peers::Nothing
    };
    let mut port_list = ports(ctx, path, w.to_ports)?;
    port_list.extend(icmps(ctx, path, w.icmps)?);
    Ok(PeerRule {
        peers,
        ports: port_list,
        auth,
    })
}

fn rule(ctx: &Ctx, path: &str, scope: Scope<'_>, w: WireRule) -> Result<Rule, PolicyError> {
    let sel = w
        .endpoint_selector
        .ok_or_else(|| ctx.err(path, "endpointSelector is required"))?;
    let sel_path = format!("{path}.endpointSelector");
    let mut endpoint_selector = selector(ctx, &sel_path, sel)?;
    if let Scope::Namespace(ns) = scope {
        if let Some(other) = endpoint_selector.match_labels.get(NAMESPACE_LABEL)
            && other != ns
        {
            return Err(ctx.err(
                &sel_path,
                format!(
                    "a CiliumNetworkPolicy applies in its own namespace {ns:?}, so its endpointSelector cannot select namespace {other:?}; drop the namespace label or use a CiliumClusterwideNetworkPolicy"
                ),
            ));
        }
        endpoint_selector
            .match_labels
            .insert(NAMESPACE_LABEL.to_owned(), ns.to_owned());
    }
    let mut out = Rule {
        endpoint_selector,
        ingress: vec![],
        egress: vec![],
        ingress_deny: vec![],
        egress_deny: vec![],
    };
    for (name, list, deny) in [
        ("ingress", w.ingress, false),
        ("ingressDeny", w.ingress_deny, true),
    ] {
        for (i, r) in list.unwrap_or_default().into_iter().enumerate() {
            let p = format!("{path}.{name}[{i}]");
            let pr = peer_rule(ctx, &p, &FROM, scope, r.into(), deny)?;
            if deny {
                &mut out.ingress_deny
            } else {
                &mut out.ingress
            }
            .push(pr);
        }
    }
    for (name, list, deny) in [
        ("egress", w.egress, false),
        ("egressDeny", w.egress_deny, true),
    ] {
        for (i, r) in list.unwrap_or_default().into_iter().enumerate() {
            let p = format!("{path}.{name}[{i}]");
            let pr = peer_rule(ctx, &p, &TO, scope, r.into(), deny)?;
            if deny {
                &mut out.egress_deny
            } else {
                &mut out.egress
            }
            .push(pr);
        }
    }
    Ok(out)
}

fn unknown_field_message(msg: &str) -> String {
    for (field, why) in UNSUPPORTED {
        if msg.contains(&format!("unknown field `{field}`")) {
            return format!("field `{field}` is not supported: {why}");
        }
    }
    // serde: "unknown field `x`, expected one of ..." — keep the first clause and the list.
    msg.split(" at line ").next().unwrap_or(msg).to_owned()
}

/// Parses a multi-document YAML stream of CiliumNetworkPolicy and
/// CiliumClusterwideNetworkPolicy objects. Empty documents are skipped. A
/// `CiliumNetworkPolicy` without `metadata.namespace` is in namespace `default`.
pub fn parse_policies(text: &str) -> Result<Vec<Policy>, PolicyError> {
    parse_policies_in(text, DEFAULT_NAMESPACE)
}

/// As [`parse_policies`], with `namespace` for the `CiliumNetworkPolicy` documents that have no
/// `metadata.namespace` (as `kubectl apply -n <namespace>` does); documents that name theirs
/// keep it.
pub fn parse_policies_in(text: &str, namespace: &str) -> Result<Vec<Policy>, PolicyError> {
    let mut out = Vec::new();
    for (i, de) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let doc = i + 1;
        // First as a generic value: syntax errors and empty documents.
        let value = match serde_yaml::Value::deserialize(de) {
            Ok(v) => v,
            Err(e) => {
                let (line, column) = e
                    .location()
                    .map(|l| (l.line(), l.column()))
                    .unwrap_or((0, 0));
                return Err(PolicyError::Yaml {
                    doc,
                    line,
                    column,
                    msg: e
                        .to_string()
                        .split(" at line ")
                        .next()
                        .unwrap_or("")
                        .to_owned(),
                });
            }
        };
        if value.is_null() {
            continue;
        }
        let name = value
            .get("metadata")
            .and_then(|m| m.get("name"))
            .and_then(|n| n.as_str())
            .unwrap_or("?")
            .to_owned();
        let mut ctx = Ctx {
            doc,
            name,
            per_connection: false,
        };
        let wire: WireDoc = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            ctx.err(&path, unknown_field_message(&e.inner().to_string()))
        })?;
        if wire.api_version != "cilium.io/v2" {
            return Err(ctx.err(
                "apiVersion",
                format!("{:?} is not supported; use cilium.io/v2", wire.api_version),
            ));
        }
        let kind = match wire.kind.as_str() {
            "CiliumNetworkPolicy" => PolicyKind::CiliumNetworkPolicy,
            "CiliumClusterwideNetworkPolicy" => PolicyKind::CiliumClusterwideNetworkPolicy,
            other => {
                return Err(ctx.err(
                    "kind",
                    format!("{other:?} is not supported; use CiliumNetworkPolicy or CiliumClusterwideNetworkPolicy"),
                ));
            }
        };
        check_name(&wire.metadata.name).map_err(|why| ctx.err("metadata.name", why))?;
        let policy_namespace = match (kind, wire.metadata.namespace) {
            (PolicyKind::CiliumNetworkPolicy, ns) => {
                let (ns, given) = match ns {
                    Some(ns) => (ns, true),
                    None => (namespace.to_owned(), false),
                };
                check_namespace(&ns).map_err(|e| {
                    ctx.err(
                        "metadata.namespace",
                        if given {
                            e.to_string()
                        } else {
                            format!("the default namespace is not valid: {e}")
                        },
                    )
                })?;
                Some(ns)
            }
            (PolicyKind::CiliumClusterwideNetworkPolicy, None) => None,
            (PolicyKind::CiliumClusterwideNetworkPolicy, Some(_)) => {
                return Err(ctx.err(
                    "metadata.namespace",
                    "a CiliumClusterwideNetworkPolicy has no namespace; remove metadata.namespace or use a CiliumNetworkPolicy",
                ));
            }
        };
        let _ = &wire.metadata.labels;
        match wire
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(AUTH_ANNOTATION))
            .map(String::as_str)
        {
            None | Some("per-pair") => {}
            Some("per-connection") => ctx.per_connection = true,
            Some(other) => {
                return Err(ctx.err(
                    &format!("metadata.annotations.{AUTH_ANNOTATION}"),
                    format!("{other:?} is not a value; use per-connection or per-pair"),
                ));
            }
        }
        let scope = match &policy_namespace {
            Some(ns) => Scope::Namespace(ns),
            None => Scope::Cluster,
        };
        let mut rules = Vec::new();
        if let Some(spec) = wire.spec {
            rules.push(rule(&ctx, "spec", scope, spec)?);
        }
        for (j, spec) in wire.specs.unwrap_or_default().into_iter().enumerate() {
            rules.push(rule(&ctx, &format!("specs[{j}]"), scope, spec)?);
        }
        if rules.is_empty() {
            return Err(ctx.err("spec", "a policy needs spec or specs"));
        }
        out.push(Policy {
            name: wire.metadata.name,
            namespace: policy_namespace,
            kind,
            rules,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_keys_round_trip() {
        let k = PolicyKey::namespaced("ns1", "isolate-ns1");
        assert_eq!(k.to_string(), "ns1/isolate-ns1");
        assert_eq!("ns1/isolate-ns1".parse::<PolicyKey>().unwrap(), k);
        let c = PolicyKey::clusterwide("deny-ssh");
        assert_eq!(c.to_string(), "deny-ssh");
        assert_eq!("deny-ssh".parse::<PolicyKey>().unwrap(), c);
        assert!("Bad_NS/x".parse::<PolicyKey>().is_err());
        assert!("ns/".parse::<PolicyKey>().is_err());
        assert!("a/b/c".parse::<PolicyKey>().is_err());
        assert!(c < k, "clusterwide policies sort first");
    }
}
