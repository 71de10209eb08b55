//! The `twinvm-arbiter` behind the machine's [`Arbiter`] trait.
//!
//! Every VMM process claims as an *incarnation* that no other process can share (its role,
//! host name, boot id, process id and a random id), so two sides can never both be told
//! `won` for one generation because they were given the same name. Both sides check the
//! arbiter when they start: it answers, it takes the token, and the pair's generation is
//! still open; a pair whose generation is already held (an earlier pair failed over, and
//! its survivor may still run) is refused with an error naming the holder.

use std::path::{Path, PathBuf};
use std::time::Duration;

use arbiter::client::ClientError;
use arbiter::protocol::{ClaimResponse, Entry};

use super::failover::{Arbiter, Claim};

/// How long a side waits at start-up for an arbiter that does not answer yet.
pub const START_WAIT: Duration = Duration::from_secs(10);

/// Errors setting up the arbiter at start-up; each is a configuration error, found before
/// the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum ArbiterSetupError {
    /// The token file cannot be read.
    #[error("the arbiter's token file: {0}")]
    Token(#[from] arbiter::auth::AuthError),
    /// The client cannot be created (or an id is not one the arbiter accepts).
    #[error("the arbiter client for {addr}: {source}")]
    Client {
        /// The arbiter's address.
        addr: String,
        /// The error.
        source: ClientError,
    },
    /// The arbiter does not answer its health check.
    #[error("the arbiter at {addr} does not answer ({source}), after waiting {START_WAIT:?}: start it, or fix --arbiter")]
    Unreachable {
        /// The arbiter's address.
        addr: String,
        /// The error.
        source: ClientError,
    },
    /// The arbiter refused the token (or has none while this side sends one, or the other
    /// way round).
    #[error("the arbiter at {addr} refuses this side's token{file}: {source}")]
    BadToken {
        /// The arbiter's address.
        addr: String,
        /// ` (from FILE)` or ` (none given: --arbiter-token-file)`.
        file: String,
        /// The error.
        source: ClientError,
    },
    /// The arbiter answered the VM's state with an error.
    #[error("the arbiter at {addr} cannot tell the state of VM {vm:?}: {source}")]
    State {
        /// The arbiter's address.
        addr: String,
        /// The VM.
        vm: String,
        /// The error.
        source: ClientError,
    },
    /// The pair's generation cannot be used (held, stale, retired or not open).
    #[error("{0}")]
    Generation(String),
}

/// Where the arbiter is and what this side claims there.
#[derive(Debug, Clone)]
pub struct ArbiterSettings {
    /// HOST:PORT.
    pub addr: String,
    /// The file holding the arbiter's token, if any.
    pub token_file: Option<PathBuf>,
    /// The VM's id at the arbiter.
    pub vm: String,
    /// The pair's generation.
    pub generation: u64,
    /// The name this side's incarnation starts with (its role, or `--claimant`).
    pub name: String,
}

/// The arbiter's test-and-set over HTTP, claimed as one incarnation of a VMM.
pub struct HttpArbiter {
    client: arbiter::BlockingClient,
    vm: String,
    claimant: String,
    generation: u64,
    addr: String,
}

