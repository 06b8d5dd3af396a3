//! A server refuses a damaged data dir rather than forgetting it: a datastore that is empty,
//! missing, not SQLite, of another trust domain, without its CA, or with a row that does not
//! decode stops `server run` at once with one line naming the file and the damage, and
//! `server check` says the same without starting anything. Only a data dir that holds nothing
//! gets a new CA.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use support::{BIN, ServerProcess, TD, free_port};

#[allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]
fn run_server(dir: &Path, td: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(["--log", "error", "server", "run", "--trust-domain", td])
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--metrics-listen", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("server-data"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the server kept running on a damaged data dir");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

#[allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]
fn check(dir: &Path, td: &str) -> Output {
    Command::new(BIN)
        .args(["--log", "error", "server", "check", "--trust-domain", td])
        .arg("--data-dir")
        .arg(dir.join("server-data"))
        .output()
        .unwrap()
}

/// The one line a refused start printed; asserts it failed.
fn refused(out: &Output) -> String {
    assert!(!out.status.success(), "it must fail");
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    stderr
}

fn db(dir: &Path) -> PathBuf {
    dir.join("server-data/meshauth.db")
}

/// Removes the datastore and its WAL files.
fn remove_db(dir: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", db(dir).display()));
    }
}

#[test]
#[allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]
fn a_damaged_data_dir_stops_the_server_naming_the_file_and_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let server = ServerProcess::start(dir);
    server.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://cli.test/web",
        "--parent-id",
        "spiffe://cli.test/node/n1",
        "--selector",
        "unix:uid:1000",
    ]);
    let bundle = server.ok(&["bundle", "show"]);
    server.stop();
    let file = db(dir).display().to_string();

    // Healthy: check passes and counts the rows.
    let ok = check(dir, TD);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("entries      1 rows"), "{text}");
    assert!(text.contains("ca_journal   1 rows"), "{text}");

    // Another trust domain.
    let e = refused(&run_server(dir, "other.test"));
    assert!(e.contains("belongs to trust domain \"cli.test\""), "{e}");

    // A row that does not decode: the entry's selectors are not JSON any more.
    let conn = rusqlite::Connection::open(db(dir)).unwrap();
    conn.execute("UPDATE entries SET selectors = '[\"unix:uid:1000\"'", [])
        .unwrap();
    drop(conn);
    for out in [run_server(dir, TD), check(dir, TD)] {
        let e = refused(&out);
        assert!(
            e.contains(&file) && e.contains("table entries") && e.contains("entry "),
            "{e}"
        );
    }
    let conn = rusqlite::Connection::open(db(dir)).unwrap();
    conn.execute("UPDATE entries SET selectors = '[\"unix:uid:1000\"]'", [])
        .unwrap();
    drop(conn);
    let server = ServerProcess::start(dir);
    assert_eq!(
        server.ok(&["bundle", "show"]),
        bundle,
        "repaired: the same CA"
    );
    server.stop();

    // The CA's row gone.
    let saved = std::fs::read(db(dir)).unwrap();
    let conn = rusqlite::Connection::open(db(dir)).unwrap();
    conn.execute("DELETE FROM ca_journal", []).unwrap();
    drop(conn);
    let e = refused(&run_server(dir, TD));
    assert!(e.contains(&file) && e.contains("holds no CA"), "{e}");

    // Not SQLite at all.
    remove_db(dir);
    std::fs::write(db(dir), b"this is not a database, it only has its name").unwrap();
    let e = refused(&run_server(dir, TD));
    assert!(
        e.contains(&file) && e.contains("not a readable meshauth datastore"),
        "{e}"
    );

    // Zero length (the case that used to start empty with a new CA).
    remove_db(dir);
    std::fs::write(db(dir), b"").unwrap();
    for out in [run_server(dir, TD), check(dir, TD)] {
        let e = refused(&out);
        assert!(e.contains(&file) && e.contains("is empty"), "{e}");
    }

    // Missing from the initialized data dir.
    remove_db(dir);
    let e = refused(&run_server(dir, TD));
    assert!(e.contains(&file) && e.contains("is missing"), "{e}");
    assert!(!db(dir).exists(), "nothing was created in its place");

    // Put back, it serves its CA again.
    std::fs::write(db(dir), saved).unwrap();
    let conn = rusqlite::Connection::open(db(dir)).unwrap();
    let rows: i64 = conn
        .query_row("SELECT COUNT(*) FROM ca_journal", [], |r| r.get(0))
        .unwrap();
    drop(conn);
    assert_eq!(rows, 1, "the copy taken before the CA row was deleted");
    let server = ServerProcess::start(dir);
    assert_eq!(server.ok(&["bundle", "show"]), bundle);
    server.stop();
}

#[test]
#[allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]
fn only_an_empty_data_dir_gets_a_new_ca_and_check_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let e = refused(&check(dir, TD));
    assert!(e.contains("holds no meshauth datastore"), "{e}");
    assert!(!db(dir).exists(), "check created nothing");
    let server = ServerProcess::start(dir);
    server.stop();
    assert_eq!(
        std::fs::read_to_string(dir.join("server-data/trust-domain")).unwrap(),
        "cli.test\n"
    );
}
