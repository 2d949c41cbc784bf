//! [`SharedSlice`]: a read-only slice of numbers in sealed shared memory, passed to other
//! processes for the cost of a descriptor and read there in place, as a plain `&[T]`.
//!
//! The memory is an anonymous memory file (memfd) that is written once, when the slice is
//! made, then sealed against writes and resizing (`F_SEAL_WRITE`, `F_SEAL_SHRINK`,
//! `F_SEAL_GROW`, `F_SEAL_SEAL`): from then on the kernel refuses every write, by any process,
//! through any descriptor or mapping, so reading it as a plain slice races with nothing. A
//! receiver checks the seals and a small header (element type, element size, length) against
//! the memfd's own size before it hands out a slice.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Deref;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{scalar_bytes, scalar_name, Scalar, ShmError, MAGIC};
use crate::ipc::FdRef;
use crate::sys::shm::SealedMapping;

/// Received slices up to this many bytes are mapped whole at once (see [`populate_on_open`]).
const POPULATE_MAX: usize = 64 << 20;

/// Whether a received slice of `len` bytes is mapped with all its pages at once: yes up to
/// [`POPULATE_MAX`] (a task usually reads the slice it was given, and one `MAP_POPULATE`
/// costs a fraction of the page faults it saves: about a quarter of a worker's time when
/// summing 4 MiB slices); larger ones fault their pages in as they are read, so that a
/// task that reads a few rows of a huge slice pays only for those.
fn populate_on_open(len: usize) -> bool {
    len <= POPULATE_MAX
}

/// The header: magic, kind, element code, element size (u32 each), length (u64).
const HEADER: usize = 64;
/// The kind word of a slice (1 and 2 are values and arrays).
const KIND: u32 = 3;

/// A shared, read-only slice of plain numbers (`f32`, `u64`, ...: the [`Scalar`] types).
///
/// Made once, from a slice ([`from_slice`](Self::from_slice), one copy) or filled in place
/// ([`build`](Self::build)), then sealed: nobody, in any process, can change it any more,
/// so every holder reads it as a plain `&[T]` ([`Deref`], [`as_slice`](Self::as_slice)) in
/// safe code, at memory speed. Sending it (as a [`Process`](crate::Process) argument or
/// result, a [`Pool`](crate::Pool) task's argument or result, a [`Queue`](crate::Queue) or
/// [`Pipe`](crate::Pipe) message, with every start method) sends a descriptor, not the
/// data: the receiver maps the same memory. [`Clone`] shares the memory too. The memory is
/// freed when the last handle, in any process, is dropped.
///
/// To change data, make a new slice: [`SharedArray`](super::SharedArray) is the shared
/// array every process may write (element by element), and
/// [`SharedMemory`](super::SharedMemory) the named block.
///
/// ```
/// # gpuproc::init();
/// use gpuproc::{Pool, SharedSlice};
///
/// fn sum(x: SharedSlice<f32>) -> f32 {
///     x.iter().sum()
/// }
///
/// let batches = (0..4)
///     .map(|i| SharedSlice::from_vec(vec![i as f32; 1000]))
///     .collect::<Result<Vec<_>, _>>()?;
/// let pool = Pool::new(2)?;
/// assert_eq!(pool.map(sum, batches)?, [0.0, 1000.0, 2000.0, 3000.0]);
///
/// // Filled in place: no copy at all.
/// let squares = SharedSlice::<u64>::build(5, |buf| {
///     for (i, x) in buf.iter_mut().enumerate() {
///         *x = (i * i) as u64;
///     }
/// })?;
/// assert_eq!(&squares[..], &[0, 1, 4, 9, 16]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct SharedSlice<T: Scalar> {
    map: Arc<SealedMapping>,
    len: usize,
    _t: PhantomData<fn() -> T>,
}

impl<T: Scalar> Clone for SharedSlice<T> {
    fn clone(&self) -> Self {
        SharedSlice {
            map: Arc::clone(&self.map),
            len: self.len,
            _t: PhantomData,
        }
    }
}

