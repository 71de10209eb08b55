//! Client library for the VMM and for tools: an async [`Client`] and a [`BlockingClient`]
//! for plain OS threads.
//!
//! Every call has a connect timeout and a per-attempt timeout. `test-and-set`, `re-pair`,
//! `get`, `list` and `health` are retried (with doubling backoff) on connection errors,
//! timeouts and 5xx answers: retrying is safe because the arbiter answers a repeated
//! `test-and-set` by the same claimant for the same generation, and a repeated `re-pair`,
//! with the same decision. `clear` is never retried (a lost answer followed by a retry
//! would report "unknown VM"). Each attempt uses a fresh TCP connection.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::net::TcpStream;
use tracing::debug;

use crate::auth::Token;
use crate::protocol::{
    validate_id, ClaimRequest, ClaimResponse, ClearResponse, Entry, ErrorBody, ErrorCode,
    ListResponse, RePairResponse,
};

/// Errors of client calls.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// A VM or claimant id the arbiter would refuse.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// No answer after every attempt (connection refused, timeouts, 5xx).
    #[error("arbiter at {addr} unavailable after {attempts} attempt(s): {last}")]
    Unavailable {
        /// Arbiter address.
        addr: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// The arbiter answered with an error (4xx) that retrying would not change.
    #[error("arbiter refused the request ({status}, {code:?}): {message}")]
    Rejected {
        /// HTTP status.
        status: u16,
        /// Error code from the body.
        code: ErrorCode,
        /// Message from the body.
        message: String,
    },
    /// The answer could not be understood.
    #[error("unexpected answer from the arbiter ({status}): {detail}")]
    Protocol {
        /// HTTP status.
        status: u16,
        /// What was wrong.
        detail: String,
    },
    /// The blocking client could not create its runtime.
    #[error("cannot start the blocking client's runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl ClientError {
    /// The error code if the arbiter refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Rejected { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Timeouts and retry policy.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Time allowed to open a TCP connection.
    pub connect_timeout: Duration,
    /// Time allowed for one attempt (connect, send, receive).
    pub request_timeout: Duration,
    /// Attempts per call (at least 1) for retryable calls.
    pub attempts: u32,
    /// Pause before the second attempt; doubled for each further one.
    pub backoff: Duration,
    /// Largest accepted answer.
    pub max_response_bytes: usize,
}

impl Default for ClientConfig {
    fn default() -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(3),
            attempts: 4,
            backoff: Duration::from_millis(100),
            max_response_bytes: 16 * 1024 * 1024,
        }
    }
}

/// What one attempt produced.
enum Attempt {
    Answer { status: StatusCode, body: Bytes },
    Failed(String),
}

/// Async client of one arbiter.
#[derive(Debug, Clone)]
pub struct Client {
    addr: String,
    authorization: Option<HeaderValue>,
    config: ClientConfig,
}

impl Client {
    /// A client of the arbiter at `addr` (`host:port`), sending `token` if given, with the
    /// default [`ClientConfig`].
    pub fn new(addr: impl Into<String>, token: Option<Token>) -> Client {
        Client::with_config(addr, token, ClientConfig::default())
    }

    /// A client with explicit timeouts and retries.
    pub fn with_config(
        addr: impl Into<String>,
        token: Option<Token>,
        config: ClientConfig,
    ) -> Client {
        let authorization = token.map(|t| {
            let mut v =
                HeaderValue::from_str(&t.header_value()).expect("tokens are printable ASCII");
            v.set_sensitive(true);
            v
        });
        Client {
            addr: addr.into(),
            authorization,
            config,
        }
    }

