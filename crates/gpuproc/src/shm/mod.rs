//! Memory shared between processes: Python's `multiprocessing.Value` and `Array`
//! ([`SharedValue`], [`SharedArray`]) and `multiprocessing.shared_memory.SharedMemory`
//! ([`SharedMemory`], named blocks in `/dev/shm` that unrelated processes can attach), and
//! [`SharedSlice`], a read-only slice sealed once made (see the crate guide, "Big data",
//! for which to use when).
//!
//! Values and arrays live in an anonymous memory file (memfd) and reach child processes as
//! part of their argument, with every start method. Named blocks are found by name.
//!
//! # Access rules (why there is no `&mut [T]`)
//!
//! Another process may write shared memory at any moment, and Rust forbids a plain read or
//! write racing with a write. So safe access is element-wise and atomic: [`SharedValue::get`]
//! and [`set`](SharedValue::set), [`SharedArray::get`], [`set`](SharedArray::set),
//! [`to_vec`](SharedArray::to_vec), [`SharedMemory::buf`] (a slice of `AtomicU8`). Each
//! element is read or written whole (no torn values), but a sequence of them is not one step:
//! hold the object's lock ([`SharedValue::get_lock`], [`SharedValue::update`]) for
//! read-modify-write or to see an array consistently, as in Python. [`SharedMemory::view`]
//! reads and writes a named block as numbers the same way ([`AtomicSlice`]). Bulk copies
//! ([`SharedArray::to_vec`], [`AtomicSlice::copy_to_slice`], ...) still read each element
//! whole, at about the speed of `memcpy`.
//!
//! A [`SharedSlice`] is the exception: nobody can write it once it is made (the kernel
//! refuses), so it is a plain `&[T]` in safe code. Where you know no one else writes the
//! others, the `unsafe` [`SharedArray::as_slice`] and friends give plain slices too.
//!
//! ```
//! # gpuproc::init();
//! use gpuproc::shm::{SharedArray, SharedValue};
//!
//! fn f((num, arr): (SharedValue<f64>, SharedArray<i32>)) {
//!     num.set(3.1415927);
//!     for i in 0..arr.len() {
//!         arr.set(i, -arr.get(i).unwrap());
//!     }
//! }
//!
//! let num = SharedValue::new(0.0)?;
//! let arr = SharedArray::from_slice(&(0..10).collect::<Vec<i32>>())?;
//! let mut p = gpuproc::Process::new(f, (num.clone(), arr.clone()));
//! p.start()?;
//! p.join()?;
//! assert_eq!(num.get(), 3.1415927);
//! assert_eq!(arr.to_vec(), [0, -1, -2, -3, -4, -5, -6, -7, -8, -9]);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

mod list;
mod slice;
pub(crate) mod tracker;

pub use list::{Item, ShareableList};
pub use slice::SharedSlice;

use crate::sync::{Lock, SyncError};
use crate::sys::shm::{self as sys, Mapping};

/// Why a shared memory operation failed.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum ShmError {
    /// No block has this name.
    #[error("no shared memory block named {name:?} (never created, or unlinked already)")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// A block with this name exists already.
    #[error("a shared memory block named {name:?} already exists")]
    AlreadyExists {
        /// The name asked for.
        name: String,
    },
    /// The name cannot name a block.
    #[error("invalid shared memory name {name:?}: {reason}")]
    InvalidName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Attaching asked for more bytes than the block has.
    #[error(
        "shared memory block {name:?} has {actual} bytes, fewer than the {requested} asked for"
    )]
    WrongSize {
        /// The block's name.
        name: String,
        /// The size asked for.
        requested: usize,
        /// The block's size.
        actual: usize,
    },
    /// A size of zero (or too large to map).
    #[error("invalid size {size}: a shared memory block needs at least one byte")]
    InvalidSize {
        /// The size given.
        size: usize,
    },
    /// [`SharedMemory::unlink`] was called twice on this handle.
    #[error("shared memory block {name:?} was already unlinked through this handle")]
    AlreadyUnlinked {
        /// The block's name.
        name: String,
    },
    /// [`SharedValue::update`] on a value made without a lock.
    #[error("this shared value has no lock (it was made with new_unlocked)")]
    NoLock,
    /// Taking the object's lock failed.
    #[error("locking the shared object failed")]
    Lock(#[from] SyncError),
    /// A handle received from another process is not what was expected.
    #[error("the shared object received is not a {expected}: {reason}")]
    WrongObject {
        /// What the receiver expected.
        expected: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A typed view ([`SharedMemory::view`]) that the block cannot hold.
    #[error("shared memory block {name:?} ({size} bytes) has no {what}: {reason}")]
    BadView {
        /// The block's name.
        name: String,
        /// The block's size in bytes.
        size: usize,
        /// The view asked for.
        what: String,
        /// Why it does not fit.
        reason: String,
    },
    /// The block does not hold a well-formed [`ShareableList`] (or a slot was read while
    /// being written).
    #[error("shared memory block {name:?} is not a valid ShareableList: {reason}")]
    BadList {
        /// The block's name.
        name: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A [`ShareableList`] index past its end.
    #[error("index {index} is out of range for a ShareableList of {len} items")]
    IndexOutOfRange {
        /// The index given.
        index: usize,
        /// The list's length.
        len: usize,
    },
    /// A value of another type than the [`ShareableList`] slot's.
    #[error("slot {index} holds a {expected}, not a {got}")]
    WrongType {
        /// The slot.
        index: usize,
        /// The slot's type (Python's name).
        expected: &'static str,
        /// The value's type.
        got: &'static str,
    },
    /// A `str` or `bytes` longer than its [`ShareableList`] slot holds.
    #[error("slot {index} holds at most {capacity} bytes; the value has {len}")]
    TooLong {
        /// The slot.
        index: usize,
        /// The value's length in bytes.
        len: usize,
        /// The slot's capacity.
        capacity: usize,
    },
    /// A system call failed.
    #[error("{op} failed")]
    Os {
        /// What was being done.
        op: String,
        /// The system's error.
        #[source]
        source: io::Error,
    },
}

impl ShmError {
    /// Whether no block had the name.
    pub fn is_not_found(&self) -> bool {
        matches!(self, ShmError::NotFound { .. })
    }
    /// Whether the name was taken.
    pub fn is_already_exists(&self) -> bool {
        matches!(self, ShmError::AlreadyExists { .. })
    }
    /// Whether the name was invalid.
    pub fn is_invalid_name(&self) -> bool {
        matches!(self, ShmError::InvalidName { .. })
    }
    /// Whether the block was smaller than asked for.
    pub fn is_wrong_size(&self) -> bool {
        matches!(self, ShmError::WrongSize { .. })
    }
    /// Whether this handle had unlinked the block already.
    pub fn is_already_unlinked(&self) -> bool {
        matches!(self, ShmError::AlreadyUnlinked { .. })
    }
    /// Whether a system call failed.
    pub fn is_os(&self) -> bool {
        matches!(self, ShmError::Os { .. })
    }

    /// Whether the block is not a valid [`ShareableList`].
    pub fn is_bad_list(&self) -> bool {
        matches!(self, ShmError::BadList { .. })
    }

    /// Whether a [`ShareableList`] value had the wrong type for its slot.
    pub fn is_wrong_type(&self) -> bool {
        matches!(self, ShmError::WrongType { .. })
    }

    /// Whether a [`ShareableList`] value was too long for its slot.
    pub fn is_too_long(&self) -> bool {
        matches!(self, ShmError::TooLong { .. })
    }

    /// Whether a [`ShareableList`] index was out of range.
    pub fn is_index_out_of_range(&self) -> bool {
        matches!(self, ShmError::IndexOutOfRange { .. })
    }

    fn os(op: impl Into<String>) -> impl FnOnce(io::Error) -> ShmError {
        let op = op.into();
        move |source| ShmError::Os { op, source }
    }
}

// --- element types --------------------------------------------------------------------------

mod sealed {
    pub trait Sealed {}
}

/// Plain numbers that can live in shared memory: the integers, `f32`, `f64` and `bool`
/// (Python's typecodes `'b'`, `'i'`, `'d'`, ...). Sealed: each is read and written with one
/// atomic access of its own size.
pub trait Scalar: sealed::Sealed + Copy + PartialEq + fmt::Debug + Send + Sync + 'static {
    /// The type's name, for error messages.
    const NAME: &'static str;
    #[doc(hidden)]
    const CODE: u32;
    /// Reads `*p` atomically.
    ///
    /// # Safety
    /// `p` is valid, aligned, and only ever accessed atomically.
    #[doc(hidden)]
    unsafe fn load(p: *mut Self) -> Self;
    /// Writes `*p` atomically.
    ///
    /// # Safety
    /// As for [`load`](Self::load).
    #[doc(hidden)]
    unsafe fn store(p: *mut Self, v: Self);
    /// Reads `*p` atomically, with no ordering (for bulk copies, fenced as a whole).
    ///
    /// # Safety
    /// As for [`load`](Self::load).
    #[doc(hidden)]
    unsafe fn load_relaxed(p: *mut Self) -> Self;
    /// Writes `*p` atomically, with no ordering (for bulk copies, fenced as a whole).
    ///
    /// # Safety
    /// As for [`load`](Self::load).
    #[doc(hidden)]
    unsafe fn store_relaxed(p: *mut Self, v: Self);
    /// Whether every bit pattern of the type's size is a value (false for `bool`).
    #[doc(hidden)]
    const ANY_BITS: bool;
    /// Whether the value is all zero bits (what new shared memory holds).
    #[doc(hidden)]
    fn is_zero_bits(self) -> bool;
}

/// The bytes of `values` (for copies into shared memory).
pub(crate) fn scalar_bytes<T: Scalar>(values: &[T]) -> &[u8] {
    // SAFETY: every `Scalar` is a primitive without padding, so all its bytes are
    // initialised; the slice covers exactly the memory of `values`, for its lifetime.
    unsafe {
        std::slice::from_raw_parts(values.as_ptr().cast::<u8>(), std::mem::size_of_val(values))
    }
}

/// The name of the [`Scalar`] type whose code is `code`.
pub(crate) fn scalar_name(code: u32) -> Option<&'static str> {
    SCALAR_NAMES
        .iter()
        .find(|(c, _)| *c == code)
        .map(|(_, name)| *name)
}