impl std::fmt::Debug for HttpArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpArbiter")
            .field("vm", &self.vm)
            .field("claimant", &self.claimant)
            .field("generation", &self.generation)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl HttpArbiter {
    /// A client of the arbiter, claiming as a new incarnation named after `s.name`; nothing
    /// is asked yet (see [`HttpArbiter::check_start`]).
    pub fn new(s: &ArbiterSettings) -> Result<Self, ArbiterSetupError> {
        let token = match &s.token_file {
            Some(p) => Some(arbiter::Token::from_file(p)?),
            None => None,
        };
        let config = arbiter::ClientConfig {
            connect_timeout: Duration::from_millis(500),
            request_timeout: Duration::from_secs(2),
            attempts: 2,
            ..Default::default()
        };
        let client_err = |source| ArbiterSetupError::Client {
            addr: s.addr.clone(),
            source,
        };
        let client = arbiter::BlockingClient::with_config(s.addr.clone(), token, config)
            .map_err(client_err)?;
        let claimant = incarnation(&s.name);
        for (kind, id) in [("VM", s.vm.as_str()), ("claimant", claimant.as_str())] {
            arbiter::protocol::validate_id(kind, id)
                .map_err(|m| client_err(ClientError::InvalidArgument(m)))?;
        }
        Ok(HttpArbiter {
            client,
            vm: s.vm.clone(),
            claimant,
            generation: s.generation,
            addr: s.addr.clone(),
        })
    }

    /// [`HttpArbiter::new`] followed by [`HttpArbiter::check_start`].
    pub fn connect(s: &ArbiterSettings) -> Result<Self, ArbiterSetupError> {
        let a = Self::new(s)?;
        a.check_start(s.token_file.as_deref())?;
        Ok(a)
    }

    /// The incarnation this side claims as.
    pub fn claimant(&self) -> &str {
        &self.claimant
    }

    /// Checks, before the guest boots, that the arbiter answers, takes this side's token,
    /// and has the pair's generation open (see [`check_generation`]).
    pub fn check_start(&self, token_file: Option<&Path>) -> Result<(), ArbiterSetupError> {
        let addr = self.addr.clone();
        // An arbiter started together with the pair may not listen yet: give it a moment.
        let deadline = std::time::Instant::now() + START_WAIT;
        loop {
            match self.client.health() {
                Ok(()) => break,
                Err(e @ ClientError::Unavailable { .. })
                    if std::time::Instant::now() < deadline =>
                {
                    tracing::debug!("arbiter not answering yet: {e}");
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(source) => {
                    return Err(ArbiterSetupError::Unreachable {
                        addr: addr.clone(),
                        source,
                    })
                }
            }
        }
        let refused = |source: ClientError| match source.code() {
            Some(arbiter::ErrorCode::Unauthorized) => ArbiterSetupError::BadToken {
                addr: addr.clone(),
                file: match token_file {
                    Some(p) => format!(" (from {})", p.display()),
                    None => " (none given: --arbiter-token-file)".to_string(),
                },
                source,
            },
            _ => ArbiterSetupError::State {
                addr: addr.clone(),
                vm: self.vm.clone(),
                source,
            },
        };
        let entry = self.client.get(&self.vm).map_err(refused)?;
        let retired = match entry {
            Some(_) => None,
            None => self
                .client
                .list()
                .map_err(refused)?
                .cleared
                .into_iter()
                .find(|t| t.vm == self.vm)
                .map(|t| t.retired_generation),
        };
        check_generation(&self.vm, self.generation, entry.as_ref(), retired)
            .map_err(ArbiterSetupError::Generation)?;
        tracing::info!(
            "arbiter {}: generation {} of VM {:?} is open; this side claims it as {}",
            self.addr,
            self.generation,
            self.vm,
            self.claimant
        );
        Ok(())
    }
}

impl Arbiter for HttpArbiter {
    fn claim(&mut self) -> Claim {
        classify(
            self.client
                .test_and_set(&self.vm, &self.claimant, self.generation),
        )
    }

    fn describe(&self) -> String {
        format!(
            "generation {} of VM {:?} at the arbiter {} (as {})",
            self.generation, self.vm, self.addr, self.claimant
        )
    }

    fn re_pair(&mut self) -> Result<u64, String> {
        let r = self
            .client
            .re_pair(&self.vm, &self.claimant, self.generation)
            .map_err(|e| format!("re-pair of {}: {e}", self.describe()))?;
        self.generation = r.generation;
        Ok(r.generation)
    }

    fn join_generation(&mut self, generation: u64) -> Result<(), String> {
        let entry = self
            .client
            .get(&self.vm)
            .map_err(|e| format!("the arbiter at {}: {e}", self.addr))?;
        check_generation(&self.vm, generation, entry.as_ref(), None)?;
        self.generation = generation;
        Ok(())
    }
}

impl HttpArbiter {
    /// Checks, before a joining backup starts, that the arbiter answers and takes this
    /// side's token (its generation comes later, from the live side: see
    /// [`Arbiter::join_generation`]).
    pub fn connect_joining(s: &ArbiterSettings) -> Result<Self, ArbiterSetupError> {
        let a = Self::new(s)?;
        a.client.list().map_err(|source| match source.code() {
            Some(arbiter::ErrorCode::Unauthorized) => ArbiterSetupError::BadToken {
                addr: s.addr.clone(),
                file: match &s.token_file {
                    Some(p) => format!(" (from {})", p.display()),
                    None => " (none given: --arbiter-token-file)".to_string(),
                },
                source,
            },
            _ => ArbiterSetupError::Unreachable {
                addr: s.addr.clone(),
                source,
            },
        })?;
        Ok(a)
    }
}

/// What an answered test-and-set means (the same for every backend): `won`, or `lost` and
/// `stale`, which halt, naming the holder.
pub fn answered(r: &ClaimResponse) -> Claim {
    let holder = r.holder.as_deref().unwrap_or("nobody");
    match r.outcome {
        arbiter::Outcome::Won => Claim::Won,
        arbiter::Outcome::Lost => Claim::Lost(format!("held by {holder}")),
        arbiter::Outcome::Stale => Claim::Lost(format!(
            "stale: the VM is at generation {}, held by {holder}",
            r.generation
        )),
    }
}

/// What an answer of the arbiter's test-and-set means for a side that lost its peer.
/// `lost` and `stale` halt; an arbiter that cannot be reached (connection errors,
/// timeouts, 408, 5xx, an answer that cannot be read) is asked again; any other refusal
/// (4xx: a wrong token, a bad id, a generation that is not open) will not change by asking
/// again, so the side halts at once.
pub fn classify(answer: Result<ClaimResponse, ClientError>) -> Claim {
    match answer {
        Ok(r) => answered(&r),
        Err(e @ ClientError::Rejected { status, .. })
            if (400..500).contains(&status) && status != 408 =>
        {
            Claim::Refused(e.to_string())
        }
        Err(e @ ClientError::InvalidArgument(_)) => Claim::Refused(e.to_string()),
        Err(e) => Claim::Unreachable(e.to_string()),
    }
}

/// Whether a new pair may use `generation` of `vm`, given the arbiter's `entry` for it and,
/// for a VM it does not know, the generation an operator's clear retired. A pair may start
/// only where nobody holds its generation yet, and where a claim would not be refused.
pub fn check_generation(
    vm: &str,
    generation: u64,
    entry: Option<&Entry>,
    retired: Option<u64>,
) -> Result<(), String> {
    let Some(e) = entry else {
        return match retired {
            Some(r) if generation <= r => Err(format!(
                "generation {generation} of VM {vm:?} was retired when the VM was cleared at the arbiter (generations up to {r}): start the pair with --generation {}",
                r + 1
            )),
            _ => Ok(()),
        };
    };
    let held = |h: &Option<String>| match h {
        Some(h) => format!("held by {h}"),
        None => "open".to_string(),
    };
    if e.generation == generation {
        return match &e.holder {
            None => Ok(()),
            Some(h) => Err(format!(
                "generation {generation} of VM {vm:?} is held by {h}: a side of an earlier pair went on alone with it and may still be running. \
                 Stop that copy, then clear the VM at the arbiter (DELETE /v1/vms/{vm}) and start the pair with --generation {}, \
                 or pair it with a new backup (re-pair opens generation {})",
                generation + 1,
                generation + 1
            )),
        };
    }
    if e.generation > generation {
        return Err(format!(
            "generation {generation} of VM {vm:?} is stale: the arbiter is at generation {} ({}){}",
            e.generation,
            held(&e.holder),
            if e.holder.is_none() {
                format!(": start the pair with --generation {}", e.generation)
            } else {
                ": stop the copy that holds it, clear the VM at the arbiter and start above it"
                    .to_string()
            }
        ));
    }
    Err(format!(
        "generation {generation} of VM {vm:?} is not open: the arbiter is at generation {} ({}); only its holder opens the next one (re-pair), or clear the VM at the arbiter",
        e.generation,
        held(&e.holder)
    ))
}

/// A claimant id no other process shares: `NAME@HOST:BOOT:PID:RANDOM`, where BOOT is the
/// start of the host's boot id (`/proc/sys/kernel/random/boot_id`), PID this process's id
/// and RANDOM 64 random bits. Only characters the arbiter accepts in ids, at most 128.
pub fn incarnation(name: &str) -> String {
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let boot: String = boot
        .chars()
        .filter(char::is_ascii_hexdigit)
        .take(12)
        .collect();
    let mut random = [0u8; 8];
    if let Err(e) = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut random))
    {
        // Not expected on Linux; the time and the stack address still vary per process.
        tracing::warn!("/dev/urandom: {e}");
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        random = (t ^ (&random as *const _ as u64)).to_le_bytes();
    }
    let random: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}@{}:{}:{}:{}",
        id_part(name, 24),
        id_part(&host_name(), 40),
        if boot.is_empty() {
            "noboot".to_string()
        } else {
            boot
        },
        std::process::id(),
        random
    )
}

