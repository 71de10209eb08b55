//! The arbiter on etcd: the same test-and-set and re-pair as `twinvm-arbiter`, decided by
//! [`crate::rules`], made atomic by etcd transactions and replicated by etcd's Raft.
//!
//! One key per VM, `<prefix><vm>`, holding JSON: `{"state":"live","vm","generation",
//! "holder","opened_by"}` (an [`Entry`]) or, after an operator's clear, the tombstone
//! `{"state":"cleared","vm","retired_generation"}`. A decision reads the key (a linearizable
//! read), applies the rules, and if they change the entry writes it in a transaction that
//! compares the key's `mod_revision` with the one read (or its `create_revision` with 0 when
//! the key did not exist). If someone else wrote first, the transaction's else branch
//! returns the new value and the rules run again on it. So each (VM, generation) has at most
//! one winner, every claimant is told the same holder, and answers that only reveal state
//! come from a linearizable read: exactly the semantics table of `arbiter/README.md`.
//!
//! Calls are bounded: a timeout per RPC, a bounded number of attempts with doubling backoff
//! on retryable failures (unavailable member, no leader, timeouts), and a bounded number of
//! compare-and-swap rounds. The client keeps one connection per member, made on first use,
//! and sends every call to one member until that member fails in a retryable way; the next
//! attempt then goes to the next member in the list. (A balanced channel over all members,
//! as `etcd_client` makes by default, keeps picking a dead member: its reconnecting service
//! reports ready and fails each call at once, so a few attempts could all land on it while
//! two members were up, which is how a claim with one member down was seen to fail.) Retrying is safe for the same reasons as with the standalone
//! arbiter: a repeated claim or re-pair by the same claimant is answered the same.
//! Without a quorum nothing is decided: calls fail with [`EtcdError::Unavailable`].
//!
//! [`EtcdClient`] is async (tokio); [`BlockingEtcdClient`] owns a small runtime for plain
//! threads such as the VMM's vCPU thread.

use std::future::Future;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Compare, CompareOp, ConnectOptions, GetOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use crate::protocol::Tombstone;
use crate::protocol::{validate_id, ClaimResponse, Entry, ErrorCode, ListResponse, RePairResponse};
use crate::rules::{self, Slot};
use crate::store::StoreError;

/// The URL scheme that selects the etcd backend: `etcd://HOST:PORT[,HOST:PORT...]`.
pub const SCHEME: &str = "etcd://";

/// Default key prefix; the key of a VM is the prefix followed by the VM id.
pub const DEFAULT_PREFIX: &str = "/twinvm/arbiter/";

/// Compare-and-swap rounds per attempt. Every failed round means another claimant changed
/// the entry, and an entry changes at most twice per generation (claimed, re-paired), so a
/// few rounds always suffice; the bound only guards against a misbehaving writer.
const MAX_CAS_ROUNDS: usize = 16;

/// Errors of the etcd backend.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// A VM or claimant id the rules refuse.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// Bad endpoints or prefix.
    #[error("invalid etcd arbiter configuration: {0}")]
    Config(String),
    /// The credentials file could not be used.
    #[error("cannot use the etcd credentials file {path}: {reason}")]
    Credentials {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// etcd refused the user and password (or wants some and got none).
    #[error(
        "etcd at {endpoints} refused authentication{}: {message}",
        match user {
            Some(u) => format!(" of user {u:?}"),
            None => " (no credentials were given)".to_owned(),
        }
    )]
    AuthFailed {
        /// The endpoints.
        endpoints: String,
        /// The user, if credentials were given.
        user: Option<String>,
        /// etcd's message.
        message: String,
    },
    /// The user is authenticated but its roles do not allow the arbiter's keys.
    #[error(
        "etcd at {endpoints} denied access to {key:?}: {message} (grant the user a role \
         with readwrite permission on the prefix)"
    )]
    PermissionDenied {
        /// The endpoints.
        endpoints: String,
        /// The key.
        key: String,
        /// etcd's message.
        message: String,
    },
    /// No answer after every attempt (no member reachable, no quorum, timeouts).
    #[error("etcd at {endpoints} unavailable after {attempts} attempt(s): {last}")]
    Unavailable {
        /// The endpoints.
        endpoints: String,
        /// Attempts made.
        attempts: u32,
        /// The last failure.
        last: String,
    },
    /// Any other error etcd answered with; retrying would not change it.
    #[error("etcd at {endpoints} failed: {message}")]
    Etcd {
        /// The endpoints.
        endpoints: String,
        /// What failed.
        message: String,
    },
    /// A key under the prefix holds something that is not an arbiter entry.
    #[error("key {key:?} does not hold an arbiter entry: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The rules refused the request (future generation, not holder, stale, unknown VM).
    #[error(transparent)]
    Refused(StoreError),
    /// The blocking client could not create its runtime.
    #[error("cannot start the blocking etcd client's runtime: {0}")]
    Runtime(#[source] io::Error),
}