macro_rules! scalar {
    ($($t:ty => $atomic:ty, $bits:ty, $code:expr, |$x:ident| $to:expr, |$b:ident| $from:expr;)*) => {$(
        impl sealed::Sealed for $t {}
        impl Scalar for $t {
            const NAME: &'static str = stringify!($t);
            const CODE: u32 = $code;
            #[inline]
            unsafe fn load(p: *mut Self) -> Self {
                // SAFETY: forwarded to the caller; the atomic has the size and alignment of
                // the type.
                let $b = unsafe { <$atomic>::from_ptr(p.cast::<$bits>()) }.load(Ordering::Acquire);
                $from
            }
            #[inline]
            unsafe fn store(p: *mut Self, $x: Self) {
                // SAFETY: as in `load`.
                unsafe { <$atomic>::from_ptr(p.cast::<$bits>()) }.store($to, Ordering::Release)
            }
            #[inline]
            unsafe fn load_relaxed(p: *mut Self) -> Self {
                // SAFETY: as in `load`.
                let $b = unsafe { <$atomic>::from_ptr(p.cast::<$bits>()) }.load(Ordering::Relaxed);
                $from
            }
            #[inline]
            unsafe fn store_relaxed(p: *mut Self, $x: Self) {
                // SAFETY: as in `load`.
                unsafe { <$atomic>::from_ptr(p.cast::<$bits>()) }.store($to, Ordering::Relaxed)
            }
            const ANY_BITS: bool = !matches!(stringify!($t).as_bytes(), b"bool");
            #[inline]
            fn is_zero_bits(self) -> bool {
                let $x = self;
                $to == 0
            }
        }
    )*
        const SCALAR_NAMES: &[(u32, &str)] = &[$(($code, stringify!($t))),*];
    };
}

use std::sync::atomic::{AtomicU16, AtomicU64};

scalar! {
    u8 => AtomicU8, u8, 1, |x| x, |b| b;
    i8 => AtomicU8, u8, 2, |x| x as u8, |b| b as i8;
    u16 => AtomicU16, u16, 3, |x| x, |b| b;
    i16 => AtomicU16, u16, 4, |x| x as u16, |b| b as i16;
    u32 => AtomicU32, u32, 5, |x| x, |b| b;
    i32 => AtomicU32, u32, 6, |x| x as u32, |b| b as i32;
    u64 => AtomicU64, u64, 7, |x| x, |b| b;
    i64 => AtomicU64, u64, 8, |x| x as u64, |b| b as i64;
    usize => AtomicU64, u64, 9, |x| x as u64, |b| b as usize;
    isize => AtomicU64, u64, 10, |x| x as u64, |b| b as isize;
    f32 => AtomicU32, u32, 11, |x| x.to_bits(), |b| f32::from_bits(b);
    f64 => AtomicU64, u64, 12, |x| x.to_bits(), |b| f64::from_bits(b);
    bool => AtomicU8, u8, 13, |x| x as u8, |b| b != 0;
}

// usize/isize are stored as 64 bits above.
const _: () = assert!(std::mem::size_of::<usize>() == 8);

// --- the memory behind values and arrays ----------------------------------------------------

const MAGIC: u32 = 0x6770_7368; // "gpsh"
/// Header: magic, kind (1 value, 2 array), element code, padding, length (u64). Data follows.
const DATA_AT: usize = 64;

#[derive(Clone)]
struct Cells<T> {
    map: Arc<Mapping>,
    len: usize,
    _t: std::marker::PhantomData<fn() -> T>,
}

