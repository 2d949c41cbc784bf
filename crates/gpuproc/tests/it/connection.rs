//! Listener and Client: Rust with Rust over Unix sockets and TCP loopback, hostile peers, and
//! Python's `multiprocessing.connection` on the other end, both ways.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use gpuproc::channel::Queue;
use gpuproc::connection::{Address, Client, Connection, ConnectionError, Listener};

use crate::support::{wait_all_ended, TIMEOUT};

const KEY: &[u8] = b"the right key";

/// A new, empty directory for socket files; removed by [`TempDir`]'s drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "gpuproc-conn-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn unique_abstract() -> Address {
    static N: AtomicU32 = AtomicU32::new(0);
    Address::abstract_name(format!(
        "gpuproc-test-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Runs `f` on a thread; joined by the caller.
fn spawn<R: Send + 'static>(f: impl FnOnce() -> R + Send + 'static) -> JoinHandle<R> {
    std::thread::spawn(f)
}

/// Values and bytes both ways between a listener and a client, then the client's closing.
fn exchange(listener: &Listener) {
    let address = listener.address().clone();
    let client = spawn(move || {
        let conn = Client::connect_timeout(address, KEY, TIMEOUT).unwrap();
        conn.send_timeout(&(7u64, "seven".to_string(), vec![1.5f32; 3]), TIMEOUT)
            .unwrap();
        conn.send_bytes_timeout(b"raw", TIMEOUT).unwrap();
        let big: Vec<u8> = conn.recv_bytes_timeout(TIMEOUT).unwrap();
        conn.send_bytes_timeout(&big, TIMEOUT).unwrap();
        let s: String = conn.recv_timeout(TIMEOUT).unwrap();
        assert_eq!(s, "bye");
    });
    let conn = listener.accept_timeout(TIMEOUT).unwrap();
    let v: (u64, String, Vec<f32>) = conn.recv_timeout(TIMEOUT).unwrap();
    assert_eq!(v, (7, "seven".to_string(), vec![1.5; 3]));
    assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"raw");
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    conn.send_bytes_timeout(&big, TIMEOUT).unwrap();
    assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), big);
    conn.send_timeout("bye", TIMEOUT).unwrap();
    client.join().unwrap();
    let e = conn.recv_bytes_timeout(TIMEOUT).unwrap_err();
    assert!(e.is_disconnected(), "{e}");
}

#[test]
fn unix_socket_values_and_bytes_both_ways() {
    let dir = TempDir::new();
    let path = dir.path("sock");
    let listener = Listener::bind(path.clone(), KEY).unwrap();
    assert_eq!(listener.address(), &Address::unix(&path));
    exchange(&listener);
    // The socket file goes with the listener.
    assert!(path.exists());
    listener.close();
    assert!(!path.exists());
}

#[test]
fn abstract_unix_name_values_and_bytes_both_ways() {
    let address = unique_abstract();
    let listener = Listener::bind(address.clone(), KEY).unwrap();
    assert_eq!(listener.address(), &address);
    exchange(&listener);
}

#[test]
fn tcp_loopback_values_and_bytes_both_ways() {
    let listener = Listener::bind(("127.0.0.1", 0), KEY).unwrap();
    let Address::Tcp { host, port } = listener.address().clone() else {
        panic!("{:?}", listener.address())
    };
    assert_eq!(host, "127.0.0.1");
    assert_ne!(port, 0, "address() reports the port that was picked");
    exchange(&listener);
    // A host name, parsed from a string, reaches the same listener.
    let address: Address = format!("localhost:{port}").parse().unwrap();
    let client = spawn(move || Client::connect_timeout(address, KEY, TIMEOUT).map(|_| ()));
    listener.accept_timeout(TIMEOUT).unwrap();
    client.join().unwrap().unwrap();
}

#[test]
fn a_unix_socket_without_authkey_skips_the_handshake() {
    let dir = TempDir::new();
    let listener = Listener::builder(dir.path("open")).bind().unwrap();
    let address = listener.address().clone();
    let client = spawn(move || {
        let c = Client::builder(address).timeout(TIMEOUT).connect().unwrap();
        c.send_bytes_timeout(b"hi", TIMEOUT).unwrap();
        c
    });
    let conn = listener.accept_timeout(TIMEOUT).unwrap();
    assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"hi");
    drop(client.join().unwrap());
}

