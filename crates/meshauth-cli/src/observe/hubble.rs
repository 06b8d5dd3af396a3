//! A meshauth flow record in Hubble's shapes: the JSON of `hubble observe -o json` (the
//! `flow.v1.Flow` message as protojson writes it, with the `GetFlowsResponse` envelope) and the
//! one-line text of `hubble observe`.
//!
//! Datapath verdicts are `Type: "L3_L4"` flows; handshake events have no Hubble counterpart and
//! are `Type: "meshauth_auth"`, without `verdict`, `IP` or `l4`. What only meshauth knows (the
//! handshake state, its latency, the drop reason as the agent wrote it) is under
//! `flow.extensions.meshauth`. A pod's namespace is its identity's label
//! `io.kubernetes.pod.namespace` (`default` when an identity has none), and a label `app=x` is
//! Hubble's `k8s:app=x`.
//!
//! Kept free of the rest of the CLI so that tests can include it (`tests/observe_json.rs`).

use std::collections::HashMap;

use meshauth_proto::agent::Flow;
use serde_json::{Map, Value, json};

/// The namespace of a pod whose identity names none.
pub(crate) const NAMESPACE: &str = "default";

/// The namespace of a pod with identity labels `labels`.
fn namespace_of(labels: &HashMap<String, String>) -> &str {
    labels
        .get("io.kubernetes.pod.namespace")
        .map_or(NAMESPACE, String::as_str)
}

/// `Type` of a handshake (auth) record.
pub(crate) const AUTH_TYPE: &str = "meshauth_auth";

/// TCP flag bits, in Hubble's order and spelling (`flow.v1.TCPFlags`).
const TCP_FLAGS: [(u32, &str); 9] = [
    (0x01, "FIN"),
    (0x02, "SYN"),
    (0x04, "RST"),
    (0x08, "PSH"),
    (0x10, "ACK"),
    (0x20, "URG"),
    (0x40, "ECE"),
    (0x80, "CWR"),
    (0x100, "NS"),
];

/// RFC 3339 time of a record, UTC with milliseconds.
pub(crate) fn rfc3339(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// Hubble's text time (Go's `time.StampMilli`): `Jul 31 11:35:18.651`, `Dec  1 23:02:55.123`.
pub(crate) fn hubble_time(ms: i64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let t = rfc3339(ms); // 2026-12-01T23:02:55.123Z
    let month = t
        .get(5..7)
        .and_then(|m| m.parse::<usize>().ok())
        .and_then(|m| MONTHS.get(m.wrapping_sub(1)))
        .copied()
        .unwrap_or("???");
    let day = t.get(8..10).unwrap_or("??");
    let day = day
        .strip_prefix('0')
        .map_or(day.to_string(), |d| format!(" {d}"));
    let clock = t.get(11..23).unwrap_or("??:??:??.???");
    format!("{month} {day} {clock}")
}

/// Hubble's labels, sorted: a pod's `app=x` is `k8s:app=x`; the labels the agent gives peers
/// that are not pods carry their source already (`reserved:world`, `cidr:192.0.2.0/24`, with
/// empty values), as Cilium prints them.
pub(crate) fn hubble_labels(l: &HashMap<String, String>) -> Vec<String> {
    let mut v: Vec<String> = l
        .iter()
        .map(|(k, v)| match (k.contains(':'), v.is_empty()) {
            (true, true) => k.clone(),
            (true, false) => format!("{k}={v}"),
            (false, _) => format!("k8s:{k}={v}"),
        })
        .collect();
    v.sort();
    v
}

/// A policy key (`namespace/name`, or `name` for a clusterwide policy) as Hubble's
/// `flow.v1.Policy`.
fn policy_json(key: &str) -> Value {
    match key.split_once('/') {
        Some((ns, name)) => {
            json!({"name": name, "namespace": ns, "kind": "CiliumNetworkPolicy"})
        }
        None => json!({"name": key, "kind": "CiliumClusterwideNetworkPolicy"}),
    }
}

/// The end of a text line naming the policies that decided, if the agent found any.
fn decided_text(f: &Flow) -> String {
    let list = |v: &[String]| v.join(", ");
    if !f.denied_by.is_empty() {
        format!(" denied by {}", list(&f.denied_by))
    } else if !f.default_deny_by.is_empty() {
        format!(" by default deny of {}", list(&f.default_deny_by))
    } else if !f.allowed_by.is_empty() {
        format!(" allowed by {}", list(&f.allowed_by))
    } else {
        String::new()
    }
}

/// Hubble's `drop_reason_desc` (the `flow.v1.DropReason` name) for the agent's reason.
pub(crate) fn drop_reason_desc(reason: &str) -> &'static str {
    // "policy denied (established flow re-checked)" is still a policy drop.
    let base = reason.split(" (").next().unwrap_or(reason);
    match base {
        "policy denied" => "POLICY_DENIED",
        "authentication required" => "AUTH_REQUIRED",
        "no identity" => "INVALID_IDENTITY",
        "spoofed source" => "INVALID_SOURCE_IP",
        "unsupported protocol" => "UNKNOWN_L4_PROTOCOL",
        "unencrypted" => "UNENCRYPTED_TRAFFIC",
        _ => "DROP_REASON_UNKNOWN",
    }
}

