//! The storage of a managed dict: a hash table of byte keys to byte values in one shared
//! memory file, under a robust process-shared mutex, so that every process on the manager's
//! machine reads and writes it in place (a lock, a lookup and a copy: no message to the
//! manager and back).
//!
//! # Layout
//!
//! A memfd of [`MAX_BYTES`] (less where the address space is limited: see
//! [`Table::create`]; sparse: pages exist once touched), sealed against any change
//! of size, mapped whole by every user. A header (magic, the mutex, the bump pointer of the
//! arena, the current slot array, counts, and one free list per block size), then an arena
//! of blocks whose sizes are powers of two from 32 bytes: an entry block holds its key and
//! value, a slot-array block holds `(hash, entry offset)` pairs (offset 0: empty, 1: a
//! removed entry) probed linearly.
//!
//! # Crash safety
//!
//! A process may die (SIGKILL) anywhere inside an operation, holding the mutex; the next
//! locker is told (`EOWNERDEAD`) and recounts the entries. Every change is ordered so that
//! the table is valid after any prefix of it: an entry is written whole before one 8-byte
//! store links it, unlinked before its block goes back to a free list, and a grown slot
//! array is filled before one store publishes it. A death can leak a block; it never leaves
//! a block both used and free, nor a link to a half-written entry.
//!
//! # Hostile data
//!
//! Any process holding the memfd can write anything into it. Every offset, length and count
//! read from it is checked against the mapping before use, and probing is bounded, so that
//! a corrupt table gives [`TableError::Corrupt`], never a fault, a panic or a hang (a
//! process that holds the mutex for ever can only make the others wait: lock timeouts).

use std::io;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use crate::sys::shm::{Locked, Mapping, MutexError, RobustMutex, MUTEX_SIZE};

/// The size of the shared file (and of each mapping of it): the most a dict can hold,
/// entries and slot arrays together. Address space only until used.
pub(crate) const MAX_BYTES: usize = 4 << 30;

/// The sizes tried, largest first, where mapping [`MAX_BYTES`] fails (`ulimit -v`).
const SIZES: [usize; 4] = [MAX_BYTES, 1 << 30, 256 << 20, 64 << 20];

const MAGIC: u64 = u64::from_le_bytes(*b"gpuprocT");
const MUTEX_AT: usize = 64;
const ARENA_END_AT: usize = 128;
const SLOTS_AT: usize = 136;
const COUNT_AT: usize = 144;
const USED_AT: usize = 152;
const FREE_AT: usize = 192;
/// Block sizes are `MIN_BLOCK << class`.
const CLASSES: usize = 32;
const ARENA_START: usize = 512;
const MIN_BLOCK: usize = 32;
/// An entry block: class (u64), key length (u32), value length (u32), key, value.
const ENTRY_HEADER: usize = 16;
/// A slot-array block: class (u64), capacity (u64), then the slots.
const SLOTS_HEADER: usize = 16;
const SLOT: usize = 16;
const MIN_SLOTS: usize = 16;
const EMPTY: u64 = 0;
const REMOVED: u64 = 1;

const _: () = assert!(MUTEX_AT + MUTEX_SIZE <= ARENA_END_AT);
const _: () = assert!(FREE_AT + 8 * CLASSES <= ARENA_START);

/// Why a table operation failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TableError {
    /// The lock was not free before the deadline.
    #[error("the dict stayed locked by another process")]
    Busy,
    /// The table's shared memory is full.
    #[error("the dict is full: its shared memory holds at most {} MiB", .0 >> 20)]
    Full(usize),
    /// The shared memory does not hold a valid table (written by something else).
    #[error("the dict's shared memory is corrupt: {0}")]
    Corrupt(String),
    /// The system refused.
    #[error("{0}")]
    Os(#[from] io::Error),
}

fn corrupt(what: impl Into<String>) -> TableError {
    TableError::Corrupt(what.into())
}

