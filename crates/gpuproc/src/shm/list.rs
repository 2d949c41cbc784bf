//! `ShareableList`: Python's `multiprocessing.shared_memory.ShareableList`, a fixed-length
//! list of scalars and short strings in one named [`SharedMemory`] block.
//!
//! # Layout (gpuproc's own, not Python's)
//! All numbers little-endian, 8-byte aligned:
//!
//! | bytes | what |
//! |---|---|
//! | 0..8 | magic `GPSLIST1` |
//! | 8..16 | `n`, the number of slots |
//! | 16..16+8n | per slot: kind (low 8 bits) and capacity in bytes (bits 8..40) |
//! | then | each slot's data in order: 8 bytes for a scalar; for `str`/`bytes`, an 8-byte length and `capacity` bytes (a multiple of 8) |
//!
//! The header is written once by the creator and checked whole, with checked arithmetic, by
//! every process that attaches: a block that another process wrote badly (or on purpose) is
//! an error, never a panic or a read out of bounds.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{SharedMemory, ShmError};

const MAGIC: &[u8; 8] = b"GPSLIST1";
/// The most slots a list may have (keeps the header's arithmetic far from overflow).
const MAX_SLOTS: u64 = 1 << 32;

/// One item of a [`ShareableList`]: Python's `int`, `float`, `bool`, `None`, `str` and
/// `bytes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Item {
    /// Python's `None`.
    None,
    /// Python's `int`, as 64 bits.
    Int(i64),
    /// Python's `float`.
    Float(f64),
    /// Python's `bool`.
    Bool(bool),
    /// Python's `str`, in UTF-8.
    Str(String),
    /// Python's `bytes`.
    Bytes(Vec<u8>),
}

impl Item {
    fn kind(&self) -> Kind {
        match self {
            Item::None => Kind::None,
            Item::Int(_) => Kind::Int,
            Item::Float(_) => Kind::Float,
            Item::Bool(_) => Kind::Bool,
            Item::Str(_) => Kind::Str,
            Item::Bytes(_) => Kind::Bytes,
        }
    }
}

impl From<i64> for Item {
    fn from(v: i64) -> Self {
        Item::Int(v)
    }
}
impl From<f64> for Item {
    fn from(v: f64) -> Self {
        Item::Float(v)
    }
}
impl From<bool> for Item {
    fn from(v: bool) -> Self {
        Item::Bool(v)
    }
}
impl From<&str> for Item {
    fn from(v: &str) -> Self {
        Item::Str(v.to_string())
    }
}
impl From<String> for Item {
    fn from(v: String) -> Self {
        Item::Str(v)
    }
}
impl From<&[u8]> for Item {
    fn from(v: &[u8]) -> Self {
        Item::Bytes(v.to_vec())
    }
}
impl From<()> for Item {
    fn from(_: ()) -> Self {
        Item::None
    }
}

/// A slot's type, fixed when the list is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    None = 0,
    Int = 1,
    Float = 2,
    Bool = 3,
    Str = 4,
    Bytes = 5,
}

impl Kind {
    fn from_u8(k: u8) -> Option<Kind> {
        Some(match k {
            0 => Kind::None,
            1 => Kind::Int,
            2 => Kind::Float,
            3 => Kind::Bool,
            4 => Kind::Str,
            5 => Kind::Bytes,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            Kind::None => "None",
            Kind::Int => "int",
            Kind::Float => "float",
            Kind::Bool => "bool",
            Kind::Str => "str",
            Kind::Bytes => "bytes",
        }
    }

    fn is_sized(self) -> bool {
        matches!(self, Kind::Str | Kind::Bytes)
    }
}

/// Where a slot lives in the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Slot {
    kind: Kind,
    /// Bytes of the slot's data (after its length, for `str`/`bytes`).
    capacity: usize,
    /// The data's offset in the block.
    offset: usize,
}

/// The size of a header of `n` slots.
fn header_len(n: usize) -> Option<usize> {
    n.checked_mul(8)?.checked_add(16)
}

/// The room a slot takes after the header.
fn slot_len(kind: Kind, capacity: usize) -> Option<usize> {
    if kind.is_sized() {
        capacity.checked_add(8)
    } else {
        Some(8)
    }
}

/// Lays out slots of `(kind, capacity)`: each slot, and the block's total size.
pub(crate) fn layout(kinds: &[(Kind, usize)]) -> Option<(Vec<Slot>, usize)> {
    let mut at = header_len(kinds.len())?;
    let mut slots = Vec::with_capacity(kinds.len());
    for &(kind, capacity) in kinds {
        let capacity = if kind.is_sized() { capacity } else { 0 };
        if capacity % 8 != 0 || u32::try_from(capacity).is_err() {
            return None;
        }
        slots.push(Slot {
            kind,
            capacity,
            offset: at,
        });
        at = at.checked_add(slot_len(kind, capacity)?)?;
    }
    Some((slots, at))
}