fn tcp_flags_names(f: u32) -> Vec<&'static str> {
    TCP_FLAGS
        .iter()
        .filter(|(b, _)| f & b != 0)
        .map(|(_, n)| *n)
        .collect()
}

fn endpoint(pod: &str, identity: u32, labels: &HashMap<String, String>) -> Value {
    let mut e = Map::new();
    e.insert("identity".into(), json!(identity));
    if !pod.is_empty() {
        e.insert("namespace".into(), json!(namespace_of(labels)));
        e.insert("pod_name".into(), json!(pod));
    }
    e.insert("labels".into(), json!(hubble_labels(labels)));
    Value::Object(e)
}

/// Hubble's `Summary` (and the parenthesis of the text line).
fn summary(f: &Flow) -> String {
    if f.kind == "auth" {
        let mut s = format!("auth handshake {}", f.verdict);
        if f.latency_us > 0 {
            s.push_str(&format!(" in {:.1} ms", f.latency_us as f64 / 1000.0));
        }
        if !f.reason.is_empty() {
            s.push_str(&format!(" ({})", f.reason));
        }
        return s;
    }
    match f.protocol.as_str() {
        "TCP" => format!("TCP Flags: {}", tcp_flags_names(f.tcp_flags).join(", ")),
        "ICMP" => "ICMPv4".into(),
        p => p.into(),
    }
}

/// One record as `hubble observe -o json` prints a flow: `{"flow": {...}, "node_name", "time"}`.
pub(crate) fn flow_json(f: &Flow) -> Value {
    let time = rfc3339(f.time_unix_ms);
    let mut flow = Map::new();
    flow.insert("time".into(), json!(time));
    let auth = f.kind == "auth";
    let mut ext = Map::new();
    ext.insert("kind".into(), json!(f.kind));
    ext.insert("reason".into(), json!(f.reason));
    if auth {
        flow.insert("Type".into(), json!(AUTH_TYPE));
        ext.insert("handshake".into(), json!(f.verdict));
        ext.insert("latency_us".into(), json!(f.latency_us));
    } else {
        flow.insert("verdict".into(), json!(f.verdict));
        if f.verdict == "DROPPED" {
            flow.insert(
                "drop_reason_desc".into(),
                json!(drop_reason_desc(&f.reason)),
            );
        }
        flow.insert(
            "IP".into(),
            json!({"source": f.src_ip, "destination": f.dst_ip, "ipVersion": "IPv4"}),
        );
        let ports = json!({"source_port": f.sport, "destination_port": f.dport});
        let l4 = match f.protocol.as_str() {
            "TCP" => {
                let mut tcp = ports;
                let flags: Map<String, Value> = tcp_flags_names(f.tcp_flags)
                    .into_iter()
                    .map(|n| (n.to_string(), json!(true)))
                    .collect();
                tcp["flags"] = Value::Object(flags);
                json!({"TCP": tcp})
            }
            "UDP" => json!({"UDP": ports}),
            "SCTP" => json!({"SCTP": ports}),
            // The type, which policy decided on (protojson leaves out a zero), and the echo id.
            "ICMP" => {
                ext.insert("icmp_echo_id".into(), json!(f.sport));
                if f.icmp_type != 0 {
                    json!({"ICMPv4": {"type": f.icmp_type}})
                } else {
                    json!({"ICMPv4": {}})
                }
            }
            _ => Value::Null,
        };
        if !l4.is_null() {
            flow.insert("l4".into(), l4);
        }
        flow.insert("Type".into(), json!("L3_L4"));
    }
    flow.insert(
        "source".into(),
        endpoint(&f.src_pod, f.src_identity, &f.src_labels),
    );
    flow.insert(
        "destination".into(),
        endpoint(&f.dst_pod, f.dst_identity, &f.dst_labels),
    );
    flow.insert("node_name".into(), json!(f.node));
    if !f.direction.is_empty() {
        flow.insert("traffic_direction".into(), json!(f.direction));
        // Hubble's egress_allowed_by, ingress_denied_by, ...: the deciding policies.
        let dir = f.direction.to_ascii_lowercase();
        for (what, keys) in [("allowed_by", &f.allowed_by), ("denied_by", &f.denied_by)] {
            if !keys.is_empty() {
                let list: Vec<Value> = keys.iter().map(|k| policy_json(k)).collect();
                flow.insert(format!("{dir}_{what}"), Value::Array(list));
            }
        }
    }
    if !f.default_deny_by.is_empty() {
        ext.insert("default_deny_by".into(), json!(f.default_deny_by));
    }
    // A SYN without ACK opens a connection: surely not a reply. Otherwise unknown, and Hubble
    // leaves the field out.
    if !auth && f.protocol == "TCP" && f.tcp_flags & 0x12 == 0x02 {
        flow.insert("is_reply".into(), json!(false));
    }
    flow.insert("Summary".into(), json!(summary(f)));
    flow.insert("extensions".into(), json!({"meshauth": ext}));
    json!({"flow": flow, "node_name": f.node, "time": time})
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|x| x.to_uppercase().collect::<String>() + c.as_str())
        .unwrap_or_default()
}