/// `s` with characters the arbiter does not accept in ids replaced by `-`, at most `max`
/// characters, never empty.
fn id_part(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '-'
            }
        })
        .take(max)
        .collect();
    if out.is_empty() {
        "x".to_string()
    } else {
        out
    }
}

fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if r != 0 {
        return "unknown-host".to_string();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use arbiter::ErrorCode;

    fn rejected(status: u16, code: ErrorCode) -> ClientError {
        ClientError::Rejected {
            status,
            code,
            message: "no".into(),
        }
    }

    fn entry(generation: u64, holder: Option<&str>) -> Entry {
        Entry {
            vm: "twinvm".into(),
            generation,
            holder: holder.map(str::to_string),
            opened_by: None,
        }
    }

    #[test]
    fn a_4xx_is_a_refusal_and_only_unavailability_is_retried() {
        for (status, code) in [
            (401, ErrorCode::Unauthorized),
            (400, ErrorCode::BadRequest),
            (409, ErrorCode::FutureGeneration),
            (404, ErrorCode::NotFound),
        ] {
            assert!(
                matches!(classify(Err(rejected(status, code))), Claim::Refused(ref m) if m.contains(&status.to_string())),
                "{status}"
            );
        }
        assert!(matches!(
            classify(Err(ClientError::InvalidArgument("bad id".into()))),
            Claim::Refused(_)
        ));
        for e in [
            ClientError::Unavailable {
                addr: "a:1".into(),
                attempts: 2,
                last: "refused".into(),
            },
            rejected(408, ErrorCode::RequestTimeout),
            rejected(503, ErrorCode::StoreUnavailable),
            ClientError::Protocol {
                status: 200,
                detail: "garbage".into(),
            },
        ] {
            assert!(matches!(classify(Err(e)), Claim::Unreachable(_)));
        }
        let answer = |outcome, holder: Option<&str>| {
            Ok(ClaimResponse {
                outcome,
                vm: "twinvm".into(),
                generation: 1,
                holder: holder.map(str::to_string),
            })
        };
        assert!(matches!(
            classify(answer(arbiter::Outcome::Won, Some("me"))),
            Claim::Won
        ));
        assert!(
            matches!(classify(answer(arbiter::Outcome::Lost, Some("other@h"))), Claim::Lost(ref m) if m.contains("other@h"))
        );
        assert!(matches!(
            classify(answer(arbiter::Outcome::Stale, None)),
            Claim::Lost(_)
        ));
    }

    #[test]
    fn a_pair_starts_only_where_its_generation_is_open() {
        assert!(check_generation("twinvm", 1, None, None).is_ok());
        assert!(check_generation("twinvm", 1, Some(&entry(1, None)), None).is_ok());
        let held = check_generation("twinvm", 1, Some(&entry(1, Some("backup@h:b:7:r"))), None)
            .unwrap_err();
        assert!(
            held.contains("generation 1 of VM \"twinvm\" is held by backup@h:b:7:r"),
            "{held}"
        );
        assert!(held.contains("--generation 2"), "{held}");
        let stale = check_generation("twinvm", 1, Some(&entry(3, None)), None).unwrap_err();
        assert!(stale.contains("--generation 3"), "{stale}");
        assert!(check_generation("twinvm", 2, Some(&entry(1, Some("x"))), None).is_err());
        let retired = check_generation("twinvm", 2, None, Some(2)).unwrap_err();
        assert!(retired.contains("--generation 3"), "{retired}");
        assert!(check_generation("twinvm", 3, None, Some(2)).is_ok());
    }

    #[test]
    fn incarnations_differ_per_call_and_are_valid_arbiter_ids() {
        let a = incarnation("primary");
        let b = incarnation("primary");
        assert_ne!(a, b);
        assert!(a.starts_with("primary@"), "{a}");
        assert!(a.contains(&format!(":{}:", std::process::id())), "{a}");
        arbiter::protocol::validate_id("claimant", &a).unwrap();
        let odd = incarnation(&"ü/ x".repeat(40));
        arbiter::protocol::validate_id("claimant", &odd).unwrap();
        assert!(odd.len() <= arbiter::protocol::MAX_ID_LEN, "{odd}");
    }
}