impl EtcdError {
    /// The protocol error code the standalone arbiter answers in the same situation, if the
    /// rules refused the request.
    pub fn code(&self) -> Option<ErrorCode> {
        match self {
            EtcdError::Refused(e) => Some(match e {
                StoreError::UnknownVm(_) => ErrorCode::UnknownVm,
                StoreError::FutureGeneration { .. } => ErrorCode::FutureGeneration,
                StoreError::NotHolder { .. } => ErrorCode::NotHolder,
                StoreError::StaleGeneration { .. } => ErrorCode::StaleGeneration,
                StoreError::GenerationExhausted(_) => ErrorCode::BadRequest,
                _ => ErrorCode::Other,
            }),
            _ => None,
        }
    }
}

/// An etcd user and password. `Debug` does not show the password.
#[derive(Clone)]
pub struct Credentials {
    user: String,
    password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Credentials {
    /// A user and its password.
    pub fn new(user: impl Into<String>, password: impl Into<String>) -> Credentials {
        Credentials {
            user: user.into(),
            password: password.into(),
        }
    }

    /// Reads `user:password` from the first line of `path` (the password may contain
    /// colons; a trailing newline is ignored). Warns if the file is readable by group or
    /// others.
    pub fn from_file(path: &Path) -> Result<Credentials, EtcdError> {
        let bad = |reason: String| EtcdError::Credentials {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode();
            if mode & 0o077 != 0 {
                warn!(
                    path = %path.display(),
                    mode = format!("{:o}", mode & 0o777),
                    "the etcd credentials file is readable by others; chmod 600 it"
                );
            }
        }
        let line = text.lines().next().unwrap_or("").trim_end_matches('\r');
        let Some((user, password)) = line.split_once(':') else {
            return Err(bad("its first line must be user:password".into()));
        };
        if user.is_empty() || password.is_empty() {
            return Err(bad("the user or the password is empty".into()));
        }
        Ok(Credentials::new(user, password))
    }

    /// The user name.
    pub fn user(&self) -> &str {
        &self.user
    }
}

/// Where the etcd cluster is, under which prefix the arbiter keeps its keys, and the
/// timeouts and retries of every call.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members, `http://host:port`.
    pub endpoints: Vec<String>,
    /// Key prefix (non-empty, ending with `/`).
    pub prefix: String,
    /// User and password, if the cluster has authentication enabled.
    pub credentials: Option<Credentials>,
    /// Time allowed to connect to a member.
    pub connect_timeout: Duration,
    /// Time allowed for one RPC.
    pub request_timeout: Duration,
    /// Attempts per call (at least 1) on retryable failures; after a failure the next
    /// attempt goes to the next member.
    pub attempts: u32,
    /// Pause before the second attempt; doubled for each further one.
    pub backoff: Duration,
}

