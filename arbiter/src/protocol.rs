//! Wire types of the arbiter's HTTP/1.1 + JSON protocol, shared by the server and the client.
//!
//! Routes (all under [`API_PREFIX`]; every route except `GET /v1/health` needs
//! `Authorization: Bearer <token>`):
//!
//! | method | path                         | body             | answer                |
//! |--------|------------------------------|------------------|-----------------------|
//! | GET    | `/v1/health`                 |                  | `{"status":"ok"}`     |
//! | POST   | `/v1/vms/{vm}/test-and-set`  | [`ClaimRequest`] | [`ClaimResponse`]     |
//! | POST   | `/v1/vms/{vm}/re-pair`       | [`ClaimRequest`] | [`RePairResponse`]    |
//! | GET    | `/v1/vms/{vm}`               |                  | [`Entry`]             |
//! | GET    | `/v1/vms`                    |                  | [`ListResponse`]      |
//! | DELETE | `/v1/vms/{vm}`               |                  | [`ClearResponse`]     |
//!
//! Errors are answered with a non-2xx status and an [`ErrorBody`].

use serde::{Deserialize, Serialize};

/// Prefix of every route; bumped if the protocol ever changes incompatibly.
pub const API_PREFIX: &str = "/v1";

/// Longest accepted VM id or claimant id, in bytes.
pub const MAX_ID_LEN: usize = 128;

/// Default limit on a request body; larger requests get `413 Payload Too Large`.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024;

/// Body of `test-and-set` and `re-pair`: who asks, and for which generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRequest {
    /// Identity of the claimant (normally the host name of the VMM asking).
    pub claimant: String,
    /// The generation the claimant believes is current.
    pub generation: u64,
}

/// Result of a `test-and-set`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The claimant holds the generation it asked for (first to ask, or asking again).
    Won,
    /// Another claimant holds the generation asked for; see `holder`.
    Lost,
    /// The generation asked for is older than the VM's current generation (or was retired
    /// by an operator's clear); it can never be won again.
    Stale,
}

/// Answer to a `test-and-set`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClaimResponse {
    /// What happened to this claim.
    pub outcome: Outcome,
    /// The VM the claim was about.
    pub vm: String,
    /// The VM's current generation (for `stale` after a clear: the last retired generation).
    pub generation: u64,
    /// Holder of the current generation, if any.
    pub holder: Option<String>,
}

/// Answer to a successful `re-pair`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RePairResponse {
    /// The VM that was re-paired.
    pub vm: String,
    /// The newly opened generation (current generation + 1), still without a holder.
    pub generation: u64,
}

/// The arbiter's state for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// VM id.
    pub vm: String,
    /// Current generation.
    pub generation: u64,
    /// Winner of the current generation, if it has been claimed.
    pub holder: Option<String>,
    /// Holder of the previous generation who opened this one with `re-pair`
    /// (`None` if the entry was created by a first claim).
    pub opened_by: Option<String>,
}

/// A VM removed by an operator's clear: generations up to `retired_generation` can never
/// be claimed again, so a stale claimant cannot resurrect the VM at an old generation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tombstone {
    /// VM id.
    pub vm: String,
    /// Highest generation ever used by the cleared VM.
    pub retired_generation: u64,
}

/// Answer to `GET /v1/vms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListResponse {
    /// Live entries, sorted by VM id.
    pub vms: Vec<Entry>,
    /// Cleared VMs and the generations they retired, sorted by VM id.
    pub cleared: Vec<Tombstone>,
}

/// Answer to `DELETE /v1/vms/{vm}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClearResponse {
    /// The entry as it was before it was removed.
    pub cleared: Entry,
}

/// Machine-readable error codes carried in [`ErrorBody::error`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed request: bad JSON, bad id, missing field (400).
    BadRequest,
    /// Missing or wrong bearer token (401).
    Unauthorized,
    /// No such route (404).
    NotFound,
    /// The VM id is not known to the arbiter (404).
    UnknownVm,
    /// The route exists but not with this method (405).
    MethodNotAllowed,
    /// The request body did not arrive in time (408).
    RequestTimeout,
    /// A claim for a generation newer than the VM's current one (409).
    FutureGeneration,
    /// `re-pair` by someone who does not hold the current generation (409).
    NotHolder,
    /// `re-pair` with an old generation that this claimant did not open from (409).
    StaleGeneration,
    /// Request body larger than the limit (413).
    PayloadTooLarge,
    /// The store cannot make decisions durable (503); nothing was decided.
    StoreUnavailable,
    /// An error code this version does not know.
    #[serde(other)]
    Other,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub error: ErrorCode,
    /// Human-readable explanation.
    pub message: String,
}

/// Checks that `id` is usable as a VM or claimant id: 1 to [`MAX_ID_LEN`] bytes of
/// `A-Z a-z 0-9 . _ - : @`. Returns a message saying what is wrong otherwise.
pub fn validate_id(kind: &str, id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err(format!("{kind} id is empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(format!(
            "{kind} id is {} bytes long, the limit is {MAX_ID_LEN}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@')))
    {
        return Err(format!(
            "{kind} id contains {c:?}; allowed are A-Z a-z 0-9 . _ - : @"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_validated() {
        assert!(validate_id("vm", "vm-1.example:a@b_c").is_ok());
        assert!(validate_id("vm", "").is_err());
        assert!(validate_id("vm", "a/b").is_err());
        assert!(validate_id("vm", "a b").is_err());
        assert!(validate_id("vm", &"x".repeat(MAX_ID_LEN)).is_ok());
        assert!(validate_id("vm", &"x".repeat(MAX_ID_LEN + 1)).is_err());
        assert!(validate_id("vm", "é").is_err());
    }

    #[test]
    fn unknown_error_codes_decode_as_other() {
        let body: ErrorBody =
            serde_json::from_str(r#"{"error":"from_the_future","message":"m"}"#).unwrap();
        assert_eq!(body.error, ErrorCode::Other);
    }
}