/// The header of a slice of `len` `T`s.
fn header<T: Scalar>(len: usize) -> [u8; HEADER] {
    let mut h = [0u8; HEADER];
    h[0..4].copy_from_slice(&MAGIC.to_ne_bytes());
    h[4..8].copy_from_slice(&KIND.to_ne_bytes());
    h[8..12].copy_from_slice(&T::CODE.to_ne_bytes());
    h[12..16].copy_from_slice(&(std::mem::size_of::<T>() as u32).to_ne_bytes());
    h[16..24].copy_from_slice(&(len as u64).to_ne_bytes());
    h
}

fn word(bytes: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&bytes[at..at + 4]);
    u32::from_ne_bytes(w)
}

/// Bytes of the memory for `len` `T`s, header included.
fn total_bytes<T: Scalar>(len: usize) -> Option<usize> {
    len.checked_mul(std::mem::size_of::<T>())?
        .checked_add(HEADER)
        .filter(|&n| n <= isize::MAX as usize)
}

fn memfd_name<T: Scalar>() -> String {
    format!("gpuproc-slice-{}", T::NAME)
}

impl<T: Scalar> SharedSlice<T> {
    /// A shared slice holding a copy of `values` (one copy, made by the kernel).
    pub fn from_slice(values: &[T]) -> Result<Self, ShmError> {
        total_bytes::<T>(values.len()).ok_or(ShmError::InvalidSize { size: values.len() })?;
        let map = SealedMapping::create_from(
            &memfd_name::<T>(),
            &[&header::<T>(values.len()), scalar_bytes(values)],
        )
        .map_err(ShmError::os("creating a shared slice"))?;
        Ok(SharedSlice {
            map: Arc::new(map),
            len: values.len(),
            _t: PhantomData,
        })
    }

    /// A shared slice holding the values of `values` (one copy; the `Vec` is freed).
    pub fn from_vec(values: Vec<T>) -> Result<Self, ShmError> {
        SharedSlice::from_slice(&values)
    }