/// One record as `hubble observe --print-node-name` prints a flow:
/// `Jul 31 11:35:19.661 [n1]: default/client2-2:50986 (ID:257) -> default/demodeployment-1:80
/// (ID:256) policy-verdict:L3-L4 INGRESS ALLOWED (TCP Flags: SYN)`; drops as
/// `... <> ... Authentication required DROPPED (TCP Flags: SYN)`.
pub(crate) fn flow_line(f: &Flow) -> String {
    let head = format!("{} [{}]:", hubble_time(f.time_unix_ms), f.node);
    if f.kind == "auth" {
        let who = |id: u32, labels: &HashMap<String, String>| {
            let l: Vec<String> = hubble_labels(labels)
                .into_iter()
                .map(|l| l.trim_start_matches("k8s:").to_string())
                .collect();
            format!("ID:{id} {}", l.join(","))
        };
        return format!(
            "{head} {} <-> {} {}",
            who(f.src_identity, &f.src_labels),
            who(f.dst_identity, &f.dst_labels),
            summary(f)
        );
    }
    let who = |pod: &str, ip: &str, port: u32, id: u32, labels: &HashMap<String, String>| {
        let name = if pod.is_empty() {
            ip.to_string()
        } else {
            format!("{}/{pod}", namespace_of(labels))
        };
        if f.protocol == "ICMP" {
            format!("{name} (ID:{id})")
        } else {
            format!("{name}:{port} (ID:{id})")
        }
    };
    let src = who(
        &f.src_pod,
        &f.src_ip,
        f.sport,
        f.src_identity,
        &f.src_labels,
    );
    let dst = who(
        &f.dst_pod,
        &f.dst_ip,
        f.dport,
        f.dst_identity,
        &f.dst_labels,
    );
    let dir = if f.direction.is_empty() {
        String::new()
    } else {
        format!("{} ", f.direction)
    };
    let decided = decided_text(f);
    match f.verdict.as_str() {
        "DROPPED" => format!(
            "{head} {src} <> {dst} {} DROPPED ({}){decided}",
            capitalized(&f.reason),
            summary(f)
        ),
        // Held on the sender's node until its pair authenticates: where Hubble shows
        // "Authentication required DROPPED", meshauth shows it HELD, then ALLOWED with the
        // time it waited.
        "HELD" => format!(
            "{head} {src} -> {dst} {} HELD ({}){decided}",
            capitalized(&f.reason),
            summary(f)
        ),
        _ => {
            let note = if f.reason.is_empty() {
                String::new()
            } else {
                format!(", {}", f.reason)
            };
            format!(
                "{head} {src} -> {dst} policy-verdict:L3-L4 {dir}ALLOWED ({}{note}){decided}",
                summary(f)
            )
        }
    }
}