    /// The arbiter's address.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Test-and-set: asks for `claimant` to hold `generation` of `vm`. See
    /// [`crate::store::Store::test_and_set`] for the rules.
    pub async fn test_and_set(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, ClientError> {
        let body = claim_body(vm, claimant, generation)?;
        let path = format!("/v1/vms/{vm}/test-and-set");
        self.call(Method::POST, &path, Some(body), self.config.attempts)
            .await
    }

    /// Re-pair: the holder of `generation` opens `generation + 1` for a new pair.
    pub async fn re_pair(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<RePairResponse, ClientError> {
        let body = claim_body(vm, claimant, generation)?;
        let path = format!("/v1/vms/{vm}/re-pair");
        self.call(Method::POST, &path, Some(body), self.config.attempts)
            .await
    }

    /// The entry of `vm`, or `None` if the arbiter does not know it.
    pub async fn get(&self, vm: &str) -> Result<Option<Entry>, ClientError> {
        check("VM", vm)?;
        let path = format!("/v1/vms/{vm}");
        none_if_unknown(
            self.call(Method::GET, &path, None, self.config.attempts)
                .await,
        )
    }

    /// Every entry and tombstone.
    pub async fn list(&self) -> Result<ListResponse, ClientError> {
        self.call(Method::GET, "/v1/vms", None, self.config.attempts)
            .await
    }

    /// Operator clear of `vm` (one attempt only); `None` if the VM was not known.
    pub async fn clear(&self, vm: &str) -> Result<Option<Entry>, ClientError> {
        check("VM", vm)?;
        let path = format!("/v1/vms/{vm}");
        none_if_unknown(
            self.call::<ClearResponse>(Method::DELETE, &path, None, 1)
                .await,
        )
        .map(|c| c.map(|c| c.cleared))
    }

    /// Checks that the arbiter answers.
    pub async fn health(&self) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(Method::GET, "/v1/health", None, self.config.attempts)
            .await
            .map(drop)
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        attempts: u32,
    ) -> Result<T, ClientError> {
        let attempts = attempts.max(1);
        let mut backoff = self.config.backoff;
        let mut last = String::new();
        for attempt in 1..=attempts {
            if attempt > 1 {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            let outcome = match tokio::time::timeout(
                self.config.request_timeout,
                self.attempt(method.clone(), path, body.clone()),
            )
            .await
            {
                Ok(outcome) => outcome,
                Err(_) => Attempt::Failed(format!(
                    "no answer within {:?}",
                    self.config.request_timeout
                )),
            };
            match outcome {
                Attempt::Answer { status, body } if status.is_success() => {
                    return serde_json::from_slice(&body).map_err(|e| ClientError::Protocol {
                        status: status.as_u16(),
                        detail: format!("cannot decode answer: {e}"),
                    });
                }
                Attempt::Answer { status, body }
                    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT =>
                {
                    last = format!("{status}: {}", String::from_utf8_lossy(&body).trim());
                }
                Attempt::Answer { status, body } => {
                    return Err(match serde_json::from_slice::<ErrorBody>(&body) {
                        Ok(e) => ClientError::Rejected {
                            status: status.as_u16(),
                            code: e.error,
                            message: e.message,
                        },
                        Err(_) => ClientError::Protocol {
                            status: status.as_u16(),
                            detail: String::from_utf8_lossy(&body).into_owned(),
                        },
                    });
                }
                Attempt::Failed(why) => last = why,
            }
            debug!(addr = %self.addr, %path, attempt, %last, "arbiter call failed");
        }
        Err(ClientError::Unavailable {
            addr: self.addr.clone(),
            attempts,
            last,
        })
    }

    async fn attempt(&self, method: Method, path: &str, body: Option<Bytes>) -> Attempt {
        let stream =
            match tokio::time::timeout(self.config.connect_timeout, TcpStream::connect(&self.addr))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => return Attempt::Failed(format!("connect: {e}")),
                Err(_) => {
                    return Attempt::Failed(format!(
                        "connect: no connection within {:?}",
                        self.config.connect_timeout
                    ))
                }
            };
        let _ = stream.set_nodelay(true);
        let (mut sender, conn) =
            match hyper::client::conn::http1::handshake(TokioIo::new(stream)).await {
                Ok(pair) => pair,
                Err(e) => return Attempt::Failed(format!("handshake: {e}")),
            };
        let driver = tokio::spawn(conn);
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.addr);
        if let Some(authorization) = &self.authorization {
            request = request.header(header::AUTHORIZATION, authorization.clone());
        }
        if body.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = match request.body(Full::new(body.unwrap_or_default())) {
            Ok(request) => request,
            Err(e) => return Attempt::Failed(format!("building the request: {e}")),
        };
        let outcome = match sender.send_request(request).await {
            Ok(response) => {
                let status = response.status();
                match Limited::new(response.into_body(), self.config.max_response_bytes)
                    .collect()
                    .await
                {
                    Ok(collected) => Attempt::Answer {
                        status,
                        body: collected.to_bytes(),
                    },
                    Err(e) => Attempt::Failed(format!("reading the answer: {e}")),
                }
            }
            Err(e) => Attempt::Failed(format!("request: {e}")),
        };
        drop(sender);
        driver.abort();
        outcome
    }
}

fn check(kind: &str, id: &str) -> Result<(), ClientError> {
    validate_id(kind, id).map_err(ClientError::InvalidArgument)
}

fn claim_body(vm: &str, claimant: &str, generation: u64) -> Result<Bytes, ClientError> {
    check("VM", vm)?;
    check("claimant", claimant)?;
    let body = serde_json::to_vec(&ClaimRequest {
        claimant: claimant.to_owned(),
        generation,
    })
    .expect("claims always serialize");
    Ok(Bytes::from(body))
}

fn none_if_unknown<T>(result: Result<T, ClientError>) -> Result<Option<T>, ClientError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == Some(ErrorCode::UnknownVm) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Blocking wrapper around [`Client`] for callers on plain OS threads. It owns a small
/// single-threaded runtime; do not call it from inside an async runtime.
#[derive(Debug)]
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl BlockingClient {
    /// A blocking client with the default [`ClientConfig`].
    pub fn new(
        addr: impl Into<String>,
        token: Option<Token>,
    ) -> Result<BlockingClient, ClientError> {
        BlockingClient::with_config(addr, token, ClientConfig::default())
    }

    /// A blocking client with explicit timeouts and retries.
    pub fn with_config(
        addr: impl Into<String>,
        token: Option<Token>,
        config: ClientConfig,
    ) -> Result<BlockingClient, ClientError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(BlockingClient {
            runtime,
            client: Client::with_config(addr, token, config),
        })
    }

    /// See [`Client::test_and_set`].
    pub fn test_and_set(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, ClientError> {
        self.runtime
            .block_on(self.client.test_and_set(vm, claimant, generation))
    }

    /// See [`Client::re_pair`].
    pub fn re_pair(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<RePairResponse, ClientError> {
        self.runtime
            .block_on(self.client.re_pair(vm, claimant, generation))
    }

    /// See [`Client::get`].
    pub fn get(&self, vm: &str) -> Result<Option<Entry>, ClientError> {
        self.runtime.block_on(self.client.get(vm))
    }

    /// See [`Client::list`].
    pub fn list(&self) -> Result<ListResponse, ClientError> {
        self.runtime.block_on(self.client.list())
    }

    /// See [`Client::clear`].
    pub fn clear(&self, vm: &str) -> Result<Option<Entry>, ClientError> {
        self.runtime.block_on(self.client.clear(vm))
    }

    /// See [`Client::health`].
    pub fn health(&self) -> Result<(), ClientError> {
        self.runtime.block_on(self.client.health())
    }
}