    /// A shared slice of `len` elements that `fill` writes in place (they start as zeros,
    /// `false` for `bool`), with no copy; sealed when `fill` returns.
    ///
    /// A panic in `fill` propagates; the memory is freed.
    pub fn build(len: usize, fill: impl FnOnce(&mut [T])) -> Result<Self, ShmError> {
        let bytes = total_bytes::<T>(len).ok_or(ShmError::InvalidSize { size: len })?;
        let (map, ()) = SealedMapping::create_with(&memfd_name::<T>(), bytes, |buf| {
            buf[..HEADER].copy_from_slice(&header::<T>(len));
            let data = &mut buf[HEADER..];
            // SAFETY: `data` holds exactly `len` `T`s (`bytes` was computed from `len`),
            // aligned (the mapping is page-aligned, HEADER a multiple of 8), all zero bits
            // (a new memfd), which is a value of every Scalar type (`false` for bool); the
            // borrow of `buf` is moved into the new slice.
            let data =
                unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<T>(), len) };
            fill(data)
        })
        .map_err(ShmError::os("creating a shared slice"))?;
        Ok(SharedSlice {
            map: Arc::new(map),
            len,
            _t: PhantomData,
        })
    }

    /// A slice received from another process: its memfd must carry every seal, and its
    /// header must describe exactly the memfd's size with elements of type `T`.
    fn open(fd: OwnedFd) -> Result<Self, ShmError> {
        let wrong = |reason: String| ShmError::WrongObject {
            expected: format!("SharedSlice<{}>", T::NAME),
            reason,
        };
        let map = SealedMapping::open(fd, populate_on_open).map_err(|e| wrong(e.to_string()))?;
        let bytes = map.bytes();
        if bytes.len() < HEADER || word(bytes, 0) != MAGIC || word(bytes, 4) != KIND {
            return Err(wrong("it is not a gpuproc SharedSlice".into()));
        }
        let code = word(bytes, 8);
        if code != T::CODE {
            return Err(wrong(match scalar_name(code) {
                Some(name) => format!("its elements are {name}, not {}", T::NAME),
                None => format!("its element type code {code} is unknown"),
            }));
        }
        let size = word(bytes, 12);
        if usize::try_from(size).ok() != Some(std::mem::size_of::<T>()) {
            return Err(wrong(format!(
                "its elements have {size} bytes, not {}",
                std::mem::size_of::<T>()
            )));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[16..24]);
        let len = u64::from_ne_bytes(len);
        let fits = usize::try_from(len)
            .ok()
            .filter(|&n| total_bytes::<T>(n) == Some(bytes.len()));
        let Some(len) = fits else {
            return Err(wrong(format!(
                "its header announces {len} elements, which do not make its {} bytes",
                bytes.len()
            )));
        };
        if !T::ANY_BITS {
            if let Some(at) = bytes[HEADER..].iter().position(|&b| b > 1) {
                return Err(wrong(format!(
                    "element {at} is {}, not a {}",
                    bytes[HEADER + at],
                    T::NAME
                )));
            }
        }
        Ok(SharedSlice {
            map: Arc::new(map),
            len,
            _t: PhantomData,
        })
    }

    /// The elements, in place.
    pub fn as_slice(&self) -> &[T] {
        let data = &self.map.bytes()[HEADER.min(self.map.bytes().len())..];
        // SAFETY: the memory holds HEADER + len * size_of::<T>() bytes (checked when made or
        // received), aligned for T (page-aligned mapping, HEADER a multiple of 8), each
        // element a valid T (any bits, or checked for bool), and sealed: nobody can write it
        // while the slice, which borrows `self`, lives.
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<T>(), self.len) }
    }

    /// The number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it has no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// A copy of the elements in a `Vec`.
    pub fn to_vec(&self) -> Vec<T> {
        self.as_slice().to_vec()
    }
}

impl<T: Scalar> Deref for SharedSlice<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Scalar> AsRef<[T]> for SharedSlice<T> {
    fn as_ref(&self) -> &[T] {
        self.as_slice()
    }
}

impl<T: Scalar> PartialEq for SharedSlice<T> {
    fn eq(&self, other: &Self) -> bool {
        self.as_slice() == other.as_slice()
    }
}

impl<T: Scalar> PartialEq<[T]> for SharedSlice<T> {
    fn eq(&self, other: &[T]) -> bool {
        self.as_slice() == other
    }
}

/// Elements shown by `Debug` (a slice may hold gigabytes).
const DEBUG_ELEMENTS: usize = 16;

impl<T: Scalar> fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Head<'a, T>(&'a [T], usize);
        impl<T: fmt::Debug> fmt::Debug for Head<'_, T> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let mut l = f.debug_list();
                l.entries(self.0);
                if self.1 > self.0.len() {
                    l.entry(&format_args!("... {} more", self.1 - self.0.len()));
                }
                l.finish()
            }
        }
        let s = self.as_slice();
        f.debug_struct(&format!("SharedSlice<{}>", T::NAME))
            .field("len", &self.len)
            .field("values", &Head(&s[..s.len().min(DEBUG_ELEMENTS)], s.len()))
            .finish()
    }
}

#[derive(Serialize)]
struct WireRef<'a> {
    fd: FdRef<'a>,
}

#[derive(Deserialize)]
struct Wire {
    #[serde(deserialize_with = "crate::ipc::deserialize_fd")]
    fd: OwnedFd,
}

impl<T: Scalar> Serialize for SharedSlice<T> {
    /// Sends the memfd (a descriptor): only inside a gpuproc message.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        WireRef {
            fd: FdRef(self.map.fd()),
        }
        .serialize(s)
    }
}

