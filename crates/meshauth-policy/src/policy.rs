//! Policies as domain types, and parsing them from CiliumNetworkPolicy YAML.
//!
//! Wire types (serde, `deny_unknown_fields`) stay private to this module and become domain types
//! once, in [`parse_policies`]. Fields meshauth does not implement are refused with the field's
//! path and the document, never ignored.
//!
//! Namespaces: meshauth workloads carry plain label sets, with no implicit namespace label, so
//! `metadata.namespace` (like `metadata.labels` and `annotations`) is accepted and does not
//! scope the policy: a `CiliumNetworkPolicy` selects and allows exactly what its selectors say,
//! as a `CiliumClusterwideNetworkPolicy` would. To scope by namespace, put the namespace label
//! (e.g. `io.kubernetes.pod.namespace`) in the selectors and on the workloads. Policies are
//! identified by `metadata.name` alone.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::entry::{AuthType, PortRange, Protocol};
use crate::labels::{LabelError, Operator, Requirement, Selector};

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

/// A reserved entity a rule can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Entity {
    /// Everything, inside the cluster or not.
    All,
    /// Outside the cluster.
    World,
    /// The node itself.
    Host,
    /// Every endpoint of the cluster and the hosts.
    Cluster,
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
    /// `test-always-fail`.
    TestAlwaysFail,
}

impl AuthMode {
    /// The datapath requirement.
    pub fn auth_type(self) -> AuthType {
        match self {
            AuthMode::Unset | AuthMode::Disabled => AuthType::None,
            AuthMode::Required => AuthType::Required,
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
    /// Endpoints matching any of these selectors, or any of these entities.
    Listed {
        /// `fromEndpoints` / `toEndpoints`.
        selectors: Vec<Selector>,
        /// `fromEntities` / `toEntities`.
        entities: Vec<Entity>,
    },
    /// The rule names no peer but has ports: every peer, on those ports.
    Any,
    /// The empty rule `{}`: selects the endpoint (default deny) and allows nothing.
    Nothing,
}

/// A port and protocol of `toPorts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct PortProtocol {
    /// Ports (`port`..`endPort`, or any when `port` is 0 or absent).
    pub ports: PortRange,
    /// Protocol; `None` is ANY.
    pub protocol: Option<Protocol>,
}

/// An allow or deny rule in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PeerRule {
    /// The peers.
    pub peers: Peers,
    /// The ports; empty means every port and protocol.
    pub ports: Vec<PortProtocol>,
    /// Authentication (allow rules only).
    pub auth: AuthMode,
}

/// One rule of a policy: a selector and its rules per direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Endpoints it applies to.
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
    /// Which kind.
    pub kind: PolicyKind,
    /// `spec` and `specs`, in order.
    pub rules: Vec<Rule>,
}

