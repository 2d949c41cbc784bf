//! The resource tracker: Python's `multiprocessing.resource_tracker`. It unlinks the named
//! shared memory blocks (and so [`ShareableList`](super::ShareableList)s) that a process
//! created and could not unlink itself because it was killed (SIGKILL, SIGTERM, ...).
//!
//! A program that creates a named block starts, with the first one, a small tracker process
//! (this same executable, started as gpuproc starts its other helpers) and keeps one end of
//! a socket pair to it. The creator tells the tracker each block it creates and each it
//! unlinks, one line per message. Processes forked from the creator share its tracker (they
//! inherit the socket, as in Python); processes started with `spawn` or the fork server get
//! a tracker of their own when they create a block. When every process holding the socket
//! is gone (the tracker reads end of file), the tracker unlinks the blocks still
//! registered, prints a warning naming them on standard error, and exits. It ignores SIGINT
//! and SIGTERM, as Python's does, so that a Ctrl-C or a `terminate` of the whole process
//! group still leaves it to clean up.
//!
//! The tracker starts only in programs that called [`init`](crate::init) (it is this same
//! executable run again, which must recognise its role); without `init`, named blocks are
//! not tracked.
//!
//! What other local users can and cannot do with `/dev/shm` names is documented on
//! [`SharedMemory`](super::SharedMemory) ("Resource tracker").

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Mutex;

use crate::sys;

/// The first argument of a tracker process.
pub(crate) const ARG: &str = "--gpuproc-resource-tracker";
/// The environment variable carrying the tracker's end of the socket.
pub(crate) const FD_ENV: &str = "GPUPROC_RESOURCE_TRACKER_FD";
/// How long a new tracker may take to start.
const START_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// The longest message line read; longer ones are dropped whole.
const MAX_LINE: usize = 1024;

/// A message from a creator to its tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Msg {
    /// A block was created (its name, device and inode).
    Register(String, (u64, u64)),
    /// A block was unlinked, or its creator stopped owning the name.
    Unregister(String, (u64, u64)),
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl Msg {
    /// One line: `R` or `U`, the device, the inode, and the name in hex (names may hold
    /// spaces and newlines).
    pub fn encode(&self) -> Vec<u8> {
        let (op, name, (dev, ino)) = match self {
            Msg::Register(n, id) => ('R', n, id),
            Msg::Unregister(n, id) => ('U', n, id),
        };
        format!("{op} {dev} {ino} {}\n", hex(name.as_bytes())).into_bytes()
    }

    /// Parses one line (without its newline); `None` for anything malformed, including a
    /// name that [`check_name`](super::check_name) refuses.
    pub fn parse(line: &[u8]) -> Option<Msg> {
        let line = std::str::from_utf8(line).ok()?;
        let mut parts = line.split(' ');
        let op = parts.next()?;
        let dev: u64 = parts.next()?.parse().ok()?;
        let ino: u64 = parts.next()?.parse().ok()?;
        let name = String::from_utf8(unhex(parts.next()?)?).ok()?;
        if parts.next().is_some() || super::check_name(&name).ok()? != name {
            return None;
        }
        match op {
            "R" => Some(Msg::Register(name, (dev, ino))),
            "U" => Some(Msg::Unregister(name, (dev, ino))),
            _ => None,
        }
    }
}

/// What a tracker knows: the blocks registered and not unregistered, and a partial line.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    blocks: BTreeSet<(String, u64, u64)>,
    line: Vec<u8>,
    /// The current line is too long: drop it up to its newline.
    skipping: bool,
}

impl Registry {
    /// Takes bytes read from the socket.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                if !self.skipping {
                    if let Some(msg) = Msg::parse(&self.line) {
                        self.apply(msg);
                    }
                }
                self.line.clear();
                self.skipping = false;
            } else if self.line.len() >= MAX_LINE {
                self.line.clear();
                self.skipping = true;
            } else if !self.skipping {
                self.line.push(b);
            }
        }
    }

    fn apply(&mut self, msg: Msg) {
        match msg {
            Msg::Register(name, (dev, ino)) => {
                self.blocks.insert((name, dev, ino));
            }
            Msg::Unregister(name, (dev, ino)) => {
                self.blocks.remove(&(name, dev, ino));
            }
        }
    }

    /// The blocks left registered.
    pub fn left(&self) -> impl Iterator<Item = (&str, (u64, u64))> {
        self.blocks
            .iter()
            .map(|(n, dev, ino)| (n.as_str(), (*dev, *ino)))
    }
}

/// The warning for blocks the tracker unlinked (Python: "resource_tracker: There appear to
/// be N leaked shared_memory objects to clean up at shutdown").
pub(crate) fn warning(names: &[String]) -> String {
    format!(
        "gpuproc resource tracker: {} shared memory block{} left by a process that ended \
         without unlinking {}, unlinked now: {}",
        names.len(),
        if names.len() == 1 { "" } else { "s" },
        if names.len() == 1 { "it" } else { "them" },
        names.join(", ")
    )
}