/// Reads and checks a header from the first bytes of a block of `size` bytes (`read` copies
/// bytes from an offset): the slots, or why the block is not a list.
pub(crate) fn parse_header(
    size: usize,
    read: impl Fn(usize, &mut [u8]),
) -> Result<Vec<Slot>, String> {
    let word = |at: usize| -> Result<u64, String> {
        let end = at.checked_add(8).ok_or("an offset overflows")?;
        if end > size {
            return Err(format!("the header runs past the block's {size} bytes"));
        }
        let mut b = [0u8; 8];
        read(at, &mut b);
        Ok(u64::from_le_bytes(b))
    };
    if size < 16 {
        return Err(format!("{size} bytes cannot hold a header"));
    }
    let mut magic = [0u8; 8];
    read(0, &mut magic);
    if &magic != MAGIC {
        return Err("it does not start with the ShareableList magic".into());
    }
    let n = word(8)?;
    if n > MAX_SLOTS {
        return Err(format!("it claims {n} slots"));
    }
    let n = usize::try_from(n).map_err(|_| format!("it claims {n} slots"))?;
    if header_len(n).is_none_or(|h| h > size) {
        return Err(format!(
            "a header of {n} slots does not fit in {size} bytes"
        ));
    }
    let mut kinds = Vec::with_capacity(n);
    for i in 0..n {
        let d = word(16 + 8 * i)?;
        let kind = u8::try_from(d & 0xff)
            .ok()
            .and_then(Kind::from_u8)
            .ok_or_else(|| format!("slot {i} has an unknown type {}", d & 0xff))?;
        let capacity =
            usize::try_from(d >> 8).map_err(|_| format!("slot {i} has capacity {}", d >> 8))?;
        if capacity > u32::MAX as usize || (!kind.is_sized() && capacity != 0) {
            return Err(format!("slot {i} has capacity {capacity}"));
        }
        kinds.push((kind, capacity));
    }
    match layout(&kinds) {
        Some((slots, total)) if total <= size => Ok(slots),
        Some((_, total)) => Err(format!(
            "its slots need {total} bytes, more than the block's {size}"
        )),
        None => Err("its slot sizes are not multiples of 8, or overflow".into()),
    }
}

/// Python's `shared_memory.ShareableList`: a fixed-length list of [`Item`]s (`int`, `float`,
/// `bool`, `None`, `str`, `bytes`) in one named shared memory block, which any process can
/// [`attach`](Self::attach) by [`name`](Self::name).
///
/// As in Python, the length is fixed, and a `str` or `bytes` slot holds at most the bytes it
/// was created with, rounded up to a multiple of 8 (at least 8; more with
/// [`with_capacity`](Self::with_capacity)): a longer value is [`ShmError::TooLong`]. Unlike
/// Python, each slot's type is fixed too: setting an `int` slot to a `float` is
/// [`ShmError::WrongType`] (Python changes the slot's format). The block's layout is
/// gpuproc's own, so a Python program cannot attach it.
///
/// There is no lock, as in Python: each scalar is read and written whole, but a `str` or
/// `bytes` written while another process reads it may be seen half-written (then it may be
/// invalid UTF-8: [`ShmError::BadList`]); use a [`Lock`](crate::sync::Lock) around them.
/// The name is unlinked as [`SharedMemory`]'s is (by the creator's drop, or by the
/// resource tracker if the creator is killed).
///
/// ```
/// use gpuproc::shm::{Item, ShareableList};
///
/// let list = ShareableList::new([Item::Int(1), Item::from("howdy"), Item::Float(-0.5), Item::None])?;
/// let other = ShareableList::attach(list.name())?;
/// other.set(1, "hi")?;
/// assert_eq!(list.get(1)?, Item::from("hi"));
/// assert!(list.set(1, "far too long for the slot").unwrap_err().is_too_long());
/// assert!(list.set(0, 2.5).unwrap_err().is_wrong_type());
/// assert_eq!(list.index(&Item::Float(-0.5)), Some(2));
/// assert_eq!(list.count(&Item::None), 1);
/// # Ok::<(), gpuproc::shm::ShmError>(())
/// ```
pub struct ShareableList {
    shm: SharedMemory,
    slots: Vec<Slot>,
}

impl fmt::Debug for ShareableList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShareableList")
            .field("name", &self.shm.name())
            .field("len", &self.slots.len())
            .finish()
    }
}

impl ShareableList {
    /// A list of `items` in a new block with a random name; Python's
    /// `ShareableList(sequence)`.
    pub fn new<I: Into<Item>>(items: impl IntoIterator<Item = I>) -> Result<Self, ShmError> {
        Self::create(None, items, 0)
    }

