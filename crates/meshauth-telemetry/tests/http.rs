//! `/metrics`, `/healthz` and `/readyz` over real loopback TCP.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use meshauth_telemetry::{Encoder, Readiness, serve_http};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `GET path` over HTTP/1.0; the status code and the body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_owned())
}

struct Running {
    addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

async fn start(readiness: Readiness) -> Running {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let encoder: Encoder = Arc::new(|| "# EOF\n".to_owned());
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(serve_http(listener, encoder, readiness, async move {
        let _ = rx.await;
    }));
    Running { addr, stop, task }
}

#[tokio::test]
async fn readyz_lists_each_condition_that_is_not_ready_with_its_reason() {
    let readiness = Readiness::new();
    let sync = readiness.register("sync");
    let store = readiness.register("store");
    let http = start(readiness.clone()).await;

    let (status, body) = get(http.addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body, "sync: not yet reported\nstore: not yet reported\n");

    sync.set_not_ready("waiting for the first sync with the server");
    store.set_ready();
    let (status, body) = get(http.addr, "/readyz").await;
    assert_eq!(status, 503);
    assert_eq!(body, "sync: waiting for the first sync with the server\n");

    sync.set_ready();
    assert_eq!(get(http.addr, "/readyz").await, (200, "ready\n".to_owned()));

    // Readiness can be lost again.
    store.set_not_ready("database is locked");
    assert_eq!(
        get(http.addr, "/readyz").await,
        (503, "store: database is locked\n".to_owned())
    );

    assert_eq!(get(http.addr, "/healthz").await, (200, "ok\n".to_owned()));
    assert_eq!(
        get(http.addr, "/metrics").await,
        (200, "# EOF\n".to_owned())
    );

    let _ = http.stop.send(());
    tokio::time::timeout(Duration::from_secs(5), http.task)
        .await
        .expect("the listener stops on shutdown")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn readyz_without_conditions_is_ready() {
    let http = start(Readiness::new()).await;
    assert_eq!(get(http.addr, "/readyz").await, (200, "ready\n".to_owned()));
    let _ = http.stop.send(());
    http.task.await.unwrap().unwrap();
}
