//! The admin API: health, readiness, kernel counters and run-time enrollment. Served on its own
//! thread and runtime so it answers even when the data path is saturated.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::warn;

use crate::{
    enrollment::{Enrollments, PodSpec},
    redirect::Redirect,
};

pub struct AdminState {
    pub redirect: Arc<Redirect>,
    pub enrollments: Arc<Enrollments>,
    pub ready: AtomicBool,
}

/// The running admin server; `stop` ends it and releases its hold on the agent's state.
pub struct AdminServer {
    pub addr: SocketAddr,
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl AdminServer {
    pub fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// Binds now (so a bad address fails start-up) and serves on a dedicated thread.
pub fn spawn(addr: SocketAddr, state: Arc<AdminState>) -> std::io::Result<AdminServer> {
    let listener = std::net::TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel();
    let thread = std::thread::Builder::new()
        .name("admin".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("admin runtime");
            runtime.block_on(async {
                tokio::select! {
                    _ = serve(listener, state) => {}
                    _ = stopped => {}
                }
            });
        })?;
    Ok(AdminServer { addr, stop, thread })
}

async fn serve(listener: std::net::TcpListener, state: Arc<AdminState>) {
    let listener = TcpListener::from_std(listener).expect("admin listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let state = Arc::clone(&state);
                async move { Ok::<_, Infallible>(route(&state, req).await) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                warn!(%error, "admin connection failed");
            }
        });
    }
}

#[derive(Deserialize)]
struct EnrollRequest {
    name: String,
    netns: std::path::PathBuf,
}

async fn route(state: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    match (req.method().clone(), path.as_str()) {
        (Method::GET, "/healthz") => text(StatusCode::OK, "ok\n"),
        (Method::GET, "/ready") => {
            if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (Method::GET, "/stats") => json_response(StatusCode::OK, &stats(state)),
        (Method::GET, "/pods") => json_response(StatusCode::OK, &state.enrollments.list()),
        (Method::POST, "/pods") => {
            let body = match req.into_body().collect().await {
                Ok(body) => body.to_bytes(),
                Err(error) => return text(StatusCode::BAD_REQUEST, &format!("{error}\n")),
            };
            let request: EnrollRequest = match serde_json::from_slice(&body) {
                Ok(request) => request,
                Err(error) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        &format!("expected {{\"name\": ..., \"netns\": ...}}: {error}\n"),
                    )
                }
            };
            let spec = PodSpec {
                name: request.name,
                netns: request.netns,
            };
            match state.enrollments.enroll(&spec) {
                Ok(pod) => json_response(StatusCode::OK, &pod),
                Err(error) => text(StatusCode::UNPROCESSABLE_ENTITY, &format!("{error}\n")),
            }
        }
        (Method::DELETE, p) if p.starts_with("/pods/") => {
            match state.enrollments.unenroll(&p["/pods/".len()..]) {
                Ok(()) => text(StatusCode::OK, "unenrolled\n"),
                Err(error) => text(StatusCode::NOT_FOUND, &format!("{error}\n")),
            }
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn stats(state: &AdminState) -> serde_json::Value {
    let decisions: serde_json::Map<String, serde_json::Value> = state
        .redirect
        .decision_counts()
        .iter()
        .map(|(decision, count)| (decision.name().to_owned(), json!(count)))
        .collect();
    let (pending, established) = state.redirect.map_occupancy();
    json!({
        "cgroup": state.redirect.cgroup(),
        "decisions": decisions,
        "original_dst_entries": { "pending": pending, "established": established },
        "pods": state.enrollments.list(),
    })
}

fn text(status: StatusCode, body: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_owned())));
    *response.status_mut() = status;
    response
}

fn json_response<T: serde::Serialize>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec_pretty(value).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
