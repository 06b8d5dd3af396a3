//! The fuzz targets of meshauth, one function per target; `src/bin/<target>.rs` runs each under
//! AFL++ (`afl::fuzz!`). Every target feeds arbitrary bytes to code that takes input from outside
//! the process, and checks, besides "no panic, no hang", what must hold for any input (round
//! trips, rewritten headers). A panic anywhere aborts the process (`panic = "abort"`), which AFL
//! records as a crash.
//!
//! | target | what it exercises |
//! |---|---|
//! | `relay` | the Workload API relay's core without I/O (`meshauth_agent::authority_fix::relay_client_bytes`, the code the socket relay runs): HTTP/2 frames, CONTINUATION reassembly, HPACK decode within the limits and re-encode |
//! | `policy` | `meshauth_policy::parse_policies`, then `compile_endpoint` and `lookup` |
//! | `spiffe_id` | `SpiffeId` and `TrustDomain` parsing, `node_spiffe_id`, `identity_spiffe_id`, `reserved_namespace` |
//! | `svid` | `meshauth_spiffe::validate_x509_svid` on a chain against a fixed bundle |
//! | `bundle` | `X509Bundle::from_jwks_json` and `from_pem`, with round trips |
//! | `handshake` | the first bytes a handshake-port (`:4250`) server reads: a rustls server config as `meshauth_auth` builds it, fed in memory |

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::{Duration, SystemTime};

use meshauth_agent::authority_fix::RelayedEnd;
use meshauth_policy::{Direction, IdentityId, Labels, Protocol};
use meshauth_spiffe::{SpiffeId, TrustDomain, X509Bundle};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The fixtures' trust domain.
pub const TD: &str = "fuzz.test";
/// Where the fixtures live, relative to this crate.
pub const FIXTURES: &str = "fixtures";

/// A chain as the `svid` target reads it: each certificate prefixed by its length (2 bytes, BE).
pub fn chain_input(certs: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for c in certs {
        out.extend_from_slice(&(c.len() as u16).to_be_bytes());
        out.extend_from_slice(c);
    }
    out
}

/// An HTTP/2 frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let l = (payload.len() as u32).to_be_bytes();
    let mut out = vec![l[1], l[2], l[3], kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn td() -> TrustDomain {
    TD.parse().expect("the fixtures' trust domain parses")
}

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(FIXTURES)
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| {
        panic!(
            "cannot read fixture {}: {e} (run `cargo run --bin gen_seeds` in fuzz/)",
            path.display()
        )
    })
}

/// The fixed bundle: the fixtures' root CA.
fn bundle() -> X509Bundle {
    X509Bundle {
        trust_domain: td(),
        authorities: vec![CertificateDer::from(fixture("ca.der"))],
        sequence: 1,
        refresh_hint: None,
    }
}

/// The time chains are validated at: inside the fixtures' validity (2024-2044).
fn validation_time() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_893_456_000) // 2030-01-01
}

// ---------------------------------------------------------------------------------------------
// spiffe_id