#[test]
fn wrong_key_fails_on_both_sides_and_the_listener_survives() {
    for address in [Address::tcp("127.0.0.1", 0), unique_abstract()] {
        let listener = Listener::bind(address, KEY).unwrap();
        let address = listener.address().clone();
        let a = address.clone();
        let client = spawn(move || Client::connect_timeout(a, b"a wrong key", TIMEOUT));
        let e = listener.accept_timeout(TIMEOUT).unwrap_err();
        assert!(e.is_authentication(), "{e}");
        assert!(e.to_string().contains("digest received was wrong"), "{e}");
        let e = client.join().unwrap().unwrap_err();
        assert!(e.is_authentication(), "{e}");
        assert!(e.to_string().contains("rejected"), "{e}");
        // The next client, with the right key, gets through.
        let client = spawn(move || {
            let c = Client::connect_timeout(address, KEY, TIMEOUT).unwrap();
            c.send_bytes_timeout(b"second", TIMEOUT).unwrap();
            c
        });
        let conn = listener.accept_timeout(TIMEOUT).unwrap();
        assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"second");
        drop(client.join().unwrap());
    }
}

#[test]
fn a_silent_client_makes_accept_time_out_and_the_next_one_gets_in() {
    let listener = Listener::builder(("127.0.0.1", 0))
        .authkey(KEY)
        .handshake_timeout(Duration::from_millis(200))
        .bind()
        .unwrap();
    let Address::Tcp { port, .. } = listener.address().clone() else {
        panic!()
    };
    // Connects and says nothing.
    let silent = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), TIMEOUT).unwrap();
    let e = listener.accept_timeout(TIMEOUT).unwrap_err();
    assert!(e.is_authentication(), "{e}");
    assert!(
        e.to_string().contains("did not complete the handshake"),
        "{e}"
    );
    drop(silent);
    // With nobody connecting, accept_timeout is a timeout.
    let e = listener
        .accept_timeout(Duration::from_millis(50))
        .unwrap_err();
    assert!(e.is_timeout(), "{e}");
    let address = listener.address().clone();
    let client = spawn(move || Client::connect_timeout(address, KEY, TIMEOUT).map(|_| ()));
    listener.accept_timeout(TIMEOUT).unwrap();
    client.join().unwrap().unwrap();
}

#[test]
fn a_silent_listener_makes_connect_fail_not_hang() {
    // A bare TCP socket that accepts (through its backlog) and never speaks.
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = server.local_addr().unwrap().port();
    let e = Client::builder(("127.0.0.1", port))
        .authkey(KEY)
        .handshake_timeout(Duration::from_millis(200))
        .connect()
        .unwrap_err();
    assert!(e.is_authentication(), "{e}");
    let e =
        Client::connect_timeout(("127.0.0.1", port), KEY, Duration::from_millis(200)).unwrap_err();
    assert!(e.is_authentication(), "{e}");
}

#[test]
fn connecting_to_a_full_backlog_times_out() {
    let dir = TempDir::new();
    for address in [
        Address::tcp("127.0.0.1", 0),
        Address::unix(dir.path("full")),
    ] {
        // Nobody accepts, and the backlog holds one pending connection.
        let listener = Listener::builder(address)
            .authkey(KEY)
            .backlog(0)
            .bind()
            .unwrap();
        let address = listener.address().clone();
        let mut pending = Vec::new();
        let e = loop {
            match Client::builder(address.clone())
                .authkey(KEY)
                .timeout(Duration::from_millis(200))
                .handshake_timeout(Duration::ZERO)
                .connect()
            {
                // Connected (queued), then the handshake could not start.
                Err(e) if e.is_authentication() => pending.push(e),
                Err(e) => break e,
                Ok(c) => panic!("{address}: a connection without a listener's handshake: {c:?}"),
            }
            assert!(pending.len() < 64, "{address}: the backlog never filled");
        };
        assert!(e.is_timeout(), "{address}: {e}");
        assert!(e.to_string().contains("the connection to be made"), "{e}");
    }
}

