//! The SPIFFE Workload API (`SpiffeWorkloadAPI`) on the agent's Unix socket.
//!
//! As the specification requires: requests without the `workload.spiffe.io: true` metadata get
//! `InvalidArgument`; callers are identified out of band (peer credentials and the process
//! pinned when the connection was accepted, see `attestor`);
//! a caller with no matching entry gets `PermissionDenied`; streams send the full state first
//! and again on every change (rotation, entry change, bundle change). JWT-SVIDs are not issued
//! yet: those RPCs answer `Unimplemented`, which clients must not retry.

use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::Arc;

use meshauth_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use meshauth_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use tokio::sync::{mpsc, watch};
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::attestor;
use crate::authority_fix::{WarnLimit, WorkloadPeer};
use crate::cache::Snapshot;
use crate::metrics::{ApiResult, Metrics};

/// Messages buffered per stream (each is the full state).
const STREAM_BUFFER: usize = 2;

/// Warnings about callers that cannot be attested.
static ATTESTATION_LOG: WarnLimit = WarnLimit::new();

/// The Workload API over the agent's cache.
#[derive(Debug, Clone)]
pub struct WorkloadApi {
    state: watch::Receiver<Arc<Snapshot>>,
    metrics: Metrics,
}

impl WorkloadApi {
    /// Serves snapshots from `state`.
    pub fn new(state: watch::Receiver<Arc<Snapshot>>, metrics: Metrics) -> Self {
        WorkloadApi { state, metrics }
    }

    /// Checks the header and attests the caller.
    fn caller<T>(&self, request: &Request<T>) -> Result<BTreeSet<String>, Status> {
        let header = request
            .metadata()
            .get("workload.spiffe.io")
            .map(|v| v.as_bytes());
        if header != Some(b"true".as_slice()) {
            self.metrics.workload_api(ApiResult::MissingHeader);
            return Err(Status::invalid_argument(
                "security header missing from request: set metadata workload.spiffe.io: true",
            ));
        }
        let attested = match request.extensions().get::<WorkloadPeer>() {
            Some(WorkloadPeer(Ok(caller))) => attestor::selectors(caller),
            Some(WorkloadPeer(Err(e))) => Err(e.clone()),
            None => Err(attestor::AttestError::NoCredentials),
        };
        attested.map_err(|e| {
            self.metrics.workload_api(ApiResult::AttestationFailed);
            // Any local process can cause this: rate-limited.
            match ATTESTATION_LOG.allow() {
                Some(suppressed) => {
                    tracing::warn!(error = %e, suppressed, "workload attestation failed");
                }
                None => tracing::debug!(error = %e, "workload attestation failed"),
            }
            Status::permission_denied(format!("cannot attest the caller: {e}"))
        })
    }
}

fn concat_der<'a>(
    certs: impl IntoIterator<Item = &'a rustls::pki_types::CertificateDer<'a>>,
) -> Vec<u8> {
    certs
        .into_iter()
        .flat_map(|c| c.as_ref().iter().copied())
        .collect()
}

/// The X.509-SVID response for a caller, or the status that refuses it.
fn x509_response(
    snap: &Snapshot,
    selectors: &BTreeSet<String>,
) -> Result<X509svidResponse, (Status, ApiResult)> {
    let svids = snap.svids_for(selectors);
    if svids.is_empty() {
        if !snap.synced || snap.has_entry_for(selectors) {
            // Not synced yet, or the SVID is being signed: the client retries with backoff.
            return Err((
                Status::unavailable("identity not available yet; retry"),
                ApiResult::NotReady,
            ));
        }
        return Err((
            Status::permission_denied("no identity issued"),
            ApiResult::NoIdentity,
        ));
    }
    let bundle = snap
        .bundle
        .as_ref()
        .map(|b| concat_der(&b.authorities))
        .unwrap_or_default();
    Ok(X509svidResponse {
        svids: svids
            .iter()
            .map(|s| X509svid {
                spiffe_id: s.entry.spiffe_id.to_string(),
                x509_svid: concat_der(&s.chain),
                x509_svid_key: s.key.secret_pkcs8_der().to_vec(),
                bundle: bundle.clone(),
                hint: String::new(),
            })
            .collect(),
        crl: vec![],
        federated_bundles: HashMap::new(),
    })
}

fn bundles_response(
    snap: &Snapshot,
    selectors: &BTreeSet<String>,
) -> Result<X509BundlesResponse, (Status, ApiResult)> {
    if !snap.synced {
        return Err((
            Status::unavailable("not synced with the server yet; retry"),
            ApiResult::NotReady,
        ));
    }
    if !snap.has_entry_for(selectors) {
        return Err((
            Status::permission_denied("no identity issued"),
            ApiResult::NoIdentity,
        ));
    }
    let mut bundles = HashMap::new();
    if let Some(b) = &snap.bundle {
        bundles.insert(
            format!("spiffe://{}", b.trust_domain),
            concat_der(&b.authorities),
        );
    }
    Ok(X509BundlesResponse {
        crl: vec![],
        bundles,
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

impl WorkloadApi {
    /// Streams `build(snapshot)` now and on every change while it differs; ends with the first
    /// refusal.
    fn stream<T, F>(&self, selectors: BTreeSet<String>, build: F) -> Result<BoxStream<T>, Status>
    where
        T: PartialEq + Clone + Send + 'static,
        F: Fn(&Snapshot, &BTreeSet<String>) -> Result<T, (Status, ApiResult)> + Send + 'static,
    {
        let mut rx = self.state.clone();
        let first = build(&rx.borrow_and_update(), &selectors).map_err(|(status, result)| {
            self.metrics.workload_api(result);
            status
        })?;
        self.metrics.workload_api(ApiResult::Ok);
        let (tx, out) = mpsc::channel(STREAM_BUFFER);
        let metrics = self.metrics.clone();
        tokio::spawn(async move {
            let mut last = first.clone();
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = rx.changed() => if changed.is_err() { return },
                    () = tx.closed() => return,
                }
                let next = build(&rx.borrow_and_update(), &selectors);
                match next {
                    Ok(msg) if msg == last => {}
                    Ok(msg) => {
                        last = msg.clone();
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    Err((status, result)) => {
                        metrics.workload_api(result);
                        let _ = tx.send(Err(status)).await;
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(ReceiverStream::new(out)))
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadApi {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let selectors = self.caller(&request)?;
        tracing::debug!(selectors = ?selectors, "FetchX509SVID");
        Ok(Response::new(self.stream(selectors, x509_response)?))
    }

    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let selectors = self.caller(&request)?;
        Ok(Response::new(self.stream(selectors, bundles_response)?))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        self.caller(&request)?;
        self.metrics.workload_api(ApiResult::Unimplemented);
        Err(Status::unimplemented(
            "JWT-SVIDs are not issued by this agent",
        ))
    }

    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        self.caller(&request)?;
        self.metrics.workload_api(ApiResult::Unimplemented);
        Err(Status::unimplemented(
            "JWT bundles are not served by this agent",
        ))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        self.caller(&request)?;
        self.metrics.workload_api(ApiResult::Unimplemented);
        Err(Status::unimplemented(
            "JWT-SVID validation is not offered by this agent",
        ))
    }
}
