//! `meshauth observe -o json` speaks Hubble's flow JSON (`hubble observe -o json`): the field
//! names and types of `flow.v1.Flow` as protojson writes them, inside the `GetFlowsResponse`
//! envelope. Rootless: the JSON is built from sample records through the function the command
//! uses.

#[allow(dead_code)]
#[path = "../src/observe/hubble.rs"]
mod hubble;

use std::collections::HashMap;

use meshauth_proto::agent::Flow;
use serde_json::Value;

fn labels(app: &str) -> HashMap<String, String> {
    HashMap::from([("app".to_string(), app.to_string())])
}

/// client2-2 → demodeployment-1:80, a SYN dropped for authentication on n1's ingress.
fn dropped_syn() -> Flow {
    Flow {
        time_unix_ms: 1_722_425_718_651,
        node: "n1".into(),
        kind: "flow".into(),
        src_ip: "10.200.2.3".into(),
        src_pod: "client2-2".into(),
        src_identity: 257,
        src_labels: labels("client2"),
        dst_ip: "10.200.1.1".into(),
        dst_pod: "demodeployment-1".into(),
        dst_identity: 256,
        dst_labels: labels("demodeployment"),
        dport: 80,
        protocol: "TCP".into(),
        verdict: "DROPPED".into(),
        reason: "authentication required".into(),
        tcp_flags: 0x02,
        latency_us: 0,
        sport: 50986,
        direction: "INGRESS".into(),
        allowed_by: vec![],
        denied_by: vec![],
        default_deny_by: vec![],
        icmp_type: 0,
    }
}

fn handshake() -> Flow {
    Flow {
        time_unix_ms: 1_722_425_718_700,
        node: "n1".into(),
        kind: "auth".into(),
        src_identity: 256,
        src_labels: labels("demodeployment"),
        dst_identity: 257,
        dst_labels: labels("client2"),
        verdict: "SUCCEEDED".into(),
        latency_us: 4200,
        ..Default::default()
    }
}

#[track_caller]
fn at<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = cur
            .get(key)
            .unwrap_or_else(|| panic!("no {path} (missing {key:?}) in {v:#}"));
    }
    cur
}

#[track_caller]
fn str_at<'a>(v: &'a Value, path: &str) -> &'a str {
    at(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v:#}"))
}

#[track_caller]
fn uint_at(v: &Value, path: &str) -> u64 {
    at(v, path)
        .as_u64()
        .unwrap_or_else(|| panic!("{path} is not an unsigned integer in {v:#}"))
}

#[track_caller]
fn is_rfc3339(s: &str) {
    humantime::parse_rfc3339(s).unwrap_or_else(|e| panic!("{s:?} is not RFC 3339: {e}"));
}

#[test]
fn a_dropped_syn_has_hubbles_field_paths() {
    let v = hubble::flow_json(&dropped_syn());
    // The GetFlowsResponse envelope.
    assert_eq!(str_at(&v, "node_name"), "n1");
    is_rfc3339(str_at(&v, "time"));
    // flow.v1.Flow.
    is_rfc3339(str_at(&v, "flow.time"));
    assert_eq!(str_at(&v, "flow.time"), "2024-07-31T11:35:18.651Z");
    assert_eq!(str_at(&v, "flow.verdict"), "DROPPED");
    assert_eq!(str_at(&v, "flow.drop_reason_desc"), "AUTH_REQUIRED");
    assert_eq!(str_at(&v, "flow.Type"), "L3_L4");
    assert_eq!(str_at(&v, "flow.node_name"), "n1");
    assert_eq!(str_at(&v, "flow.traffic_direction"), "INGRESS");
    assert_eq!(at(&v, "flow.is_reply"), &Value::Bool(false));
    assert_eq!(str_at(&v, "flow.Summary"), "TCP Flags: SYN");
    // IP.
    assert_eq!(str_at(&v, "flow.IP.source"), "10.200.2.3");
    assert_eq!(str_at(&v, "flow.IP.destination"), "10.200.1.1");
    assert_eq!(str_at(&v, "flow.IP.ipVersion"), "IPv4");
    // l4.TCP, flags as booleans named as in flow.v1.TCPFlags (only the set ones).
    assert_eq!(uint_at(&v, "flow.l4.TCP.source_port"), 50986);
    assert_eq!(uint_at(&v, "flow.l4.TCP.destination_port"), 80);
    assert_eq!(at(&v, "flow.l4.TCP.flags.SYN"), &Value::Bool(true));
    assert!(at(&v, "flow.l4.TCP.flags").get("ACK").is_none(), "{v:#}");
    // Endpoints.
    for (side, id, pod, app) in [
        ("source", 257, "client2-2", "client2"),
        ("destination", 256, "demodeployment-1", "demodeployment"),
    ] {
        assert_eq!(uint_at(&v, &format!("flow.{side}.identity")), id);
        assert_eq!(str_at(&v, &format!("flow.{side}.pod_name")), pod);
        assert_eq!(str_at(&v, &format!("flow.{side}.namespace")), "default");
        let labels = at(&v, &format!("flow.{side}.labels"))
            .as_array()
            .unwrap_or_else(|| panic!("flow.{side}.labels is not an array: {v:#}"));
        assert_eq!(labels, &[Value::from(format!("k8s:app={app}"))]);
    }
    // meshauth's own, out of Hubble's names.
    assert_eq!(str_at(&v, "flow.extensions.meshauth.kind"), "flow");
    assert_eq!(
        str_at(&v, "flow.extensions.meshauth.reason"),
        "authentication required"
    );
    // None of the old meshauth names at the top.
    for old in [
        "kind",
        "reason",
        "latency_us",
        "protocol",
        "tcp_flags",
        "node",
    ] {
        assert!(v["flow"].get(old).is_none(), "{old} in {v:#}");
        assert!(v.get(old).is_none(), "{old} in {v:#}");
    }
}