// === wire types ===

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct WireDoc {
    api_version: String,
    kind: String,
    metadata: WireMeta,
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
    #[serde(default)]
    to_ports: Option<Vec<WirePortRule>>,
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
    #[serde(default)]
    to_ports: Option<Vec<WirePortRule>>,
    #[serde(default)]
    authentication: Option<WireAuth>,
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
    ("toCIDR", "CIDR rules are not supported"),
    ("toCIDRSet", "CIDR rules are not supported"),
    ("fromCIDR", "CIDR rules are not supported"),
    ("fromCIDRSet", "CIDR rules are not supported"),
    ("toServices", "service rules are not supported"),
    ("toGroups", "group rules are not supported"),
    ("fromGroups", "group rules are not supported"),
    ("toRequires", "requires rules are not supported"),
    ("fromRequires", "requires rules are not supported"),
    (
        "icmps",
        "ICMP type rules are not supported; use toPorts with protocol ICMP",
    ),
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

struct Ctx {
    doc: usize,
    name: String,
}

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

fn entity(ctx: &Ctx, path: &str, s: &str) -> Result<Entity, PolicyError> {
    match s {
        "all" => Ok(Entity::All),
        "world" => Ok(Entity::World),
        "host" => Ok(Entity::Host),
        "cluster" => Ok(Entity::Cluster),
        other => Err(ctx.err(
            path,
            format!("entity {other:?} is not supported; use all, world, host or cluster"),
        )),
    }
}

fn auth(ctx: &Ctx, path: &str, w: Option<WireAuth>) -> Result<AuthMode, PolicyError> {
    match w.as_ref().map(|a| a.mode.as_str()) {
        None => Ok(AuthMode::Unset),
        Some("disabled") => Ok(AuthMode::Disabled),
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
            let ports = if start == 0 {
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

#[allow(
    clippy::too_many_arguments,
    reason = "one call per direction; a struct would only rename them"
)]
fn peer_rule(
    ctx: &Ctx,
    path: &str,
    names: (&str, &str),
    endpoints: Option<Vec<WireSelector>>,
    entities: Option<Vec<String>>,
    to_ports: Option<Vec<WirePortRule>>,
    authentication: Option<WireAuth>,
    is_deny: bool,
) -> Result<PeerRule, PolicyError> {
    let has_peers = endpoints.is_some() || entities.is_some();
    let has_ports = to_ports.is_some();
    let mut sels = Vec::new();
    for (i, s) in endpoints.unwrap_or_default().into_iter().enumerate() {
        sels.push(selector(ctx, &format!("{path}.{}[{i}]", names.0), s)?);
    }
    let mut ents = Vec::new();
    for (i, e) in entities.unwrap_or_default().iter().enumerate() {
        ents.push(entity(ctx, &format!("{path}.{}[{i}]", names.1), e)?);
    }
    let auth = auth(ctx, path, authentication)?;
    if is_deny && auth != AuthMode::Unset {
        return Err(ctx.err(path, "deny rules cannot carry authentication"));
    }
    if matches!(auth, AuthMode::Required | AuthMode::TestAlwaysFail) {
        if let Some(e) = ents.iter().find(|e| {
            matches!(
                e,
                Entity::World | Entity::Host | Entity::All | Entity::Cluster
            )
        }) {
            let why = match e {
                Entity::World => "`world` has no SPIFFE identity",
                Entity::Host => "`host` has no SPIFFE identity",
                Entity::All => "`all` includes world and host, which have no SPIFFE identity",
                Entity::Cluster => "`cluster` includes the host, which has no SPIFFE identity",
            };
            return Err(ctx.err(
                path,
                format!(
                    "authentication with the {} entity can never succeed ({why}): traffic would be \
                     dropped forever; drop `authentication` or name endpoints \
                     (fromEndpoints/toEndpoints) instead",
                    format!("{e:?}").to_lowercase()
                ),
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
        }
    } else if has_ports {
        Peers::Any
    } else {
        Peers::Nothing
    };
    Ok(PeerRule {
        peers,
        ports: ports(ctx, path, to_ports)?,
        auth,
    })
}

fn rule(ctx: &Ctx, path: &str, w: WireRule) -> Result<Rule, PolicyError> {
    let sel = w
        .endpoint_selector
        .ok_or_else(|| ctx.err(path, "endpointSelector is required"))?;
    let endpoint_selector = selector(ctx, &format!("{path}.endpointSelector"), sel)?;
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
            let pr = peer_rule(
                ctx,
                &p,
                ("fromEndpoints", "fromEntities"),
                r.from_endpoints,
                r.from_entities,
                r.to_ports,
                r.authentication,
                deny,
            )?;
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
            let pr = peer_rule(
                ctx,
                &p,
                ("toEndpoints", "toEntities"),
                r.to_endpoints,
                r.to_entities,
                r.to_ports,
                r.authentication,
                deny,
            )?;
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
/// CiliumClusterwideNetworkPolicy objects. Empty documents are skipped.
pub fn parse_policies(text: &str) -> Result<Vec<Policy>, PolicyError> {
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
        let ctx = Ctx { doc, name };
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
        let _ = (
            &wire.metadata.namespace,
            &wire.metadata.labels,
            &wire.metadata.annotations,
        );
        let mut rules = Vec::new();
        if let Some(spec) = wire.spec {
            rules.push(rule(&ctx, "spec", spec)?);
        }
        for (j, spec) in wire.specs.unwrap_or_default().into_iter().enumerate() {
            rules.push(rule(&ctx, &format!("specs[{j}]"), spec)?);
        }
        if rules.is_empty() {
            return Err(ctx.err("spec", "a policy needs spec or specs"));
        }
        out.push(Policy {
            name: wire.metadata.name,
            kind,
            rules,
        });
    }
    Ok(out)
}