impl<T: Scalar> Cells<T> {
    fn create(kind: u32, len: usize) -> Result<Self, ShmError> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(DATA_AT))
            .ok_or(ShmError::InvalidSize { size: len })?;
        let map = Mapping::anonymous(&format!("gpuproc-shared-{}", T::NAME), bytes)
            .map_err(ShmError::os("creating shared memory"))?;
        map.atomic_u32(4).store(kind, Ordering::SeqCst);
        map.atomic_u32(8).store(T::CODE, Ordering::SeqCst);
        map.atomic_u32(16).store(len as u32, Ordering::SeqCst);
        map.atomic_u32(20)
            .store((len as u64 >> 32) as u32, Ordering::SeqCst);
        map.atomic_u32(0).store(MAGIC, Ordering::SeqCst);
        Ok(Cells {
            map: Arc::new(map),
            len,
            _t: std::marker::PhantomData,
        })
    }

    fn open(fd: OwnedFd, kind: u32, what: &str) -> Result<Self, ShmError> {
        let expected = format!("{what}<{}>", T::NAME);
        let wrong = |reason: String| ShmError::WrongObject {
            expected: expected.clone(),
            reason,
        };
        let map = Mapping::map_existing(fd, DATA_AT).map_err(|e| wrong(e.to_string()))?;
        if map.atomic_u32(0).load(Ordering::SeqCst) != MAGIC
            || map.atomic_u32(4).load(Ordering::SeqCst) != kind
        {
            return Err(wrong(format!("it is not a gpuproc {what}")));
        }
        let code = map.atomic_u32(8).load(Ordering::SeqCst);
        if code != T::CODE {
            return Err(wrong(format!("its element type code is {code}")));
        }
        // The length is read once, here, from memory any holder can write: checked against
        // the size of the memfd (which `map_existing` took from the kernel, and which the
        // seals keep), then kept in this handle and never read again.
        let len = u64::from(map.atomic_u32(16).load(Ordering::SeqCst))
            | (u64::from(map.atomic_u32(20).load(Ordering::SeqCst)) << 32);
        let fits = usize::try_from(len).ok().filter(|&n| {
            n.checked_mul(std::mem::size_of::<T>())
                .and_then(|b| b.checked_add(DATA_AT))
                .is_some_and(|end| end <= map.len())
        });
        let Some(len) = fits else {
            return Err(wrong(format!(
                "its header announces {len} elements, which do not fit in its {} bytes",
                map.len()
            )));
        };
        Ok(Cells {
            map: Arc::new(map),
            len,
            _t: std::marker::PhantomData,
        })
    }

    /// New memory holding a copy of `values`: written into the memfd by the kernel, before
    /// anyone else can see it (one copy, no atomics needed).
    fn create_from(kind: u32, values: &[T]) -> Result<Self, ShmError> {
        let cells = Cells::create(kind, values.len())?;
        crate::sys::shm::write_all_at(cells.map.fd(), scalar_bytes(values), DATA_AT as u64)
            .map_err(ShmError::os("copying into shared memory"))?;
        Ok(cells)
    }

    /// The first element (for bulk copies; `len` elements follow).
    fn base(&self) -> *mut T {
        // SAFETY: the mapping holds DATA_AT + len elements; DATA_AT is in bounds even for
        // len 0, and aligned (a multiple of 8 in a page-aligned mapping).
        unsafe { self.map.ptr().add(DATA_AT).cast::<T>() }
    }

    /// Copies every element into `out` (`len` of them), each read whole, then fences.
    fn copy_out(&self, out: &mut [T]) {
        assert_eq!(out.len(), self.len);
        let base = self.base();
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: i < len: valid and aligned (see `base`); shared cells are only
            // accessed atomically.
            *o = unsafe { T::load_relaxed(base.add(i)) };
        }
        std::sync::atomic::fence(Ordering::Acquire);
    }

    /// A copy of every element, each read whole, then a fence.
    fn to_vec(&self) -> Vec<T> {
        let mut out = Vec::<T>::with_capacity(self.len);
        let (src, dst) = (self.base(), out.as_mut_ptr());
        for i in 0..self.len {
            // SAFETY: i < len: `src` as in `copy_out`; `dst` has capacity for len elements.
            unsafe { dst.add(i).write(T::load_relaxed(src.add(i))) };
        }
        // SAFETY: all len elements were written above.
        unsafe { out.set_len(self.len) };
        std::sync::atomic::fence(Ordering::Acquire);
        out
    }

    /// Writes every element from `values` (`len` of them), each whole, after a fence.
    fn copy_in(&self, values: &[T]) {
        assert_eq!(values.len(), self.len);
        let base = self.base();
        std::sync::atomic::fence(Ordering::Release);
        for (i, v) in values.iter().enumerate() {
            // SAFETY: as in `copy_out`.
            unsafe { T::store_relaxed(base.add(i), *v) };
        }
    }

    fn ptr(&self, i: usize) -> *mut T {
        assert!(i < self.len);
        // SAFETY: in bounds (checked above; the mapping holds DATA_AT + len elements), and
        // aligned: the mapping is page-aligned and DATA_AT is a multiple of 8.
        unsafe { self.map.ptr().add(DATA_AT).cast::<T>().add(i) }
    }

    fn get(&self, i: usize) -> T {
        // SAFETY: valid and aligned (see `ptr`); shared cells are only accessed atomically.
        unsafe { T::load(self.ptr(i)) }
    }

    fn set(&self, i: usize, v: T) {
        // SAFETY: as in `get`.
        unsafe { T::store(self.ptr(i), v) }
    }
}

#[derive(Serialize, Deserialize)]
struct Wire {
    #[serde(
        serialize_with = "ser_fd",
        deserialize_with = "crate::ipc::deserialize_fd"
    )]
    fd: OwnedFd,
    lock: Option<Lock>,
}

fn ser_fd<S: Serializer>(fd: &OwnedFd, s: S) -> Result<S::Ok, S::Error> {
    crate::ipc::serialize_fd(fd.as_fd(), s)
}

fn wire<T>(cells: &Cells<T>, lock: &Option<Lock>) -> Result<Wire, io::Error> {
    Ok(Wire {
        fd: cells.map.fd().try_clone_to_owned()?,
        lock: lock.clone(),
    })
}

// --- SharedValue ----------------------------------------------------------------------------

/// One number shared between processes; Python's `multiprocessing.Value`.
///
/// [`get`](Self::get) and [`set`](Self::set) are atomic. Like Python's default
/// (`lock=True`), it comes with a [`Lock`] for read-modify-write: [`update`](Self::update),
/// or [`get_lock`](Self::get_lock) to hold it around several steps. Clones, and copies
/// passed to children, are the same value.
#[derive(Clone)]
pub struct SharedValue<T: Scalar> {
    cells: Cells<T>,
    lock: Option<Lock>,
}

impl<T: Scalar> SharedValue<T> {
    /// A shared value with a lock; Python's `Value(typecode, value)`.
    pub fn new(value: T) -> Result<Self, ShmError> {
        let v = SharedValue::new_unlocked(value)?;
        Ok(SharedValue {
            lock: Some(Lock::new()?),
            ..v
        })
    }

    /// A shared value without a lock; Python's `RawValue` (or `Value(..., lock=False)`).
    pub fn new_unlocked(value: T) -> Result<Self, ShmError> {
        let cells = Cells::create(1, 1)?;
        cells.set(0, value);
        Ok(SharedValue { cells, lock: None })
    }

    /// The value now; Python's `.value`.
    pub fn get(&self) -> T {
        self.cells.get(0)
    }

