//! A page store in memory with a disk's faults on demand, for tests and fuzzing: the contract of
//! `PageStore` as redb keeps it (atomic batches, durable ones carrying every batch before them),
//! plus what a crash and a disk can do to it.
//!
//! A `MemoryDisk` outlives the stores opened on it, as a disk outlives a process: `pages()` opens
//! one, `crash()` cuts the power. After a crash the disk holds what was durable, and as many of
//! the batches after it as asked, each whole (`crash`), or the next one in part (`crash_torn`:
//! what a page store that broke its contract would leave); every store opened before the crash
//! fails from then on, as a process that died does nothing more. `damage` flips a bit of a
//! stored value, as a disk can at rest.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex};

use super::{Batch, Entries, Open, PageStore, Value};
use ledger::store::{StoreError, StoreResult};

type Writes = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// A disk that holds one page store (cheap to clone: clones share it).
#[derive(Clone, Default)]
pub struct MemoryDisk {
    shared: Arc<Mutex<Disk>>,
}

#[derive(Default)]
struct Disk {
    /// What a crash keeps.
    durable: BTreeMap<Vec<u8>, Value>,
    /// The batches applied after the last durable one, in order: what a crash may take back.
    unsynced: Vec<Writes>,
    /// What readers see: `durable` with `unsynced` applied.
    current: BTreeMap<Vec<u8>, Value>,
    /// Counts crashes: a store opened before the last one fails.
    power_cycles: u64,
}

/// A page store on a `MemoryDisk`.
pub struct MemoryPages {
    disk: MemoryDisk,
    power_cycle: u64,
}

impl MemoryDisk {
    /// A page store on this disk (as a process opens it after the last crash).
    pub fn pages(&self) -> MemoryPages {
        MemoryPages { disk: self.clone(), power_cycle: self.shared.lock().unwrap().power_cycles }
    }

    /// A disk of its own holding what this one holds (unsynced batches included).
    pub fn copy(&self) -> MemoryDisk {
        let disk = self.shared.lock().unwrap();
        let copy = Disk {
            durable: disk.durable.clone(),
            unsynced: disk.unsynced.clone(),
            current: disk.current.clone(),
            power_cycles: 0,
        };
        MemoryDisk { shared: Arc::new(Mutex::new(copy)) }
    }

    /// Batches applied since the last durable one.
    pub fn unsynced_batches(&self) -> usize {
        self.shared.lock().unwrap().unsynced.len()
    }

    /// The power is cut: the disk keeps what was durable and the first `keep` batches after it
    /// (at most those there are), each whole.
    pub fn crash(&self, keep: usize) {
        self.crash_torn(keep, 0);
    }

    /// As `crash`, and the batch after the kept ones is torn: its first `writes` writes are kept.
    pub fn crash_torn(&self, keep: usize, writes: usize) {
        let mut disk = self.shared.lock().unwrap();
        let disk = &mut *disk;
        let unsynced = std::mem::take(&mut disk.unsynced);
        let keep = keep.min(unsynced.len());
        for batch in &unsynced[..keep] {
            apply(&mut disk.durable, batch);
        }
        if let Some(torn) = unsynced.get(keep) {
            apply(&mut disk.durable, &torn[..writes.min(torn.len())]);
        }
        disk.current = disk.durable.clone();
        disk.power_cycles += 1;
    }

    /// The keys stored, in order.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        self.shared.lock().unwrap().current.keys().cloned().collect()
    }

    /// Flips bit `bit` (modulo the value's bits) of the value stored under `key`, durably; false
    /// if there is none.
    pub fn damage(&self, key: &[u8], bit: usize) -> bool {
        let mut disk = self.shared.lock().unwrap();
        let mut found = false;
        let disk = &mut *disk;
        for map in [&mut disk.current, &mut disk.durable] {
            if let Some(value) = map.get_mut(key).filter(|value| !value.is_empty()) {
                let mut bytes = value.to_vec();
                let bit = bit % (bytes.len() * 8);
                bytes[bit / 8] ^= 1 << (bit % 8);
                *value = Value::from(bytes);
                found = true;
            }
        }
        found
    }
}

fn apply(map: &mut BTreeMap<Vec<u8>, Value>, writes: &[(Vec<u8>, Option<Vec<u8>>)]) {
    for (key, value) in writes {
        match value {
            Some(value) => map.insert(key.clone(), Value::from(value.as_slice())),
            None => map.remove(key),
        };
    }
}

impl MemoryPages {
    /// The disk, unless it lost power since this store was opened.
    fn disk(&self) -> StoreResult<std::sync::MutexGuard<'_, Disk>> {
        let disk = self.disk.shared.lock().unwrap();
        if disk.power_cycles != self.power_cycle {
            return Err(StoreError::Io(std::io::Error::other("the page store's disk lost power")));
        }
        Ok(disk)
    }
}

impl PageStore for MemoryPages {
    fn get(&self, key: &[u8], open: Open) -> StoreResult<Option<Value>> {
        self.disk()?.current.get(key).map(|stored| open(key, stored)).transpose()
    }

    fn range(&self, lower: Bound<&[u8]>, upper: Bound<&[u8]>, open: Open) -> Entries {
        let disk = match self.disk() {
            Ok(disk) => disk,
            Err(error) => return Box::new(std::iter::once(Err(error))),
        };
        // As of now: a copy of the entries in range (tests' stores are small).
        let entries: Vec<(Value, Value)> = disk
            .current
            .range::<[u8], _>((lower, upper))
            .map(|(key, stored)| (Value::from(key.as_slice()), stored.clone()))
            .collect();
        Box::new(entries.into_iter().map(move |(key, stored)| Ok((key.clone(), open(&key, &stored)?))))
    }

    fn commit(&self, batch: Batch, durably: bool) -> StoreResult<()> {
        let mut disk = self.disk()?;
        let disk = &mut *disk;
        let writes = batch.writes;
        apply(&mut disk.current, &writes);
        if durably {
            disk.durable = disk.current.clone();
            disk.unsynced.clear();
        } else {
            disk.unsynced.push(writes);
        }
        Ok(())
    }

    fn clear(&self) -> StoreResult<()> {
        let mut disk = self.disk()?;
        let deletes: Writes = disk.current.keys().map(|key| (key.clone(), None)).collect();
        disk.current.clear();
        disk.unsynced.push(deletes);
        Ok(())
    }

    fn is_empty(&self) -> StoreResult<bool> {
        Ok(self.disk()?.current.is_empty())
    }
}
