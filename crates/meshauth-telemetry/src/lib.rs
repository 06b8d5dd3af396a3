//! What every long-running meshauth process exposes: `/metrics` (Prometheus text), `/healthz`
//! (the process is alive) and `/readyz` (it can do its job), on one HTTP listener.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::sync::Arc;

use axum::Router;
use axum::http::StatusCode;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Produces the metrics text on each scrape.
pub type Encoder = Arc<dyn Fn() -> String + Send + Sync>;

/// Serves the three endpoints until `shutdown` completes. `/readyz` answers 200 while `ready`
/// holds `true` and 503 otherwise.
pub async fn serve_http(
    listener: TcpListener,
    metrics: Encoder,
    ready: watch::Receiver<bool>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let body = metrics();
                async move {
                    (
                        [(
                            CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = *ready.borrow();
                async move {
                    if ready {
                        (StatusCode::OK, "ready\n")
                    } else {
                        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
                    }
                }
            }),
        );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}