    /// Replaces the value; Python's `.value = v`.
    pub fn set(&self, value: T) {
        self.cells.set(0, value)
    }

    /// The lock, if it has one; Python's `get_lock()`.
    pub fn get_lock(&self) -> Option<&Lock> {
        self.lock.as_ref()
    }

    /// Replaces the value with `f(value)` holding the lock, and returns the new value (for
    /// example `counter.update(|n| n + 1)`); [`ShmError::NoLock`] without a lock.
    ///
    /// Other processes that change the value without holding the lock are not held back.
    pub fn update(&self, f: impl FnOnce(T) -> T) -> Result<T, ShmError> {
        let lock = self.lock.as_ref().ok_or(ShmError::NoLock)?;
        let _guard = lock.lock()?;
        let new = f(self.get());
        self.set(new);
        Ok(new)
    }
}

impl<T: Scalar> fmt::Debug for SharedValue<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedValue")
            .field("value", &self.get())
            .field("lock", &self.lock.is_some())
            .finish()
    }
}

impl<T: Scalar> Serialize for SharedValue<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire(&self.cells, &self.lock)
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

impl<'de, T: Scalar> Deserialize<'de> for SharedValue<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = Wire::deserialize(d)?;
        let cells = Cells::open(w.fd, 1, "SharedValue").map_err(serde::de::Error::custom)?;
        Ok(SharedValue {
            cells,
            lock: w.lock,
        })
    }
}

// --- SharedArray ----------------------------------------------------------------------------

/// A fixed-length array of numbers shared between processes; Python's
/// `multiprocessing.Array`.
///
/// Elements are read and written atomically one at a time ([`get`](Self::get),
/// [`set`](Self::set)); hold [`get_lock`](Self::get_lock) to make several steps one. Clones,
/// and copies passed to children, are the same array.
#[derive(Clone)]
pub struct SharedArray<T: Scalar> {
    cells: Cells<T>,
    lock: Option<Lock>,
}

impl<T: Scalar> SharedArray<T> {
    /// A shared array holding a copy of `values`, with a lock; Python's
    /// `Array(typecode, values)`.
    pub fn from_slice(values: &[T]) -> Result<Self, ShmError> {
        let a = SharedArray::from_slice_unlocked(values)?;
        Ok(SharedArray {
            lock: Some(Lock::new()?),
            ..a
        })
    }

    /// Like [`from_slice`](Self::from_slice), without a lock; Python's `RawArray`.
    pub fn from_slice_unlocked(values: &[T]) -> Result<Self, ShmError> {
        let cells = Cells::create_from(2, values)?;
        Ok(SharedArray { cells, lock: None })
    }

    /// `len` copies of `value`, with a lock; Python's `Array(typecode, size)` (for zeros).
    pub fn filled(value: T, len: usize) -> Result<Self, ShmError> {
        let cells = Cells::create(2, len)?;
        // New memory is zero-filled: only another value needs writing.
        if !value.is_zero_bits() {
            // SAFETY: `len` aligned elements (see `Cells::base`) of memory that nobody else
            // can see yet, so no atomics are needed; every bit pattern written is a `T`.
            unsafe { std::slice::from_raw_parts_mut(cells.base(), len) }.fill(value);
        }
        Ok(SharedArray {
            cells,
            lock: Some(Lock::new()?),
        })
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.cells.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.cells.len == 0
    }

    /// Element `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<T> {
        (i < self.len()).then(|| self.cells.get(i))
    }

    /// Sets element `i`.
    ///
    /// # Panics
    /// If `i` is out of bounds, like slice indexing.
    pub fn set(&self, i: usize, value: T) {
        assert!(
            i < self.len(),
            "index {i} out of bounds for a SharedArray of length {}",
            self.len()
        );
        self.cells.set(i, value)
    }

    /// A copy of all elements (each read atomically; hold the lock for a consistent copy).
    ///
    /// A bulk copy: about as fast as `memcpy` for 4- and 8-byte elements.
    pub fn to_vec(&self) -> Vec<T> {
        self.cells.to_vec()
    }

    /// Copies all elements into `out` (each read atomically; hold the lock for a consistent
    /// copy), without allocating.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_to_slice(&self, out: &mut [T]) {
        assert_eq!(out.len(), self.len(), "length mismatch in copy_to_slice");
        self.cells.copy_out(out);
    }

    /// Sets every element from `values`.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_from_slice(&self, values: &[T]) {
        assert_eq!(
            values.len(),
            self.len(),
            "length mismatch in copy_from_slice"
        );
        self.cells.copy_in(values);
    }

    /// The lock, if it has one; Python's `get_lock()`.
    pub fn get_lock(&self) -> Option<&Lock> {
        self.lock.as_ref()
    }

    /// The elements as a plain slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, no process or thread may write the array.
    pub unsafe fn as_slice(&self) -> &[T] {
        // SAFETY: the memory holds `len` initialised, aligned elements for the life of `self`;
        // the caller promises that nobody writes them meanwhile.
        unsafe { std::slice::from_raw_parts(self.cells.map.ptr().add(DATA_AT).cast(), self.len()) }
    }

    /// The elements as a plain mutable slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, no other process or thread may read or write the array, and no
    /// other slice of it may exist (hold the lock and make sure every user does the same, or
    /// use it before sharing the array).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [T] {
        // SAFETY: as in `as_slice`, and the caller promises exclusive access.
        unsafe {
            std::slice::from_raw_parts_mut(self.cells.map.ptr().add(DATA_AT).cast(), self.len())
        }
    }
}

impl<T: Scalar> fmt::Debug for SharedArray<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedArray")
            .field("values", &self.to_vec())
            .field("lock", &self.lock.is_some())
            .finish()
    }
}

impl<T: Scalar> Serialize for SharedArray<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        wire(&self.cells, &self.lock)
            .map_err(serde::ser::Error::custom)?
            .serialize(s)
    }
}

impl<'de, T: Scalar> Deserialize<'de> for SharedArray<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = Wire::deserialize(d)?;
        let cells = Cells::open(w.fd, 2, "SharedArray").map_err(serde::de::Error::custom)?;
        Ok(SharedArray {
            cells,
            lock: w.lock,
        })
    }
}

// --- SharedMemory ---------------------------------------------------------------------------