#[test]
fn a_pre_authentication_flood_is_refused_at_the_size_limit() {
    let listener = Listener::bind(("127.0.0.1", 0), KEY).unwrap();
    let Address::Tcp { port, .. } = listener.address().clone() else {
        panic!()
    };
    // A peer that announces a 1 GiB answer and starts sending it.
    let flooder = spawn(move || {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), TIMEOUT).unwrap();
        s.set_write_timeout(Some(TIMEOUT)).unwrap();
        let mut sent: u64 = 0;
        if s.write_all(&(1i32 << 30).to_be_bytes()).is_err() {
            return sent;
        }
        let chunk = vec![0x41u8; 1 << 20];
        while sent < 1 << 30 {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(_) => break,
            }
        }
        sent
    });
    let e = listener.accept_timeout(TIMEOUT).unwrap_err();
    assert!(e.is_authentication(), "{e}");
    assert!(
        e.to_string().contains("1073741824 bytes") && e.to_string().contains("at most 256"),
        "{e}"
    );
    // The listener closed the connection instead of reading the gigabyte: the flooder's
    // writes failed long before it was all sent.
    let sent = flooder.join().unwrap();
    assert!(sent < 1 << 30, "the whole flood was taken: {sent} bytes");
}

#[test]
fn an_oversize_message_is_refused_and_the_receiver_says_why() {
    let dir = TempDir::new();
    let listener = Listener::builder(dir.path("small"))
        .authkey(KEY)
        .max_message_size(1000)
        .bind()
        .unwrap();
    let address = listener.address().clone();
    let client = spawn(move || {
        let c = Client::connect_timeout(address, KEY, TIMEOUT).unwrap();
        c.send_bytes_timeout(&[1; 1001], TIMEOUT).unwrap();
        c
    });
    let conn = listener.accept_timeout(TIMEOUT).unwrap();
    assert_eq!(conn.max_message_size(), 1000);
    let e = conn.recv_bytes_timeout(TIMEOUT).unwrap_err();
    assert!(
        matches!(
            e,
            ConnectionError::TooLarge {
                size: 1001,
                limit: 1000
            }
        ),
        "{e}"
    );
    // The sending side refuses before sending.
    let e = conn.send_bytes(&[0; 1001]).unwrap_err();
    assert!(e.is_too_large(), "{e}");
    drop(client.join().unwrap());
    // A limit below the handshake's own messages does not stop the handshake.
    let listener = Listener::builder(dir.path("tiny"))
        .authkey(KEY)
        .max_message_size(8)
        .bind()
        .unwrap();
    let address = listener.address().clone();
    let client = spawn(move || {
        let c = Client::builder(address)
            .authkey(KEY)
            .max_message_size(8)
            .timeout(TIMEOUT)
            .connect()
            .unwrap();
        c.send_bytes_timeout(b"8 bytes!", TIMEOUT).unwrap();
        c
    });
    let conn = listener.accept_timeout(TIMEOUT).unwrap();
    assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"8 bytes!");
    drop(client.join().unwrap());
}