/// One process's handle on a table.
#[derive(Debug, Clone)]
pub(crate) struct Table {
    map: Arc<Mapping>,
    mutex: RobustMutex,
}

impl Table {
    /// A new, empty table in a new memfd of [`MAX_BYTES`], or of the largest of the smaller
    /// sizes that can be mapped (where `ulimit -v` limits the address space).
    pub fn create() -> Result<Table, TableError> {
        let mut made = Err(TableError::Os(io::Error::other("no size to try")));
        for size in SIZES {
            made = Table::create_of(size);
            if made.is_ok() {
                break;
            }
        }
        made
    }

    /// A new, empty table in a new memfd of `size` bytes (one of [`SIZES`]).
    fn create_of(size: usize) -> Result<Table, TableError> {
        let map = Arc::new(Mapping::anonymous("gpuproc-managed-dict", size)?);
        let mutex = RobustMutex::init(map.clone(), MUTEX_AT, false)?;
        let t = Table { map, mutex };
        t.word(ARENA_END_AT)
            .store(ARENA_START as u64, Ordering::Relaxed);
        let slots = t.new_slots(MIN_SLOTS)?;
        t.word(SLOTS_AT).store(slots as u64, Ordering::Relaxed);
        t.word(0).store(MAGIC, Ordering::Release);
        Ok(t)
    }

    /// The table in a memfd received from another process (checked: sealed against
    /// shrinking, of one of the sizes [`create`](Self::create) makes, with the magic word).
    pub fn open(fd: OwnedFd) -> Result<Table, TableError> {
        let map = Mapping::map_existing(fd, ARENA_START)?;
        if !SIZES.contains(&map.len()) {
            return Err(corrupt(format!("{} bytes, not a table's size", map.len())));
        }
        let map = Arc::new(map);
        if map.atomic_u64(0).load(Ordering::Acquire) != MAGIC {
            return Err(corrupt("no table header"));
        }
        let mutex = RobustMutex::existing(map.clone(), MUTEX_AT);
        Ok(Table { map, mutex })
    }