#[test]
fn forwarded_and_other_protocols() {
    let mut f = dropped_syn();
    f.verdict = "FORWARDED".into();
    f.reason.clear();
    let v = hubble::flow_json(&f);
    assert_eq!(str_at(&v, "flow.verdict"), "FORWARDED");
    assert!(v["flow"].get("drop_reason_desc").is_none(), "{v:#}");

    f.verdict = "DROPPED".into();
    f.reason = "policy denied (established flow re-checked)".into();
    f.protocol = "UDP".into();
    f.tcp_flags = 0;
    let v = hubble::flow_json(&f);
    assert_eq!(str_at(&v, "flow.drop_reason_desc"), "POLICY_DENIED");
    assert_eq!(uint_at(&v, "flow.l4.UDP.source_port"), 50986);
    assert_eq!(uint_at(&v, "flow.l4.UDP.destination_port"), 80);
    assert!(v["flow"].get("is_reply").is_none(), "{v:#}");

    f.protocol = "ICMP".into();
    let v = hubble::flow_json(&f);
    assert!(at(&v, "flow.l4.ICMPv4").is_object(), "{v:#}");
}

#[test]
fn a_handshake_is_a_meshauth_auth_record() {
    let v = hubble::flow_json(&handshake());
    assert_eq!(str_at(&v, "flow.Type"), hubble::AUTH_TYPE);
    assert_eq!(str_at(&v, "flow.Type"), "meshauth_auth");
    is_rfc3339(str_at(&v, "flow.time"));
    assert_eq!(str_at(&v, "flow.node_name"), "n1");
    // Not a datapath verdict: no verdict, IP or l4 a Hubble reader could take for one.
    for absent in ["verdict", "drop_reason_desc", "IP", "l4"] {
        assert!(v["flow"].get(absent).is_none(), "{absent} in {v:#}");
    }
    assert_eq!(uint_at(&v, "flow.source.identity"), 256);
    assert_eq!(uint_at(&v, "flow.destination.identity"), 257);
    assert!(at(&v, "flow.source.labels").is_array());
    assert!(v["flow"]["source"].get("pod_name").is_none(), "{v:#}");
    assert_eq!(str_at(&v, "flow.extensions.meshauth.kind"), "auth");
    assert_eq!(
        str_at(&v, "flow.extensions.meshauth.handshake"),
        "SUCCEEDED"
    );
    assert_eq!(uint_at(&v, "flow.extensions.meshauth.latency_us"), 4200);
    assert_eq!(str_at(&v, "flow.extensions.meshauth.reason"), "");
    assert!(str_at(&v, "flow.Summary").contains("SUCCEEDED"), "{v:#}");
}

#[test]
fn text_lines_are_hubbles() {
    // Go's time.StampMilli, as hubble prints it: the day padded with a space.
    assert_eq!(
        hubble::hubble_time(1_796_166_175_123),
        "Dec  1 23:02:55.123"
    );
    assert_eq!(
        hubble::flow_line(&dropped_syn()),
        "Jul 31 11:35:18.651 [n1]: default/client2-2:50986 (ID:257) <> \
         default/demodeployment-1:80 (ID:256) Authentication required DROPPED (TCP Flags: SYN)"
    );
    let mut f = dropped_syn();
    f.verdict = "FORWARDED".into();
    f.reason.clear();
    f.tcp_flags = 0x12;
    assert_eq!(
        hubble::flow_line(&f),
        "Jul 31 11:35:18.651 [n1]: default/client2-2:50986 (ID:257) -> \
         default/demodeployment-1:80 (ID:256) policy-verdict:L3-L4 INGRESS ALLOWED \
         (TCP Flags: SYN, ACK)"
    );
    assert_eq!(
        hubble::flow_line(&handshake()),
        "Jul 31 11:35:18.700 [n1]: ID:256 app=demodeployment <-> ID:257 app=client2 auth \
         handshake SUCCEEDED in 4.2 ms"
    );
}