impl EtcdConfig {
    /// A configuration for the members at `endpoints` (`host:port`, or full `http://`
    /// URLs) with the default prefix, no credentials and default timeouts: 1 s to connect,
    /// 3 s per RPC, 4 attempts with 100 ms doubling backoff.
    pub fn new<S: AsRef<str>>(endpoints: impl IntoIterator<Item = S>) -> EtcdConfig {
        EtcdConfig {
            endpoints: endpoints
                .into_iter()
                .map(|e| {
                    let e = e.as_ref().trim();
                    if e.contains("://") {
                        e.to_owned()
                    } else {
                        format!("http://{e}")
                    }
                })
                .collect(),
            prefix: DEFAULT_PREFIX.to_owned(),
            credentials: None,
            connect_timeout: Duration::from_secs(1),
            request_timeout: Duration::from_secs(3),
            attempts: 4,
            backoff: Duration::from_millis(100),
        }
    }

    /// Parses `etcd://HOST:PORT[,HOST:PORT...]`.
    pub fn from_url(url: &str) -> Result<EtcdConfig, EtcdError> {
        let Some(list) = url.strip_prefix(SCHEME) else {
            return Err(EtcdError::Config(format!(
                "{url:?} does not start with {SCHEME}"
            )));
        };
        let endpoints: Vec<&str> = list.split(',').map(str::trim).collect();
        for e in &endpoints {
            let ok = e
                .rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
            if !ok || e.contains('/') {
                return Err(EtcdError::Config(format!(
                    "{e:?} in {url:?} is not HOST:PORT"
                )));
            }
        }
        Ok(EtcdConfig::new(endpoints))
    }

    fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Config("no endpoints".into()));
        }
        if self.prefix.is_empty() || !self.prefix.ends_with('/') {
            return Err(EtcdError::Config(format!(
                "the key prefix {:?} must be non-empty and end with '/'",
                self.prefix
            )));
        }
        Ok(())
    }
}

/// What is stored under a VM's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Stored {
    Live(Entry),
    Cleared { vm: String, retired_generation: u64 },
}

fn slot(stored: Option<&Stored>) -> Slot<'_> {
    match stored {
        None => Slot::Unknown,
        Some(Stored::Live(e)) => Slot::Live(e),
        Some(Stored::Cleared {
            retired_generation, ..
        }) => Slot::Cleared(*retired_generation),
    }
}

/// A failed attempt: retry it, or give up with this error.
enum Failure {
    Retry(String),
    Fatal(EtcdError),
}

/// Async client of the arbiter on etcd.
#[derive(Clone)]
pub struct EtcdClient {
    members: Arc<Members>,
    config: Arc<EtcdConfig>,
    label: String,
}