impl<'de, T: Scalar> Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = Wire::deserialize(d)?;
        SharedSlice::open(w.fd).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{MemfdFlags, SealFlags};
    use rustix::mm::{MapFlags, ProtFlags};
    use std::os::fd::AsFd;

    /// What another process receiving `s` would get (its memfd, opened again).
    fn received<T: Scalar>(s: &SharedSlice<T>) -> Result<SharedSlice<T>, ShmError> {
        SharedSlice::open(s.map.fd().try_clone_to_owned().unwrap())
    }

    /// A memfd holding `bytes`, with `seals`.
    fn forged(bytes: &[u8], seals: SealFlags) -> OwnedFd {
        let fd =
            rustix::fs::memfd_create("t", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        crate::sys::shm::write_all_at(fd.as_fd(), bytes, 0).unwrap();
        rustix::fs::fcntl_add_seals(&fd, seals).unwrap();
        fd
    }

    fn all() -> SealFlags {
        SealFlags::WRITE | SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL
    }

    #[test]
    fn received_slices_are_populated_up_to_the_limit_only() {
        assert!(populate_on_open(0));
        assert!(populate_on_open(4 << 20));
        assert!(populate_on_open(POPULATE_MAX));
        assert!(!populate_on_open(POPULATE_MAX + 1));
        assert!(!populate_on_open(usize::MAX));
    }

    #[test]
    fn made_three_ways_and_read_back() {
        let v: Vec<f32> = (0..1000).map(|i| i as f32 * 0.5).collect();
        let a = SharedSlice::from_slice(&v).unwrap();
        let b = SharedSlice::from_vec(v.clone()).unwrap();
        let c = SharedSlice::<f32>::build(1000, |buf| {
            assert!(buf.iter().all(|&x| x == 0.0));
            for (i, x) in buf.iter_mut().enumerate() {
                *x = i as f32 * 0.5;
            }
        })
        .unwrap();
        for s in [&a, &b, &c] {
            assert_eq!(&s[..], &v[..]);
            assert_eq!(s.len(), 1000);
            assert_eq!(received(s).unwrap().as_slice(), &v[..]);
        }
        assert_eq!(a, c.clone());
        assert_eq!(a.to_vec(), v);
        let e = SharedSlice::<u8>::from_slice(&[]).unwrap();
        assert!(e.is_empty() && received(&e).unwrap().is_empty());
        let bools = SharedSlice::from_slice(&[true, false, true]).unwrap();
        assert_eq!(&received(&bools).unwrap()[..], &[true, false, true]);
        let dbg = format!("{:?}", SharedSlice::from_slice(&[7u16; 20]).unwrap());
        assert!(
            dbg.starts_with("SharedSlice<u16> { len: 20, values: [7, 7,"),
            "{dbg}"
        );
        assert!(dbg.contains("... 4 more"), "{dbg}");
    }

    #[test]
    fn sealed_memory_refuses_every_write() {
        let s = SharedSlice::from_slice(&[1u64, 2, 3]).unwrap();
        let fd = s.map.fd();
        // write(2), at the start and past the end.
        assert_eq!(
            rustix::io::pwrite(fd, b"x", 0),
            Err(rustix::io::Errno::PERM)
        );
        assert_eq!(
            rustix::io::pwrite(fd, b"x", 4096),
            Err(rustix::io::Errno::PERM)
        );
        // A shared writable mapping.
        // SAFETY: a new mapping chosen by the kernel; if it were made it would be unmapped.
        let m = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                4096,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        };
        assert_eq!(m.err(), Some(rustix::io::Errno::PERM));
        // Resizing, punching a hole, removing seals.
        assert!(rustix::fs::ftruncate(fd, 0).is_err());
        assert!(rustix::fs::ftruncate(fd, 1 << 20).is_err());
        assert!(rustix::fs::fallocate(
            fd,
            rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
            0,
            4096
        )
        .is_err());
        assert!(rustix::fs::fcntl_add_seals(fd, SealFlags::empty()).is_err());
        assert_eq!(&s[..], &[1, 2, 3]);
        assert_eq!(&received(&s).unwrap()[..], &[1, 2, 3]);
    }

    #[test]
    fn forged_or_unsealed_memory_is_refused() {
        let good = {
            let mut b = header::<u32>(2).to_vec();
            b.extend_from_slice(scalar_bytes(&[5u32, 6]));
            b
        };
        let open = |bytes: &[u8], seals| SharedSlice::<u32>::open(forged(bytes, seals));
        assert_eq!(&open(&good, all()).unwrap()[..], &[5, 6]);
        let refused = |r: Result<SharedSlice<u32>, ShmError>, says: &str| {
            let e = r.expect_err("accepted");
            assert!(matches!(e, ShmError::WrongObject { .. }), "{e}");
            assert!(e.to_string().contains(says), "{e}");
        };
        // Missing seals: any of them.
        for missing in [
            SealFlags::WRITE,
            SealFlags::SHRINK,
            SealFlags::GROW,
            SealFlags::SEAL,
        ] {
            refused(open(&good, all() - missing), "not sealed");
        }
        // Not a memfd at all.
        let (r, _w) = rustix::pipe::pipe().unwrap();
        refused(SharedSlice::<u32>::open(r), "not a memfd");
        // Another element type, named.
        let e = SharedSlice::<f32>::open(forged(&good, all()))
            .err()
            .unwrap();
        assert!(
            e.to_string().contains("its elements are u32, not f32"),
            "{e}"
        );
        // Lengths that do not make the size: larger, smaller, overflowing.
        for len in [3u64, 1, u64::MAX, (u64::MAX / 4) + 1, 1 << 62] {
            let mut b = good.clone();
            b[16..24].copy_from_slice(&len.to_ne_bytes());
            refused(open(&b, all()), "header announces");
        }
        // A wrong element size, a wrong magic, too short for a header.
        let mut b = good.clone();
        b[12..16].copy_from_slice(&8u32.to_ne_bytes());
        refused(open(&b, all()), "have 8 bytes");
        let mut b = good.clone();
        b[0] ^= 1;
        refused(open(&b, all()), "not a gpuproc SharedSlice");
        refused(open(&good[..10], all()), "not a gpuproc SharedSlice");
        refused(open(&[], all()), "not a gpuproc SharedSlice");
        // bool: a byte other than 0 or 1 is not a bool.
        let mut b = header::<bool>(3).to_vec();
        b.extend_from_slice(&[1, 0, 2]);
        let e = SharedSlice::<bool>::open(forged(&b, all())).err().unwrap();
        assert!(e.to_string().contains("element 2 is 2"), "{e}");
    }

    /// Descriptors and mappings of `SharedSlice<i16>` memory in this process (no other test
    /// makes one).
    fn i16_memory() -> (usize, usize) {
        let name = "memfd:gpuproc-slice-i16";
        let fds = std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .flatten()
            .filter(|e| {
                std::fs::read_link(e.path()).is_ok_and(|l| l.to_string_lossy().contains(name))
            })
            .count();
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        (fds, maps.lines().filter(|l| l.contains(name)).count())
    }

    #[test]
    fn a_panic_while_filling_frees_the_memory() {
        let r = std::panic::catch_unwind(|| {
            SharedSlice::<i16>::build(100_000, |buf| {
                buf[0] = 1;
                assert_eq!(i16_memory(), (1, 1));
                panic!("fill failed");
            })
        });
        assert!(r.is_err());
        assert_eq!(i16_memory(), (0, 0));
        let s = SharedSlice::<i16>::build(3, |buf| buf[2] = -1).unwrap();
        assert_eq!(i16_memory(), (1, 1));
        assert_eq!(&s[..], &[0, 0, -1]);
        drop(s);
        assert_eq!(i16_memory(), (0, 0));
    }

    #[test]
    fn sizes_that_cannot_exist_are_refused_before_allocating() {
        let e = SharedSlice::<u64>::build(usize::MAX / 4, |_| unreachable!()).unwrap_err();
        assert!(matches!(e, ShmError::InvalidSize { .. }), "{e}");
    }
}
