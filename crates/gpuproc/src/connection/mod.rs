//! Connections between programs, over Unix sockets or TCP, with an authkey: Python's
//! `multiprocessing.connection` (`Listener`, `Client`).
//!
//! A [`Listener`] is bound to an [`Address`] and [`accept`](Listener::accept)s connections;
//! [`Client::connect`] connects to one. Both sides return a [`Connection`], whose API is that
//! of a [`Pipe`](crate::channel::Pipe)'s ends: serde values with `send`/`recv`, raw bytes
//! with `send_bytes`/`recv_bytes`, `_timeout` forms, `poll`.
//!
//! ```
//! use gpuproc::connection::{Client, Listener};
//! use std::time::Duration;
//!
//! let dir = std::env::temp_dir().join(format!("gpuproc-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir)?;
//! let listener = Listener::bind(dir.join("sock"), b"secret password")?;
//! let address = listener.address().clone();
//!
//! let client = std::thread::spawn(move || -> Result<(), gpuproc::connection::ConnectionError> {
//!     let conn = Client::connect_timeout(address, b"secret password", Duration::from_secs(10))?;
//!     conn.send(&vec![1.5f64, 2.5])?;
//!     conn.send_bytes(b"raw bytes")?;
//!     assert_eq!(conn.recv_timeout::<String>(Duration::from_secs(10))?, "thanks");
//!     Ok(())
//! });
//!
//! let conn = listener.accept_timeout(Duration::from_secs(10))?;
//! let values: Vec<f64> = conn.recv_timeout(Duration::from_secs(10))?;
//! assert_eq!(values, [1.5, 2.5]);
//! assert_eq!(conn.recv_bytes_timeout(Duration::from_secs(10))?, b"raw bytes");
//! conn.send("thanks")?;
//! client.join().unwrap()?;
//! listener.close(); // removes the socket file
//! std::fs::remove_dir(&dir)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Authentication
//!
//! With an authkey, both sides prove that they hold it before [`accept`](Listener::accept)
//! or [`connect`](Client::connect) return, with Python's handshake (CPython 3.12 and later):
//! the listener sends 40 random bytes, the client answers with their HMAC-SHA256 under the
//! authkey, then the client challenges the listener the same way. The key itself never
//! crosses the wire, and a recorded handshake cannot be replayed (each challenge is new).
//! Peers running Python 3.11 or older speak the legacy form of the same handshake
//! (HMAC-MD5): it is accepted, as Python 3.12 accepts it, unless turned off with
//! [`ListenerBuilder::allow_md5`]/[`ClientBuilder::allow_md5`]. A failed handshake is a
//! [`ConnectionError::Authentication`] error (Python's `AuthenticationError`) on both sides;
//! the listener stays open and its next `accept` works.
//!
//! # Talking to Python
//!
//! Messages are framed as Python frames them, so `send_bytes`/`recv_bytes` interoperate
//! with Python's `Listener`, `Client` and their connections both ways, with the same
//! authkey. `send`/`recv` encode values with postcard, not pickle: a Python peer sees them
//! as bytes (and a pickled object from Python does not decode as a Rust value), so exchange
//! bytes with Python programs, in a format both sides know.
//!
//! # What a hostile peer can and cannot do
//!
//! Before the handshake is complete, every message read is at most 256 bytes long (a
//! larger one is refused from its length alone, nothing is allocated for it), at most three
//! messages are read, and the whole handshake must end within the handshake timeout (20 s
//! by default, [`ListenerBuilder::handshake_timeout`]). So a peer without the key can make
//! one `accept` call fail after at most that long, and no more: it cannot make the listener
//! allocate, hang, or accept it. `accept` serves one client at a time, as Python's does, so
//! such a peer delays the clients queued behind it by at most the handshake timeout. A
//! client that waits for a listener's part of the handshake is bounded the same way.
//!
//! After the handshake a peer is trusted as far as the data goes: an incoming message may
//! be as large as [`max_message_size`](ListenerBuilder::max_message_size) (4 GiB by
//! default); a length announced over it is refused before anything is allocated, and the
//! memory for a message grows only as its bytes arrive.
//!
//! A peer on the network can still read and change the data: nothing is encrypted, and
//! only the handshake is authenticated (as in Python). Use a Unix socket, a private network,
//! or a tunnel (SSH, WireGuard) for data that must stay secret.
//!
//! # Differences from Python
//!
//! - A TCP listener or client needs an authkey ([`ConnectionError::AuthkeyRequired`]):
//!   Python falls back to `current_process().authkey` when none is given, which another
//!   program does not share; gpuproc has no process-wide key and refuses instead. An empty
//!   key is refused for TCP too. Unix sockets may go without one, as in Python: a socket
//!   file is guarded by its permissions, but a Linux abstract name has none (any process in
//!   the same network namespace can connect), so give an abstract listener a key.
//! - Values are postcard, not pickle (see above); only bytes interoperate with Python.
//! - Values that hold file descriptors (pipes, queues, locks, shared memory) cannot be sent
//!   ([`ConnectionError::CarriesDescriptors`]); Python refuses some of them (queues and
//!   locks are shared "only through inheritance") and pickles others into handles that work
//!   only on the same machine.
//! - Every call that waits has a timeout form, and the handshake always has one.
//! - A listener's Unix socket file is removed when the listener is closed or dropped (only
//!   if the file is still the one it made), as Python removes it at `close()`.
//! - Host names resolve to IPv4 and then IPv6 addresses (Python uses IPv4 only).

