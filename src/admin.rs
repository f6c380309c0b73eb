//! The admin listener: `GET /metrics` (Prometheus text format 0.0.4),
//! `GET /status` (a page a person reads) and `GET /api/status` (the same as JSON),
//! `POST /api/reload` (answers `ok`, or 422 with every validation error) and
//! `POST /api/pools/{pool}/maintenance` with the body `on` or `off`, and
//! `POST /api/snapshots/refresh[?name=LABEL]` (fetches edge snapshots now and waits).
//!
//! Served only on the `[admin] listen` addresses (loopback by default), never on a
//! public listener. The maintenance
//! switch outlives reloads until it is switched again.

use std::convert::Infallible;
use std::sync::Arc;

use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::body::Body;
use crate::proxy::local;
use crate::server::Server;

/// Largest admin request body read (the maintenance switch needs three bytes).
const MAX_BODY: usize = 1024;

/// Answers one admin request.
pub async fn handle(server: &Arc<Server>, req: Request<Incoming>) -> Response<Body> {
    let proxy = server.proxy();
    if let Some(token) = proxy.live().snapshot.admin.token.as_deref() {
        if !authorized(&req, token) {
            let mut resp = local(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "A bearer token is required.\n",
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    let path = req.uri().path().to_owned();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method(), segments.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            let mut resp = Response::new(Body::full(proxy.metrics().render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, ["status"]) => {
            let mut resp = Response::new(Body::full(crate::status::page(proxy, server.history())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, ["api", "status"]) => {
            match serde_json::to_vec_pretty(&crate::status::status(proxy, server.history())) {
                Ok(json) => {
                    let mut resp = Response::new(Body::full(json));
                    resp.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    resp
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        (&Method::POST, ["api", "reload"]) => {
            let Some(path) = proxy.live().snapshot.source.clone() else {
                return text(
                    StatusCode::CONFLICT,
                    "this instance runs a built-in config; there is no file to reload\n".into(),
                );
            };
            match server.reload_file(&path).await {
                Ok(()) => {
                    tracing::info!(config = %path.display(), "reloaded (admin API)");
                    text(StatusCode::OK, "ok\n".into())
                }
                Err(e) => {
                    tracing::error!("reload rejected, the running config stays:\n{e}");
                    text(StatusCode::UNPROCESSABLE_ENTITY, format!("{e}\n"))
                }
            }
        }
        (&Method::POST, ["api", "pools", pool, "maintenance"]) => {
            let pool = (*pool).to_owned();
            let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(_) => return text(StatusCode::PAYLOAD_TOO_LARGE, "body too large\n".into()),
            };
            let on = match body.trim_ascii() {
                b"on" => true,
                b"off" => false,
                _ => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        "the body must be `on` or `off`\n".into(),
                    )
                }
            };
            let live = proxy.live();
            match live.pools.iter().find(|p| p.name() == pool) {
                Some(p) => {
                    p.set_maintenance(on);
                    tracing::info!(pool = %pool, on, "manual maintenance switched");
                    text(
                        StatusCode::OK,
                        format!(
                            "pool {pool}: maintenance {}\n",
                            if on { "on" } else { "off" }
                        ),
                    )
                }
                None => text(StatusCode::NOT_FOUND, format!("no pool named {pool:?}\n")),
            }
        }
        (&Method::POST, ["api", "snapshots", "refresh"]) => {
            // `?name=LABEL` refreshes one snapshot; without it, all. Waits for the
            // fetches, so the answer says whether the new copy is in.
            let name = req.uri().query().and_then(|q| {
                q.split('&')
                    .find_map(|kv| kv.strip_prefix("name="))
                    .map(str::to_owned)
            });
            let Some(edge) = proxy.live().snapshots.clone() else {
                return text(
                    StatusCode::NOT_FOUND,
                    "no snapshots are configured\n".into(),
                );
            };
            match edge.refresh_and_wait(name.as_deref()).await {
                Ok(results) => {
                    let lines: String = results
                        .iter()
                        .map(|(n, r)| format!("{n}: {}\n", r.map_or("removed", |r| r.as_str())))
                        .collect();
                    tracing::info!(count = results.len(), "snapshots refreshed (admin API)");
                    text(StatusCode::OK, lines)
                }
                Err(e) => text(StatusCode::NOT_FOUND, format!("{e}\n")),
            }
        }
        (_, ["metrics"])
        | (_, ["api", "reload"])
        | (_, ["api", "pools", _, "maintenance"])
        | (_, ["api", "snapshots", "refresh"]) => local(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "Wrong method for this path.\n",
        ),
        _ => local(
            StatusCode::NOT_FOUND,
            "not_found",
            "Not found. Try /metrics.\n",
        ),
    }
}

/// Whether `req` carries `Authorization: Bearer <token>` (compared in constant time).
fn authorized<B>(req: &Request<B>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    else {
        return false;
    };
    let (a, b) = (given.trim().as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Body::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// Serves the admin API on `listener` until `stop` changes.
pub async fn serve(
    listener: Arc<TcpListener>,
    server: Arc<Server>,
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
        let server = Arc::clone(&server);
        let svc = service_fn(move |req| {
            let server = Arc::clone(&server);
            async move { Ok::<_, Infallible>(handle(&server, req).await) }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
