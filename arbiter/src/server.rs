//! The HTTP/1.1 server: routing, request limits, authentication, and the mapping of store
//! decisions to JSON answers. See [`crate::protocol`] for the routes.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn};

use crate::auth::Auth;
use crate::protocol::{
    validate_id, ClaimRequest, ClearResponse, ErrorBody, ErrorCode, DEFAULT_MAX_BODY_BYTES,
};
use crate::store::{Store, StoreError};

/// Errors starting or running the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Address asked for.
        addr: SocketAddr,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Some other socket error.
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Address to listen on (port 0 picks a free port; see [`Server::local_addr`]).
    pub listen: SocketAddr,
    /// Authentication policy.
    pub auth: Auth,
    /// Largest accepted request body, in bytes (larger: 413).
    pub max_body_bytes: usize,
    /// Most connections served at once; further connections are closed at once.
    pub max_connections: usize,
    /// Time allowed to send a request's headers.
    pub header_timeout: Duration,
    /// Time allowed to send a request's body (else 408).
    pub body_timeout: Duration,
    /// Time open requests get to finish at shutdown.
    pub shutdown_grace: Duration,
}

impl ServerConfig {
    /// Settings with the defaults: 64 KiB bodies, 1024 connections, 10 s timeouts.
    pub fn new(listen: SocketAddr, auth: Auth) -> ServerConfig {
        ServerConfig {
            listen,
            auth,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            max_connections: 1024,
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

type Body = Full<Bytes>;

struct App {
    store: Arc<Store>,
    auth: Auth,
    max_body_bytes: usize,
    body_timeout: Duration,
}

/// A bound, not yet serving, arbiter server.
pub struct Server {
    listener: TcpListener,
    app: Arc<App>,
    config: ServerConfig,
}

impl Server {
    /// Binds the listening socket.
    pub async fn bind(config: ServerConfig, store: Arc<Store>) -> Result<Server, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        if matches!(config.auth, Auth::Disabled) {
            warn!("authentication is disabled: anyone who can reach the port can claim VMs");
        }
        let app = Arc::new(App {
            store,
            auth: config.auth.clone(),
            max_body_bytes: config.max_body_bytes,
            body_timeout: config.body_timeout,
        });
        Ok(Server {
            listener,
            app,
            config,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, ServerError> {
        Ok(self.listener.local_addr()?)
    }

    /// Serves until `shutdown` completes, then stops accepting and gives open requests
    /// [`ServerConfig::shutdown_grace`] to finish.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let graceful = GracefulShutdown::new();
        let slots = Arc::new(Semaphore::new(self.config.max_connections));
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                _ = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // E.g. out of file descriptors: back off instead of spinning.
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                warn!(%peer, "too many connections; closing this one");
                continue;
            };
            let _ = stream.set_nodelay(true);
            let app = self.app.clone();
            let service = service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.handle(req).await) }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(TokioTimer::new())
                .header_read_timeout(self.config.header_timeout)
                .max_buf_size(16 * 1024);
            let conn = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    debug!(%peer, error = %e, "connection ended with an error");
                }
                drop(slot);
            });
        }
        drop(self.listener);
        info!("shutting down: no new connections, waiting for open requests");
        tokio::select! {
            _ = graceful.shutdown() => info!("all connections closed"),
            _ = tokio::time::sleep(self.config.shutdown_grace) => {
                warn!("shutdown grace period over; dropping open connections")
            }
        }
        Ok(())
    }
}

fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    let mut body = serde_json::to_vec(value).expect("answers always serialize");
    body.push(b'\n');
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn error(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> Response<Body> {
    json(
        status,
        &ErrorBody {
            error: code,
            message: message.into(),
        },
    )
}

fn method_not_allowed(allow: &'static str) -> Response<Body> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::MethodNotAllowed,
        format!("this route accepts {allow}"),
    );
    response
        .headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    response
}

fn store_error(e: StoreError) -> Response<Body> {
    let message = e.to_string();
    match e {
        StoreError::UnknownVm(_) => error(StatusCode::NOT_FOUND, ErrorCode::UnknownVm, message),
        StoreError::FutureGeneration { .. } => {
            error(StatusCode::CONFLICT, ErrorCode::FutureGeneration, message)
        }
        StoreError::NotHolder { .. } => error(StatusCode::CONFLICT, ErrorCode::NotHolder, message),
        StoreError::StaleGeneration { .. } => {
            error(StatusCode::CONFLICT, ErrorCode::StaleGeneration, message)
        }
        StoreError::GenerationExhausted(_) => {
            error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
        }
        StoreError::Io { .. }
        | StoreError::Locked(_)
        | StoreError::Corrupt { .. }
        | StoreError::Poisoned => {
            error!(error = %message, "store unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::StoreUnavailable,
                message,
            )
        }
    }
}

