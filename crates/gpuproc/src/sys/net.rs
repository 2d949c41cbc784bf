//! Listening and connected stream sockets for [`connection`](crate::connection): Unix
//! sockets (a path or a Linux abstract name) and TCP, with deadlines on connecting, and
//! non-blocking reads straight into a `Vec`'s spare capacity.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::io::Errno;
use rustix::net::{sockopt, AddressFamily, RecvFlags, SocketAddrUnix, SocketFlags, SocketType};

use super::Received;

/// The addresses `host` resolves to (through the C library's resolver), IPv4 ones first.
pub(crate) fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    use std::net::ToSocketAddrs;
    let mut addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    // Stable: the resolver's order is kept within each family.
    addrs.sort_by_key(|a| a.is_ipv6());
    addrs.dedup();
    Ok(addrs)
}

/// Where a Unix socket lives: a file system path, or a name in Linux's abstract namespace
/// (without the leading NUL byte).
#[derive(Debug, Clone, Copy)]
pub(crate) enum UnixName<'a> {
    Path(&'a Path),
    Abstract(&'a [u8]),
}

fn unix_addr(name: UnixName<'_>) -> io::Result<SocketAddrUnix> {
    let addr = match name {
        UnixName::Path(p) => SocketAddrUnix::new(p),
        UnixName::Abstract(n) => SocketAddrUnix::new_abstract_name(n),
    };
    addr.map_err(|e| match e {
        Errno::NAMETOOLONG => io::Error::new(
            io::ErrorKind::InvalidInput,
            "a Unix socket address has room for a path of at most 108 bytes, or an abstract \
             name of at most 107",
        ),
        Errno::INVAL => io::Error::new(
            io::ErrorKind::InvalidInput,
            "a Unix socket path cannot contain a NUL byte",
        ),
        e => e.into(),
    })
}

fn stream_socket(family: AddressFamily, nonblocking: bool) -> io::Result<OwnedFd> {
    let mut flags = SocketFlags::CLOEXEC;
    if nonblocking {
        flags |= SocketFlags::NONBLOCK;
    }
    Ok(rustix::net::socket_with(
        family,
        SocketType::STREAM,
        flags,
        None,
    )?)
}

/// A non-blocking listening Unix stream socket bound to `name`.
pub(crate) fn listen_unix(name: UnixName<'_>, backlog: i32) -> io::Result<OwnedFd> {
    let addr = unix_addr(name)?;
    let sock = stream_socket(AddressFamily::UNIX, true)?;
    rustix::net::bind(&sock, &addr)?;
    rustix::net::listen(&sock, backlog)?;
    Ok(sock)
}

/// A non-blocking listening TCP socket bound to `addr` (with `SO_REUSEADDR`, as Python's
/// listeners have on Unix), and the address it got (the port the kernel picked for port 0).
pub(crate) fn listen_tcp(addr: SocketAddr, backlog: i32) -> io::Result<(OwnedFd, SocketAddr)> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let sock = stream_socket(family, true)?;
    sockopt::set_socket_reuseaddr(&sock, true)?;
    rustix::net::bind(&sock, &addr)?;
    rustix::net::listen(&sock, backlog)?;
    let local = SocketAddr::try_from(rustix::net::getsockname(&sock)?)
        .map_err(|_| io::Error::other("getsockname returned a non-IP address"))?;
    Ok((sock, local))
}