/// Runs the tracker on its end of the socket until every creator is gone; never returns.
pub(crate) fn serve(sock: OwnedFd) -> ! {
    sys::ignore_interrupts();
    sys::set_process_name("gpuproc-tracker");
    // Tells the creator that the socket is adopted: from here on, its death is seen.
    let _ = sys::send_all(sock.as_fd(), &[b"+"], &[]);
    let mut registry = Registry::default();
    let mut buf = [0u8; 4096];
    // End of file (or an error, which means the same: nobody will write again).
    while let Ok(n @ 1..) = sys::read_some(sock.as_fd(), &mut buf) {
        registry.feed(&buf[..n]);
    }
    let mut unlinked = Vec::new();
    for (name, id) in registry.left() {
        if let Ok(true) = super::sys::shm_unlink_if(name, id) {
            unlinked.push(name.to_string());
        }
    }
    if !unlinked.is_empty() {
        eprintln!("{}", warning(&unlinked));
    }
    sys::exit_now(0)
}

/// This program's tracker: the socket to it and its pid.
#[derive(Debug)]
struct Client {
    sock: OwnedFd,
    pid: u32,
}

static CLIENT: Mutex<Option<Client>> = Mutex::new(None);

fn start() -> std::io::Result<Client> {
    let (ours, theirs) = sys::socketpair()?;
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new("/proc/self/exe");
    if let Some(arg0) = std::env::args_os().next() {
        cmd.arg0(arg0);
    }
    cmd.arg(ARG)
        .env(FD_ENV, raw.to_string())
        .env_remove(crate::process::CHILD_FD_ENV)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only makes one fcntl system call on
    // a descriptor this process owns, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            let fd = std::os::fd::BorrowedFd::borrow_raw(raw);
            sys::clear_cloexec(fd)
        });
    }
    let child = cmd.spawn()?;
    // The tracker outlives us (init reaps it); std's handle neither waits nor kills on drop.
    let pid = child.id();
    drop(child);
    drop(theirs);
    // Wait for it to adopt its socket: a tracker whose creator died before that refuses
    // the socket (it cannot tell it from a stray one), and would clean up nothing.
    let ready = sys::poll_readable(&[ours.as_fd()], crate::time::deadline(START_TIMEOUT))?;
    let mut byte = [0u8; 1];
    if ready.first() != Some(&true) || sys::read_some(ours.as_fd(), &mut byte)? != 1 {
        return Err(std::io::Error::other(format!(
            "the tracker (pid {pid}) did not answer within {START_TIMEOUT:?}"
        )));
    }
    Ok(Client { sock: ours, pid })
}

/// Sends `msg` to this program's tracker, starting it if needed. Failures are printed (the
/// block then is not tracked), never fatal.
fn send(msg: Msg, start_if_needed: bool) {
    if !crate::process::initialized() {
        return;
    }
    let mut client = CLIENT.lock().unwrap_or_else(|p| p.into_inner());
    if client.is_none() {
        if !start_if_needed {
            return;
        }
        match start() {
            Ok(c) => *client = Some(c),
            Err(e) => {
                eprintln!("gpuproc: cannot start the resource tracker: {e}; named shared memory is not tracked");
                return;
            }
        }
    }
    let Some(c) = client.as_ref() else { return };
    if let Err(e) = sys::send_all(c.sock.as_fd(), &[&msg.encode()], &[]) {
        eprintln!("gpuproc: cannot reach the resource tracker: {e}");
    }
}

/// Registers a block this process created.
pub(crate) fn register(name: &str, id: (u64, u64)) {
    send(Msg::Register(name.to_string(), id), true);
}

/// Unregisters a block (unlinked, or no longer owned).
pub(crate) fn unregister(name: &str, id: (u64, u64)) {
    send(Msg::Unregister(name.to_string(), id), false);
}

/// The pid of this program's tracker, once started.
pub(crate) fn pid() -> Option<u32> {
    CLIENT
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|c| c.pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        for msg in [
            Msg::Register("psm_1".into(), (1, 2)),
            Msg::Unregister("a name\nwith space".into(), (u64::MAX, 0)),
        ] {
            let line = msg.encode();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Msg::parse(&line[..line.len() - 1]), Some(msg));
        }
    }

    #[test]
    fn malformed_lines_are_ignored() {
        for bad in [
            &b""[..],
            b"R",
            b"R 1 2",
            b"X 1 2 61",
            b"R x 2 61",
            b"R 1 2 6",
            b"R 1 2 zz",
            b"R 1 2 61 extra",
            b"R 1 2 2f6574632f706173737764", // "/etc/passwd"
            b"R 1 2 2e2e",                   // ".."
            b"R 1 2 ",
            b"\xff\xfe",
        ] {
            assert_eq!(Msg::parse(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_registry_keeps_what_was_not_unregistered() {
        let mut r = Registry::default();
        let mut bytes = Vec::new();
        for i in 0..3u64 {
            bytes.extend(Msg::Register(format!("b{i}"), (1, i)).encode());
        }
        bytes.extend(Msg::Unregister("b1".into(), (1, 1)).encode());
        // Unregistering with another identity leaves the block registered.
        bytes.extend(Msg::Unregister("b2".into(), (1, 99)).encode());
        bytes.extend(vec![b'x'; 5000]);
        bytes.extend(b"\nR 1 2 garbage\n");
        // Fed in pieces that split lines.
        for piece in bytes.chunks(7) {
            r.feed(piece);
        }
        let left: Vec<_> = r.left().map(|(n, _)| n.to_string()).collect();
        assert_eq!(left, ["b0", "b2"]);
        assert!(warning(&left).contains("2 shared memory blocks"));
        assert!(warning(&left).ends_with("b0, b2"));
    }
}
