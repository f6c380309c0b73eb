//! Forwarding an admitted request to its back end, with retries, and reading a
//! request body ahead while it waits for admission.
//!
//! Invariants: a retry goes through the pool's admission again (so it respects
//! `max_connections` and the queue) and only when nothing unsafe was sent; every
//! outcome feeds the back end's passive health and is counted once.

use std::sync::Arc;
use std::time::Instant;

use http::header;
use http::{Request, Response, StatusCode, Uri};

use super::{body_reject, local, refuse};
use crate::accesslog::Facts;
use crate::body::{Body, BodyError, ClientBody};
use crate::config::Class;
use crate::headers::{self, Forwarded};
use crate::pool::Pool;
use crate::recycle;
use crate::tunnel::{TunnelError, Upgrade};
use crate::upstream::{Failed, UpBody, UpstreamError};
use crate::upstream_io::UpstreamTimeouts;

/// Most request-body bytes read ahead while a request waits for admission.
pub const PREFETCH_LIMIT: usize = 256 * 1024;

/// Waits for admission while reading the request body ahead (up to
/// [`PREFETCH_LIMIT`]). Reading is what lets hyper see a client that closes its
/// connection while queued: then the wait is abandoned (`Err`), which takes the
/// request out of the queue. The body read so far is replayed to the back end.
pub(super) async fn acquire_watching_body(
    pool: &Arc<Pool>,
    class: Class,
    mut incoming: ClientBody,
) -> Result<(Result<crate::pool::Lease, crate::pool::Shed>, Body), BodyError> {
    use http_body_util::BodyExt;
    let acquire = pool.acquire(class);
    tokio::pin!(acquire);
    let mut frames = std::collections::VecDeque::new();
    let mut read = 0usize;
    let mut ended = false;
    let acquired = loop {
        tokio::select! {
            biased;
            r = &mut acquire => break r,
            f = incoming.frame(), if !ended && read < PREFETCH_LIMIT => match f {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |d| d.len());
                    frames.push_back(frame);
                }
                None => ended = true,
                Some(Err(e)) => return Err(e),
            },
        }
    };
    Ok((acquired, Body::prefetched(frames, incoming)))
}

/// The origin-form target (path and query) of `uri`, sharing its bytes.
fn origin_form(uri: &Uri) -> Uri {
    let mut parts = http::uri::Parts::default();
    parts.path_and_query = Some(
        uri.path_and_query()
            .cloned()
            .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/")),
    );
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// What [`forward`] needs besides the request and its lease.
pub(super) struct Call<'a> {
    pub(super) fwd: &'a Forwarded,
    pub(super) class: Class,
    pub(super) timeouts: UpstreamTimeouts,
    /// The upgrade the client asked for, if it did.
    pub(super) upgrade: Option<Upgrade>,
}