#[test]
fn tcp_without_an_authkey_is_refused() {
    let e = Listener::builder(("127.0.0.1", 0)).bind().unwrap_err();
    assert!(
        matches!(
            e,
            ConnectionError::AuthkeyRequired {
                side: "listener",
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("needs an authkey"), "{e}");
    let e = Listener::bind(("127.0.0.1", 0), b"").unwrap_err();
    assert!(matches!(e, ConnectionError::AuthkeyRequired { .. }), "{e}");
    let e = Client::builder(("127.0.0.1", 1)).connect().unwrap_err();
    assert!(
        matches!(e, ConnectionError::AuthkeyRequired { side: "client", .. }),
        "{e}"
    );
}

#[test]
fn a_value_holding_descriptors_is_refused() {
    let dir = TempDir::new();
    let listener = Listener::bind(dir.path("fds"), KEY).unwrap();
    let address = listener.address().clone();
    let client = spawn(move || Client::connect_timeout(address, KEY, TIMEOUT).unwrap());
    let conn = listener.accept_timeout(TIMEOUT).unwrap();
    let q: Queue<u32> = Queue::new().unwrap();
    let e = conn.send(&q).unwrap_err();
    assert!(
        matches!(e, ConnectionError::CarriesDescriptors { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("Queue<u32>"), "{e}");
    // Nothing was sent: the connection still works.
    conn.send_bytes_timeout(b"still fine", TIMEOUT).unwrap();
    let c = client.join().unwrap();
    assert_eq!(c.recv_bytes_timeout(TIMEOUT).unwrap(), b"still fine");
}

#[test]
fn errors_say_why() {
    let e = Client::connect_timeout(Address::unix("/nonexistent/gpuproc.sock"), KEY, TIMEOUT)
        .unwrap_err();
    let text = format!("{e:?}");
    assert!(
        text.contains("cannot connect to /nonexistent/gpuproc.sock") && text.contains("No such"),
        "{text}"
    );
    let dir = TempDir::new();
    let path = dir.path("taken");
    let _first = Listener::bind(path.clone(), KEY).unwrap();
    let e = Listener::bind(path, KEY).unwrap_err();
    assert!(format!("{e:?}").contains("cannot listen on"), "{e:?}");
    let long = Address::unix(format!("/tmp/{}", "x".repeat(200)));
    let e = Listener::bind(long, KEY).unwrap_err();
    assert!(format!("{e:?}").contains("at most 108 bytes"), "{e:?}");
    let e = Listener::bind(Address::unix("/tmp/a\0b"), KEY).unwrap_err();
    assert!(format!("{e:?}").contains("cannot contain a NUL"), "{e:?}");
}

// ---- against Python's multiprocessing.connection -----------------------------------------------

/// A Python interpreter and its `(major, minor)` version.
#[derive(Debug, Clone)]
struct Python {
    path: PathBuf,
    version: (u32, u32),
}

/// The version of the Python at `path`, if it runs and has `multiprocessing.connection`.
fn python_version(path: &Path) -> Option<(u32, u32)> {
    let out = Command::new("timeout")
        .args(["-k", "5", "60"])
        .arg(path)
        .args([
            "-c",
            "import sys, multiprocessing.connection, hmac; print(*sys.version_info[:2])",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let mut it = text.split_whitespace().map(|n| n.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// The Pythons to test against: `$GPUPROC_PYTHON` (else the workspace's `.venv`, else
/// `python3`), and any Python 3.12 or later found on the machine (`/usr/bin/python3.N`,
/// pyenv's versions), so that both the legacy HMAC-MD5 handshake (3.11 and older) and the
/// SHA-256 one (3.12 and later) are met where those interpreters exist. One per version.
fn pythons() -> Vec<Python> {
    let primary = [
        std::env::var_os("GPUPROC_PYTHON").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.venv/bin/python")),
        Some(PathBuf::from("python3")),
    ];
    let mut found: Vec<Python> = Vec::new();
    for path in primary.into_iter().flatten() {
        if path.is_absolute() && !path.exists() {
            continue;
        }
        if let Some(version) = python_version(&path) {
            found.push(Python { path, version });
            break;
        }
    }
    let mut candidates: Vec<PathBuf> = Vec::new();
    for minor in 12..30 {
        candidates.push(PathBuf::from(format!("/usr/bin/python3.{minor}")));
    }
    let pyenv = std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".pyenv")));
    if let Some(Ok(dir)) = pyenv.map(|p| std::fs::read_dir(p.join("versions"))) {
        let mut found: Vec<PathBuf> = dir
            .flatten()
            .map(|e| e.path().join("bin/python3"))
            .collect();
        found.sort();
        candidates.extend(found);
    }
    for path in candidates {
        if !path.exists() {
            continue;
        }
        let Some(version) = python_version(&path) else {
            continue;
        };
        if version >= (3, 12) && !found.iter().any(|p| p.version == version) {
            found.push(Python { path, version });
        }
    }
    if found.is_empty() {
        println!("note: skipping the Python cross-check: no Python with multiprocessing found");
    } else {
        println!("Pythons: {found:?}");
    }
    found
}

/// A Python child that is killed and reaped when dropped; its stdout lines arrive on a
/// channel.
struct Py {
    child: Child,
    lines: mpsc::Receiver<String>,
    stderr: Option<JoinHandle<String>>,
}

impl Py {
    /// Runs `script` (which prints a line per step) with `args`; it ends itself after 60 s.
    fn run(python: &Python, script: &str, args: &[&str]) -> Py {
        let prelude = "import signal, sys\nsignal.alarm(60)\nfrom multiprocessing.connection import Listener, Client\nfrom multiprocessing import AuthenticationError\n";
        let mut child = Command::new(&python.path)
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Py {
            child,
            lines,
            stderr: Some(stderr),
        }
    }

    fn line(&self) -> String {
        match self.lines.recv_timeout(TIMEOUT) {
            Ok(l) => l,
            Err(e) => panic!("no line from Python ({e})"),
        }
    }

    /// Waits for the script to end; its exit code and standard error.
    fn finish(mut self) -> (i32, String) {
        let left = wait_all_ended(&[self.child.id()], Instant::now() + TIMEOUT);
        assert!(left.is_empty(), "the Python script did not end");
        let status = self.child.wait().unwrap();
        let stderr = self.stderr.take().map(|t| t.join().unwrap());
        (status.code().unwrap_or(-1), stderr.unwrap_or_default())
    }
}

impl Drop for Py {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Python literal of an address: a tuple for TCP, a string for a path.
fn py_address(a: &Address) -> String {
    match a {
        Address::Tcp { host, port } => format!("({host:?}, {port})"),
        Address::Unix(p) => format!("{:?}", p.to_str().unwrap()),
        Address::Abstract(name) => format!("'\\x00{}'", std::str::from_utf8(name).unwrap()),
        other => panic!("{other:?}"),
    }
}

const PY_CLIENT: &str = r#"
address, key = eval(sys.argv[1]), sys.argv[2].encode()
try:
    c = Client(address, authkey=key)
except AuthenticationError as e:
    print("AuthenticationError", e, flush=True)
    sys.exit(3)
print("connected", flush=True)
assert c.poll(30)
data = c.recv_bytes()
c.send_bytes(data[::-1])
c.send_bytes(bytes(i % 253 for i in range(300_000)))
assert c.poll(30)
print("got", c.recv_bytes().decode(), flush=True)
c.close()
"#;

#[test]
fn a_python_client_talks_to_a_gpuproc_listener() {
    for python in pythons() {
        let dir = TempDir::new();
        for address in [
            Address::tcp("127.0.0.1", 0),
            Address::unix(dir.path("py")),
            unique_abstract(),
        ] {
            let listener = Listener::bind(address, KEY).unwrap();
            let addr = py_address(listener.address());
            let py = Py::run(&python, PY_CLIENT, &[&addr, "the right key"]);
            let conn: Connection = listener.accept_timeout(TIMEOUT).unwrap();
            assert_eq!(py.line(), "connected", "{python:?}");
            // Over 64 KiB each way.
            let big: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
            conn.send_bytes_timeout(&big, TIMEOUT).unwrap();
            let mut back = conn.recv_bytes_timeout(TIMEOUT).unwrap();
            back.reverse();
            assert_eq!(back, big);
            let theirs = conn.recv_bytes_timeout(TIMEOUT).unwrap();
            assert_eq!(
                theirs,
                (0..300_000u32).map(|i| (i % 253) as u8).collect::<Vec<_>>()
            );
            conn.send_bytes_timeout("done, thanks".as_bytes(), TIMEOUT)
                .unwrap();
            assert_eq!(py.line(), "got done, thanks");
            let (code, stderr) = py.finish();
            assert_eq!(code, 0, "{python:?}: {stderr}");
            assert!(conn
                .recv_bytes_timeout(TIMEOUT)
                .unwrap_err()
                .is_disconnected());
        }
    }
}

#[test]
fn a_python_client_with_the_wrong_key_is_refused_on_both_sides() {
    for python in pythons() {
        let listener = Listener::bind(("127.0.0.1", 0), KEY).unwrap();
        let addr = py_address(listener.address());
        let py = Py::run(&python, PY_CLIENT, &[&addr, "a wrong key"]);
        let e = listener.accept_timeout(TIMEOUT).unwrap_err();
        assert!(e.is_authentication(), "{python:?}: {e}");
        let line = py.line();
        assert!(
            line.starts_with("AuthenticationError"),
            "{python:?}: {line}"
        );
        let (code, stderr) = py.finish();
        assert_eq!(code, 3, "{python:?}: {stderr}");
        // The listener goes on: a Python client with the right key gets in.
        let py = Py::run(&python, PY_CLIENT, &[&addr, "the right key"]);
        let conn = listener.accept_timeout(TIMEOUT).unwrap();
        assert_eq!(py.line(), "connected");
        conn.send_bytes_timeout(b"abc", TIMEOUT).unwrap();
        assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"cba");
        conn.recv_bytes_timeout(TIMEOUT).unwrap();
        conn.send_bytes_timeout(b"x", TIMEOUT).unwrap();
        assert_eq!(py.line(), "got x");
        assert_eq!(py.finish().0, 0);
    }
}

const PY_LISTENER: &str = r#"
key = sys.argv[1].encode()
with Listener(("127.0.0.1", 0), authkey=key) as listener:
    print(listener.address[1], flush=True)
    try:
        c = listener.accept()
    except AuthenticationError as e:
        print("AuthenticationError", e, flush=True)
        sys.exit(3)
    assert c.poll(30)
    data = c.recv_bytes()
    c.send_bytes(data.upper())
    c.send_bytes(b"z" * 100_000)
    assert c.poll(30)
    print("got", len(c.recv_bytes()), flush=True)
"#;

#[test]
fn a_gpuproc_client_talks_to_a_python_listener() {
    for python in pythons() {
        let py = Py::run(&python, PY_LISTENER, &["the right key"]);
        let port: u16 = py.line().parse().unwrap();
        let conn = Client::connect_timeout(("127.0.0.1", port), KEY, TIMEOUT).unwrap();
        conn.send_bytes_timeout(b"hello python", TIMEOUT).unwrap();
        assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"HELLO PYTHON");
        assert_eq!(
            conn.recv_bytes_timeout(TIMEOUT).unwrap(),
            vec![b'z'; 100_000]
        );
        conn.send_bytes_timeout(&vec![5u8; 150_000], TIMEOUT)
            .unwrap();
        assert_eq!(py.line(), "got 150000", "{python:?}");
        let (code, stderr) = py.finish();
        assert_eq!(code, 0, "{python:?}: {stderr}");
    }
}

#[test]
fn a_gpuproc_client_with_the_wrong_key_is_refused_by_python() {
    for python in pythons() {
        let py = Py::run(&python, PY_LISTENER, &["the right key"]);
        let port: u16 = py.line().parse().unwrap();
        let e = Client::connect_timeout(("127.0.0.1", port), b"a wrong key", TIMEOUT).unwrap_err();
        assert!(e.is_authentication(), "{python:?}: {e}");
        let line = py.line();
        assert!(
            line.starts_with("AuthenticationError"),
            "{python:?}: {line}"
        );
        let (code, stderr) = py.finish();
        assert_eq!(code, 3, "{python:?}: {stderr}");
    }
}

#[test]
fn legacy_md5_can_be_turned_off() {
    for python in pythons() {
        let listener = Listener::builder(("127.0.0.1", 0))
            .authkey(KEY)
            .allow_md5(false)
            .bind()
            .unwrap();
        let addr = py_address(listener.address());
        let py = Py::run(&python, PY_CLIENT, &[&addr, "the right key"]);
        if python.version >= (3, 12) {
            // Python 3.12 and later answer with HMAC-SHA256: accepted.
            let conn = listener.accept_timeout(TIMEOUT).unwrap();
            assert_eq!(py.line(), "connected");
            conn.send_bytes_timeout(b"ab", TIMEOUT).unwrap();
            assert_eq!(conn.recv_bytes_timeout(TIMEOUT).unwrap(), b"ba");
            conn.recv_bytes_timeout(TIMEOUT).unwrap();
            conn.send_bytes_timeout(b"y", TIMEOUT).unwrap();
            assert_eq!(py.line(), "got y");
            assert_eq!(py.finish().0, 0);
        } else {
            // Python 3.11 and older answer with HMAC-MD5: refused when MD5 is off.
            let e = listener.accept_timeout(TIMEOUT).unwrap_err();
            assert!(e.to_string().contains("MD5 is turned off"), "{e}");
            assert!(py.line().starts_with("AuthenticationError"));
            assert_eq!(py.finish().0, 3);
        }
    }
}