    /// A list in a new block named `name`; Python's `ShareableList(sequence, name=name)`.
    pub fn new_named<I: Into<Item>>(
        name: &str,
        items: impl IntoIterator<Item = I>,
    ) -> Result<Self, ShmError> {
        Self::create(Some(name), items, 0)
    }

    /// A list whose `str` and `bytes` slots hold at least `capacity` bytes each.
    pub fn with_capacity<I: Into<Item>>(
        items: impl IntoIterator<Item = I>,
        capacity: usize,
    ) -> Result<Self, ShmError> {
        Self::create(None, items, capacity)
    }

    fn create<I: Into<Item>>(
        name: Option<&str>,
        items: impl IntoIterator<Item = I>,
        min_capacity: usize,
    ) -> Result<Self, ShmError> {
        let items: Vec<Item> = items.into_iter().map(Into::into).collect();
        let too_big = || ShmError::InvalidSize { size: usize::MAX };
        let mut kinds = Vec::with_capacity(items.len());
        for item in &items {
            let len = match item {
                Item::Str(s) => s.len(),
                Item::Bytes(b) => b.len(),
                _ => 0,
            };
            let capacity = if item.kind().is_sized() {
                len.max(min_capacity)
                    .max(8)
                    .checked_next_multiple_of(8)
                    .ok_or_else(too_big)?
            } else {
                0
            };
            kinds.push((item.kind(), capacity));
        }
        let (slots, total) = layout(&kinds).ok_or_else(too_big)?;
        let shm = match name {
            Some(name) => SharedMemory::create_named(name, total)?,
            None => SharedMemory::create(total)?,
        };
        let mut header = Vec::with_capacity(header_len(slots.len()).ok_or_else(too_big)?);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&(slots.len() as u64).to_le_bytes());
        for s in &slots {
            header.extend_from_slice(&(s.kind as u64 | (s.capacity as u64) << 8).to_le_bytes());
        }
        shm.write_at(0, &header);
        let list = ShareableList { shm, slots };
        for (i, item) in items.into_iter().enumerate() {
            list.set(i, item)?;
        }
        Ok(list)
    }

    /// Attaches the list in the block `name`; Python's `ShareableList(name=name)`. A block
    /// that does not hold a well-formed list is [`ShmError::BadList`].
    pub fn attach(name: &str) -> Result<Self, ShmError> {
        Self::from_shm(SharedMemory::attach(name)?)
    }

    fn from_shm(shm: SharedMemory) -> Result<Self, ShmError> {
        if shm.is_closed() {
            return Err(ShmError::BadList {
                name: shm.name().to_string(),
                reason: "the handle is closed".into(),
            });
        }
        let slots = parse_header(shm.size(), |at, out| shm.read_at(at, out)).map_err(|reason| {
            ShmError::BadList {
                name: shm.name().to_string(),
                reason,
            }
        })?;
        Ok(ShareableList { shm, slots })
    }

    /// The block's name, to give to [`attach`](Self::attach).
    pub fn name(&self) -> &str {
        self.shm.name()
    }

    /// The block holding the list; Python's `shm`.
    pub fn shm(&self) -> &SharedMemory {
        &self.shm
    }

    /// The number of slots.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the list has no slots.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    fn slot(&self, index: usize) -> Result<Slot, ShmError> {
        self.slots
            .get(index)
            .copied()
            .ok_or(ShmError::IndexOutOfRange {
                index,
                len: self.slots.len(),
            })
    }

    fn word(&self, at: usize) -> [u8; 8] {
        let mut b = [0u8; 8];
        self.shm.read_at(at, &mut b);
        b
    }

    /// The item at `index`; Python's `list[index]`.
    pub fn get(&self, index: usize) -> Result<Item, ShmError> {
        let s = self.slot(index)?;
        let w = self.word(s.offset);
        Ok(match s.kind {
            Kind::None => Item::None,
            Kind::Int => Item::Int(i64::from_le_bytes(w)),
            Kind::Float => Item::Float(f64::from_le_bytes(w)),
            Kind::Bool => Item::Bool(u64::from_le_bytes(w) != 0),
            Kind::Str | Kind::Bytes => {
                let bad = |reason: String| ShmError::BadList {
                    name: self.name().to_string(),
                    reason,
                };
                let len = usize::try_from(u64::from_le_bytes(w))
                    .ok()
                    .filter(|&l| l <= s.capacity)
                    .ok_or_else(|| {
                        bad(format!(
                            "slot {index} claims {} bytes, more than its {}",
                            u64::from_le_bytes(w),
                            s.capacity
                        ))
                    })?;
                let mut data = vec![0u8; len];
                self.shm.read_at(s.offset + 8, &mut data);
                if s.kind == Kind::Bytes {
                    Item::Bytes(data)
                } else {
                    Item::Str(String::from_utf8(data).map_err(|_| {
                        bad(format!(
                            "slot {index} is not UTF-8 (written while being read?)"
                        ))
                    })?)
                }
            }
        })
    }

    /// Sets the item at `index`; Python's `list[index] = value`. The value must have the
    /// slot's type ([`ShmError::WrongType`]) and, for `str` and `bytes`, fit in its capacity
    /// ([`ShmError::TooLong`]).
    pub fn set(&self, index: usize, value: impl Into<Item>) -> Result<(), ShmError> {
        let value = value.into();
        let s = self.slot(index)?;
        if value.kind() != s.kind {
            return Err(ShmError::WrongType {
                index,
                expected: s.kind.name(),
                got: value.kind().name(),
            });
        }
        let scalar = match &value {
            Item::None => return Ok(()),
            Item::Int(v) => Some(v.to_le_bytes()),
            Item::Float(v) => Some(v.to_le_bytes()),
            Item::Bool(v) => Some(u64::from(*v).to_le_bytes()),
            Item::Str(_) | Item::Bytes(_) => None,
        };
        if let Some(word) = scalar {
            self.shm.write_at(s.offset, &word);
            return Ok(());
        }
        let data = match &value {
            Item::Str(v) => v.as_bytes(),
            Item::Bytes(v) => v.as_slice(),
            _ => &[],
        };
        if data.len() > s.capacity {
            return Err(ShmError::TooLong {
                index,
                len: data.len(),
                capacity: s.capacity,
            });
        }
        self.shm.write_at(s.offset + 8, data);
        self.shm
            .write_at(s.offset, &(data.len() as u64).to_le_bytes());
        Ok(())
    }

    /// Every item, in order.
    pub fn to_vec(&self) -> Result<Vec<Item>, ShmError> {
        (0..self.len()).map(|i| self.get(i)).collect()
    }

    /// The first index holding `value`; Python's `index` (which raises `ValueError` where
    /// this is `None`). Slots that cannot be read are skipped.
    pub fn index(&self, value: &Item) -> Option<usize> {
        (0..self.len()).find(|&i| self.get(i).is_ok_and(|v| v == *value))
    }

    /// How many slots hold `value`; Python's `count`.
    pub fn count(&self, value: &Item) -> usize {
        (0..self.len())
            .filter(|&i| self.get(i).is_ok_and(|v| v == *value))
            .count()
    }
}