mod address;
mod auth;
mod error;
mod frame;
mod stream;
mod wait;

use std::fmt;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

pub use self::address::Address;
pub use self::error::ConnectionError;
pub use self::stream::Connection;
pub use self::wait::{wait, wait_indices, Waitable};

use self::auth::Policy;
use self::stream::Wait;
use crate::sys::net;

/// How long the whole handshake may take, unless set otherwise.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(20);

/// A listener's default backlog (Python's default is 1; pending connections beyond the
/// backlog wait in the client's `connect`).
pub const DEFAULT_BACKLOG: u32 = 128;

/// An authkey, kept out of `Debug` output.
#[derive(Clone, Default)]
struct Authkey(Option<Vec<u8>>);

impl fmt::Debug for Authkey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self.0 {
            Some(_) => "Some(<hidden>)",
            None => "None",
        })
    }
}

/// The settings both sides share.
#[derive(Debug, Clone)]
struct Settings {
    authkey: Authkey,
    handshake_timeout: Duration,
    max_message_size: usize,
    policy: Policy,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            authkey: Authkey(None),
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_message_size: Connection::default_max(),
            policy: Policy::default(),
        }
    }
}

impl Settings {
    fn check(&self, address: &Address, side: &'static str) -> Result<(), ConnectionError> {
        let keyless = self.authkey.0.as_ref().is_none_or(|k| k.is_empty());
        if address.is_tcp() && keyless {
            return Err(ConnectionError::AuthkeyRequired {
                side,
                address: address.to_string(),
            });
        }
        Ok(())
    }

    /// Runs the handshake on a new connection (`serve`: the listener's side), within the
    /// handshake timeout and never past `deadline`.
    fn handshake(
        &self,
        conn: &Connection,
        serve: bool,
        deadline: Option<Instant>,
    ) -> Result<(), ConnectionError> {
        let Some(key) = &self.authkey.0 else {
            return Ok(());
        };
        let message = auth::new_message()?;
        let own = crate::time::deadline(self.handshake_timeout);
        let deadline = match (own, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let mut t = PreAuth {
            conn,
            deadline,
            limit: crate::time::remaining(deadline).unwrap_or(Duration::MAX),
        };
        if serve {
            auth::serve(&mut t, key, &message, self.policy)
        } else {
            auth::client(&mut t, key, &message, self.policy)
        }
    }
}

/// The handshake's transport: the connection, with the pre-authentication size limit on
/// what is read, and one deadline for the whole handshake.
struct PreAuth<'a> {
    conn: &'a Connection,
    deadline: Option<Instant>,
    /// The time the handshake was given, for messages.
    limit: Duration,
}

