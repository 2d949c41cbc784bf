//! [`Address`]: where a listener listens and a client connects.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::ConnectionError;
use crate::sys::net::UnixName;

/// Where a [`Listener`](super::Listener) listens and a [`Client`](super::Client) connects:
/// Python's `multiprocessing.connection` addresses.
///
/// | Python | gpuproc |
/// |---|---|
/// | `'/tmp/sock'` (a path: `AF_UNIX`) | `Address::unix("/tmp/sock")`, `PathBuf::from(..).into()`, `"/tmp/sock".parse()` |
/// | `'\0name'` (Linux's abstract namespace) | `Address::abstract_name("name")`, `"\0name".parse()` |
/// | `('127.0.0.1', 6000)` (a tuple: `AF_INET`) | `("127.0.0.1", 6000).into()`, `Address::tcp(..)`, `"127.0.0.1:6000".parse()` |
///
/// Port 0 binds a free port; [`Listener::address`](super::Listener::address) then reports
/// the port the system picked. A host name is resolved when binding or connecting, IPv4
/// addresses first (Python's listeners and clients use IPv4 only; gpuproc also tries IPv6,
/// written `"[::1]:6000"`).
///
/// A string [parses](Address::from_str) as an abstract name when it starts with a NUL byte,
/// as TCP when it ends in `:PORT` (digits) after a host without a `/`, and as a Unix socket
/// path otherwise (write `./a:1` for a file named `a:1`).
///
/// ```
/// use gpuproc::connection::Address;
/// let a: Address = "localhost:6000".parse()?;
/// assert_eq!(a, Address::tcp("localhost", 6000));
/// assert_eq!("[::1]:80".parse::<Address>()?, Address::tcp("::1", 80));
/// assert_eq!("/run/app.sock".parse::<Address>()?, Address::unix("/run/app.sock"));
/// assert_eq!("\0app".parse::<Address>()?, Address::abstract_name("app"));
/// assert_eq!(Address::abstract_name("app").to_string(), "@app");
/// # Ok::<(), gpuproc::connection::ConnectionError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Address {
    /// A Unix socket file at this path.
    Unix(PathBuf),
    /// A Unix socket in Linux's abstract namespace (no file; it goes away with its last
    /// user), named by these bytes; Python's `'\0name'`. Shown as `@name`, as `ss` shows it.
    Abstract(Vec<u8>),
    /// A TCP address: a host name or IP address, and a port (0: any free one, to bind).
    Tcp {
        /// The host name or IP address (IPv6 without brackets).
        host: String,
        /// The port.
        port: u16,
    },
}

impl Address {
    /// A Unix socket at `path`.
    pub fn unix(path: impl Into<PathBuf>) -> Address {
        Address::Unix(path.into())
    }

    /// A Unix socket named `name` in Linux's abstract namespace (Python's `'\0' + name`).
    pub fn abstract_name(name: impl Into<Vec<u8>>) -> Address {
        Address::Abstract(name.into())
    }

    /// A TCP address; Python's `(host, port)`.
    pub fn tcp(host: impl Into<String>, port: u16) -> Address {
        Address::Tcp {
            host: host.into(),
            port,
        }
    }

    /// Whether this is a TCP address (which needs an authkey).
    pub fn is_tcp(&self) -> bool {
        matches!(self, Address::Tcp { .. })
    }

    fn invalid(&self, reason: impl Into<String>) -> ConnectionError {
        ConnectionError::InvalidAddress {
            address: self.to_string(),
            reason: reason.into(),
        }
    }

    /// The Unix socket name, for a Unix address.
    pub(crate) fn unix_name(&self) -> Result<Option<UnixName<'_>>, ConnectionError> {
        match self {
            Address::Unix(p) if p.as_os_str().is_empty() => Err(self.invalid("an empty path")),
            Address::Unix(p) => Ok(Some(UnixName::Path(p))),
            Address::Abstract(n) if n.is_empty() => {
                Err(self.invalid("an abstract name needs at least one byte after the NUL"))
            }
            Address::Abstract(n) => Ok(Some(UnixName::Abstract(n))),
            Address::Tcp { .. } => Ok(None),
        }
    }

    /// The socket addresses a TCP address stands for, IPv4 first.
    pub(crate) fn resolve(&self) -> Result<Vec<SocketAddr>, ConnectionError> {
        let Address::Tcp { host, port } = self else {
            return Ok(Vec::new());
        };
        if host.is_empty() {
            return Err(self.invalid("an empty host"));
        }
        let addrs = crate::sys::net::resolve(host, *port)
            .map_err(ConnectionError::io(format!("cannot resolve {self}")))?;
        if addrs.is_empty() {
            return Err(self.invalid("the host name resolves to no address"));
        }
        Ok(addrs)
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "{}", p.display()),
            Address::Abstract(n) => write!(f, "@{}", n.escape_ascii()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "{host}:{port}"),
        }
    }
}

/// Parses an address as described on [`Address`].
impl FromStr for Address {
    type Err = ConnectionError;