#[test]
fn a_pods_namespace_is_its_identitys() {
    let mut f = dropped_syn();
    f.src_labels
        .insert("io.kubernetes.pod.namespace".into(), "other".into());
    let v = hubble::flow_json(&f);
    assert_eq!(str_at(&v, "flow.source.namespace"), "other");
    assert_eq!(str_at(&v, "flow.destination.namespace"), "default");
    assert!(
        hubble::flow_line(&f).contains("other/client2-2:50986"),
        "{}",
        hubble::flow_line(&f)
    );
}

#[test]
fn the_deciding_policies_are_hubbles_allowed_by_and_denied_by() {
    let mut f = dropped_syn();
    f.verdict = "FORWARDED".into();
    f.reason.clear();
    f.allowed_by = vec!["default/allow-client".into(), "web".into()];
    let v = hubble::flow_json(&f);
    let allowed = at(&v, "flow.ingress_allowed_by")
        .as_array()
        .expect("a list");
    assert_eq!(allowed.len(), 2, "{v:#}");
    assert_eq!(str_at(&allowed[0], "name"), "allow-client");
    assert_eq!(str_at(&allowed[0], "namespace"), "default");
    assert_eq!(str_at(&allowed[0], "kind"), "CiliumNetworkPolicy");
    assert_eq!(str_at(&allowed[1], "name"), "web");
    assert!(allowed[1].get("namespace").is_none(), "{v:#}");
    assert_eq!(
        str_at(&allowed[1], "kind"),
        "CiliumClusterwideNetworkPolicy"
    );
    for absent in ["egress_allowed_by", "ingress_denied_by", "egress_denied_by"] {
        assert!(v["flow"].get(absent).is_none(), "{absent} in {v:#}");
    }
    assert!(
        hubble::flow_line(&f).ends_with("allowed by default/allow-client, web"),
        "{}",
        hubble::flow_line(&f)
    );

    let mut f = dropped_syn();
    f.direction = "EGRESS".into();
    f.reason = "policy denied".into();
    f.denied_by = vec!["no-telnet".into()];
    let v = hubble::flow_json(&f);
    let denied = at(&v, "flow.egress_denied_by").as_array().expect("a list");
    assert_eq!(str_at(&denied[0], "name"), "no-telnet");
    assert!(v["flow"].get("ingress_denied_by").is_none(), "{v:#}");
    assert!(
        hubble::flow_line(&f)
            .ends_with("Policy denied DROPPED (TCP Flags: SYN) denied by no-telnet"),
        "{}",
        hubble::flow_line(&f)
    );

    // A default deny: Hubble names no policy; the extension names what selected the endpoint.
    let mut f = dropped_syn();
    f.reason = "policy denied".into();
    f.default_deny_by = vec!["default/allow-client".into()];
    let v = hubble::flow_json(&f);
    assert!(v["flow"].get("ingress_denied_by").is_none(), "{v:#}");
    assert_eq!(
        at(&v, "flow.extensions.meshauth.default_deny_by"),
        &serde_json::json!(["default/allow-client"])
    );
    assert!(
        hubble::flow_line(&f).ends_with("by default deny of default/allow-client"),
        "{}",
        hubble::flow_line(&f)
    );
}

#[test]
fn peers_that_are_not_pods_carry_ciliums_reserved_and_cidr_labels() {
    let mut f = dropped_syn();
    f.src_pod.clear();
    f.src_ip = "192.0.2.7".into();
    f.src_identity = 16_777_216;
    f.src_labels = HashMap::from([
        ("cidr:192.0.2.0/24".to_string(), String::new()),
        ("reserved:world".to_string(), String::new()),
    ]);
    let v = hubble::flow_json(&f);
    assert_eq!(
        at(&v, "flow.source.labels"),
        &serde_json::json!(["cidr:192.0.2.0/24", "reserved:world"])
    );
    assert!(v["flow"]["source"].get("pod_name").is_none(), "{v:#}");
    assert!(
        hubble::flow_line(&f).contains(" 192.0.2.7:50986 (ID:16777216) <> "),
        "{}",
        hubble::flow_line(&f)
    );
}

#[test]
fn icmp_carries_its_type_and_held_packets_say_so() {
    let mut f = dropped_syn();
    f.protocol = "ICMP".into();
    f.icmp_type = 8;
    f.verdict = "FORWARDED".into();
    let v = hubble::flow_json(&f);
    assert_eq!(uint_at(&v, "flow.l4.ICMPv4.type"), 8);

    let mut f = dropped_syn();
    f.verdict = "HELD".into();
    f.direction = "EGRESS".into();
    let line = hubble::flow_line(&f);
    assert!(
        line.ends_with(
            "default/demodeployment-1:80 (ID:256) Authentication required HELD (TCP Flags: SYN)"
        ),
        "{line}"
    );
    assert!(!line.contains("ALLOWED"), "{line}");
    let mut f = dropped_syn();
    f.verdict = "FORWARDED".into();
    f.reason = "held 31 ms, released after authentication".into();
    let line = hubble::flow_line(&f);
    assert!(
        line.ends_with("ALLOWED (TCP Flags: SYN, held 31 ms, released after authentication)"),
        "{line}"
    );
}
