//! The operator's HTTP endpoints: `/` (the live page, see `dashboard.rs`), `/api/taskqueues`
//! (its data as JSON, `?namespace=NS` to filter, `&limit=N` rows, 300 by default), `/metrics` (OpenMetrics text), `/healthz`
//! (the process serves requests) and `/readyz` (the caches are filled and reconciling has
//! started).
//!
//! The page and its API show every watched namespace's TaskQueues, their reasons and
//! conditions: they are served on loopback addresses only ([`Serves::page`]). In a pod that
//! means through `kubectl port-forward`, which the API server allows only to those who may
//! create `pods/portforward` in the operator's namespace: Kubernetes authentication and RBAC,
//! with no token handling (and no cluster-wide TokenReview/SubjectAccessReview rights) in the
//! operator. `/metrics` and the probes may be served on any address (Prometheus, the kubelet).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::dashboard::{Dashboard, DEFAULT_LIMIT, PAGE};
use crate::metrics::Metrics;

/// What one listener serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Serves {
    /// `/` and `/api/taskqueues`, besides `/metrics` and the probes.
    pub page: bool,
}

impl Serves {
    /// The page only where nothing but this host can connect.
    pub fn at(addr: &SocketAddr) -> Self {
        Serves { page: addr.ip().is_loopback() }
    }
}

/// The response to one request (no IO, so it is tested without a socket).
pub fn respond(
    method: &Method,
    path: &str,
    query: Option<&str>,
    metrics: &Metrics,
    dashboard: &Dashboard,
    serves: Serves,
) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .expect("static response parts are valid")
    };
    if method != Method::GET && method != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n".into());
    }
    match path {
        "/" | "/index.html" | "/api/taskqueues" if !serves.page => {
            let msg = "the page is served on a loopback address only (run --page-addr, 127.0.0.1:8081 by default): \
                       kubectl port-forward to the operator pod's page port, then open it\n";
            reply(StatusCode::NOT_FOUND, "text/plain", msg.into())
        }
        "/" | "/index.html" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.into()),
        "/api/taskqueues" => {
            let namespace = query_param(query, "namespace");
            let limit = match query_param(query, "limit").map(|l| l.parse::<usize>()) {
                None => DEFAULT_LIMIT,
                Some(Ok(n)) => n,
                Some(Err(_)) => {
                    let msg = "limit must be a whole number of rows (e.g. ?limit=1000)\n";
                    return reply(StatusCode::BAD_REQUEST, "text/plain", msg.into());
                }
            };
            let view = dashboard.api(namespace.as_deref().filter(|n| !n.is_empty()), limit);
            let body = serde_json::to_string(&view).expect("the view serializes");
            reply(StatusCode::OK, "application/json", body)
        }
        "/metrics" => {
            reply(StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", metrics.render())
        }
        "/healthz" => reply(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" if metrics.is_ready() => reply(StatusCode::OK, "text/plain", "ready\n".into()),
        "/readyz" => reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "caches not filled yet\n".into()),
        _ => {
            reply(StatusCode::NOT_FOUND, "text/plain", "try /, /api/taskqueues, /metrics, /healthz or /readyz\n".into())
        }
    }
}

/// One parameter of a query string, percent-decoded.
fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == name).map(|(_, v)| v.into_owned())
}

/// Bind first (so a taken port is reported before anything else starts), then serve forever.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>, dashboard: Arc<Dashboard>) {
    let serves = listener.local_addr().map(|a| Serves::at(&a)).unwrap_or(Serves { page: false });
    if let Ok(addr) = listener.local_addr() {
        if serves.page {
            info!(%addr, "serving / (live page), /api/taskqueues, /metrics, /healthz, /readyz");
        } else {
            info!(%addr, "serving /metrics, /healthz, /readyz (the page: loopback only)");
        }
    }
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (metrics, dashboard) = (metrics.clone(), dashboard.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let response = respond(req.method(), req.uri().path(), req.uri().query(), &metrics, &dashboard, serves);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(e) =
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await
            {
                debug!(error = %e, "metrics connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let (m, d) = (Metrics::new(), Dashboard::default());
        let all = Serves { page: true };
        let get = |path: &str, query: Option<&str>| respond(&Method::GET, path, query, &m, &d, all);
        assert_eq!(get("/healthz", None).status(), StatusCode::OK);
        assert_eq!(get("/readyz", None).status(), StatusCode::SERVICE_UNAVAILABLE);
        m.set_ready();
        assert_eq!(get("/readyz", None).status(), StatusCode::OK);
        let r = get("/metrics", None);
        assert_eq!(r.status(), StatusCode::OK);
        assert!(r.headers()["content-type"].to_str().unwrap().starts_with("application/openmetrics-text"));
        let page = get("/", None);
        assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
        let api = get("/api/taskqueues", Some("namespace=prod"));
        assert_eq!(api.headers()["content-type"], "application/json");
        assert_eq!(get("/api/taskqueues", Some("limit=all")).status(), StatusCode::BAD_REQUEST);
        assert_eq!(get("/api/taskqueues", Some("namespace=prod&limit=20")).status(), StatusCode::OK);
        assert_eq!(get("/nope", None).status(), StatusCode::NOT_FOUND);
        assert_eq!(respond(&Method::POST, "/metrics", None, &m, &d, all).status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(query_param(Some("a=1&namespace=team%2Da"), "namespace").as_deref(), Some("team-a"));
        assert_eq!(query_param(None, "namespace"), None);
    }

    #[test]
    fn the_page_and_its_api_only_on_loopback() {
        let (m, d) = (Metrics::new(), Dashboard::default());
        let public = Serves::at(&"0.0.0.0:8080".parse().unwrap());
        assert_eq!(public, Serves { page: false });
        for path in ["/", "/index.html", "/api/taskqueues"] {
            assert_eq!(respond(&Method::GET, path, None, &m, &d, public).status(), StatusCode::NOT_FOUND, "{path}");
        }
        assert_eq!(respond(&Method::GET, "/metrics", None, &m, &d, public).status(), StatusCode::OK);
        assert_eq!(respond(&Method::GET, "/healthz", None, &m, &d, public).status(), StatusCode::OK);
        for loopback in ["127.0.0.1:8081", "[::1]:8081"] {
            let serves = Serves::at(&loopback.parse().unwrap());
            assert_eq!(respond(&Method::GET, "/", None, &m, &d, serves).status(), StatusCode::OK, "{loopback}");
        }
    }
}