/// Accepts one pending connection without blocking (`None` when none is waiting). The new
/// socket is blocking and close-on-exec; a TCP one has `TCP_NODELAY`, since every message
/// is written whole.
pub(crate) fn accept(listener: BorrowedFd<'_>, tcp: bool) -> io::Result<Option<OwnedFd>> {
    loop {
        match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(sock) => {
                if tcp {
                    // Best effort: without it messages still arrive, a little later.
                    let _ = sockopt::set_tcp_nodelay(&sock, true);
                }
                return Ok(Some(sock));
            }
            Err(Errno::INTR) => continue,
            // The client gave up between poll and accept: nothing to take.
            Err(Errno::AGAIN) | Err(Errno::CONNABORTED) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
}

/// Connects to a Unix socket, waiting while the listener's backlog is full, at most until
/// `deadline` (`Ok(None)` when it passed first).
pub(crate) fn connect_unix(
    name: UnixName<'_>,
    deadline: Option<Instant>,
) -> io::Result<Option<OwnedFd>> {
    let addr = unix_addr(name)?;
    let sock = stream_socket(AddressFamily::UNIX, false)?;
    // A Unix connect waits while the backlog is full; SO_SNDTIMEO bounds that wait.
    let left = crate::time::remaining(deadline);
    if let Some(left) = left {
        if left.is_zero() {
            return Ok(None);
        }
        const YEAR: Duration = Duration::from_secs(365 * 86_400);
        sockopt::set_socket_timeout(&sock, sockopt::Timeout::Send, Some(left.min(YEAR)))?;
    }
    loop {
        match rustix::net::connect(&sock, &addr) {
            Ok(()) => break,
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) | Err(Errno::INPROGRESS) => return Ok(None),
            Err(e) => return Err(e.into()),
        }
    }
    if left.is_some() {
        sockopt::set_socket_timeout(&sock, sockopt::Timeout::Send, None)?;
    }
    Ok(Some(sock))
}

/// Connects to a TCP address, giving up at `deadline` (`Ok(None)`). The socket is blocking,
/// with `TCP_NODELAY`.
pub(crate) fn connect_tcp(
    addr: SocketAddr,
    deadline: Option<Instant>,
) -> io::Result<Option<OwnedFd>> {
    let family = match addr {
        SocketAddr::V4(_) => AddressFamily::INET,
        SocketAddr::V6(_) => AddressFamily::INET6,
    };
    let sock = stream_socket(family, true)?;
    match rustix::net::connect(&sock, &addr) {
        Ok(()) => {}
        Err(Errno::INPROGRESS) | Err(Errno::INTR) => {
            if !super::wait_ready(sock.as_fd(), true, deadline)? {
                return Ok(None);
            }
            if let Err(e) = sockopt::socket_error(&sock)? {
                return Err(e.into());
            }
        }
        Err(e) => return Err(e.into()),
    }
    let _ = sockopt::set_tcp_nodelay(&sock, true);
    set_blocking(sock.as_fd())?;
    Ok(Some(sock))
}

fn set_blocking(fd: BorrowedFd<'_>) -> io::Result<()> {
    let flags = rustix::fs::fcntl_getfl(fd)?;
    rustix::fs::fcntl_setfl(fd, flags - rustix::fs::OFlags::NONBLOCK)?;
    Ok(())
}

/// Receives at most `max` bytes (at least one is asked for) without blocking, appending them
/// to `buf` in its spare capacity (reserved first, so nothing is zero-filled). Never reads
/// past `max`: on a stream the next message may follow at once.
pub(crate) fn recv_append(
    sock: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    max: usize,
) -> io::Result<Received> {
    let max = max.max(1);
    buf.reserve(max);
    loop {
        let before = buf.len();
        let spare = &mut buf.spare_capacity_mut()[..max];
        match rustix::net::recv(sock, spare, RecvFlags::DONTWAIT) {
            Ok((([], _), _)) => return Ok(Received::Eof),
            Ok(((filled, _), _)) => {
                let n = filled.len();
                // SAFETY: `recv` initialised the first `n` bytes of the spare capacity.
                unsafe { buf.set_len(before + n) };
                return Ok(Received::Data(n));
            }
            Err(Errno::INTR) => continue,
            Err(Errno::AGAIN) => return Ok(Received::WouldBlock),
            Err(Errno::CONNRESET) => return Ok(Received::Eof),
            Err(e) => return Err(e.into()),
        }
    }
}

/// The device and inode of the file at `path`, if there is one (no links followed).
pub(crate) fn file_id(path: &Path) -> Option<(u64, u64)> {
    let st = rustix::fs::lstat(path).ok()?;
    Some((st.st_dev, st.st_ino))
}

/// Removes the socket file at `path` if it is still the one with identity `id`.
pub(crate) fn unlink_if_same(path: &Path, id: (u64, u64)) {
    if file_id(path) == Some(id) {
        let _ = std::fs::remove_file(path);
    }
}