/// A named block of shared memory in `/dev/shm`; Python's
/// `multiprocessing.shared_memory.SharedMemory`.
///
/// One process [`create`](Self::create)s it; any process, related or not, can
/// [`attach`](Self::attach) it by [`name`](Self::name). It can also be passed to a child as
/// part of its argument (it arrives attached, not owning the name).
///
/// # Lifetime of the name
/// The name is removed ([`unlink`](Self::unlink)) exactly once. The creating handle unlinks
/// it when dropped, unless it was unlinked already (by anyone) or
/// [`set_unlink_on_drop(false)`](Self::set_unlink_on_drop) was called: what Python's
/// resource tracker does at exit, done at drop. Attached handles never unlink on drop, nor
/// does the creator's handle in a child that got it through `fork` (only the creating
/// process does). A
/// second [`unlink`](Self::unlink) through the same handle is
/// [`ShmError::AlreadyUnlinked`]; one after another process unlinked it is
/// [`ShmError::NotFound`]. Before removing the name, the handle checks that it still names
/// its own block, so a block created later under the same name is left alone. The memory
/// itself lives until the last process unmaps it.
///
/// # Resource tracker
/// A process killed before it could unlink its blocks (SIGKILL, SIGTERM, a crash) leaves
/// them in `/dev/shm`. As Python's `resource_tracker` does, a program that creates a named
/// block (after calling [`init`](crate::init)) starts, with the first one, a small tracker
/// process, and tells it each block it creates and each it unlinks. Processes forked from
/// the creator share its tracker; those started with `spawn` or the fork server get their
/// own when they create a block. When every process that could tell the tracker something
/// is gone, it unlinks the blocks still registered, prints a warning naming them on standard
/// error (`gpuproc resource tracker: 3 shared memory blocks left by a process that ended
/// without unlinking them, unlinked now: psm_...`), and exits. It ignores SIGINT and
/// SIGTERM, so that a Ctrl-C or a `kill` of the whole process group still leaves it to
/// clean up. [`set_unlink_on_drop(false)`](Self::set_unlink_on_drop) takes a block off its
/// list (Python 3.13's `track=False`).
///
/// # What other local users can and cannot do
/// `/dev/shm` is one namespace for the whole machine, writable by everyone, with the sticky
/// bit. Blocks are created with mode `0600` and `O_EXCL`. Another user (not root) therefore
/// **can** see the names of your blocks (`ls /dev/shm`), take a name before you do (then
/// [`SharedMemory::create_named`](Self::create_named) fails with
/// `AlreadyExists`; the random names of [`SharedMemory::create`](Self::create)
/// are 64 random bits, retried on a clash), and fill `/dev/shm` so that creating fails. They
/// **cannot** open, read, write, resize, rename or unlink your blocks (mode `0600` and the
/// sticky bit), nor make your tracker remove anything of theirs: the tracker unlinks a name
/// only if it still names the very file that was registered (same device and inode),
/// and only names without `/` (so nothing outside `/dev/shm`). Processes running as your own
/// user can do all of that, and can also write to the tracker's socket if they hold it;
/// the tracker checks every line and ignores what does not parse, but it will unlink (with
/// the identity check) what such a process registers; one that shrinks a block makes the
/// processes that read past its new end die with SIGBUS. Root can do anything.
///
/// ```
/// use gpuproc::shm::SharedMemory;
///
/// let shm = SharedMemory::create(16)?;
/// shm.write_at(0, b"hello");
/// let other = SharedMemory::attach(shm.name())?;
/// let mut buf = [0u8; 5];
/// other.read_at(0, &mut buf);
/// assert_eq!(&buf, b"hello");
/// shm.unlink()?;
/// assert!(SharedMemory::attach(shm.name()).unwrap_err().is_not_found());
/// # Ok::<(), gpuproc::shm::ShmError>(())
/// ```
pub struct SharedMemory {
    name: String,
    map: Option<Mapping>,
    size: usize,
    id: (u64, u64),
    unlink_on_drop: bool,
    /// The process whose drop may unlink: a forked copy of the handle never does.
    owner_pid: u32,
    unlinked: AtomicBool,
}

/// The longest name (a file name in /dev/shm).
const NAME_MAX: usize = 255;

pub(crate) fn check_name(name: &str) -> Result<&str, ShmError> {
    let invalid = |reason| ShmError::InvalidName {
        name: name.to_string(),
        reason,
    };
    // POSIX names start with '/'; Python adds it. Accept both spellings.
    let bare = name.strip_prefix('/').unwrap_or(name);
    if bare.is_empty() {
        return Err(invalid("it is empty"));
    }
    if bare.len() > NAME_MAX {
        return Err(invalid("it is longer than 255 bytes"));
    }
    if bare.contains('/') {
        return Err(invalid("it contains '/' (other than a leading one)"));
    }
    if bare.contains('\0') {
        return Err(invalid("it contains a NUL byte"));
    }
    if bare == "." || bare == ".." {
        return Err(invalid("'.' and '..' are not names"));
    }
    Ok(bare)
}

impl SharedMemory {
    /// Creates a block of `size` bytes (zero-filled) under a new random name (`psm_...`, as
    /// Python does); Python's `SharedMemory(create=True, size=size)`.
    pub fn create(size: usize) -> Result<SharedMemory, ShmError> {
        loop {
            let name = format!("psm_{:016x}", sys::unique_u64());
            match SharedMemory::create_named(&name, size) {
                Err(ShmError::AlreadyExists { .. }) => continue,
                other => return other,
            }
        }
    }

