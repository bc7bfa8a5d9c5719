//! The daemon's HTTP servers: the control API on the Unix socket (mode 0660) and optionally on TCP
//! behind a bearer token, the guest API on its own listener, and Prometheus metrics.

mod control_token;
pub mod error;
pub mod guest;
pub mod guest_limits;
mod jobs;
mod paging;
mod sandboxes;
mod stream;
mod system;
mod templates;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use actix::Addr;
use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::middleware::{from_fn, Next};
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::actors::governor::ResourceGovernor;
use crate::actors::supervisor::Supervisor;
use crate::actors::Services;
use error::{json_error, path_error, query_error, ApiError};

pub use control_token::{load_for as load_control_token, ControlToken};
pub use jobs::{is_remote_repo, validate as validate_job_request};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("another agentlabd is already serving {0}")]
    SocketInUse(PathBuf),
    #[error("preparing the socket {path}: {source}")]
    Socket {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("socket group `{0}` does not exist")]
    UnknownGroup(String),
    #[error("reading the control token file {path}: {source}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the control token file {0} is empty: put a long random token in it \
         (e.g. `openssl rand -hex 32`)"
    )]
    TokenEmpty(PathBuf),
    #[error("the control token file {0} is too long to be a token")]
    TokenTooLong(PathBuf),
    #[error("the control token file {path} {reason}")]
    TokenExposed { path: PathBuf, reason: String },
    #[error("control_listen {0} needs control_token_file")]
    TokenMissing(String),
}

/// What every handler shares.
#[derive(Debug)]
pub struct ApiState {
    pub svc: Arc<Services>,
    pub supervisor: Addr<Supervisor>,
    pub governor: Addr<ResourceGovernor>,
    pub reports: guest::Reports,
    /// Each job's log masker, kept across the guest's log posts.
    pub log_masks: crate::jobfiles::LogMasks,
    pub started: Instant,
    pub shutting_down: Arc<AtomicBool>,
    /// The job files the guest API writes: one instance, whose per-job locks keep the caps.
    pub guest_files: crate::jobfiles::JobFiles,
    /// How many guest requests each job has in flight.
    pub guest_limits: guest_limits::GuestLimits,
}

impl ApiState {
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }
}

/// What a control listener asks of a request: nothing on the Unix socket (its mode and group
/// guard it), the bearer token on TCP.
#[derive(Debug, Clone)]
enum ControlAuth {
    Socket,
    Bearer(Arc<ControlToken>),
}

async fn require_token(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    if let Some(ControlAuth::Bearer(expected)) = req.app_data::<ControlAuth>() {
        let given = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        // A missing and a wrong token get the same answer, which says nothing about the token.
        let accepted = expected.matches(given.unwrap_or("").as_bytes()) && given.is_some();
        if !accepted {
            return Err(ApiError::Unauthorized("a valid bearer token is required".into()).into());
        }
    }
    next.call(req).await
}

/// On the guest listener, an internal error leaves without its message: the daemon's log has it
/// (`ApiError::internal` logged it), the guest learns nothing of the host (paths, git, SQLite).
async fn hide_internal_errors(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let response = next.call(req).await?;
    if response.status() == actix_web::http::StatusCode::INTERNAL_SERVER_ERROR {
        let generic = HttpResponse::InternalServerError().json(serde_json::json!({
            "error": {"code": "internal", "message": error::GUEST_INTERNAL_MESSAGE}
        }));
        let (req, _) = response.into_parts();
        return Ok(ServiceResponse::new(req, generic).map_into_right_body());
    }
    Ok(response.map_into_left_body())
}

async fn time_request(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    let started = Instant::now();
    let method = req.method().to_string();
    let metrics = req
        .app_data::<web::Data<ApiState>>()
        .map(|s| s.svc.metrics.clone());
    let response = next.call(req).await?;
    if let Some(metrics) = metrics {
        // The route pattern, never the path itself: paths can carry tokens and unbounded ids.
        let route = response
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".into());
        let status = response.status().as_u16().to_string();
        metrics
            .api_duration
            .with_label_values(&[&method, &route, &status])
            .observe(started.elapsed().as_secs_f64());
    }
    Ok(response)
}

fn extractor_config(cfg: &mut web::ServiceConfig, body_limit: usize) {
    cfg.app_data(
        web::JsonConfig::default()
            .limit(body_limit)
            .error_handler(|err, _| json_error(err).into()),
    )
    .app_data(web::QueryConfig::default().error_handler(|err, _| query_error(err).into()))
    .app_data(web::PathConfig::default().error_handler(|err, _| path_error(err).into()));
}

async fn no_route() -> Result<HttpResponse, ApiError> {
    Err(ApiError::NotFound("no such route".into()))
}

/// The running servers, to stop on shutdown.
#[derive(Debug, Default)]
pub struct Servers {
    handles: Vec<ServerHandle>,
}

impl Servers {
    pub async fn stop(&self) {
        for handle in &self.handles {
            handle.stop(true).await;
        }
    }
}

/// Where a server listens.
#[derive(Debug, Clone)]
enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Listen {
    fn describe(&self) -> String {
        match self {
            Listen::Unix(path) => path.display().to_string(),
            Listen::Tcp(addr) => addr.to_string(),
        }
    }
}

fn bind_error(what: &'static str, listen: &Listen) -> impl FnOnce(std::io::Error) -> HttpError {
    let addr = listen.describe();
    move |source| HttpError::Bind { what, addr, source }
}