    fn from_str(s: &str) -> Result<Address, ConnectionError> {
        let invalid = |reason: &str| ConnectionError::InvalidAddress {
            address: s.to_string(),
            reason: reason.to_string(),
        };
        if s.is_empty() {
            return Err(invalid("an empty address"));
        }
        if let Some(name) = s.strip_prefix('\0') {
            if name.is_empty() {
                return Err(invalid(
                    "an abstract name needs at least one byte after the NUL",
                ));
            }
            return Ok(Address::abstract_name(name.as_bytes()));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let Some((host, port)) = rest.split_once("]:") else {
                return Err(invalid("expected [IPv6 address]:port"));
            };
            if host.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(invalid("not an IPv6 address in the brackets"));
            }
            return Ok(Address::tcp(
                host,
                parse_port(port).map_err(|r| invalid(&r))?,
            ));
        }
        if let Some((host, port)) = s.rsplit_once(':') {
            let digits = !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit());
            if digits && !host.is_empty() && !host.contains('/') {
                if host.contains(':') {
                    return Err(invalid("write an IPv6 address in brackets: [::1]:6000"));
                }
                return Ok(Address::tcp(
                    host,
                    parse_port(port).map_err(|r| invalid(&r))?,
                ));
            }
        }
        Ok(Address::unix(s))
    }
}

fn parse_port(port: &str) -> Result<u16, String> {
    port.parse::<u16>()
        .map_err(|_| format!("the port {port} is not a number from 0 to 65535"))
}

impl From<PathBuf> for Address {
    fn from(p: PathBuf) -> Address {
        Address::Unix(p)
    }
}

impl From<&Path> for Address {
    fn from(p: &Path) -> Address {
        Address::Unix(p.to_path_buf())
    }
}

/// Python's `(host, port)` tuple.
impl From<(&str, u16)> for Address {
    fn from((host, port): (&str, u16)) -> Address {
        Address::tcp(host, port)
    }
}

/// Python's `(host, port)` tuple.
impl From<(String, u16)> for Address {
    fn from((host, port): (String, u16)) -> Address {
        Address::tcp(host, port)
    }
}

impl From<(IpAddr, u16)> for Address {
    fn from((ip, port): (IpAddr, u16)) -> Address {
        Address::tcp(ip.to_string(), port)
    }
}

impl From<SocketAddr> for Address {
    fn from(a: SocketAddr) -> Address {
        Address::tcp(a.ip().to_string(), a.port())
    }
}

impl From<&Address> for Address {
    fn from(a: &Address) -> Address {
        a.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Address {
        s.parse().unwrap_or_else(|e| panic!("{s:?}: {e}"))
    }

    #[test]
    fn strings_parse_like_python_addresses() {
        assert_eq!(p("127.0.0.1:0"), Address::tcp("127.0.0.1", 0));
        assert_eq!(p("localhost:65535"), Address::tcp("localhost", 65535));
        assert_eq!(p("[::1]:6000"), Address::tcp("::1", 6000));
        assert_eq!(p("/tmp/x.sock"), Address::unix("/tmp/x.sock"));
        assert_eq!(p("relative.sock"), Address::unix("relative.sock"));
        assert_eq!(p("./a:1"), Address::unix("./a:1"));
        assert_eq!(p("/dir:1/sock"), Address::unix("/dir:1/sock"));
        assert_eq!(p("host:"), Address::unix("host:"));
        assert_eq!(p("\0abstract"), Address::abstract_name("abstract"));
        for bad in [
            "",
            "\0",
            "host:65536",
            "::1:80",
            "[::1]80",
            "[nope]:1",
            "h:99999999999",
        ] {
            let e = bad.parse::<Address>().unwrap_err();
            assert!(
                matches!(e, ConnectionError::InvalidAddress { .. }),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn addresses_display_and_convert() {
        assert_eq!(Address::tcp("::1", 5).to_string(), "[::1]:5");
        assert_eq!(Address::tcp("h", 5).to_string(), "h:5");
        assert_eq!(Address::abstract_name(&b"a\0b"[..]).to_string(), "@a\\x00b");
        assert_eq!(Address::from(("h", 1)), Address::tcp("h", 1));
        let sa: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(Address::from(sa), Address::tcp("127.0.0.1", 9));
        assert!(Address::tcp("h", 1).is_tcp());
        assert!(!Address::unix("/x").is_tcp());
        for a in [
            Address::tcp("h", 1),
            Address::tcp("::1", 2),
            Address::unix("/x"),
        ] {
            assert_eq!(p(&a.to_string()), a);
        }
    }

    #[test]
    fn ipv4_comes_first() {
        let addrs = Address::tcp("127.0.0.1", 7).resolve().unwrap();
        assert_eq!(addrs, vec!["127.0.0.1:7".parse().unwrap()]);
        assert!(Address::tcp("", 7).resolve().is_err());
        assert!(Address::unix("").unix_name().is_err());
        assert!(Address::abstract_name("").unix_name().is_err());
    }
}
