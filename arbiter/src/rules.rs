//! The arbiter's decision rules as pure functions, shared by every backend: the durable
//! [`crate::store::Store`] of `twinvm-arbiter` and the etcd backend ([`crate::etcd`]). Each
//! function looks at what is known about one VM and returns the answer and, if the decision
//! changes anything, the VM's new entry. The backend makes that write atomic (a lock, or a
//! compare-and-swap transaction) and durable before it answers.
//!
//! See the semantics table in `arbiter/README.md`.

use crate::protocol::{ClaimResponse, Entry, Outcome, RePairResponse};
use crate::store::StoreError;

/// What a backend knows about one VM before a decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slot<'a> {
    /// Never seen.
    Unknown,
    /// Known, with its current entry.
    Live(&'a Entry),
    /// Removed by an operator's clear; generations up to this one are retired.
    Cleared(u64),
}

/// Test-and-set: `claimant` asks to hold `generation` of `vm`.
///
/// * unknown VM: created at `generation` with `claimant` as holder (`won`), unless an
///   operator cleared it and `generation` is not above the retired one (`stale`);
/// * `generation` current, no holder: `claimant` becomes the holder (`won`);
/// * `generation` current, held: `won` if `claimant` is the holder, else `lost`;
/// * `generation` older than current: `stale`;
/// * `generation` newer than current: [`StoreError::FutureGeneration`].
///
/// Returns the answer and the entry to write, if any.
pub fn claim(
    slot: Slot<'_>,
    vm: &str,
    claimant: &str,
    generation: u64,
) -> Result<(ClaimResponse, Option<Entry>), StoreError> {
    let answer = |outcome, generation, holder: Option<&str>| ClaimResponse {
        outcome,
        vm: vm.to_owned(),
        generation,
        holder: holder.map(str::to_owned),
    };
    let created = || Entry {
        vm: vm.to_owned(),
        generation,
        holder: Some(claimant.to_owned()),
        opened_by: None,
    };
    match slot {
        Slot::Cleared(retired) if generation <= retired => {
            Ok((answer(Outcome::Stale, retired, None), None))
        }
        Slot::Unknown | Slot::Cleared(_) => Ok((
            answer(Outcome::Won, generation, Some(claimant)),
            Some(created()),
        )),
        Slot::Live(e) if generation < e.generation => Ok((
            answer(Outcome::Stale, e.generation, e.holder.as_deref()),
            None,
        )),
        Slot::Live(e) if generation > e.generation => Err(StoreError::FutureGeneration {
            vm: vm.to_owned(),
            asked: generation,
            current: e.generation,
        }),
        Slot::Live(e) => match e.holder.as_deref() {
            None => {
                let entry = Entry {
                    holder: Some(claimant.to_owned()),
                    ..e.clone()
                };
                Ok((
                    answer(Outcome::Won, generation, Some(claimant)),
                    Some(entry),
                ))
            }
            Some(h) if h == claimant => Ok((answer(Outcome::Won, generation, Some(h)), None)),
            Some(h) => Ok((answer(Outcome::Lost, generation, Some(h)), None)),
        },
    }
}

/// Re-pair: the holder of the current generation `generation` of `vm` opens
/// `generation + 1`, with no holder yet. Asking again (same claimant, same `generation`)
/// after it succeeded answers the same new generation. A cleared VM is unknown.
///
/// Returns the answer and the entry to write, if any.
pub fn re_pair(
    slot: Slot<'_>,
    vm: &str,
    claimant: &str,
    generation: u64,
) -> Result<(RePairResponse, Option<Entry>), StoreError> {
    let Slot::Live(e) = slot else {
        return Err(StoreError::UnknownVm(vm.to_owned()));
    };
    let answer = |generation| RePairResponse {
        vm: vm.to_owned(),
        generation,
    };
    if generation == e.generation {
        if e.holder.as_deref() != Some(claimant) {
            return Err(StoreError::NotHolder {
                vm: vm.to_owned(),
                claimant: claimant.to_owned(),
                generation,
                holder: e.holder.clone(),
            });
        }
        let next = generation
            .checked_add(1)
            .ok_or(StoreError::GenerationExhausted(generation))?;
        let entry = Entry {
            vm: vm.to_owned(),
            generation: next,
            holder: None,
            opened_by: Some(claimant.to_owned()),
        };
        Ok((answer(next), Some(entry)))
    } else if generation < e.generation {
        if generation + 1 == e.generation && e.opened_by.as_deref() == Some(claimant) {
            Ok((answer(e.generation), None))
        } else {
            Err(StoreError::StaleGeneration {
                vm: vm.to_owned(),
                asked: generation,
                current: e.generation,
            })
        }
    } else {
        Err(StoreError::FutureGeneration {
            vm: vm.to_owned(),
            asked: generation,
            current: e.generation,
        })
    }
}

/// Operator clear: the tombstone's retired generation if `vm` is live (the caller removes
/// the entry and records the tombstone), `None` if there is nothing to clear.
pub fn clear(slot: Slot<'_>) -> Option<u64> {
    match slot {
        Slot::Live(e) => Some(e.generation),
        Slot::Unknown | Slot::Cleared(_) => None,
    }
}