/// SPIFFE IDs and trust domains: what parses prints back to itself and parses again to the same
/// value; the helpers that build IDs never panic.
pub fn spiffe_id(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(id) = s.parse::<SpiffeId>() {
        let shown = id.to_string();
        let again: SpiffeId = shown
            .parse()
            .unwrap_or_else(|e| panic!("{shown:?} (from {s:?}) does not parse again: {e}"));
        assert_eq!(again, id, "{s:?}");
        assert!(shown.len() <= meshauth_spiffe::id::MAX_SPIFFE_ID_LEN);
        let td = id.trust_domain();
        let td_again: TrustDomain = td
            .as_str()
            .parse()
            .unwrap_or_else(|e| panic!("trust domain of {s:?} does not parse alone: {e}"));
        assert_eq!(&td_again, td);
        assert_eq!(td.id_string(), format!("spiffe://{td}"));
        assert!(
            shown == format!("{}{}", td.id_string(), id.path()),
            "{shown:?} is not its trust domain and path"
        );
        if let Some(n) = meshauth_auth::handshake::identity_of(&id, td) {
            // What the handshake takes for a label identity is in a namespace no registration
            // entry may claim.
            assert!(
                meshauth_spiffe::id::reserved_namespace(&id).is_some(),
                "{shown} is an identity ID outside the reserved namespaces"
            );
            // An identity ID always prints to the canonical form.
            let canonical = meshauth_spiffe::identity_spiffe_id(td, n.get());
            assert_eq!(
                meshauth_auth::handshake::identity_of(&canonical, td),
                Some(n)
            );
        }
    }
    let (td_text, name) = s.split_once('\n').unwrap_or((s, "n1"));
    if let Ok(td) = td_text.parse::<TrustDomain>() {
        assert_eq!(td.to_string().parse::<TrustDomain>().ok(), Some(td.clone()));
        if let Ok(node) = meshauth_spiffe::node_spiffe_id(&td, name) {
            assert_eq!(
                meshauth_spiffe::id::reserved_namespace(&node).map(|ns| ns.prefix),
                Some("/node"),
                "{node}"
            );
        }
        let n = name
            .bytes()
            .fold(0u32, |a, b| a.wrapping_mul(31).wrapping_add(b.into()));
        let id = meshauth_spiffe::identity_spiffe_id(&td, n);
        assert_eq!(
            meshauth_auth::handshake::identity_of(&id, &td).map(|i| i.get()),
            Some(n)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// policy

static IDENTITIES: LazyLock<(BTreeMap<IdentityId, Labels>, Vec<Labels>)> = LazyLock::new(|| {
    let sets = [
        "app=a",
        "app=b,env=prod",
        "app=c,env=dev,tier=db",
        "k8s:io.kubernetes.pod.namespace=default,app=a",
    ];
    let labels: Vec<Labels> = sets
        .iter()
        .map(|s| s.parse().expect("fixed label sets parse"))
        .collect();
    let ids = labels
        .iter()
        .enumerate()
        .map(|(i, l)| (IdentityId::new(256 + i as u32), l.clone()))
        .collect();
    (ids, labels)
});

/// Inputs whose flow collections (`[`, `{`) nest deeper than this, counted naively (brackets in
/// strings and comments count too), are skipped. `parse_policies` refuses them anyway (serde_yaml
/// stops at 128 levels: "recursion limit exceeded", which inputs of 129 to 256 levels still
/// exercise), but libyaml scans every level first, at about 60 µs a level in the instrumented
/// build: inputs of nested `[` (up to 26 KB) took up to 1.5 s per execution, and trimming them
/// took half of a 40-minute run.
const MAX_POLICY_FLOW_DEPTH: usize = 256;

/// The deepest nesting of `[`/`{` in `data`, counting every bracket.
fn flow_depth(data: &[u8]) -> usize {
    let (mut depth, mut max) = (0usize, 0usize);
    for b in data {
        match b {
            b'[' | b'{' => {
                depth += 1;
                max = max.max(depth);
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Policy YAML: parsing never panics; what parses compiles for every fixed endpoint, and the
/// compiled entries answer lookups.
pub fn policy(data: &[u8]) {
    if flow_depth(data) > MAX_POLICY_FLOW_DEPTH {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policies) = meshauth_policy::parse_policies(text) else {
        return;
    };
    let (ids, endpoints) = &*IDENTITIES;
    for endpoint in endpoints {
        let entries = meshauth_policy::compile_endpoint(&policies, ids, endpoint);
        for &remote in ids
            .keys()
            .chain(&[IdentityId::new(2), IdentityId::new(9999)])
        {
            for direction in [Direction::Ingress, Direction::Egress] {
                for protocol in [Protocol::Tcp, Protocol::Udp] {
                    for port in [0, 80, 443, 8080, 65535] {
                        let _ =
                            meshauth_policy::lookup(&entries, direction, remote, protocol, port);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// svid

static BUNDLE: LazyLock<X509Bundle> = LazyLock::new(bundle);

/// Splits `data` into length-prefixed certificates.
fn chain_of(mut data: &[u8]) -> Vec<CertificateDer<'static>> {
    let mut chain = Vec::new();
    while let [a, b, rest @ ..] = data {
        let len = usize::from(u16::from_be_bytes([*a, *b])).min(rest.len());
        let (one, tail) = rest.split_at(len);
        chain.push(CertificateDer::from(one.to_vec()));
        data = tail;
    }
    chain
}

/// X.509-SVID chains: validation never panics; an accepted chain's leaf is an SVID of the
/// bundle's trust domain, and the per-certificate readers agree with the validation.
pub fn svid(data: &[u8]) {
    let chain = chain_of(data);
    for cert in &chain {
        let _ = meshauth_spiffe::spiffe_id_of(cert);
        let _ = meshauth_spiffe::not_after_of(cert);
        let _ = meshauth_spiffe::serial_of(cert);
    }
    if let Ok(v) = meshauth_spiffe::validate_x509_svid(&chain, &BUNDLE, validation_time()) {
        let leaf = &chain[0];
        assert_eq!(v.spiffe_id.trust_domain(), &BUNDLE.trust_domain);
        assert!(!v.spiffe_id.path().is_empty());
        assert_eq!(meshauth_spiffe::spiffe_id_of(leaf).ok(), Some(v.spiffe_id));
        assert_eq!(meshauth_spiffe::not_after_of(leaf).ok(), Some(v.not_after));
        assert_eq!(meshauth_spiffe::serial_of(leaf).ok(), Some(v.serial));
        assert!(v.not_after >= validation_time());
    }
}

// ---------------------------------------------------------------------------------------------
// bundle

/// Bundles: the first byte picks JWKS (even) or PEM (odd); whatever parses survives a round trip
/// through its own encoding unchanged.
pub fn bundle_target(data: &[u8]) {
    let Some((&which, doc)) = data.split_first() else {
        return;
    };
    if which % 2 == 0 {
        if let Ok(b) = X509Bundle::from_jwks_json(td(), doc) {
            let json = b.to_jwks_json();
            let again = X509Bundle::from_jwks_json(td(), json.as_bytes())
                .unwrap_or_else(|e| panic!("our own JWKS does not parse: {e}: {json}"));
            assert_eq!(again.authorities, b.authorities);
            assert_eq!(again.sequence, b.sequence);
            assert_eq!(again.refresh_hint, b.refresh_hint);
        }
    } else if let Ok(text) = std::str::from_utf8(doc)
        && let Ok(b) = X509Bundle::from_pem(td(), text)
    {
        let pem = b.to_pem();
        let again = X509Bundle::from_pem(td(), &pem)
            .unwrap_or_else(|e| panic!("our own PEM does not parse: {e}"));
        assert_eq!(again.authorities, b.authorities);
    }
}

// ---------------------------------------------------------------------------------------------
// handshake

/// Answers for identity 1 only, by SNI, as the handshake port's resolver does for the
/// identities it hosts.
#[derive(Debug)]
struct SniResolver(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for SniResolver {
    fn resolve(
        &self,
        hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let sni = hello.server_name()?;
        (sni == meshauth_auth::handshake::sni_for(IdentityId::new(1))).then(|| Arc::clone(&self.0))
    }
}

static HANDSHAKE: LazyLock<Arc<rustls::ServerConfig>> = LazyLock::new(|| {
    let own = meshauth_tls::SharedCertifiedKey::new(
        vec![
            CertificateDer::from(fixture("server.der")),
            CertificateDer::from(fixture("intermediate.der")),
        ],
        PrivateKeyDer::Pkcs8(fixture("server.key.der").into()),
    )
    .expect("the fixture key matches its certificate");
    let td = td();
    let peers = meshauth_tls::PeerPolicy::Predicate(Arc::new(move |id: &SpiffeId| {
        meshauth_auth::handshake::identity_of(id, &td).is_some()
    }));
    let config = meshauth_tls::server_config_with_resolver(
        Arc::new(SniResolver(own.get())),
        meshauth_tls::SharedBundle::new(bundle()),
        peers,
        meshauth_tls::ClientAuth::Required,
        &[meshauth_auth::handshake::ALPN],
    )
    .expect("the handshake server config builds");
    Arc::new(config)
});

/// The handshake port's first bytes: a server connection configured as the responder's reads
/// them; it never panics and never completes a handshake (nothing here holds a client key).
pub fn handshake(data: &[u8]) {
    let Ok(mut conn) = rustls::ServerConnection::new(Arc::clone(&HANDSHAKE)) else {
        return;
    };
    let mut input = data;
    let mut sink = Vec::new();
    // Small reads, as a TCP stream may deliver them; the first byte of the input sets the size.
    let chunk = usize::from(data.first().copied().unwrap_or(0)).max(1) * 16;
    loop {
        let take = chunk.min(input.len());
        let (now, rest) = input.split_at(take);
        let mut reader = now;
        match conn.read_tls(&mut reader) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        input = rest;
        let failed = conn.process_new_packets().is_err();
        while conn.wants_write() {
            sink.clear();
            if conn.write_tls(&mut sink).is_err() {
                break;
            }
        }
        if failed {
            break;
        }
    }
    // Client certificates come encrypted under keys only a real initiator has: no input
    // authenticates a peer.
    assert!(
        conn.peer_certificates().is_none(),
        "a client was authenticated"
    );
}

// ---------------------------------------------------------------------------------------------
// relay

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const MAX_FRAME: usize = 16_384;

/// The Workload API relay's core without I/O
/// (`meshauth_agent::authority_fix::relay_client_bytes`, default `RelayLimits`): `data` is what
/// a client sends on the socket before its EOF; what would reach the gRPC server must be the
/// preface, then whole frames no larger than the maximum, whose header blocks decode (in order,
/// with one HPACK decoder as the server has) and name no `:authority` but `localhost`; nothing is
/// forwarded from a connection without the preface. The socket path runs the same code, and a
/// unit test of `authority_fix` checks that it forwards the same bytes and closes the server side
/// within 5 s of the client's EOF.
pub fn relay(data: &[u8]) {
    let (out, end) = relay_bytes(data);
    check_relayed(data, &out);
    if matches!(end, RelayedEnd::EndOfInput) {
        assert!(
            data.starts_with(PREFACE),
            "a connection without the preface ended as a clean EOF"
        );
    }
}

/// What the relay forwards of `data`, and how it ends.
fn relay_bytes(data: &[u8]) -> (Vec<u8>, RelayedEnd) {
    meshauth_agent::authority_fix::relay_client_bytes(
        data,
        &meshauth_agent::authority_fix::RelayLimits::default(),
    )
}

fn check_relayed(input: &[u8], out: &[u8]) {
    if out.is_empty() {
        return;
    }
    assert!(
        input.starts_with(PREFACE),
        "the relay forwarded something from a connection without the preface"
    );
    let mut rest = out
        .strip_prefix(PREFACE)
        .expect("the relay forwards the preface first");
    let mut decoder = loona_hpack::Decoder::new();
    let mut block: Option<Vec<u8>> = None;
    while !rest.is_empty() {
        assert!(rest.len() >= 9, "a partial frame header was forwarded");
        let len = u32::from_be_bytes([0, rest[0], rest[1], rest[2]]) as usize;
        let (kind, flags) = (rest[3], rest[4]);
        assert!(
            len <= MAX_FRAME,
            "a frame larger than the maximum was forwarded"
        );
        assert!(rest.len() >= 9 + len, "a partial frame was forwarded");
        let payload = &rest[9..9 + len];
        rest = &rest[9 + len..];
        match (kind, block.as_mut()) {
            (0x1, None) => {
                assert_eq!(flags & 0x8, 0, "re-encoded HEADERS are never padded");
                let body = if flags & 0x20 != 0 {
                    payload.get(5..).expect("priority fields present")
                } else {
                    payload
                };
                block = Some(body.to_vec());
            }
            (0x9, Some(b)) => b.extend_from_slice(payload),
            (_, Some(_)) => panic!("frame {kind:#x} inside a header block the relay wrote"),
            (_, None) => {
                // Forwarded unchanged (DATA, SETTINGS, ..., a stray CONTINUATION).
                continue;
            }
        }
        if flags & 0x4 != 0 {
            let b = block.take().unwrap_or_default();
            let headers = decoder.decode(&b).unwrap_or_else(|e| {
                panic!("the relay wrote a header block that does not decode: {e:?}")
            });
            for (name, value) in &headers {
                if name == b":authority" {
                    assert_eq!(value, b"localhost", "an :authority passed unrewritten");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The seeds still mean what they should (run without AFL: `cargo test` in `fuzz/`).

    use super::*;

    fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("corpus")
            .join(target);
        let mut out: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| {
                let p = e.expect("entry").path();
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, std::fs::read(&p).expect("seed"))
            })
            .collect();
        out.sort();
        assert!(!out.is_empty(), "no seeds for {target}");
        out
    }

    /// A fuzz target: a name and the function AFL runs.
    type Target = (&'static str, fn(&[u8]));

    #[test]
    fn every_seed_runs_through_its_target() {
        let targets: [Target; 6] = [
            ("relay", relay),
            ("policy", policy),
            ("spiffe_id", spiffe_id),
            ("svid", svid),
            ("bundle", bundle_target),
            ("handshake", handshake),
        ];
        for (name, target) in targets {
            for (_, data) in seeds(name) {
                target(&data);
            }
        }
    }

    #[test]
    fn the_svid_seeds_validate_against_the_fixture_bundle() {
        for (name, data) in seeds("svid") {
            let ok =
                meshauth_spiffe::validate_x509_svid(&chain_of(&data), &BUNDLE, validation_time());
            assert_eq!(ok.is_ok(), name != "ca-as-leaf", "{name}: {ok:?}");
        }
    }

    #[test]
    fn only_deeply_nested_flow_collections_are_skipped() {
        assert_eq!(flow_depth(b"{a: [1, {b: [2]}], c: [3]}"), 4);
        assert_eq!(flow_depth(b"]]]["), 1);
        for (_, data) in seeds("policy") {
            assert!(flow_depth(&data) <= MAX_POLICY_FLOW_DEPTH);
        }
        // Just past serde_yaml's limit: still parsed (and refused).
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(flow_depth(deep.as_bytes()) <= MAX_POLICY_FLOW_DEPTH);
        assert!(meshauth_policy::parse_policies(&deep).is_err());
        assert!(flow_depth("[".repeat(257).as_bytes()) > MAX_POLICY_FLOW_DEPTH);
    }

    #[test]
    fn the_policy_seeds_parse() {
        for (name, data) in seeds("policy") {
            let text = std::str::from_utf8(&data).expect("utf-8");
            meshauth_policy::parse_policies(text).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn the_client_hello_seed_gets_a_server_hello() {
        let (_, hello) = &seeds("handshake")[0];
        let mut conn = rustls::ServerConnection::new(Arc::clone(&HANDSHAKE)).expect("conn");
        let mut reader = &hello[..];
        conn.read_tls(&mut reader).expect("read");
        conn.process_new_packets().expect("a valid ClientHello");
        assert!(conn.wants_write(), "the server answers");
        assert_eq!(
            conn.server_name(),
            Some(meshauth_auth::handshake::sni_for(IdentityId::new(1)).as_str())
        );
    }

    #[test]
    fn the_relay_seeds_are_rewritten() {
        for (name, data) in seeds("relay") {
            let (out, end) = relay_bytes(&data);
            assert!(matches!(end, RelayedEnd::EndOfInput), "{name}: {end:?}");
            assert!(out.len() > PREFACE.len(), "{name}: nothing relayed");
            assert!(
                !out.windows(16).any(|w| w == b"tmp%2Fagent.sock"),
                "{name}: the authority was not rewritten"
            );
            check_relayed(&data, &out);
        }
    }

    #[test]
    fn a_refused_relay_connection_forwards_nothing_more() {
        let (out, end) = relay_bytes(b"GET / HTTP/1.1\r\n\r\n........");
        assert!(out.is_empty());
        assert!(matches!(end, RelayedEnd::Closed(_)), "{end:?}");
        let mut bad_hpack = PREFACE.to_vec();
        bad_hpack.extend(frame(0x1, 0x4, 1, &[0xff, 0xff, 0xff, 0xff]));
        bad_hpack.extend(frame(0x0, 0x1, 1, b"after"));
        let (out, end) = relay_bytes(&bad_hpack);
        assert_eq!(out, PREFACE);
        assert!(matches!(end, RelayedEnd::Closed(_)), "{end:?}");
    }
}