    /// The memfd, to send to another process.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.map.fd()
    }

    /// The value of `key`, handed to `read` while the table is locked.
    pub fn get<R>(
        &self,
        key: &[u8],
        deadline: Option<Instant>,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, TableError> {
        let g = self.lock(deadline)?;
        let found = g.find(key)?;
        Ok(found
            .entry
            .map(|e| read(g.t.bytes(e.value_at, e.value_len))))
    }

    /// Sets `key` to `value`.
    pub fn set(
        &self,
        key: &[u8],
        value: &[u8],
        deadline: Option<Instant>,
    ) -> Result<(), TableError> {
        let g = self.lock(deadline)?;
        let found = g.find(key)?;
        match found.entry {
            Some(e) => {
                // Link the new entry, then free the old one.
                let block = g.t.new_entry(key, value)?;
                g.t.word(found.slot + 8)
                    .store(block as u64, Ordering::Release);
                g.t.free(e.block)?;
            }
            None => {
                // The slot first (growing the array if need be), then the entry: a full
                // table refuses before it allocates anything.
                let slot = match found.free_slot {
                    Some(s) if g.t.has_room_for_one_more(found.cap) => s,
                    _ => {
                        g.t.grow()?;
                        g.find(key)?
                            .free_slot
                            .ok_or_else(|| corrupt("no free slot"))?
                    }
                };
                let block = g.t.new_entry(key, value)?;
                let was_removed = g.t.word(slot + 8).load(Ordering::Acquire) == REMOVED;
                g.t.word(slot).store(hash(key), Ordering::Relaxed);
                g.t.word(slot + 8).store(block as u64, Ordering::Release);
                g.t.add(COUNT_AT, 1);
                if !was_removed {
                    g.t.add(USED_AT, 1);
                }
            }
        }
        Ok(())
    }

    /// Removes `key`, handing its value to `read`.
    pub fn remove<R>(
        &self,
        key: &[u8],
        deadline: Option<Instant>,
        read: impl FnOnce(&[u8]) -> R,
    ) -> Result<Option<R>, TableError> {
        let g = self.lock(deadline)?;
        let found = g.find(key)?;
        let Some(e) = found.entry else {
            return Ok(None);
        };
        let r = read(g.t.bytes(e.value_at, e.value_len));
        g.t.word(found.slot + 8).store(REMOVED, Ordering::Release);
        g.t.add(COUNT_AT, u64::MAX); // - 1
        g.t.free(e.block)?;
        Ok(Some(r))
    }

    /// The number of entries.
    pub fn len(&self, deadline: Option<Instant>) -> Result<usize, TableError> {
        let g = self.lock(deadline)?;
        usize::try_from(g.t.word(COUNT_AT).load(Ordering::Relaxed))
            .map_err(|_| corrupt("entry count"))
    }

    /// Every entry, handed to `each` (key, value) while the table is locked.
    pub fn for_each(
        &self,
        deadline: Option<Instant>,
        mut each: impl FnMut(&[u8], &[u8]),
    ) -> Result<(), TableError> {
        let g = self.lock(deadline)?;
        let (slots, cap) = g.t.slots()?;
        for i in 0..cap {
            let off =
                g.t.word(slots + SLOTS_HEADER + i * SLOT + 8)
                    .load(Ordering::Acquire);
            if off > REMOVED {
                let e = g.t.entry(off)?;
                each(
                    g.t.bytes(e.block + ENTRY_HEADER, e.key_len),
                    g.t.bytes(e.value_at, e.value_len),
                );
            }
        }
        Ok(())
    }

    /// Removes every entry.
    pub fn clear(&self, deadline: Option<Instant>) -> Result<(), TableError> {
        let g = self.lock(deadline)?;
        let (old, cap) = g.t.slots()?;
        let fresh = g.t.new_slots(MIN_SLOTS)?;
        g.t.word(SLOTS_AT).store(fresh as u64, Ordering::Release);
        g.t.word(COUNT_AT).store(0, Ordering::Relaxed);
        g.t.word(USED_AT).store(0, Ordering::Relaxed);
        // The old entries are unreachable now: free them, then their array.
        for i in 0..cap {
            let off =
                g.t.word(old + SLOTS_HEADER + i * SLOT + 8)
                    .load(Ordering::Acquire);
            if off > REMOVED {
                g.t.free(g.t.entry(off)?.block)?;
            }
        }
        g.t.free(old)
    }

    fn lock(&self, deadline: Option<Instant>) -> Result<Guard<'_>, TableError> {
        let locked = match self.mutex.lock(deadline) {
            Ok(l) => l,
            Err(MutexError::Busy) => return Err(TableError::Busy),
            Err(MutexError::Deadlock) => return Err(corrupt("locked twice by one thread")),
            Err(MutexError::NotOwner) => return Err(corrupt("lock state")),
            Err(MutexError::Os(e)) => return Err(TableError::Os(e)),
        };
        let g = Guard { t: self };
        if locked == Locked::OwnerDied {
            g.t.recount()?;
        }
        Ok(g)
    }

    /// The `u64` at `offset` (8-aligned, in bounds: callers check offsets read from the
    /// table before they get here).
    fn word(&self, offset: usize) -> &std::sync::atomic::AtomicU64 {
        self.map.atomic_u64(offset)
    }

    fn add(&self, offset: usize, n: u64) {
        let w = self.word(offset);
        w.store(w.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
    }

    /// `len` bytes at `at`, checked in bounds by the caller (see [`entry`](Self::entry)).
    fn bytes(&self, at: usize, len: usize) -> &[u8] {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.map.len()));
        // SAFETY: in bounds (checked above) of a mapping that lives as long as `self`; the
        // caller holds the table's mutex, so no cooperating process writes these bytes now
        // (a hostile one could: it would change what we read, not its validity as bytes).
        unsafe { std::slice::from_raw_parts(self.map.ptr().add(at), len) }
    }

    fn write(&self, at: usize, data: &[u8]) {
        assert!(at
            .checked_add(data.len())
            .is_some_and(|end| end <= self.map.len()));
        // SAFETY: in bounds (checked above); the caller holds the mutex and `at` is a block
        // it allocated and has not linked yet, so no other process reads it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.map.ptr().add(at), data.len()) }
    }

    /// The current slot array: its block offset and capacity, checked.
    fn slots(&self) -> Result<(usize, usize), TableError> {
        let at = self.block_at(self.word(SLOTS_AT).load(Ordering::Acquire))?;
        let cap = usize::try_from(self.word(at + 8).load(Ordering::Relaxed))
            .map_err(|_| corrupt("slot count"))?;
        let size = self.block_size(at)?;
        let need = cap
            .checked_mul(SLOT)
            .and_then(|n| n.checked_add(SLOTS_HEADER));
        if !cap.is_power_of_two() || need.is_none_or(|n| n > size) {
            return Err(corrupt(format!(
                "a slot array of {cap} slots in {size} bytes"
            )));
        }
        Ok((at, cap))
    }

    /// A block offset read from the table, checked: in the arena, aligned.
    fn block_at(&self, off: u64) -> Result<usize, TableError> {
        let end = self.arena_end()?;
        match usize::try_from(off) {
            Ok(at) if at >= ARENA_START && at % 8 == 0 && at < end => Ok(at),
            _ => Err(corrupt(format!("block offset {off}"))),
        }
    }

    fn arena_end(&self) -> Result<usize, TableError> {
        let end = self.word(ARENA_END_AT).load(Ordering::Relaxed);
        match usize::try_from(end) {
            Ok(e) if (ARENA_START..=self.map.len()).contains(&e) => Ok(e),
            _ => Err(corrupt(format!("arena end {end}"))),
        }
    }

    /// The size of the block at `at` (a checked offset), itself checked to end in the arena.
    fn block_size(&self, at: usize) -> Result<usize, TableError> {
        let class = self.word(at).load(Ordering::Relaxed);
        let size = usize::try_from(class)
            .ok()
            .filter(|&c| c < CLASSES)
            .map(|c| MIN_BLOCK << c)
            .ok_or_else(|| corrupt(format!("block class {class}")))?;
        let end = self.arena_end()?;
        if at.checked_add(size).is_none_or(|e| e > end) {
            return Err(corrupt(format!("a block of {size} bytes at {at}")));
        }
        Ok(size)
    }

    /// The entry at `off` (read from a slot), checked.
    fn entry(&self, off: u64) -> Result<Entry, TableError> {
        let block = self.block_at(off)?;
        let size = self.block_size(block)?;
        let lens = self.word(block + 8).load(Ordering::Relaxed);
        let key_len = (lens & 0xffff_ffff) as usize;
        let value_len = (lens >> 32) as usize;
        if ENTRY_HEADER + key_len + value_len > size {
            return Err(corrupt(format!(
                "an entry of {key_len} + {value_len} bytes in a block of {size}"
            )));
        }
        Ok(Entry {
            block,
            key_len,
            value_at: block + ENTRY_HEADER + key_len,
            value_len,
        })
    }

    /// A block of at least `need` bytes: from its class's free list, else from the arena.
    fn alloc(&self, need: usize) -> Result<usize, TableError> {
        let class = class_for(need).ok_or(TableError::Full(self.map.len()))?;
        let head = self.word(FREE_AT + 8 * class);
        let first = head.load(Ordering::Acquire);
        if first != EMPTY {
            let at = self.block_at(first)?;
            if self.block_size(at)? != MIN_BLOCK << class {
                return Err(corrupt("a free list holds a block of another size"));
            }
            // Unlink it (one store: a death after it leaks the block, nothing else).
            head.store(self.word(at + 8).load(Ordering::Relaxed), Ordering::Release);
            return Ok(at);
        }
        let at = self.arena_end()?;
        let end = at
            .checked_add(MIN_BLOCK << class)
            .filter(|&e| e <= self.map.len())
            .ok_or(TableError::Full(self.map.len()))?;
        self.word(at).store(class as u64, Ordering::Relaxed);
        self.word(ARENA_END_AT).store(end as u64, Ordering::Release);
        Ok(at)
    }

    /// Puts the block at `at` (checked) on its free list.
    fn free(&self, at: usize) -> Result<(), TableError> {
        let size = self.block_size(at)?;
        let class = size.trailing_zeros() as usize - MIN_BLOCK.trailing_zeros() as usize;
        let head = self.word(FREE_AT + 8 * class);
        self.word(at + 8)
            .store(head.load(Ordering::Relaxed), Ordering::Relaxed);
        head.store(at as u64, Ordering::Release);
        Ok(())
    }

    /// A new, unlinked entry block holding `key` and `value`.
    fn new_entry(&self, key: &[u8], value: &[u8]) -> Result<usize, TableError> {
        let (Ok(k), Ok(v)) = (u32::try_from(key.len()), u32::try_from(value.len())) else {
            return Err(TableError::Full(self.map.len()));
        };
        let need = ENTRY_HEADER
            .checked_add(key.len())
            .and_then(|n| n.checked_add(value.len()))
            .ok_or(TableError::Full(self.map.len()))?;
        let at = self.alloc(need)?;
        self.word(at + 8)
            .store(u64::from(k) | u64::from(v) << 32, Ordering::Relaxed);
        self.write(at + ENTRY_HEADER, key);
        self.write(at + ENTRY_HEADER + key.len(), value);
        Ok(at)
    }

    /// A new, unpublished slot array of `cap` (a power of two) empty slots.
    fn new_slots(&self, cap: usize) -> Result<usize, TableError> {
        let bytes = cap
            .checked_mul(SLOT)
            .and_then(|n| n.checked_add(SLOTS_HEADER))
            .ok_or(TableError::Full(self.map.len()))?;
        let at = self.alloc(bytes)?;
        self.word(at + 8).store(cap as u64, Ordering::Relaxed);
        // (A block from a free list holds old bytes.)
        for s in 0..cap {
            self.word(at + SLOTS_HEADER + s * SLOT + 8)
                .store(EMPTY, Ordering::Relaxed);
        }
        Ok(at)
    }

    /// Whether one more entry keeps the slot array at most 3/4 used (removed slots count).
    fn has_room_for_one_more(&self, cap: usize) -> bool {
        let used = self.word(USED_AT).load(Ordering::Relaxed);
        used.saturating_add(1).saturating_mul(4) <= (cap as u64).saturating_mul(3)
    }

    /// Moves the entries to a new slot array (twice as large unless removed slots made
    /// most of the use), then publishes it with one store and frees the old one.
    fn grow(&self) -> Result<(), TableError> {
        let (old, cap) = self.slots()?;
        let count = self.word(COUNT_AT).load(Ordering::Relaxed);
        let new_cap = if count.saturating_mul(2) >= cap as u64 {
            cap.checked_mul(2).ok_or(TableError::Full(self.map.len()))?
        } else {
            cap
        };
        let fresh = self.new_slots(new_cap)?;
        let mask = new_cap - 1;
        let mut live = 0u64;
        for i in 0..cap {
            let slot = old + SLOTS_HEADER + i * SLOT;
            let off = self.word(slot + 8).load(Ordering::Acquire);
            if off <= REMOVED {
                continue;
            }
            let h = self.word(slot).load(Ordering::Relaxed);
            let mut j = (h as usize) & mask;
            // (new_cap > live entries, so an empty slot exists.)
            while self
                .word(fresh + SLOTS_HEADER + j * SLOT + 8)
                .load(Ordering::Relaxed)
                != EMPTY
            {
                j = (j + 1) & mask;
            }
            let to = fresh + SLOTS_HEADER + j * SLOT;
            self.word(to).store(h, Ordering::Relaxed);
            self.word(to + 8).store(off, Ordering::Relaxed);
            live += 1;
        }
        self.word(SLOTS_AT).store(fresh as u64, Ordering::Release);
        self.word(COUNT_AT).store(live, Ordering::Relaxed);
        self.word(USED_AT).store(live, Ordering::Relaxed);
        self.free(old)
    }

    /// After a holder died mid-operation: the counts again, from the slots.
    fn recount(&self) -> Result<(), TableError> {
        let (slots, cap) = self.slots()?;
        let (mut live, mut used) = (0u64, 0u64);
        for i in 0..cap {
            match self
                .word(slots + SLOTS_HEADER + i * SLOT + 8)
                .load(Ordering::Acquire)
            {
                EMPTY => {}
                REMOVED => used += 1,
                _ => {
                    live += 1;
                    used += 1;
                }
            }
        }
        self.word(COUNT_AT).store(live, Ordering::Relaxed);
        self.word(USED_AT).store(used, Ordering::Relaxed);
        Ok(())
    }
}