impl Serialize for ShareableList {
    /// Sends the block (the receiver attaches it, checking the header again).
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.shm.serialize(s)
    }
}

impl<'de> Deserialize<'de> for ShareableList {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let shm = SharedMemory::deserialize(d)?;
        ShareableList::from_shm(shm).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(words: &[u64]) -> Vec<u8> {
        let mut b = MAGIC.to_vec();
        for w in words {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b
    }

    fn parse(bytes: &[u8], size: usize) -> Result<Vec<Slot>, String> {
        parse_header(size, |at, out| {
            for (k, o) in out.iter_mut().enumerate() {
                *o = bytes.get(at + k).copied().unwrap_or(0);
            }
        })
    }

    #[test]
    fn a_good_header_parses() {
        // Two slots: an int and a str of 8 bytes.
        let b = header(&[2, Kind::Int as u64, Kind::Str as u64 | 8 << 8]);
        let slots = parse(&b, 32 + 8 + 16).unwrap();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].offset, 40);
        assert_eq!(slots[1].capacity, 8);
    }

    #[test]
    fn bad_headers_are_errors_not_panics() {
        let cases: Vec<(Vec<u8>, usize)> = vec![
            (b"NOTALIST".to_vec(), 64),
            (header(&[]), 8),
            (header(&[u64::MAX]), 64),
            (header(&[MAX_SLOTS]), 64),
            (header(&[3, 1, 1, 1]), 48),
            (header(&[1, 9]), 64),
            (header(&[1, Kind::Str as u64 | 7 << 8]), 64),
            (header(&[1, Kind::Str as u64 | u64::MAX << 8]), 64),
            (header(&[1, Kind::Int as u64 | 8 << 8]), 64),
            (header(&[1, Kind::Bytes as u64 | 1024 << 8]), 64),
            (header(&[2, 1, 1]), 32),
        ];
        for (bytes, size) in cases {
            assert!(parse(&bytes, size).is_err(), "{bytes:?} ({size} bytes)");
        }
        // Random words after a valid magic never panic.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..10_000 {
            let mut words = Vec::new();
            for _ in 0..6 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                words.push(if x % 3 == 0 { x % 8 } else { x });
            }
            let _ = parse(&header(&words), (x % 200) as usize);
        }
    }
}
