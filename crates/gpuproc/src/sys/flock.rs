//! Advisory file locks (`flock`) and the user id, for the GPU lease table.

use std::fs::File;
use std::io;

/// Tries to take an exclusive `flock` on `file` without blocking: `Ok(false)` when another
/// open file description holds a lock on it. The lock is released when `file` is closed.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    loop {
        match flock(file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(true),
            Err(rustix::io::Errno::WOULDBLOCK) => return Ok(false),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The real user id of this process.
pub(crate) fn getuid() -> u32 {
    rustix::process::getuid().as_raw()
}
