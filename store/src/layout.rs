//! The layout key: which runs each kind has, oldest first, and which runs await deletion. It is
//! written in the same batch as every change to the runs, so a crash leaves a layout that names
//! only whole runs.

use std::sync::Arc;

use super::runs::{KINDS, Kind, Run};
use ledger::store::{StoreError, StoreResult};

/// The key of the layout record (the runs of each kind), for tests that damage it.
pub const LAYOUT_KEY: &[u8] = b"Llayout";
/// Version 2 added the query indexes (kinds 3 to 11) and the transfers' zone maps. Version 1
/// (three kinds) existed only on sled, whose states are rebuilt: it is refused as superseded.
const LAYOUT_VERSION: u32 = 2;

/// The runs of each kind, oldest first.
#[derive(Clone, Default)]
pub struct Runs {
    pub(super) kinds: [Vec<Arc<Run>>; KINDS],
}

impl Runs {
    pub(super) fn of(&self, kind: Kind) -> &[Arc<Run>] {
        &self.kinds[kind as usize]
    }
}

/// The persisted layout, and what is waiting to be deleted.
#[derive(Default)]
pub(super) struct Layout {
    pub(super) next_run: u64,
    /// Merged away; deleted once nothing else holds them.
    pub(super) retired: Vec<Arc<Run>>,
    /// Being written by a merge, or abandoned: not in `Runs`.
    pub(super) writing: Vec<(Kind, u64)>,
    pub(super) garbage: Vec<(Kind, u64)>,
}

impl Layout {
    pub(super) fn encode(&self, runs: &Runs) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&LAYOUT_VERSION.to_le_bytes());
        out.extend_from_slice(&self.next_run.to_le_bytes());
        for kind in Kind::ALL {
            out.extend_from_slice(&(runs.of(kind).len() as u32).to_le_bytes());
            for run in runs.of(kind) {
                out.extend_from_slice(&run.id.to_le_bytes());
            }
        }
        let garbage: Vec<(Kind, u64)> = self
            .retired
            .iter()
            .map(|run| (run.kind, run.id))
            .chain(self.writing.iter().copied())
            .chain(self.garbage.iter().copied())
            .collect();
        out.extend_from_slice(&(garbage.len() as u32).to_le_bytes());
        for (kind, id) in garbage {
            out.push(kind as u8);
            out.extend_from_slice(&id.to_le_bytes());
        }
        out
    }

    /// Decodes the layout.
    pub(super) fn decode(bytes: &[u8]) -> StoreResult<StoredLayout> {
        let corrupt = || StoreError::Corrupt("store layout".into());
        let mut at = 0;
        let mut take = |n: usize| -> StoreResult<&[u8]> {
            let slice = bytes.get(at..at + n).ok_or_else(corrupt)?;
            at += n;
            Ok(slice)
        };
        let version = u32::from_le_bytes(take(4)?.try_into().unwrap());
        if version < LAYOUT_VERSION {
            return Err(StoreError::Superseded(format!(
                "store layout version {version} (before the query indexes), which this build rebuilds"
            )));
        }
        if version > LAYOUT_VERSION {
            return Err(StoreError::OtherVersion(format!(
                "store layout version {version}; this build reads version {LAYOUT_VERSION}"
            )));
        }
        let next_run = u64::from_le_bytes(take(8)?.try_into().unwrap());
        let mut kinds: [Vec<u64>; KINDS] = Default::default();
        for ids in &mut kinds {
            let count = u32::from_le_bytes(take(4)?.try_into().unwrap());
            for _ in 0..count {
                ids.push(u64::from_le_bytes(take(8)?.try_into().unwrap()));
            }
        }
        let count = u32::from_le_bytes(take(4)?.try_into().unwrap());
        let mut garbage = Vec::new();
        for _ in 0..count {
            let kind = Kind::from_u8(take(1)?[0]).ok_or_else(corrupt)?;
            garbage.push((kind, u64::from_le_bytes(take(8)?.try_into().unwrap())));
        }
        if at != bytes.len() {
            return Err(corrupt());
        }
        Ok(StoredLayout { next_run, kinds, garbage })
    }
}

/// The layout as stored: the next run id, the run ids of each kind, and the garbage.
pub(super) struct StoredLayout {
    pub(super) next_run: u64,
    pub(super) kinds: [Vec<u64>; KINDS],
    pub(super) garbage: Vec<(Kind, u64)>,
}