impl PreAuth<'_> {
    fn wait(&self) -> Wait {
        match crate::time::remaining(self.deadline) {
            Some(left) => Wait::at_most(left, "the peer's part of the handshake"),
            None => Wait::Forever,
        }
    }

    fn failed(&self, e: ConnectionError) -> ConnectionError {
        match e {
            ConnectionError::Timeout { .. } => ConnectionError::Authentication(format!(
                "the peer did not complete the handshake within {:?}",
                self.limit
            )),
            ConnectionError::Disconnected => ConnectionError::Authentication(
                "the peer closed the connection during the handshake".into(),
            ),
            ConnectionError::Malformed(why) => ConnectionError::Authentication(format!(
                "the peer sent a malformed message during the handshake: {why}"
            )),
            other => other,
        }
    }
}

impl auth::Transport for PreAuth<'_> {
    fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
        // Our own handshake messages are small: the connection's size limit is not theirs.
        self.conn
            .send_frame(bytes, self.wait(), usize::MAX)
            .map_err(|e| self.failed(e))
    }

    fn recv(&mut self) -> Result<Vec<u8>, ConnectionError> {
        self.conn
            .recv_frame(self.wait(), auth::MAX_PREAUTH)
            .map_err(|e| match e {
                ConnectionError::TooLarge { size, limit } => {
                    ConnectionError::Authentication(format!(
                        "the peer sent a message of {size} bytes during the handshake, where \
                         at most {limit} are allowed"
                    ))
                }
                e => self.failed(e),
            })
    }
}

/// A bound socket that accepts connections; Python's `multiprocessing.connection.Listener`.
///
/// See the [module documentation](self) for an example, the handshake and its limits.
/// Dropping (or [`close`](Self::close)) stops listening; connections already accepted stay
/// open.
#[doc(alias = "multiprocessing.connection.Listener")]
pub struct Listener {
    sock: OwnedFd,
    address: Address,
    settings: Settings,
    /// The socket file to remove at the end, and its identity.
    unlink: Option<(PathBuf, (u64, u64))>,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("address", &self.address)
            .field("authkey", &self.settings.authkey)
            .field("handshake_timeout", &self.settings.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Listener {
    /// Binds to `address` with `authkey`; Python's `Listener(address, authkey=authkey)`.
    ///
    /// Every client must prove it holds the same key (see the [module documentation](self)).
    /// For a Unix socket without a key, or other settings, use [`builder`](Self::builder).
    pub fn bind(address: impl Into<Address>, authkey: &[u8]) -> Result<Listener, ConnectionError> {
        Listener::builder(address).authkey(authkey).bind()
    }

    /// A listener with settings: backlog, handshake timeout, message size limit, whether
    /// an authkey is required.
    pub fn builder(address: impl Into<Address>) -> ListenerBuilder {
        ListenerBuilder {
            address: address.into(),
            backlog: DEFAULT_BACKLOG,
            settings: Settings::default(),
        }
    }

    /// The address it listens on, with the real port where port 0 was asked for; Python's
    /// `listener.address`.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Waits for a client to connect and (with an authkey) to pass the handshake; Python's
    /// `listener.accept()`.
    ///
    /// A client that fails the handshake, or stalls in it longer than the handshake
    /// timeout, is a [`ConnectionError::Authentication`] error: its connection is closed,
    /// the listener stays open, and the next call takes the next client.
    pub fn accept(&self) -> Result<Connection, ConnectionError> {
        self.accept_until(None, Duration::MAX)
    }

    /// [`accept`](Self::accept), giving up after `timeout` in all (waiting for a client and
    /// its handshake): [`ConnectionError::Timeout`] when no client came, an
    /// authentication error when one came and did not finish the handshake in time.
    pub fn accept_timeout(&self, timeout: Duration) -> Result<Connection, ConnectionError> {
        self.accept_until(crate::time::deadline(timeout), timeout)
    }

    fn accept_until(
        &self,
        deadline: Option<Instant>,
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        let tcp = self.address.is_tcp();
        let sock = loop {
            let ready = crate::sys::wait_ready(self.sock.as_fd(), false, deadline)
                .map_err(ConnectionError::io("waiting for a connection"))?;
            if !ready {
                return Err(ConnectionError::Timeout {
                    waiting_for: "a client to connect",
                    after: timeout,
                });
            }
            if let Some(sock) = net::accept(self.sock.as_fd(), tcp).map_err(ConnectionError::io(
                format!("accepting a connection on {}", self.address),
            ))? {
                break sock;
            }
        };
        let conn = Connection::new(sock, self.settings.max_message_size);
        self.settings.handshake(&conn, true, deadline)?;
        Ok(conn)
    }

    /// Stops listening (and removes a Unix socket file); Python's `listener.close()`. The
    /// same as dropping it.
    pub fn close(self) {}
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Some((path, id)) = self.unlink.take() {
            net::unlink_if_same(&path, id);
        }
    }
}

/// Python's `listener._listener._socket.fileno()`: the listening socket, to wait on.
impl AsFd for Listener {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.sock.as_fd()
    }
}

