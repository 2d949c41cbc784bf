//! The files of the GPU lease table's runtime directory: advisory locks (`flock`), the user
//! ids, and opening, creating, replacing and listing files relative to the directory's
//! descriptor. Nothing here follows a symbolic link in the directory (`O_NOFOLLOW`), creates
//! a file that already exists (`O_EXCL`), or blocks on opening a FIFO (`O_NONBLOCK`); callers
//! check what they opened with [`FileInfo`].

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};

/// Tries to take an exclusive `flock` on `file` without blocking: `Ok(false)` when another
/// open file description holds a lock on it. The lock is released when `file` is closed.
pub(crate) fn try_lock_exclusive(file: impl AsFd) -> io::Result<bool> {
    use rustix::fs::{flock, FlockOperation};
    loop {
        match flock(&file, FlockOperation::NonBlockingLockExclusive) {
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

/// The effective user id of this process: the owner of the files it creates.
pub(crate) fn geteuid() -> u32 {
    rustix::process::geteuid().as_raw()
}

/// What kind of file an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Regular,
    Directory,
    Symlink,
    /// A FIFO, socket or device, named.
    Other(&'static str),
}

/// The type, owner and permission bits of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileInfo {
    pub kind: Kind,
    pub uid: u32,
    /// Permission bits, with set-id and sticky bits (`0o7777`).
    pub mode: u32,
}

impl FileInfo {
    fn of(stat: &rustix::fs::Stat) -> FileInfo {
        let kind = match FileType::from_raw_mode(stat.st_mode) {
            FileType::RegularFile => Kind::Regular,
            FileType::Directory => Kind::Directory,
            FileType::Symlink => Kind::Symlink,
            FileType::Fifo => Kind::Other("a FIFO"),
            FileType::Socket => Kind::Other("a socket"),
            FileType::CharacterDevice => Kind::Other("a character device"),
            FileType::BlockDevice => Kind::Other("a block device"),
            FileType::Unknown => Kind::Other("of an unknown type"),
        };
        FileInfo {
            kind,
            uid: stat.st_uid,
            mode: stat.st_mode & 0o7777,
        }
    }

    /// Whether users other than the owner may create and remove entries (a directory).
    pub(crate) fn others_may_write(&self) -> bool {
        self.mode & 0o022 != 0
    }

    /// Whether the sticky bit is set: only an entry's owner may remove or replace it.
    pub(crate) fn is_sticky(&self) -> bool {
        self.mode & 0o1000 != 0
    }
}

/// `ELOOP` from `O_NOFOLLOW`, said plainly.
fn no_follow(e: rustix::io::Errno) -> io::Error {
    if e == rustix::io::Errno::LOOP {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "it is a symbolic link, which is never followed here (remove it)",
        )
    } else {
        e.into()
    }
}

/// Opens the directory at `path` (following links in the path, which the user chose).
pub(crate) fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

/// The type, owner and mode of an open file.
pub(crate) fn info(fd: impl AsFd) -> io::Result<FileInfo> {
    Ok(FileInfo::of(&rustix::fs::fstat(fd)?))
}

/// The type, owner and mode of `name` in `dir`, not following a link.
pub(crate) fn info_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<FileInfo> {
    Ok(FileInfo::of(&rustix::fs::statat(
        dir,
        name,
        AtFlags::SYMLINK_NOFOLLOW,
    )?))
}

/// Opens `name` in `dir` for reading, without following a link and without blocking on a
/// FIFO; the caller checks the [`FileInfo`] before reading.
pub(crate) fn open_read_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<(File, FileInfo)> {
    let fd = rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(no_follow)?;
    let info = info(&fd)?;
    Ok((File::from(fd), info))
}

/// Creates `name` in `dir`, failing if anything (a link included) has that name, with
/// exactly `mode` (the umask does not apply): for writing when `write`, else for reading.
pub(crate) fn create_new_at(
    dir: BorrowedFd<'_>,
    name: &str,
    mode: u32,
    write: bool,
) -> io::Result<File> {
    let access = if write {
        OFlags::WRONLY
    } else {
        OFlags::RDONLY
    };
    let fd = rustix::fs::openat(
        dir,
        name,
        access | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(mode),
    )?;
    rustix::fs::fchmod(&fd, Mode::from_raw_mode(mode))?;
    Ok(File::from(fd))
}

/// Renames `from` to `to` within `dir`, replacing `to` (a link itself, never its target).
pub(crate) fn rename_at(dir: BorrowedFd<'_>, from: &str, to: &str) -> io::Result<()> {
    Ok(rustix::fs::renameat(dir, from, dir, to)?)
}

/// Removes the file `name` from `dir`.
pub(crate) fn unlink_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<()> {
    Ok(rustix::fs::unlinkat(dir, name, AtFlags::empty())?)
}

/// Flushes a file, or a directory's entries, to the disk.
pub(crate) fn sync(fd: impl AsFd) -> io::Result<()> {
    Ok(rustix::fs::fsync(fd)?)
}

/// The names in `dir` (those that are UTF-8; `.` and `..` left out).
pub(crate) fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in rustix::fs::Dir::read_from(dir)? {
        let entry = entry?;
        if let Ok(name) = entry.file_name().to_str() {
            if name != "." && name != ".." {
                names.push(name.to_string());
            }
        }
    }
    Ok(names)
}