/// Sends the request to the leased back end. A failure that is safe to retry (nothing
/// was sent, or an idempotent request without a body got no response byte) is tried
/// again on another back end, up to the pool's `retries`, through the pool's normal
/// admission (so retries respect `max_connections` and the queue). Every outcome
/// feeds the back end's passive health.
// Not an `async fn`, for the future's size: the block uses its arguments where it
// captured them (an `async fn` keeps a second copy of each in its future), and this
// future is moved whole into the caller's when it is awaited.
#[allow(clippy::manual_async_fn)]
pub(super) fn forward<'a>(
    mut parts: http::request::Parts,
    body: Body,
    mut lease: crate::pool::Lease,
    call: Call<'a>,
    facts: &'a mut Facts,
) -> impl std::future::Future<Output = Response<Body>> + Send + 'a {
    async move {
        // Back ends get origin-form targets; absolute-form (and HTTP/2's
        // `:authority`) was routed on its authority.
        let absolute = parts.uri.scheme().is_some() || parts.uri.authority().is_some();
        if absolute {
            // RFC 9112 §3.2.2, RFC 9113 §8.3.1: the target's authority replaces any Host
            // the client sent (before the rewrite, which adds a Host only if none).
            if let Some(host) = parts
                .uri
                .authority()
                .and_then(|a| recycle::host_value(a.as_str()))
            {
                parts.headers.insert(header::HOST, host);
            }
        }
        headers::rewrite_request(
            &mut parts.headers,
            call.fwd,
            &lease.backend().spec.address_text,
        );
        if let Some(up) = &call.upgrade {
            headers::keep_upgrade(&mut parts.headers, up.protocol().clone());
        }
        if absolute {
            parts.uri = origin_form(&parts.uri);
        }
        parts.version = http::Version::HTTP_11;
        let mut req = Request::from_parts(parts, body);
        let pool = Arc::clone(lease.pool());
        let mut tries_left = pool.retries();
        loop {
            let backend = lease.backend_arc();
            let backend = &*backend;
            // `facts.pool` is set only when an access line will be written.
            let sent = facts.pool.is_some().then(Instant::now);
            let result = backend.upstream.send(req, call.timeouts, lease).await;
            if let Some(sent) = sent {
                facts.backend = Some(backend.name_arc());
                facts.upstream = Some(sent.elapsed());
            }
            match result {
                Ok((resp, lease)) => {
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return switch(call.upgrade, resp, lease, backend);
                    }
                    pool.passive_result(backend, !resp.status().is_server_error());
                    let (mut parts, body) = resp.into_parts();
                    headers::rewrite_response(&mut parts.headers, backend.spec.served_by.as_ref());
                    backend.metrics.requests.inc(parts.status);
                    return Response::from_parts(parts, Body::upstream(body, lease));
                }
                Err((Failed { error, retry }, held)) => {
                    lease = held;
                    if let Some(b) = BodyError::find(&error) {
                        // The client's body broke off (too slow, too big): not the back
                        // end's fault, and not to be retried.
                        let resp = refuse(body_reject(b));
                        backend.metrics.requests.inc(resp.status());
                        return resp;
                    }
                    pool.passive_result(backend, false);
                    let code = error.code();
                    let retry = retry.filter(|_| tries_left > 0);
                    let timed_out = timed_out(&error);
                    tracing::warn!(pool = %pool.name(), backend = %backend.spec.name, error = %error,
                        retrying = retry.is_some(), "forwarding failed");
                    let Some(again) = retry else {
                        let resp = if timed_out {
                            local(
                                StatusCode::GATEWAY_TIMEOUT,
                                "upstream_timeout",
                                "The back end did not answer in time.\n",
                            )
                        } else {
                            local(
                                StatusCode::BAD_GATEWAY,
                                code,
                                "The back end could not answer.\n",
                            )
                        };
                        backend.metrics.requests.inc(resp.status());
                        return resp;
                    };
                    tries_left -= 1;
                    let reason = usize::from(matches!(
                        error,
                        UpstreamError::AfterSend { .. } | UpstreamError::Exchange { .. }
                    ));
                    pool.metrics.retries[reason].inc();
                    let failed = lease.backend_arc();
                    drop(lease);
                    match pool.acquire_retry(call.class, &failed).await {
                        Ok(next) => {
                            lease = next;
                            req = again;
                        }
                        Err(shed) => {
                            let resp = local(
                                StatusCode::BAD_GATEWAY,
                                code,
                                "The back end could not answer.\n",
                            );
                            tracing::warn!(pool = %pool.name(), reason = shed.reason(), "no back end for the retry");
                            failed.metrics.requests.inc(resp.status());
                            return resp;
                        }
                    }
                }
            }
        }
    }
}

/// The back end answered `101`: the tunnel if the client asked for this upgrade,
/// else `502` (the back-end connection, switched, is closed).
fn switch(
    upgrade: Option<Upgrade>,
    resp: Response<UpBody>,
    lease: crate::pool::Lease,
    backend: &crate::pool::Backend,
) -> Response<Body> {
    let pool = Arc::clone(lease.pool());
    let (parts, body) = resp.into_parts();
    let opened = match (upgrade, body) {
        (Some(up), UpBody::Hyper(body, checkin)) => up.open(
            Response::from_parts(parts, body),
            checkin,
            lease,
            backend.spec.served_by.as_ref(),
        ),
        // The fast path carries no upgrade requests and refuses a `101` itself.
        _ => Err(TunnelError::Unasked),
    };
    let resp = match opened {
        Ok(resp) => {
            pool.passive_result(backend, true);
            resp
        }
        Err(e) => {
            tracing::warn!(pool = %pool.name(), backend = %backend.spec.name, error = %e,
                "refusing the back end's switch of protocols");
            pool.passive_result(backend, false);
            local(
                StatusCode::BAD_GATEWAY,
                e.code(),
                "The back end switched protocols unexpectedly.\n",
            )
        }
    };
    backend.metrics.requests.inc(resp.status());
    resp
}

/// Whether an upstream failure was a pause limit (`upstream_*_timeout`).
fn timed_out(err: &UpstreamError) -> bool {
    if matches!(err, UpstreamError::ConnectTimeout { .. }) {
        return true;
    }
    let mut at: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = at {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::TimedOut {
                return true;
            }
        }
        at = e.source();
    }
    false
}