impl App {
    async fn handle(&self, req: Request<Incoming>) -> Response<Body> {
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let response = self.route(req).await;
        debug!(%method, %path, status = response.status().as_u16(), "request");
        response
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let Some(rest) = path.strip_prefix("/v1/") else {
            return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such route");
        };
        let segments: Vec<&str> = rest.split('/').collect();
        if segments == ["health"] {
            return match *req.method() {
                Method::GET => json(StatusCode::OK, &serde_json::json!({"status": "ok"})),
                _ => method_not_allowed("GET"),
            };
        }
        let authorization = req.headers().get(header::AUTHORIZATION);
        if !self.auth.allows(authorization.map(HeaderValue::as_bytes)) {
            let mut response = error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "missing or wrong token: send Authorization: Bearer <token>",
            );
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"twinvm-arbiter\""),
            );
            return response;
        }
        let method = req.method().clone();
        let result = match segments.as_slice() {
            ["vms"] => match method {
                Method::GET => self.list().await,
                _ => Err(method_not_allowed("GET")),
            },
            ["vms", vm] => match method {
                Method::GET => self.get(vm.to_string()).await,
                Method::DELETE => self.clear(vm.to_string()).await,
                _ => Err(method_not_allowed("GET, DELETE")),
            },
            ["vms", vm, action @ ("test-and-set" | "re-pair")] => match method {
                Method::POST => self.claim(vm.to_string(), *action == "re-pair", req).await,
                _ => Err(method_not_allowed("POST")),
            },
            _ => Err(error(
                StatusCode::NOT_FOUND,
                ErrorCode::NotFound,
                "no such route",
            )),
        };
        result.unwrap_or_else(|response| response)
    }

    async fn with_store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, Response<Body>> {
        let store = self.store.clone();
        match tokio::task::spawn_blocking(move || f(&store)).await {
            Ok(result) => result.map_err(store_error),
            Err(e) => {
                error!(error = %e, "store task failed");
                Err(error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    ErrorCode::Other,
                    "internal error",
                ))
            }
        }
    }

    async fn list(&self) -> Result<Response<Body>, Response<Body>> {
        let list = self.with_store(|s| s.list()).await?;
        Ok(json(StatusCode::OK, &list))
    }

    async fn get(&self, vm: String) -> Result<Response<Body>, Response<Body>> {
        validate_id("VM", &vm).map_err(bad_request)?;
        let found = self
            .with_store(move |s| s.get(&vm).map(|e| (vm, e)))
            .await?;
        match found {
            (_, Some(entry)) => Ok(json(StatusCode::OK, &entry)),
            (vm, None) => Err(store_error(StoreError::UnknownVm(vm))),
        }
    }

    async fn clear(&self, vm: String) -> Result<Response<Body>, Response<Body>> {
        validate_id("VM", &vm).map_err(bad_request)?;
        let found = self
            .with_store(move |s| s.clear(&vm).map(|e| (vm, e)))
            .await?;
        match found {
            (_, Some(cleared)) => {
                info!(vm = %cleared.vm, generation = cleared.generation, "cleared by operator");
                Ok(json(StatusCode::OK, &ClearResponse { cleared }))
            }
            (vm, None) => Err(store_error(StoreError::UnknownVm(vm))),
        }
    }

    async fn claim(
        &self,
        vm: String,
        repair: bool,
        req: Request<Incoming>,
    ) -> Result<Response<Body>, Response<Body>> {
        validate_id("VM", &vm).map_err(bad_request)?;
        let body = self.read_body(req).await?;
        let claim: ClaimRequest = serde_json::from_slice(&body).map_err(|e| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!(
                    "malformed JSON body (expected {{\"claimant\": string, \"generation\": integer}}): {e}"
                ),
            )
        })?;
        validate_id("claimant", &claim.claimant).map_err(bad_request)?;
        let ClaimRequest {
            claimant,
            generation,
        } = claim;
        if repair {
            let (vm2, claimant2) = (vm.clone(), claimant.clone());
            let answer = self
                .with_store(move |s| s.re_pair(&vm2, &claimant2, generation))
                .await?;
            info!(%vm, %claimant, from = generation, to = answer.generation, "re-pair");
            Ok(json(StatusCode::OK, &answer))
        } else {
            let (vm2, claimant2) = (vm.clone(), claimant.clone());
            let answer = self
                .with_store(move |s| s.test_and_set(&vm2, &claimant2, generation))
                .await?;
            info!(
                %vm, %claimant, generation,
                outcome = ?answer.outcome,
                holder = ?answer.holder,
                "test-and-set"
            );
            Ok(json(StatusCode::OK, &answer))
        }
    }

    async fn read_body(&self, req: Request<Incoming>) -> Result<Bytes, Response<Body>> {
        let too_large = || {
            error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorCode::PayloadTooLarge,
                format!("request body over {} bytes", self.max_body_bytes),
            )
        };
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_body_bytes as u64) {
            return Err(too_large());
        }
        let body = Limited::new(req.into_body(), self.max_body_bytes);
        match tokio::time::timeout(self.body_timeout, body.collect()).await {
            Ok(Ok(collected)) => Ok(collected.to_bytes()),
            Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large()),
            Ok(Err(e)) => Err(error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("cannot read the request body: {e}"),
            )),
            Err(_) => Err(error(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::RequestTimeout,
                "the request body did not arrive in time",
            )),
        }
    }
}

fn bad_request(message: String) -> Response<Body> {
    error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message)
}