/// One connection per member, each made on first use, and the member calls go to.
struct Members {
    options: ConnectOptions,
    conns: Vec<tokio::sync::OnceCell<etcd_client::Client>>,
    /// Index of the member the next attempt goes to: kept while it answers, moved to the
    /// next one after a retryable failure.
    current: AtomicUsize,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl EtcdClient {
    /// Connects to the cluster: to its first member that answers if credentials are given
    /// (authenticating; a wrong password is [`EtcdError::AuthFailed`] here), lazily
    /// otherwise: use [`EtcdClient::check`] to know that the cluster answers.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdClient, EtcdError> {
        config.validate()?;
        let label = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.connect_timeout)
            .with_timeout(config.request_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(3))
            .with_require_leader(true);
        if let Some(c) = &config.credentials {
            options = options
                .with_user(c.user.clone(), c.password.clone())
                .with_auto_token_refresh(true);
        }
        let members = Members {
            options,
            conns: config
                .endpoints
                .iter()
                .map(|_| tokio::sync::OnceCell::new())
                .collect(),
            current: AtomicUsize::new(0),
        };
        let client = EtcdClient {
            members: Arc::new(members),
            config: Arc::new(config),
            label,
        };
        if client.config.credentials.is_some() {
            client
                .retrying(client.config.attempts, "connect", |_| async { Ok(()) })
                .await?;
        }
        Ok(client)
    }

    fn calls(&self) -> Calls<'_> {
        Calls {
            config: &self.config,
            label: &self.label,
            members: &self.members,
        }
    }

    async fn retrying<T, F, Fut>(
        &self,
        attempts: u32,
        what: &str,
        attempt: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.calls().retrying(attempts, what, attempt).await
    }

    async fn rpc<T>(
        &self,
        key: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Failure> {
        self.calls().rpc(key, call).await
    }

    /// The endpoints, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.label
    }

    /// The etcd key of `vm`.
    pub fn key(&self, vm: &str) -> String {
        format!("{}{vm}", self.config.prefix)
    }

    /// Start-up check: authenticates, and checks that this user may read and write the key
    /// of `vm` (a transaction whose condition is never true, with a put in its then-branch,
    /// which etcd checks against the user's roles without executing it). Returns the VM's
    /// entry, if any.
    pub async fn check(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        check_id("VM", vm)?;
        let key = &self.key(vm);
        self.retrying(self.config.attempts, "check", |client| async move {
            let txn = Txn::new()
                .when([Compare::version(key.clone(), CompareOp::Less, 0)])
                .and_then([TxnOp::put(key.clone(), "", None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let resp = self.rpc(key, client.kv_client().txn(txn)).await?;
            let (stored, _) = self.read_from_txn(key, &resp)?;
            Ok(match stored {
                Some(Stored::Live(e)) => Some(e),
                _ => None,
            })
        })
        .await
    }

    /// Test-and-set: asks for `claimant` to hold `generation` of `vm`; see
    /// [`rules::claim`].
    pub async fn test_and_set(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, EtcdError> {
        check_id("VM", vm)?;
        check_id("claimant", claimant)?;
        self.decide(vm, self.config.attempts, |s| {
            let (answer, put) = rules::claim(s, vm, claimant, generation)?;
            Ok((answer, put.map(Stored::Live)))
        })
        .await
    }

    /// Re-pair: the holder of `generation` opens `generation + 1`; see [`rules::re_pair`].
    pub async fn re_pair(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<RePairResponse, EtcdError> {
        check_id("VM", vm)?;
        check_id("claimant", claimant)?;
        self.decide(vm, self.config.attempts, |s| {
            let (answer, put) = rules::re_pair(s, vm, claimant, generation)?;
            Ok((answer, put.map(Stored::Live)))
        })
        .await
    }

    /// The entry of `vm`, or `None` if unknown (or cleared).
    pub async fn get(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        check_id("VM", vm)?;
        self.decide(vm, self.config.attempts, |s| {
            Ok((
                match s {
                    Slot::Live(e) => Some(e.clone()),
                    _ => None,
                },
                None,
            ))
        })
        .await
    }

    /// Operator clear of `vm` (one attempt only, like the standalone client): removes the
    /// entry and leaves a tombstone retiring its generations. `None` if the VM was not live.
    pub async fn clear(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        check_id("VM", vm)?;
        self.decide(vm, 1, |s| {
            let before = match s {
                Slot::Live(e) => Some(e.clone()),
                _ => None,
            };
            let write = rules::clear(s).map(|retired_generation| Stored::Cleared {
                vm: vm.to_owned(),
                retired_generation,
            });
            Ok((before, write))
        })
        .await
    }

    /// Every entry and tombstone under the prefix, sorted by VM id.
    pub async fn list(&self) -> Result<ListResponse, EtcdError> {
        let prefix = self.config.prefix.clone();
        let prefix = &prefix;
        self.retrying(self.config.attempts, "list", |client| async move {
            let resp = self
                .rpc(
                    prefix,
                    client
                        .kv_client()
                        .get(prefix.clone(), Some(GetOptions::new().with_prefix())),
                )
                .await?;
            let mut list = ListResponse {
                vms: Vec::new(),
                cleared: Vec::new(),
            };
            for kv in resp.kvs() {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                match parse(&key, kv.value()).map_err(Failure::Fatal)? {
                    Stored::Live(e) => list.vms.push(e),
                    Stored::Cleared {
                        vm,
                        retired_generation,
                    } => list.cleared.push(Tombstone {
                        vm,
                        retired_generation,
                    }),
                }
            }
            Ok(list)
        })
        .await
    }

    /// Reads the key of `vm`, applies `decide` and writes its result with a
    /// compare-and-swap, re-deciding on the value that won if another writer was first.
    async fn decide<T>(
        &self,
        vm: &str,
        attempts: u32,
        decide: impl Fn(Slot<'_>) -> Result<(T, Option<Stored>), StoreError>,
    ) -> Result<T, EtcdError> {
        let key = self.key(vm);
        let decide = &decide;
        let key = &key;
        self.retrying(attempts, "decide", |client| async move {
            let mut kv = client.kv_client();
            let resp = self.rpc(key, kv.get(key.clone(), None)).await?;
            let (mut stored, mut revision) = match resp.kvs().first() {
                None => (None, 0),
                Some(kv) => (
                    Some(parse(key, kv.value()).map_err(Failure::Fatal)?),
                    kv.mod_revision(),
                ),
            };
            for _ in 0..MAX_CAS_ROUNDS {
                let (answer, write) = decide(slot(stored.as_ref()))
                    .map_err(|e| Failure::Fatal(EtcdError::Refused(e)))?;
                let Some(write) = write else {
                    return Ok(answer);
                };
                let value = serde_json::to_vec(&write).expect("entries always serialize");
                let compare = if revision == 0 {
                    Compare::create_revision(key.clone(), CompareOp::Equal, 0)
                } else {
                    Compare::mod_revision(key.clone(), CompareOp::Equal, revision)
                };
                let txn = Txn::new()
                    .when([compare])
                    .and_then([TxnOp::put(key.clone(), value, None)])
                    .or_else([TxnOp::get(key.clone(), None)]);
                let resp = self.rpc(key, kv.txn(txn)).await?;
                if resp.succeeded() {
                    return Ok(answer);
                }
                debug!(%key, "lost a compare-and-swap round; deciding again");
                (stored, revision) = self.read_from_txn(key, &resp)?;
            }
            Err(Failure::Retry(format!(
                "{key:?} changed under {MAX_CAS_ROUNDS} compare-and-swap rounds in a row"
            )))
        })
        .await
    }

    /// The value and `mod_revision` returned by a transaction's get.
    fn read_from_txn(
        &self,
        key: &str,
        resp: &etcd_client::TxnResponse,
    ) -> Result<(Option<Stored>, i64), Failure> {
        for op in resp.op_responses() {
            if let TxnOpResponse::Get(get) = op {
                return match get.kvs().first() {
                    None => Ok((None, 0)),
                    Some(kv) => Ok((
                        Some(parse(key, kv.value()).map_err(Failure::Fatal)?),
                        kv.mod_revision(),
                    )),
                };
            }
        }
        Err(Failure::Fatal(EtcdError::Etcd {
            endpoints: self.label.clone(),
            message: "a transaction's else branch returned no read".into(),
        }))
    }
}

/// The timeouts, retries, member choice and error classification of every call.
struct Calls<'a> {
    config: &'a EtcdConfig,
    label: &'a str,
    members: &'a Members,
}

impl Calls<'_> {
    /// Runs `attempt` up to `attempts` times while it fails in a retryable way, each time
    /// on the current member's connection (made first if need be); a retryable failure
    /// moves the next attempt to the next member.
    async fn retrying<T, F, Fut>(
        &self,
        attempts: u32,
        what: &str,
        mut attempt: F,
    ) -> Result<T, EtcdError>
    where
        F: FnMut(etcd_client::Client) -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = attempts.max(1);
        let mut backoff = self.config.backoff;
        let mut last = String::new();
        for n in 1..=attempts {
            if n > 1 {
                tokio::time::sleep(backoff).await;
                backoff = backoff.saturating_mul(2);
            }
            let member = self.members.current.load(Ordering::Relaxed) % self.members.conns.len();
            let result = match self.member(member).await {
                Ok(client) => attempt(client).await,
                Err(e) => Err(e),
            };
            let why = match result {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(e)) => return Err(e),
                Err(Failure::Retry(why)) => why,
            };
            let url = &self.config.endpoints[member];
            debug!(member = %url, what, attempt = n, %why, "etcd call failed; trying the next member");
            last = format!("{url}: {why}");
            // Another call may have moved on already: move only from the member that failed.
            let next = (member + 1) % self.members.conns.len();
            let _ = self.members.current.compare_exchange(
                member,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
        Err(EtcdError::Unavailable {
            endpoints: self.label.to_owned(),
            attempts,
            last,
        })
    }

    /// The connection to member `i`, made (and authenticated) on first use.
    async fn member(&self, i: usize) -> Result<etcd_client::Client, Failure> {
        let url = &self.config.endpoints[i];
        self.members.conns[i]
            .get_or_try_init(|| async {
                self.rpc(
                    "",
                    etcd_client::Client::connect([url], Some(self.members.options.clone())),
                )
                .await
            })
            .await
            .cloned()
    }

    /// One RPC, bounded by the request timeout, its error classified.
    async fn rpc<T>(
        &self,
        key: &str,
        call: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, Failure> {
        match tokio::time::timeout(self.config.request_timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.classify(key, e)),
            Err(_) => Err(Failure::Retry(format!(
                "no answer within {:?}",
                self.config.request_timeout
            ))),
        }
    }

    fn classify(&self, key: &str, e: etcd_client::Error) -> Failure {
        use tonic::Code;
        let endpoints = self.label.to_owned();
        match e {
            etcd_client::Error::GRpcStatus(status) => {
                let message = status.message().to_owned();
                let auth = message.contains("authentication")
                    || message.contains("user name is empty")
                    || message.contains("invalid auth token");
                match status.code() {
                    Code::Unauthenticated => Failure::Fatal(self.auth_failed(message)),
                    Code::InvalidArgument | Code::FailedPrecondition if auth => {
                        Failure::Fatal(self.auth_failed(message))
                    }
                    Code::PermissionDenied => Failure::Fatal(EtcdError::PermissionDenied {
                        endpoints,
                        key: key.to_owned(),
                        message,
                    }),
                    Code::Unavailable
                    | Code::DeadlineExceeded
                    | Code::Aborted
                    | Code::ResourceExhausted
                    | Code::Cancelled
                    | Code::Unknown
                    | Code::Internal => Failure::Retry(format!("{:?}: {message}", status.code())),
                    code => Failure::Fatal(EtcdError::Etcd {
                        endpoints,
                        message: format!("{code:?}: {message}"),
                    }),
                }
            }
            etcd_client::Error::TransportError(e) => Failure::Retry(format!("transport: {e}")),
            etcd_client::Error::IoError(e) => Failure::Retry(format!("i/o: {e}")),
            e => Failure::Fatal(EtcdError::Etcd {
                endpoints,
                message: e.to_string(),
            }),
        }
    }

    fn auth_failed(&self, message: String) -> EtcdError {
        EtcdError::AuthFailed {
            endpoints: self.label.to_owned(),
            user: self.config.credentials.as_ref().map(|c| c.user.clone()),
            message,
        }
    }
}

fn check_id(kind: &str, id: &str) -> Result<(), EtcdError> {
    validate_id(kind, id).map_err(EtcdError::InvalidArgument)
}

fn parse(key: &str, value: &[u8]) -> Result<Stored, EtcdError> {
    let stored: Stored = serde_json::from_slice(value).map_err(|e| EtcdError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })?;
    let vm = match &stored {
        Stored::Live(e) => &e.vm,
        Stored::Cleared { vm, .. } => vm,
    };
    if !key.ends_with(vm.as_str()) || key.len() == vm.len() {
        return Err(EtcdError::Corrupt {
            key: key.to_owned(),
            reason: format!("it names VM {vm:?}"),
        });
    }
    Ok(stored)
}

/// Blocking wrapper around [`EtcdClient`] for callers on plain OS threads (the VMM's vCPU
/// thread). It owns a runtime with one worker thread, which keeps the gRPC connections
/// alive between calls; do not call it from inside an async runtime.
#[derive(Debug)]
pub struct BlockingEtcdClient {
    runtime: tokio::runtime::Runtime,
    client: EtcdClient,
}

impl BlockingEtcdClient {
    /// See [`EtcdClient::connect`].
    pub fn connect(config: EtcdConfig) -> Result<BlockingEtcdClient, EtcdError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-arbiter")
            .enable_all()
            .build()
            .map_err(EtcdError::Runtime)?;
        let client = runtime.block_on(EtcdClient::connect(config))?;
        Ok(BlockingEtcdClient { runtime, client })
    }

    /// The async client (for use from async code on another runtime).
    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    /// See [`EtcdClient::check`].
    pub fn check(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        self.runtime.block_on(self.client.check(vm))
    }

    /// See [`EtcdClient::test_and_set`].
    pub fn test_and_set(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<ClaimResponse, EtcdError> {
        self.runtime
            .block_on(self.client.test_and_set(vm, claimant, generation))
    }

    /// See [`EtcdClient::re_pair`].
    pub fn re_pair(
        &self,
        vm: &str,
        claimant: &str,
        generation: u64,
    ) -> Result<RePairResponse, EtcdError> {
        self.runtime
            .block_on(self.client.re_pair(vm, claimant, generation))
    }

    /// See [`EtcdClient::get`].
    pub fn get(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        self.runtime.block_on(self.client.get(vm))
    }

    /// See [`EtcdClient::clear`].
    pub fn clear(&self, vm: &str) -> Result<Option<Entry>, EtcdError> {
        self.runtime.block_on(self.client.clear(vm))
    }

    /// See [`EtcdClient::list`].
    pub fn list(&self) -> Result<ListResponse, EtcdError> {
        self.runtime.block_on(self.client.list())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_parsed() {
        let c = EtcdConfig::from_url("etcd://a:1,10.0.0.2:2379, b.example:3").unwrap();
        assert_eq!(
            c.endpoints,
            ["http://a:1", "http://10.0.0.2:2379", "http://b.example:3"]
        );
        assert_eq!(c.prefix, DEFAULT_PREFIX);
        for bad in [
            "etcd://",
            "etcd://a",
            "etcd://a:x",
            "etcd://:1",
            "http://a:1",
            "etcd://a:1/x",
        ] {
            assert!(EtcdConfig::from_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_values_round_trip_and_are_checked() {
        let live = Stored::Live(Entry {
            vm: "vm1".into(),
            generation: 3,
            holder: Some("a".into()),
            opened_by: None,
        });
        let json = serde_json::to_string(&live).unwrap();
        assert!(json.starts_with(r#"{"state":"live","vm":"vm1""#), "{json}");
        assert_eq!(parse("/p/vm1", json.as_bytes()).unwrap(), live);
        assert!(parse("/p/vm2", json.as_bytes()).is_err());
        assert!(parse("/p/vm1", b"garbage").is_err());
        let cleared = Stored::Cleared {
            vm: "vm1".into(),
            retired_generation: 3,
        };
        let json = serde_json::to_vec(&cleared).unwrap();
        assert_eq!(parse("/p/vm1", &json).unwrap(), cleared);
    }

    #[test]
    fn credentials_files_are_parsed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("creds");
        std::fs::write(&path, "twinvm:pa:ss\n").unwrap();
        let c = Credentials::from_file(&path).unwrap();
        assert_eq!((c.user(), c.password.as_str()), ("twinvm", "pa:ss"));
        assert!(!format!("{c:?}").contains("pa:ss"));
        for bad in ["", "nocolon\n", ":pw\n", "user:\n"] {
            std::fs::write(&path, bad).unwrap();
            assert!(Credentials::from_file(&path).is_err(), "{bad:?}");
        }
        assert!(Credentials::from_file(&dir.path().join("missing")).is_err());
    }
}
