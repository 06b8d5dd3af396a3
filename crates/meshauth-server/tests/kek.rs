//! The CA journal sealed under the key-encryption key (`--kek-file`): what the store holds is
//! never the CA key in the clear, and a server started without the key, or with another one,
//! refuses to start instead of creating a second CA.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

mod support;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use support::*;

const HOUR: Duration = Duration::from_secs(3600);

fn write_kek(dir: &std::path::Path, name: &str, hex: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{hex}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn stored_journal(data: &std::path::Path) -> String {
    meshauth_datastore::Store::open_existing(&data.join(meshauth_server::DATASTORE_FILE))
        .unwrap()
        .load_ca_journal()
        .unwrap()
        .unwrap()
}

#[tokio::test]
async fn the_ca_journal_is_sealed_and_opens_only_with_the_same_key() {
    let dir = tempfile::tempdir().unwrap();
    // `config` keeps the store in <dir>/data.
    let data = dir.path().join("data");
    let keys = tempfile::tempdir().unwrap();
    let k1 = write_kek(keys.path(), "k1", &"a1".repeat(32));
    let k2 = write_kek(keys.path(), "k2", &"b2".repeat(32));

    // A store written before --kek-file: the journal is plain JSON with the CA key.
    let server = TestServer::start(config(dir.path(), 24 * HOUR, HOUR)).await;
    let first_bundle = server.bundle();
    server.stop().await;
    let plain = stored_journal(&data);
    assert!(plain.starts_with('{'), "plain journal before --kek-file");

    // Started with the key: it is sealed, and the CA is the same one.
    let mut with_k1 = config(dir.path(), 24 * HOUR, HOUR);
    with_k1.kek_file = Some(k1.clone());
    let server = TestServer::start(with_k1.clone()).await;
    assert_eq!(server.bundle().authorities, first_bundle.authorities);
    server.stop().await;
    let sealed = stored_journal(&data);
    assert!(
        sealed.starts_with("meshauth-sealed:v1:"),
        "{}",
        &sealed[..40]
    );
    // Base64 has no quotes or braces: no JSON of the journal is left in the clear.
    assert!(
        !sealed.contains('"') && !sealed.contains('{'),
        "nothing of the journal is in the clear"
    );

    // Without the key, or with another: refused, saying what to check; nothing overwritten.
    for (kek, want) in [
        (
            None,
            "start the server with the --kek-file it was sealed with",
        ),
        (Some(k2), "every replica must read the same --kek-file"),
    ] {
        let mut c = config(dir.path(), 24 * HOUR, HOUR);
        c.kek_file = kek;
        let e = meshauth_server::Server::bind(c).await.unwrap_err();
        assert!(format!("{e:#}").contains(want), "{e:#}");
    }
    assert_eq!(stored_journal(&data), sealed);

    // With the key again: the same CA.
    let server = TestServer::start(with_k1).await;
    assert_eq!(server.bundle().authorities, first_bundle.authorities);
    server.stop().await;
}
