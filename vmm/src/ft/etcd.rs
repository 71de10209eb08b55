//! The etcd arbiter (`--arbiter etcd://HOST:PORT[,HOST:PORT...]`) behind the machine's
//! [`Arbiter`] trait: the same decisions as the standalone arbiter (`arbiter::rules`), as
//! etcd transactions, claimed as a unique incarnation (see [`super::arbiter::incarnation`]).

use std::path::PathBuf;
use std::time::Duration;

use arbiter::etcd::EtcdError;

use super::arbiter::{check_generation, incarnation};
use super::failover::{Arbiter, Claim};

/// Where the etcd cluster is and what this side claims there.
#[derive(Debug, Clone)]
pub struct EtcdSettings {
    /// `etcd://HOST:PORT[,HOST:PORT...]`.
    pub url: String,
    /// The prefix of the keys (one per VM).
    pub prefix: String,
    /// The file holding `user:password`, if the cluster has authentication on.
    pub credentials_file: Option<PathBuf>,
    /// The VM's id.
    pub vm: String,
    /// The pair's generation.
    pub generation: u64,
    /// The name this side's incarnation starts with.
    pub name: String,
}

/// Errors setting up the etcd arbiter at start-up.
#[derive(Debug, thiserror::Error)]
pub enum EtcdSetupError {
    /// The client could not be made, could not log in or may not use the VM's key.
    #[error("the etcd arbiter {url}: {source}")]
    Etcd {
        /// The cluster.
        url: String,
        /// The error.
        source: EtcdError,
    },
    /// The pair's generation cannot be used (held, stale, or not open).
    #[error("{0}")]
    Generation(String),
}

/// The test-and-set as an etcd transaction, claimed as one incarnation of a VMM.
pub struct EtcdArbiter {
    client: arbiter::BlockingEtcdClient,
    vm: String,
    claimant: String,
    generation: u64,
}

impl std::fmt::Debug for EtcdArbiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdArbiter")
            .field("vm", &self.vm)
            .field("claimant", &self.claimant)
            .field("generation", &self.generation)
            .finish_non_exhaustive()
    }
}

impl EtcdArbiter {
    /// Connects, logs in, checks that this side may read and write the VM's key and that
    /// the pair's generation is open (before the guest boots).
    pub fn connect(s: &EtcdSettings) -> Result<Self, EtcdSetupError> {
        Self::open(s, true)
    }

    /// [`EtcdArbiter::connect`] for a joining backup, whose generation comes later from the
    /// live side (see [`Arbiter::join_generation`]).
    pub fn connect_joining(s: &EtcdSettings) -> Result<Self, EtcdSetupError> {
        Self::open(s, false)
    }

    fn open(s: &EtcdSettings, check: bool) -> Result<Self, EtcdSetupError> {
        let err = |source| EtcdSetupError::Etcd {
            url: s.url.clone(),
            source,
        };
        let mut config = arbiter::EtcdConfig::from_url(&s.url).map_err(err)?;
        config.prefix = s.prefix.clone();
        if let Some(p) = &s.credentials_file {
            config.credentials = Some(arbiter::etcd::Credentials::from_file(p).map_err(err)?);
        }
        config.connect_timeout = Duration::from_millis(500);
        config.request_timeout = Duration::from_secs(2);
        config.attempts = 2;
        let client = arbiter::BlockingEtcdClient::connect(config).map_err(err)?;
        let entry = client.check(&s.vm).map_err(err)?;
        if check {
            check_generation(&s.vm, s.generation, entry.as_ref(), None)
                .map_err(EtcdSetupError::Generation)?;
        }
        Ok(EtcdArbiter {
            client,
            vm: s.vm.clone(),
            claimant: incarnation(&s.name),
            generation: s.generation,
        })
    }

    /// The incarnation this side claims as.
    pub fn claimant(&self) -> &str {
        &self.claimant
    }
}

impl Arbiter for EtcdArbiter {
    fn claim(&mut self) -> Claim {
        match self
            .client
            .test_and_set(&self.vm, &self.claimant, self.generation)
        {
            Ok(r) => super::arbiter::answered(&r),
            // No quorum, no leader, timeouts: ask again while the guest stays paused.
            Err(e @ (EtcdError::Unavailable { .. } | EtcdError::Etcd { .. })) => {
                Claim::Unreachable(e.to_string())
            }
            // Credentials, permissions, a refused or corrupt key: asking again will not help.
            Err(e) => Claim::Refused(e.to_string()),
        }
    }

    fn describe(&self) -> String {
        format!(
            "generation {} of VM {:?} at the etcd arbiter {} (as {})",
            self.generation,
            self.vm,
            self.client.client().endpoints(),
            self.claimant
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
        let entry = self.client.check(&self.vm).map_err(|e| e.to_string())?;
        check_generation(&self.vm, generation, entry.as_ref(), None)?;
        self.generation = generation;
        Ok(())
    }
}