/// A checked entry.
#[derive(Debug, Clone, Copy)]
struct Entry {
    block: usize,
    key_len: usize,
    value_at: usize,
    value_len: usize,
}

/// What probing for a key found.
struct Found {
    /// The slot array's capacity.
    cap: usize,
    /// The slot holding the key (when found).
    slot: usize,
    entry: Option<Entry>,
    /// The first removed or empty slot on the key's probe path (where to insert it).
    free_slot: Option<usize>,
}

/// The table, locked.
struct Guard<'t> {
    t: &'t Table,
}

impl Guard<'_> {
    fn find(&self, key: &[u8]) -> Result<Found, TableError> {
        let (slots, cap) = self.t.slots()?;
        let h = hash(key);
        let mask = cap - 1;
        let mut free_slot = None;
        let mut i = (h as usize) & mask;
        // At most `cap` probes, whatever the slots hold.
        for _ in 0..cap {
            let slot = slots + SLOTS_HEADER + i * SLOT;
            let off = self.t.word(slot + 8).load(Ordering::Acquire);
            if off == EMPTY {
                return Ok(Found {
                    cap,
                    slot,
                    entry: None,
                    free_slot: free_slot.or(Some(slot)),
                });
            }
            if off == REMOVED {
                free_slot = free_slot.or(Some(slot));
            } else if self.t.word(slot).load(Ordering::Relaxed) == h {
                let e = self.t.entry(off)?;
                if self.t.bytes(e.block + ENTRY_HEADER, e.key_len) == key {
                    return Ok(Found {
                        cap,
                        slot,
                        entry: Some(e),
                        free_slot,
                    });
                }
            }
            i = (i + 1) & mask;
        }
        Ok(Found {
            cap,
            slot: slots,
            entry: None,
            free_slot,
        })
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        let _ = self.t.mutex.unlock();
    }
}

