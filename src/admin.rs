//! The admin listener: `/metrics` (Prometheus text format 0.0.4).
//!
//! Served only on the `[admin] listen` addresses (loopback by default), never on a
//! public listener. Later issues add `/status`, `/api/status`, `/api/reload` and the
//! maintenance switch here.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::proxy::{local, Proxy};

/// Answers one admin request.
pub fn handle<B>(proxy: &Proxy, req: &Request<B>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Body::full(proxy.metrics().render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (_, "/metrics") => local(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Use GET.\n",
        ),
        _ => local(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found. Try /metrics.\n",
        ),
    }
}

/// Serves the admin API on `listener` until `stop` changes.
pub async fn serve(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.changed() => return,
            a = listener.accept() => a,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let proxy = Arc::clone(&proxy);
        let svc = service_fn(move |req| {
            let resp = handle(&proxy, &req);
            async move { Ok::<_, Infallible>(resp) }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