fn spawn(running: actix_web::dev::Server) -> ServerHandle {
    let handle = running.handle();
    actix_web::rt::spawn(running);
    handle
}

fn serve_control(
    state: &web::Data<ApiState>,
    auth: ControlAuth,
    listen: &Listen,
) -> Result<ServerHandle, HttpError> {
    let state = state.clone();
    let body_limit = state.svc.config.request_max_bytes;
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .app_data(auth.clone())
            .configure(|cfg| extractor_config(cfg, body_limit))
            .configure(system::routes)
            .configure(jobs::routes)
            .configure(sandboxes::routes)
            .configure(templates::routes)
            .configure(stream::routes)
            .default_service(web::to(no_route))
            .wrap(from_fn(require_token))
            .wrap(from_fn(time_request))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5);
    let bound = match listen {
        Listen::Unix(path) => server.bind_uds(path),
        Listen::Tcp(addr) => server.bind(addr),
    };
    Ok(spawn(
        bound.map_err(bind_error("the control API", listen))?.run(),
    ))
}

fn serve_guest(
    state: &web::Data<ApiState>,
    listener: std::net::TcpListener,
) -> Result<ServerHandle, HttpError> {
    let state = state.clone();
    let listen = Listen::Tcp(listener.local_addr().map_err(bind_error(
        "the guest API",
        &Listen::Tcp(([0, 0, 0, 0], 0).into()),
    ))?);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .configure(|cfg| extractor_config(cfg, 64 * 1024))
            .configure(guest::routes)
            .default_service(web::to(no_route))
            .wrap(from_fn(hide_internal_errors))
            .wrap(from_fn(time_request))
    })
    .workers(2)
    .disable_signals()
    .shutdown_timeout(5);
    Ok(spawn(
        server
            .listen(listener)
            .map_err(bind_error("the guest API", &listen))?
            .run(),
    ))
}

/// Binds the guest API's socket before anything else starts, so that backends learn the real
/// address (`guest_listen` may ask for port 0).
pub fn bind_guest(addr: SocketAddr) -> Result<std::net::TcpListener, HttpError> {
    std::net::TcpListener::bind(addr).map_err(bind_error("the guest API", &Listen::Tcp(addr)))
}

async fn metrics(state: web::Data<ApiState>) -> Result<HttpResponse, ApiError> {
    // A failed measurement leaves the gauge at its last value; the scrape still answers.
    match state.svc.backend.memory_usage().await {
        Ok(usage) => state.svc.metrics.observe_memory(&usage),
        Err(err) => tracing::debug!(%err, "measuring sandbox memory failed"),
    }
    let svc = Arc::clone(&state.svc);
    let text = state
        .svc
        .store
        .call(move |s| Ok(svc.metrics.render(s)))
        .await?
        .map_err(ApiError::internal)?;
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(text))
}

fn serve_metrics(state: &web::Data<ApiState>, addr: SocketAddr) -> Result<ServerHandle, HttpError> {
    let state = state.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/metrics", web::get().to(metrics))
            .default_service(web::to(no_route))
    })
    .workers(1)
    .disable_signals()
    .shutdown_timeout(1);
    Ok(spawn(
        server
            .bind(addr)
            .map_err(bind_error("metrics", &Listen::Tcp(addr)))?
            .run(),
    ))
}

/// Clears a stale socket file left by a crash, refusing if a live daemon still answers on it.
fn prepare_socket(path: &Path) -> Result<(), HttpError> {
    let fail = |source| HttpError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(fail)?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(HttpError::SocketInUse(path.to_owned()));
        }
        std::fs::remove_file(path).map_err(fail)?;
    }
    Ok(())
}

fn secure_socket(path: &Path, group: Option<&str>) -> Result<(), HttpError> {
    use std::os::unix::fs::PermissionsExt;
    let fail = |source| HttpError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(name) = group {
        let group = nix::unistd::Group::from_name(name)
            .map_err(|e| fail(std::io::Error::from(e)))?
            .ok_or_else(|| HttpError::UnknownGroup(name.to_owned()))?;
        std::os::unix::fs::chown(path, None, Some(group.gid.as_raw())).map_err(fail)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660)).map_err(fail)
}

/// Starts every configured server; the guest API on the listener `bind_guest` made, the TCP
/// control API (if `control_listen` is set) behind the token `load_control_token` read.
pub fn start(
    state: &web::Data<ApiState>,
    guest: std::net::TcpListener,
    control_token: Option<ControlToken>,
) -> Result<Servers, HttpError> {
    let config = Arc::clone(&state.svc.config);
    let mut servers = Servers::default();
    prepare_socket(&config.socket_path)?;
    servers.handles.push(serve_control(
        state,
        ControlAuth::Socket,
        &Listen::Unix(config.socket_path.clone()),
    )?);
    secure_socket(&config.socket_path, config.socket_group.as_deref())?;
    if let Some(addr) = config.control_listen {
        let token = control_token.ok_or_else(|| HttpError::TokenMissing(addr.to_string()))?;
        servers.handles.push(serve_control(
            state,
            ControlAuth::Bearer(Arc::new(token)),
            &Listen::Tcp(addr),
        )?);
    }
    servers.handles.push(serve_guest(state, guest)?);
    if let Some(addr) = config.metrics_listen {
        servers.handles.push(serve_metrics(state, addr)?);
    }
    Ok(servers)
}