    /// Creates a block of `size` bytes named `name`; [`ShmError::AlreadyExists`] if the name
    /// is taken. Python's `SharedMemory(name, create=True, size=size)`.
    pub fn create_named(name: &str, size: usize) -> Result<SharedMemory, ShmError> {
        let bare = check_name(name)?;
        if size == 0 || size > isize::MAX as usize {
            return Err(ShmError::InvalidSize { size });
        }
        let fd = sys::shm_create(bare, size).map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => ShmError::AlreadyExists { name: bare.into() },
            _ => ShmError::Os {
                op: format!("creating shared memory {bare:?} in {}", sys::SHM_DIR),
                source: e,
            },
        })?;
        let mut shm = SharedMemory::from_fd(bare, fd, size).inspect_err(|_| {
            let _ = std::fs::remove_file(format!("{}/{bare}", sys::SHM_DIR));
        })?;
        shm.unlink_on_drop = true;
        tracker::register(&shm.name, shm.id);
        Ok(shm)
    }

    /// Attaches the existing block `name`, all of it; Python's `SharedMemory(name)`.
    pub fn attach(name: &str) -> Result<SharedMemory, ShmError> {
        SharedMemory::attach_with_size(name, 1)
    }

    /// Attaches the existing block `name`, which must have at least `size` bytes
    /// ([`ShmError::WrongSize`] if not). The whole block is mapped.
    pub fn attach_with_size(name: &str, size: usize) -> Result<SharedMemory, ShmError> {
        let bare = check_name(name)?;
        let fd = sys::shm_open(bare).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ShmError::NotFound { name: bare.into() },
            _ => ShmError::Os {
                op: format!("opening shared memory {bare:?} in {}", sys::SHM_DIR),
                source: e,
            },
        })?;
        let actual = sys::file_size(fd.as_fd()).map_err(ShmError::os("reading its size"))?;
        if actual < size || actual == 0 {
            return Err(ShmError::WrongSize {
                name: bare.into(),
                requested: size,
                actual,
            });
        }
        SharedMemory::from_fd(bare, fd, actual)
    }

    fn from_fd(name: &str, fd: OwnedFd, size: usize) -> Result<SharedMemory, ShmError> {
        let id = sys::file_id(fd.as_fd()).map_err(ShmError::os("reading its identity"))?;
        let map = Mapping::map(fd, size)
            .map_err(ShmError::os(format!("mapping shared memory {name:?}")))?;
        Ok(SharedMemory {
            name: name.to_string(),
            map: Some(map),
            size,
            id,
            unlink_on_drop: false,
            owner_pid: std::process::id(),
            unlinked: AtomicBool::new(false),
        })
    }

    /// The block's name (without a leading `/`), to give to [`attach`](Self::attach).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The block's size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    fn mapping(&self) -> &Mapping {
        self.map
            .as_ref()
            .unwrap_or_else(|| panic!("shared memory {:?} is closed", self.name))
    }

    /// The block's bytes, each accessed atomically; Python's `buf`.
    ///
    /// # Panics
    /// After [`close`](Self::close).
    pub fn buf(&self) -> &[AtomicU8] {
        let m = self.mapping();
        // SAFETY: the mapping holds `size` bytes for the life of `self` (close needs `&mut`);
        // AtomicU8 has the layout of u8, and shared memory is only accessed atomically here.
        unsafe { std::slice::from_raw_parts(m.ptr().cast::<AtomicU8>(), self.size) }
    }

    /// Copies bytes from offset `at` into `out`.
    ///
    /// # Panics
    /// If the range is out of bounds, or after [`close`](Self::close).
    pub fn read_at(&self, at: usize, out: &mut [u8]) {
        let src = &self.buf()[at..at + out.len()];
        for (o, b) in out.iter_mut().zip(src) {
            *o = b.load(Ordering::Relaxed);
        }
        std::sync::atomic::fence(Ordering::Acquire);
    }

    /// Copies `data` to offset `at`.
    ///
    /// # Panics
    /// If the range is out of bounds, or after [`close`](Self::close).
    pub fn write_at(&self, at: usize, data: &[u8]) {
        let dst = &self.buf()[at..at + data.len()];
        std::sync::atomic::fence(Ordering::Release);
        for (d, b) in dst.iter().zip(data) {
            d.store(*b, Ordering::Relaxed);
        }
    }

    /// The block as a plain byte slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, no process or thread may write the block.
    ///
    /// # Panics
    /// After [`close`](Self::close).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the caller promises no concurrent writes; the mapping is valid for `size`.
        unsafe { std::slice::from_raw_parts(self.mapping().ptr(), self.size) }
    }

    /// The block as a plain mutable byte slice, without copying.
    ///
    /// # Safety
    /// While the slice lives, no other process or thread may read or write the block, and
    /// no other slice of it may exist.
    ///
    /// # Panics
    /// After [`close`](Self::close).
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: the caller promises exclusive access; the mapping is valid for `size`.
        unsafe { std::slice::from_raw_parts_mut(self.mapping().ptr(), self.size) }
    }

    /// The whole block as elements of type `T` (as many as fit: `size() / size_of::<T>()`),
    /// each read and written atomically, in safe code; like Python's
    /// `numpy.ndarray(shape, dtype, buffer=shm.buf)`.
    ///
    /// ```
    /// use gpuproc::shm::SharedMemory;
    ///
    /// let shm = SharedMemory::create(4096)?;
    /// let x = shm.view::<f32>()?;
    /// assert_eq!(x.len(), 1024);
    /// x.copy_from_slice(&vec![0.5; 1024]);
    /// let row = x.range(256..512).expect("in bounds");
    /// assert_eq!(row.iter().sum::<f32>(), 128.0);
    /// # Ok::<(), gpuproc::shm::ShmError>(())
    /// ```
    pub fn view<T: Scalar>(&self) -> Result<AtomicSlice<'_, T>, ShmError> {
        self.view_at(0, self.size / std::mem::size_of::<T>())
    }

    /// `len` elements of type `T` from byte `offset`, each read and written atomically;
    /// [`ShmError::BadView`] if `offset` is not aligned for `T` or the elements do not fit
    /// in the block (or it is closed).
    pub fn view_at<T: Scalar>(
        &self,
        offset: usize,
        len: usize,
    ) -> Result<AtomicSlice<'_, T>, ShmError> {
        let bad = |reason: String| ShmError::BadView {
            name: self.name.clone(),
            size: self.size,
            what: format!("{len} elements of {} at byte {offset}", T::NAME),
            reason,
        };
        let map = self
            .map
            .as_ref()
            .ok_or_else(|| bad("this handle is closed".into()))?;
        if offset % std::mem::align_of::<T>() != 0 {
            return Err(bad(format!(
                "the offset is not a multiple of {}",
                std::mem::align_of::<T>()
            )));
        }
        let end = len
            .checked_mul(std::mem::size_of::<T>())
            .and_then(|b| b.checked_add(offset));
        if end.is_none_or(|end| end > self.size) {
            return Err(bad("they reach past its end".into()));
        }
        Ok(AtomicSlice {
            // SAFETY: offset <= size (checked above), inside the mapping.
            ptr: unsafe { map.ptr().add(offset) }.cast::<T>(),
            len,
            _borrow: std::marker::PhantomData,
        })
    }

    /// Unmaps the block from this process; Python's `close()`. The name stays (and the
    /// creator's unlink on drop still happens); [`buf`](Self::buf) panics afterwards.
    /// Closing twice does nothing.
    pub fn close(&mut self) {
        self.map = None;
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.map.is_none()
    }

    /// Removes the name, so nobody can attach any more; Python's `unlink()`. Processes that
    /// have it mapped keep their mapping.
    pub fn unlink(&self) -> Result<(), ShmError> {
        if self.unlinked.swap(true, Ordering::SeqCst) {
            return Err(ShmError::AlreadyUnlinked {
                name: self.name.clone(),
            });
        }
        self.untrack();
        match sys::shm_unlink_if(&self.name, self.id) {
            Ok(true) => Ok(()),
            Ok(false) => Err(ShmError::NotFound {
                name: self.name.clone(),
            }),
            Err(e) => {
                self.unlinked.store(false, Ordering::SeqCst);
                Err(ShmError::Os {
                    op: format!("unlinking shared memory {:?}", self.name),
                    source: e,
                })
            }
        }
    }

    /// Whether dropping this handle unlinks the name: true for the creator, in the process
    /// that created it (a copy in a forked child, or one received in a message, never does).
    pub fn unlink_on_drop(&self) -> bool {
        self.unlink_on_drop && self.owner_pid == std::process::id()
    }

    /// Chooses whether dropping this handle unlinks the name (Python 3.13's `track`), in this
    /// process.
    ///
    /// The resource tracker follows: a block whose creator no longer unlinks it is not
    /// unlinked by the tracker either, and one given to this process to unlink is, if this
    /// process is killed.
    pub fn set_unlink_on_drop(&mut self, unlink: bool) {
        let was = self.unlink_on_drop();
        self.unlink_on_drop = unlink;
        self.owner_pid = std::process::id();
        if unlink && !was && !self.unlinked.load(Ordering::SeqCst) {
            tracker::register(&self.name, self.id);
        } else if !unlink && was {
            tracker::unregister(&self.name, self.id);
        }
    }

    /// Tells the resource tracker that this process no longer needs to unlink the block.
    fn untrack(&self) {
        if self.unlink_on_drop() {
            tracker::unregister(&self.name, self.id);
        }
    }
}

/// The pid of this program's resource tracker, once it has started (for gpuproc's own
/// tests).
#[doc(hidden)]
pub fn __resource_tracker_pid_for_tests() -> Option<u32> {
    tracker::pid()
}