/// The smallest class whose blocks hold `need` bytes.
fn class_for(need: usize) -> Option<usize> {
    let size = need.max(MIN_BLOCK).checked_next_power_of_two()?;
    let class = (size.trailing_zeros() - MIN_BLOCK.trailing_zeros()) as usize;
    (class < CLASSES).then_some(class)
}

/// FNV-1a: the same in every process (the table outlives none of them, but is shared).
fn hash(key: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn get(t: &Table, k: &[u8]) -> Option<Vec<u8>> {
        t.get(k, None, <[u8]>::to_vec).unwrap()
    }

    #[test]
    fn classes_cover_every_size_up_to_the_limit() {
        assert_eq!(class_for(0), Some(0));
        assert_eq!(class_for(32), Some(0));
        assert_eq!(class_for(33), Some(1));
        assert_eq!(class_for(MIN_BLOCK << (CLASSES - 1)), Some(CLASSES - 1));
        assert_eq!(class_for((MIN_BLOCK << (CLASSES - 1)) + 1), None);
        assert_eq!(class_for(usize::MAX), None);
    }

    #[test]
    fn behaves_as_a_hash_map_through_growth_removal_and_clear() {
        let t = Table::create().unwrap();
        let mut model: HashMap<Vec<u8>, Vec<u8>> = HashMap::new();
        let mut x: u64 = 1;
        for step in 0..20_000u64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let key = (x % 3000).to_le_bytes().to_vec();
            match x % 7 {
                0 | 1 => {
                    assert_eq!(
                        t.remove(&key, None, <[u8]>::to_vec).unwrap(),
                        model.remove(&key)
                    );
                }
                _ => {
                    let value = vec![step as u8; (x % 300) as usize];
                    t.set(&key, &value, None).unwrap();
                    model.insert(key.clone(), value);
                }
            }
            assert_eq!(get(&t, &key), model.get(&key).cloned());
            if step == 15_000 {
                t.clear(None).unwrap();
                model.clear();
            }
        }
        assert_eq!(t.len(None).unwrap(), model.len());
        let mut all = HashMap::new();
        t.for_each(None, |k, v| {
            all.insert(k.to_vec(), v.to_vec());
        })
        .unwrap();
        assert_eq!(all, model);
    }

    #[test]
    fn blocks_are_reused_not_leaked_by_overwrites() {
        let t = Table::create().unwrap();
        // (An overwrite links a new block before it frees the old one: two blocks take turns.)
        t.set(b"k", &[1; 100], None).unwrap();
        t.set(b"k", &[2; 100], None).unwrap();
        let end = t.arena_end().unwrap();
        for i in 0..1000u32 {
            t.set(b"k", &[i as u8; 100], None).unwrap();
        }
        assert_eq!(t.arena_end().unwrap(), end);
        assert_eq!(get(&t, b"k"), Some(vec![(999u32 % 256) as u8; 100]));
    }

    #[test]
    fn a_full_table_says_so_and_takes_more_once_entries_go() {
        let t = Table::create_of(64 << 20).unwrap();
        let big = vec![7u8; 1 << 20];
        let mut n = 0u32;
        let e = loop {
            match t.set(&n.to_le_bytes(), &big, None) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 100, "64 MiB took {n} MiB");
        };
        assert!(matches!(e, TableError::Full(_)), "{e}");
        // A refused insert takes nothing: the arena ends where it did.
        let end = t.arena_end().unwrap();
        for k in 1000..1010u32 {
            assert!(t.set(&k.to_le_bytes(), &big, None).is_err());
        }
        assert_eq!(t.arena_end().unwrap(), end);
        assert_eq!(
            e.to_string(),
            "the dict is full: its shared memory holds at most 64 MiB"
        );
        assert_eq!(t.len(None).unwrap(), n as usize);
        assert!(t
            .remove(&0u32.to_le_bytes(), None, |_| ())
            .unwrap()
            .is_some());
        t.set(&n.to_le_bytes(), &big, None).unwrap();
        let u = Table::open(t.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(u.len(None).unwrap(), n as usize);
    }

    #[test]
    fn a_table_too_full_to_grow_refuses_new_keys_without_taking_memory() {
        // Small entries, until the slot array cannot double any more.
        let t = Table::create_of(4 << 20).unwrap();
        let mut n = 0u32;
        let e = loop {
            match t.set(&n.to_le_bytes(), b"", None) {
                Ok(()) => n += 1,
                Err(e) => break e,
            }
            assert!(n < 1 << 20, "4 MiB took {n} entries");
        };
        assert!(matches!(e, TableError::Full(_)), "{e}");
        let end = t.arena_end().unwrap();
        for k in n..n + 100 {
            assert!(t.set(&k.to_le_bytes(), b"", None).is_err());
        }
        assert_eq!(t.arena_end().unwrap(), end, "refused inserts took blocks");
        // Known keys can still change, and every entry is there.
        t.set(&0u32.to_le_bytes(), b"x", None).unwrap();
        assert_eq!(t.len(None).unwrap(), n as usize);
    }

    #[test]
    fn a_second_handle_on_the_same_memfd_sees_the_same_entries() {
        let t = Table::create().unwrap();
        t.set(b"a", b"1", None).unwrap();
        let u = Table::open(t.fd().try_clone_to_owned().unwrap()).unwrap();
        assert_eq!(get(&u, b"a"), Some(b"1".to_vec()));
        u.set(b"b", b"2", None).unwrap();
        assert_eq!(get(&t, b"b"), Some(b"2".to_vec()));
    }

    #[test]
    fn a_memfd_that_is_not_a_table_is_refused() {
        let m = Mapping::anonymous("t", 4096).unwrap();
        let e = Table::open(m.fd().try_clone_to_owned().unwrap()).unwrap_err();
        assert!(
            e.to_string().contains("corrupt") || e.to_string().contains("bytes"),
            "{e}"
        );
    }

    #[test]
    fn corrupt_offsets_and_lengths_are_errors_not_faults() {
        let t = Table::create().unwrap();
        for i in 0..10u8 {
            t.set(&[i], &[i; 40], None).unwrap();
        }
        // Every header word and every slot-array word in turn, set to hostile values.
        let (slots, cap) = t.slots().unwrap();
        let words: Vec<usize> = [ARENA_END_AT, SLOTS_AT, COUNT_AT, USED_AT]
            .into_iter()
            .chain((0..2 + cap * 2).map(|i| slots + i * 8))
            .collect();
        for &at in &words {
            for bad in [0, 1, 7, u64::MAX, (MAX_BYTES as u64) + 8, 513, 1 << 40] {
                let saved = t.word(at).load(Ordering::Relaxed);
                t.word(at).store(bad, Ordering::Relaxed);
                for i in 0..12u8 {
                    let _ = t.get(&[i], None, <[u8]>::to_vec);
                    let _ = t.set(&[i], &[1; 40], None);
                    let _ = t.remove(&[i + 1], None, |_| ());
                    let _ = t.len(None);
                    let _ = t.for_each(None, |_, _| ());
                }
                t.word(at).store(saved, Ordering::Relaxed);
                // (The table may be damaged now: start again from a clean one.)
                if t.for_each(None, |_, _| ()).is_err() {
                    break;
                }
            }
        }
    }

    #[test]
    fn a_holder_that_died_mid_operation_leaves_a_usable_table_with_true_counts() {
        let t = Table::create().unwrap();
        t.set(b"x", b"1", None).unwrap();
        // A thread that ends holding the mutex after a half-done insert (the entry linked,
        // the count not yet raised), as a SIGKILL between the two stores would leave it.
        let t2 = t.clone();
        std::thread::spawn(move || {
            let g = t2.lock(None).unwrap();
            let f = g.find(b"y").unwrap();
            let block = t2.new_entry(b"y", b"2").unwrap();
            let slot = f.free_slot.unwrap();
            t2.word(slot).store(hash(b"y"), Ordering::Relaxed);
            t2.word(slot + 8).store(block as u64, Ordering::Release);
            std::mem::forget(g);
        })
        .join()
        .unwrap();
        assert_eq!(t.len(None).unwrap(), 2);
        assert_eq!(get(&t, b"y"), Some(b"2".to_vec()));
        t.set(b"z", b"3", None).unwrap();
        assert_eq!(t.len(None).unwrap(), 3);
    }

    #[test]
    fn a_lock_held_elsewhere_times_out() {
        let t = Table::create().unwrap();
        let t2 = t.clone();
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let h = std::thread::spawn(move || {
            let _g = t2.lock(None).unwrap();
            held_tx.send(()).unwrap();
            let _ = done_rx.recv_timeout(std::time::Duration::from_secs(10));
        });
        held_rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .unwrap();
        let soon = Instant::now() + std::time::Duration::from_millis(20);
        assert!(matches!(t.len(Some(soon)), Err(TableError::Busy)));
        done_tx.send(()).unwrap();
        h.join().unwrap();
    }
}
