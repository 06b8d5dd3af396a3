//! Writes the fixtures (a test CA, an intermediate, SVIDs and keys, all for the trust domain
//! `fuzz.test`, valid 2024-2044) and the seed corpus of every target. Run it once from `fuzz/`
//! (`cargo run --bin gen_seeds`) when a target's input format changes; the output is committed.
//! The keys are test keys for the fuzz harness only.

use std::fs;
use std::path::Path;
use std::sync::Arc;

use meshauth_fuzz::{FIXTURES, TD, chain_input, frame};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

fn ca_params(cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.distinguished_name.push(DnType::CommonName, cn);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.subject_alt_names = vec![SanType::URI(
        format!("spiffe://{TD}").try_into().expect("uri"),
    )];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2044, 1, 1);
    p
}

fn leaf(id: &str, issuer: &Issuer<'_, KeyPair>) -> (CertificateDer<'static>, KeyPair) {
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
    p.subject_alt_names = vec![SanType::URI(id.try_into().expect("uri"))];
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2044, 1, 1);
    let key = KeyPair::generate().expect("key");
    let cert = p.signed_by(&key, issuer).expect("sign").der().clone();
    (cert, key)
}

fn write(path: &Path, data: &[u8]) {
    if let Some(d) = path.parent() {
        fs::create_dir_all(d).expect("mkdir");
    }
    fs::write(path, data).expect("write");
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let fx = root.join(FIXTURES);
    let corpus = root.join("corpus");

    // CA, intermediate, a server SVID (identity 1, as the handshake port presents) and a client
    // SVID (identity 2) under the intermediate.
    let ca_key = KeyPair::generate().expect("key");
    let ca_p = ca_params("fuzz root");
    let ca = ca_p.self_signed(&ca_key).expect("ca").der().clone();
    let root_issuer = Issuer::new(ca_p, ca_key);
    let int_key = KeyPair::generate().expect("key");
    let int_p = ca_params("fuzz intermediate");
    let int = int_p
        .signed_by(&int_key, &root_issuer)
        .expect("int")
        .der()
        .clone();
    let int_issuer = Issuer::new(int_p, int_key);
    let (server, server_key) = leaf(&format!("spiffe://{TD}/identity/1"), &int_issuer);
    let (client, client_key) = leaf(&format!("spiffe://{TD}/identity/2"), &int_issuer);
    let (direct, _) = leaf(&format!("spiffe://{TD}/web"), &root_issuer);
    write(&fx.join("ca.der"), &ca);
    write(&fx.join("intermediate.der"), &int);
    write(&fx.join("server.der"), &server);
    write(&fx.join("server.key.der"), &server_key.serialize_der());

    // svid: length-prefixed chains.
    write(
        &corpus.join("svid/leaf-int"),
        &chain_input(&[server.as_ref(), int.as_ref()]),
    );
    write(
        &corpus.join("svid/leaf-root"),
        &chain_input(&[direct.as_ref()]),
    );
    write(
        &corpus.join("svid/ca-as-leaf"),
        &chain_input(&[ca.as_ref()]),
    );

    // bundle: a selector byte (even: JWKS, odd: PEM), then the document.
    let b = meshauth_spiffe::X509Bundle {
        trust_domain: TD.parse().expect("td"),
        authorities: vec![ca.clone(), int.clone()],
        sequence: 7,
        refresh_hint: Some(std::time::Duration::from_secs(300)),
    };
    let mut jwks = vec![0u8];
    jwks.extend_from_slice(b.to_jwks_json().as_bytes());
    write(&corpus.join("bundle/jwks"), &jwks);
    let mut pem = vec![1u8];
    pem.extend_from_slice(b.to_pem().as_bytes());
    write(&corpus.join("bundle/pem"), &pem);

    // spiffe_id: IDs, and "trust domain\nnode name" pairs.
    for (name, s) in [
        ("node", "spiffe://example.org/node/n1"),
        ("identity", "spiffe://fuzz.test/identity/256"),
        ("td-only", "spiffe://example.org"),
        ("td-and-name", "example.org\nn-1.a_b"),
        ("dots", "spiffe://a.b-c_d/./x/../y"),
    ] {
        write(&corpus.join(format!("spiffe_id/{name}")), s.as_bytes());
    }

    // handshake: a ClientHello as an initiator sends it (SNI naming identity 1).
    let bundle = meshauth_tls::SharedBundle::new(b.clone());
    let own = meshauth_tls::SharedCertifiedKey::new(
        vec![client, int.clone()],
        PrivateKeyDer::Pkcs8(client_key.serialize_der().into()),
    )
    .expect("client key");
    let config = meshauth_tls::client_config(
        Some(own),
        bundle,
        meshauth_tls::PeerPolicy::AnyInTrustDomain,
        &[meshauth_auth::handshake::ALPN],
    )
    .expect("client config");
    let sni = ServerName::try_from(meshauth_auth::handshake::sni_for(
        meshauth_policy::IdentityId::new(1),
    ))
    .expect("sni");
    let mut conn = rustls::ClientConnection::new(Arc::new(config), sni).expect("client");
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).expect("write_tls");
    }
    write(&corpus.join("handshake/client-hello"), &hello);

    // relay: the preface, SETTINGS, two requests as a C-core client sends them (the second
    // reusing the dynamic table, split into HEADERS + CONTINUATION), and a DATA frame.
    let mut enc = loona_hpack::Encoder::new();
    let headers = |enc: &mut loona_hpack::Encoder<'_>| {
        enc.encode([
            (b":method".as_slice(), b"POST".as_slice()),
            (b":scheme".as_slice(), b"http".as_slice()),
            (
                b":path".as_slice(),
                b"/SpiffeWorkloadAPI/FetchX509SVID".as_slice(),
            ),
            (b":authority".as_slice(), b"tmp%2Fagent.sock".as_slice()),
            (b"workload.spiffe.io".as_slice(), b"true".as_slice()),
            (b"content-type".as_slice(), b"application/grpc".as_slice()),
        ])
    };
    let mut input = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
    let first = headers(&mut enc);
    input.extend(frame(0x1, 0x4, 1, &first));
    let second = headers(&mut enc);
    let (a, b2) = second.split_at(second.len() / 2);
    input.extend(frame(0x1, 0, 3, a));
    input.extend(frame(0x9, 0x4, 3, b2));
    input.extend(frame(0x0, 0x1, 3, b"\0\0\0\0\0"));
    write(&corpus.join("relay/two-requests"), &input);
    // Padded and with priority.
    let mut padded = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let mut body = vec![3u8, 0, 0, 0, 0, 16];
    body.extend(headers(&mut loona_hpack::Encoder::new()));
    body.extend([0, 0, 0]);
    padded.extend(frame(0x1, 0x4 | 0x8 | 0x20, 1, &body));
    write(&corpus.join("relay/padded-priority"), &padded);

    // policy: a few of the Cilium documentation examples the parser supports.
    let docs = root.join("../crates/meshauth-policy/tests/fixtures");
    for name in [
        "walkthrough.yaml",
        "cilium-docs/10-port-range.yaml",
        "cilium-docs/11-match-expressions.yaml",
        "cilium-docs/12-ingress-deny.yaml",
        "cilium-docs/20-match-expressions-and.yaml",
        "cilium-docs/21-l4-multi-rule.yaml",
    ] {
        let text = fs::read(docs.join(name)).expect("policy fixture");
        let base = Path::new(name).file_name().expect("name");
        write(&corpus.join("policy").join(base), &text);
    }
    println!("wrote {} and {}", fx.display(), corpus.display());
}