impl fmt::Debug for SharedMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedMemory")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("closed", &self.is_closed())
            .field("unlink_on_drop", &self.unlink_on_drop)
            .finish()
    }
}

impl Drop for SharedMemory {
    fn drop(&mut self) {
        if self.unlink_on_drop() && !self.unlinked.swap(true, Ordering::SeqCst) {
            self.untrack();
            let _ = sys::shm_unlink_if(&self.name, self.id);
        }
    }
}

// --- typed views of shared memory ----------------------------------------------------------

/// Elements of type `T` in a [`SharedMemory`] block ([`SharedMemory::view`]), each read and
/// written atomically: any process may write the block at any time, so there is no plain
/// `&[T]`, but whole elements are never torn, and the bulk copies
/// ([`copy_to_slice`](Self::copy_to_slice), [`copy_from_slice`](Self::copy_from_slice),
/// [`to_vec`](Self::to_vec)) run at about the speed of `memcpy`.
///
/// For data that no one changes once written, [`SharedSlice`] is a plain `&[T]`.
pub struct AtomicSlice<'a, T: Scalar> {
    ptr: *mut T,
    len: usize,
    _borrow: std::marker::PhantomData<&'a [T]>,
}

// SAFETY: an `AtomicSlice` is like a `&[AtomicT]`: every access through it is atomic, and the
// memory stays mapped while the borrowed `SharedMemory` lives.
unsafe impl<T: Scalar> Send for AtomicSlice<'_, T> {}
// SAFETY: as above.
unsafe impl<T: Scalar> Sync for AtomicSlice<'_, T> {}

impl<T: Scalar> Clone for AtomicSlice<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T: Scalar> Copy for AtomicSlice<'_, T> {}

impl<'a, T: Scalar> AtomicSlice<'a, T> {
    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `range` of this view, or `None` if the range is out of bounds (or empty
    /// backwards).
    pub fn range(&self, range: std::ops::Range<usize>) -> Option<AtomicSlice<'a, T>> {
        if range.start > range.end || range.end > self.len {
            return None;
        }
        Some(AtomicSlice {
            // SAFETY: start <= len: inside (or one past) the view.
            ptr: unsafe { self.ptr.add(range.start) },
            len: range.end - range.start,
            _borrow: std::marker::PhantomData,
        })
    }

    fn at(&self, i: usize) -> *mut T {
        debug_assert!(i < self.len);
        // SAFETY: i < len, inside the view (callers check).
        unsafe { self.ptr.add(i) }
    }

    /// Element `i`, or `None` past the end.
    pub fn get(&self, i: usize) -> Option<T> {
        // SAFETY: in bounds and aligned (checked when the view was made); shared memory is
        // only accessed atomically here.
        (i < self.len).then(|| unsafe { T::load(self.at(i)) })
    }

    /// Sets element `i`.
    ///
    /// # Panics
    /// If `i` is out of bounds, like slice indexing.
    pub fn set(&self, i: usize, value: T) {
        assert!(
            i < self.len,
            "index {i} out of bounds for a view of length {}",
            self.len
        );
        // SAFETY: as in `get`.
        unsafe { T::store(self.at(i), value) }
    }

    /// The elements, each read atomically as the iterator reaches it.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = T> + 'a {
        let view = *self;
        // SAFETY: as in `get`.
        (0..view.len).map(move |i| unsafe { T::load(view.at(i)) })
    }

    /// Copies every element into `out`, each read whole.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_to_slice(&self, out: &mut [T]) {
        assert_eq!(out.len(), self.len, "length mismatch in copy_to_slice");
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: as in `get`.
            *o = unsafe { T::load_relaxed(self.at(i)) };
        }
        std::sync::atomic::fence(Ordering::Acquire);
    }

    /// A copy of the elements, each read whole.
    pub fn to_vec(&self) -> Vec<T> {
        let mut out = Vec::<T>::with_capacity(self.len);
        let dst = out.as_mut_ptr();
        for i in 0..self.len {
            // SAFETY: as in `get`; `dst` has room for len elements.
            unsafe { dst.add(i).write(T::load_relaxed(self.at(i))) };
        }
        // SAFETY: all len elements were written above.
        unsafe { out.set_len(self.len) };
        std::sync::atomic::fence(Ordering::Acquire);
        out
    }

    /// Writes every element from `values`, each whole.
    ///
    /// # Panics
    /// If the lengths differ.
    pub fn copy_from_slice(&self, values: &[T]) {
        assert_eq!(values.len(), self.len, "length mismatch in copy_from_slice");
        std::sync::atomic::fence(Ordering::Release);
        for (i, v) in values.iter().enumerate() {
            // SAFETY: as in `get`.
            unsafe { T::store_relaxed(self.at(i), *v) };
        }
    }

    /// Sets every element to `value`.
    pub fn fill(&self, value: T) {
        std::sync::atomic::fence(Ordering::Release);
        for i in 0..self.len {
            // SAFETY: as in `get`.
            unsafe { T::store_relaxed(self.at(i), value) };
        }
    }
}

impl<T: Scalar> fmt::Debug for AtomicSlice<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct(&format!("AtomicSlice<{}>", T::NAME))
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize, Deserialize)]
struct ShmWire {
    name: String,
    #[serde(
        serialize_with = "ser_fd",
        deserialize_with = "crate::ipc::deserialize_fd"
    )]
    fd: OwnedFd,
}

impl Serialize for SharedMemory {
    /// Sends the name and the block (the receiver maps the same memory, without owning the
    /// name). A closed handle cannot be sent.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let map = self.map.as_ref().ok_or_else(|| {
            serde::ser::Error::custom(format!("shared memory {:?} is closed", self.name))
        })?;
        let fd = map
            .fd()
            .try_clone_to_owned()
            .map_err(serde::ser::Error::custom)?;
        ShmWire {
            name: self.name.clone(),
            fd,
        }
        .serialize(s)
    }
}