/// Settings of a [`Listener`]; from [`Listener::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .bind()"]
pub struct ListenerBuilder {
    address: Address,
    backlog: u32,
    settings: Settings,
}

impl ListenerBuilder {
    /// The key every client must prove it holds (required for TCP).
    pub fn authkey(mut self, key: &[u8]) -> Self {
        self.settings.authkey = Authkey(Some(key.to_vec()));
        self
    }

    /// How many connections may wait to be accepted (default [`DEFAULT_BACKLOG`]; Python's
    /// `backlog`, default 1).
    pub fn backlog(mut self, backlog: u32) -> Self {
        self.backlog = backlog;
        self
    }

    /// How long the whole handshake with a client may take (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]); a client that takes longer is an authentication
    /// error.
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.settings.handshake_timeout = timeout;
        self
    }

    /// The largest message the accepted connections send or accept (default 4 GiB); see
    /// [`Connection::with_max_message_size`].
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.settings.max_message_size = bytes;
        self
    }

    /// Whether clients may answer with the legacy HMAC-MD5 of Python 3.11 and older
    /// (default `true`, as in Python 3.12 and later). With `false`, only the `{digest}`
    /// form (SHA-256 and the other SHA-2/SHA-3 digests Python allows) passes.
    pub fn allow_md5(mut self, allow: bool) -> Self {
        self.settings.policy.allow_md5 = allow;
        self
    }

    /// Binds and listens.
    pub fn bind(self) -> Result<Listener, ConnectionError> {
        let ListenerBuilder {
            address,
            backlog,
            settings,
        } = self;
        settings.check(&address, "listener")?;
        let backlog = i32::try_from(backlog).unwrap_or(i32::MAX);
        let bind_error = || format!("cannot listen on {address}");
        if let Some(name) = address.unix_name()? {
            let sock =
                net::listen_unix(name, backlog).map_err(ConnectionError::io(bind_error()))?;
            let unlink = match &address {
                Address::Unix(p) => net::file_id(p).map(|id| (p.clone(), id)),
                _ => None,
            };
            return Ok(Listener {
                sock,
                address,
                settings,
                unlink,
            });
        }
        let mut last = None;
        for addr in address.resolve()? {
            match net::listen_tcp(addr, backlog) {
                Ok((sock, local)) => {
                    return Ok(Listener {
                        sock,
                        address: Address::from(local),
                        settings,
                        unlink: None,
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ConnectionError::Io {
            context: bind_error(),
            source: last.unwrap_or_else(|| std::io::ErrorKind::AddrNotAvailable.into()),
        })
    }
}

/// Connects to a [`Listener`] (gpuproc's or Python's); Python's
/// `multiprocessing.connection.Client`.
///
/// ```no_run
/// use gpuproc::connection::Client;
/// // A Python program ran: Listener(("127.0.0.1", 6000), authkey=b"secret")
/// let conn = Client::connect(("127.0.0.1", 6000), b"secret")?;
/// conn.send_bytes(b"hello")?;
/// println!("{:?}", conn.recv_bytes()?);
/// # Ok::<(), gpuproc::connection::ConnectionError>(())
/// ```
#[derive(Debug)]
#[doc(alias = "multiprocessing.connection.Client")]
pub enum Client {}

impl Client {
    /// Connects to `address` and runs the handshake with `authkey`; Python's
    /// `Client(address, authkey=authkey)`.
    pub fn connect(
        address: impl Into<Address>,
        authkey: &[u8],
    ) -> Result<Connection, ConnectionError> {
        Client::builder(address).authkey(authkey).connect()
    }

    /// [`connect`](Self::connect), giving up after `timeout` in all (connecting and the
    /// handshake).
    pub fn connect_timeout(
        address: impl Into<Address>,
        authkey: &[u8],
        timeout: Duration,
    ) -> Result<Connection, ConnectionError> {
        Client::builder(address)
            .authkey(authkey)
            .timeout(timeout)
            .connect()
    }

    /// A client with settings: no authkey (Unix sockets only), timeouts, message size
    /// limit.
    pub fn builder(address: impl Into<Address>) -> ClientBuilder {
        ClientBuilder {
            address: address.into(),
            timeout: Duration::MAX,
            settings: Settings::default(),
        }
    }
}

/// Settings of a [`Client`] connection; from [`Client::builder`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until .connect()"]
pub struct ClientBuilder {
    address: Address,
    timeout: Duration,
    settings: Settings,
}

impl ClientBuilder {
    /// The key to prove to the listener, and to expect it to prove (required for TCP).
    pub fn authkey(mut self, key: &[u8]) -> Self {
        self.settings.authkey = Authkey(Some(key.to_vec()));
        self
    }

    /// The longest [`connect`](Self::connect) waits in all (default: no limit but the
    /// handshake timeout, and the system's own for making a TCP connection). Resolving a
    /// host name is not bounded by it.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// How long the whole handshake with the listener may take (default
    /// [`DEFAULT_HANDSHAKE_TIMEOUT`]).
    pub fn handshake_timeout(mut self, timeout: Duration) -> Self {
        self.settings.handshake_timeout = timeout;
        self
    }

    /// The largest message the connection sends or accepts (default 4 GiB).
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.settings.max_message_size = bytes;
        self
    }

    /// Whether a listener may use the legacy HMAC-MD5 handshake of Python 3.11 and older
    /// (default `true`); see [`ListenerBuilder::allow_md5`].
    pub fn allow_md5(mut self, allow: bool) -> Self {
        self.settings.policy.allow_md5 = allow;
        self
    }

    /// Connects, and runs the handshake when there is an authkey.
    pub fn connect(self) -> Result<Connection, ConnectionError> {
        let ClientBuilder {
            address,
            timeout,
            settings,
        } = self;
        settings.check(&address, "client")?;
        let deadline = crate::time::deadline(timeout);
        let io_error = |source| ConnectionError::Io {
            context: format!("cannot connect to {address}"),
            source,
        };
        let sock = if let Some(name) = address.unix_name()? {
            net::connect_unix(name, deadline).map_err(io_error)?
        } else {
            // Each address in turn (IPv4 first) until one answers; the deadline is shared.
            let mut result = Err(std::io::ErrorKind::AddrNotAvailable.into());
            for addr in address.resolve()? {
                result = net::connect_tcp(addr, deadline);
                if result.is_ok() {
                    break;
                }
            }
            result.map_err(io_error)?
        };
        let Some(sock) = sock else {
            return Err(ConnectionError::Timeout {
                waiting_for: "the connection to be made",
                after: timeout,
            });
        };
        let conn = Connection::new(sock, settings.max_message_size);
        settings.handshake(&conn, false, deadline)?;
        Ok(conn)
    }
}