impl<'de> Deserialize<'de> for SharedMemory {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ShmWire::deserialize(d)?;
        let size = sys::file_size(w.fd.as_fd()).map_err(serde::de::Error::custom)?;
        SharedMemory::from_fd(&w.name, w.fd, size).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for bad in ["", "/", "a/b", "..", "x\0y", &"n".repeat(256)] {
            let e = SharedMemory::create_named(bad, 8).unwrap_err();
            assert!(e.is_invalid_name(), "{bad:?}: {e}");
        }
        assert!(matches!(
            SharedMemory::create(0).unwrap_err(),
            ShmError::InvalidSize { size: 0 }
        ));
    }

    #[test]
    fn values_and_arrays_in_one_process() {
        let v = SharedValue::new(1.5f32).unwrap();
        assert_eq!(v.update(|x| x * 2.0).unwrap(), 3.0);
        assert!(SharedValue::new_unlocked(1u8)
            .unwrap()
            .update(|x| x)
            .is_err());
        let a = SharedArray::filled(7i64, 3).unwrap();
        a.set(1, -1);
        assert_eq!(a.to_vec(), [7, -1, 7]);
        assert_eq!(a.get(3), None);
        let b = SharedArray::<bool>::from_slice_unlocked(&[true, false]).unwrap();
        assert_eq!(b.to_vec(), [true, false]);
        assert!(SharedArray::<u16>::from_slice(&[]).unwrap().is_empty());
    }

    #[test]
    fn bulk_copies_in_and_out_equal_element_wise_ones() {
        fn check<T: Scalar>(values: &[T]) {
            let a = SharedArray::from_slice(values).unwrap();
            let one_by_one: Vec<T> = (0..a.len()).map(|i| a.get(i).unwrap()).collect();
            assert_eq!(one_by_one, values);
            assert_eq!(a.to_vec(), values);
            assert_eq!(received(&a).unwrap().to_vec(), values);
            let mut out = values.to_vec();
            out.reverse();
            a.copy_from_slice(&out);
            let mut back = values.to_vec();
            a.copy_to_slice(&mut back);
            assert_eq!(back, out);
            assert_eq!(
                (0..a.len()).map(|i| a.get(i).unwrap()).collect::<Vec<_>>(),
                out
            );
        }
        check(&(0..1000).map(|i| i as f64 / 3.0).collect::<Vec<_>>());
        check(&(0..4099).map(|i| i as u8).collect::<Vec<_>>());
        check(&(0..77).map(|i| i % 3 == 0).collect::<Vec<_>>());
        check(&(0..300).map(|i| -i as i16).collect::<Vec<_>>());
        check::<u32>(&[]);
        // filled: zero bits are left as new memory holds them; other values are written.
        assert_eq!(
            SharedArray::filled(-0.0f32, 5).unwrap().to_vec()[4].to_bits(),
            (-0.0f32).to_bits()
        );
        assert_eq!(SharedArray::filled(0u64, 3).unwrap().to_vec(), [0, 0, 0]);
        assert_eq!(SharedArray::filled(true, 2).unwrap().to_vec(), [true, true]);
    }

    #[test]
    fn typed_views_of_a_block_check_alignment_and_bounds() {
        let mut shm = SharedMemory::create(100).unwrap();
        let x = shm.view::<u64>().unwrap();
        assert_eq!(x.len(), 12);
        x.copy_from_slice(&(0..12).collect::<Vec<u64>>());
        // Another handle on the same block sees the values, typed another way.
        let other = SharedMemory::attach(shm.name()).unwrap();
        let y = other.view_at::<u32>(8, 4).unwrap();
        assert_eq!(y.to_vec(), [1, 0, 2, 0]);
        y.set(0, 7);
        assert_eq!(x.get(1), Some(7));
        assert_eq!(x.get(12), None);
        let row = x.range(4..8).unwrap();
        assert_eq!(row.iter().collect::<Vec<_>>(), [4, 5, 6, 7]);
        let mut out = [0u64; 4];
        row.copy_to_slice(&mut out);
        assert_eq!(out, [4, 5, 6, 7]);
        row.fill(9);
        assert_eq!(x.to_vec()[3..9], [3, 9, 9, 9, 9, 8]);
        assert!(x.range(8..13).is_none() && x.range(13..13).is_none());
        #[allow(clippy::reversed_empty_ranges)]
        let backwards = x.range(5..4);
        assert!(backwards.is_none());
        assert!(x.range(12..12).unwrap().is_empty());
        for (offset, len, says) in [
            (4, 1, "not a multiple of 8"),
            (0, 13, "past its end"),
            (96, 1, "past its end"),
            (8, usize::MAX / 4, "past its end"),
            (usize::MAX - 7, 1, "past its end"),
        ] {
            let e = shm.view_at::<u64>(offset, len).unwrap_err();
            assert!(matches!(e, ShmError::BadView { .. }), "{e}");
            assert!(e.to_string().contains(says), "{offset} {len}: {e}");
        }
        assert_eq!(shm.view_at::<u8>(100, 0).unwrap().len(), 0);
        shm.close();
        assert!(shm.view::<u8>().unwrap_err().to_string().contains("closed"));
    }

    /// What another process receiving `a` would get (its memfd, opened again).
    fn received<T: Scalar>(a: &SharedArray<T>) -> Result<Cells<T>, ShmError> {
        let fd = a.cells.map.fd().try_clone_to_owned().unwrap();
        Cells::open(fd, 2, "SharedArray")
    }

    #[test]
    fn a_length_rewritten_in_the_header_never_reaches_past_the_memory() {
        let a = SharedArray::from_slice_unlocked(&[1i64, 2, 3, 4]).unwrap();
        // Lengths a holder could write: 2^61 elements of 8 bytes wrap to 0 bytes, 2^64 - 1
        // overflows, 1 << 40 is merely too large.
        for huge in [1u64 << 61, u64::MAX, 1 << 40, (u64::MAX - 63) / 8 + 1] {
            a.cells
                .map
                .atomic_u32(16)
                .store(huge as u32, Ordering::SeqCst);
            a.cells
                .map
                .atomic_u32(20)
                .store((huge >> 32) as u32, Ordering::SeqCst);
            // The handle that exists keeps its own length.
            assert_eq!(a.len(), 4);
            assert_eq!(a.get(3), Some(4));
            assert_eq!(a.get(1 << 40), None);
            // A new handle refuses the memory.
            let e = received(&a).err().expect("a huge length was accepted");
            assert!(matches!(e, ShmError::WrongObject { .. }), "{huge}: {e}");
        }
        // A length that fits is taken (a holder may lie smaller: that only hides elements).
        a.cells.map.atomic_u32(16).store(2, Ordering::SeqCst);
        a.cells.map.atomic_u32(20).store(0, Ordering::SeqCst);
        assert_eq!(received(&a).unwrap().len, 2);
    }

    #[test]
    fn value_and_array_memory_cannot_change_size() {
        let a = SharedArray::filled(0u8, 10).unwrap();
        let v = SharedValue::new(0u64).unwrap();
        let r = received(&a).unwrap();
        for fd in [a.cells.map.fd(), v.cells.map.fd(), r.map.fd()] {
            assert!(rustix::fs::ftruncate(fd, 0).is_err());
            assert!(rustix::fs::ftruncate(fd, 1 << 20).is_err());
            assert!(rustix::fs::fcntl_add_seals(fd, rustix::fs::SealFlags::empty()).is_err());
        }
        assert_eq!(a.to_vec(), [0; 10]);
    }

    #[test]
    fn memory_not_sealed_against_shrinking_is_refused() {
        // A well-formed header in a memfd that any holder could cut short.
        let fd = rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, 4096).unwrap();
        let map = Mapping::map(fd, 4096).unwrap();
        map.atomic_u32(4).store(2, Ordering::SeqCst);
        map.atomic_u32(8).store(u8::CODE, Ordering::SeqCst);
        map.atomic_u32(16).store(8, Ordering::SeqCst);
        map.atomic_u32(0).store(MAGIC, Ordering::SeqCst);
        let e = Cells::<u8>::open(map.fd().try_clone_to_owned().unwrap(), 2, "SharedArray")
            .err()
            .expect("an unsealed memfd was accepted");
        assert!(e.to_string().contains("sealed"), "{e}");
    }
}
