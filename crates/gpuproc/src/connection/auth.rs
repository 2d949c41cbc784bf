//! Python's authentication handshake (`deliver_challenge` / `answer_challenge` of CPython
//! 3.12+'s `multiprocessing/connection.py`), with the legacy HMAC-MD5 form of 3.11 and
//! older.
//!
//! The side that delivers a challenge sends `#CHALLENGE#` + `{sha256}` + 40 random bytes;
//! the other side answers `{sha256}` + HMAC-SHA256(authkey, everything after `#CHALLENGE#`),
//! and the challenger replies `#WELCOME#` or `#FAILURE#`. A listener delivers first and then
//! answers the client's challenge; a client answers first, then delivers. Old peers send a
//! challenge of exactly 20 bytes without a `{digest}` prefix, and answer with a bare 16-byte
//! HMAC-MD5: a 20-byte challenge is answered that way, and a 16-byte answer is checked as
//! HMAC-MD5, as Python 3.12 does (unless MD5 is turned off). Each message read before the
//! handshake ends is at most [`MAX_PREAUTH`] bytes long.

use hmac::{Hmac, KeyInit, Mac, SimpleHmac};

use super::ConnectionError;

/// The prefix of a challenge.
pub(crate) const CHALLENGE: &[u8] = b"#CHALLENGE#";
/// The challenger's reply to a right answer.
pub(crate) const WELCOME: &[u8] = b"#WELCOME#";
/// The challenger's reply to a wrong answer.
pub(crate) const FAILURE: &[u8] = b"#FAILURE#";
/// The random bytes in a challenge (Python's `MESSAGE_LENGTH`).
pub(crate) const MESSAGE_LENGTH: usize = 40;
/// The longest message read before authentication (Python's `recv_bytes(256)`).
pub(crate) const MAX_PREAUTH: usize = 256;
/// The length of a legacy (Python 3.11 and older) challenge, without a digest prefix.
const MD5_ONLY_MESSAGE_LENGTH: usize = 20;
/// The length of a bare HMAC-MD5 answer.
const MD5_DIGEST_LEN: usize = 16;
/// The longest digest name (`sha3_256`, `sha3_384`).
const MAX_DIGEST_NAME: usize = 8;

/// The digests Python accepts in a `{digest}` prefix (its `_ALLOWED_DIGESTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Digest {
    Md5,
    Sha256,
    Sha384,
    Sha3_256,
    Sha3_384,
}

impl Digest {
    const ALL: [Digest; 5] = [
        Digest::Md5,
        Digest::Sha256,
        Digest::Sha384,
        Digest::Sha3_256,
        Digest::Sha3_384,
    ];

    /// The name in a prefix, as Python's `hashlib` spells it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Digest::Md5 => "md5",
            Digest::Sha256 => "sha256",
            Digest::Sha384 => "sha384",
            Digest::Sha3_256 => "sha3_256",
            Digest::Sha3_384 => "sha3_384",
        }
    }

    fn from_name(name: &[u8]) -> Option<Digest> {
        Digest::ALL
            .into_iter()
            .find(|d| d.name().as_bytes() == name)
    }

    /// HMAC(`key`, `message`) with this digest.
    pub(crate) fn mac(self, key: &[u8], message: &[u8]) -> Vec<u8> {
        fn run<M: Mac + KeyInit>(key: &[u8], message: &[u8]) -> Vec<u8> {
            // HMAC takes keys of every length: `new_from_slice` cannot fail for it.
            match <M as KeyInit>::new_from_slice(key) {
                Ok(mut m) => {
                    m.update(message);
                    m.finalize().into_bytes().to_vec()
                }
                Err(_) => Vec::new(),
            }
        }
        match self {
            Digest::Md5 => run::<Hmac<md5::Md5>>(key, message),
            Digest::Sha256 => run::<Hmac<sha2::Sha256>>(key, message),
            Digest::Sha384 => run::<Hmac<sha2::Sha384>>(key, message),
            Digest::Sha3_256 => run::<SimpleHmac<sha3::Sha3_256>>(key, message),
            Digest::Sha3_384 => run::<SimpleHmac<sha3::Sha3_384>>(key, message),
        }
    }

    /// Whether `tag` is HMAC(`key`, `message`) with this digest, compared in constant time.
    fn verify(self, key: &[u8], message: &[u8], tag: &[u8]) -> bool {
        fn run<M: Mac + KeyInit>(key: &[u8], message: &[u8], tag: &[u8]) -> bool {
            match <M as KeyInit>::new_from_slice(key) {
                Ok(mut m) => {
                    m.update(message);
                    m.verify_slice(tag).is_ok()
                }
                Err(_) => false,
            }
        }
        match self {
            Digest::Md5 => run::<Hmac<md5::Md5>>(key, message, tag),
            Digest::Sha256 => run::<Hmac<sha2::Sha256>>(key, message, tag),
            Digest::Sha384 => run::<Hmac<sha2::Sha384>>(key, message, tag),
            Digest::Sha3_256 => run::<SimpleHmac<sha3::Sha3_256>>(key, message, tag),
            Digest::Sha3_384 => run::<SimpleHmac<sha3::Sha3_384>>(key, message, tag),
        }
    }

    /// The length of this digest's output.
    fn len(self) -> usize {
        match self {
            Digest::Md5 => 16,
            Digest::Sha256 | Digest::Sha3_256 => 32,
            Digest::Sha384 | Digest::Sha3_384 => 48,
        }
    }
}

/// Which handshake forms are accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Policy {
    /// Whether the legacy HMAC-MD5 forms (Python 3.11 and older) are accepted: a 20-byte
    /// challenge answered with a bare HMAC-MD5, and a bare 16-byte HMAC-MD5 answer.
    pub allow_md5: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy { allow_md5: true }
    }
}

/// A message's digest (`None`: the legacy, prefix-less form) and payload; Python's
/// `_get_digest_name_and_payload`. Errors are Python's `AuthenticationError` texts.
pub(crate) fn split_digest(message: &[u8]) -> Result<(Option<Digest>, &[u8]), String> {
    if message.len() == MD5_ONLY_MESSAGE_LENGTH || message.len() == MD5_DIGEST_LEN {
        return Ok((None, message));
    }
    if message.first() == Some(&b'{') {
        // Python: message.find(b'}', 1, _MAX_DIGEST_LEN + 2)
        let end = message.len().min(MAX_DIGEST_NAME + 2);
        if let Some(curly) = message[1..end].iter().position(|&b| b == b'}') {
            let curly = curly + 1;
            if let Some(d) = Digest::from_name(&message[1..curly]) {
                return Ok((Some(d), &message[curly + 1..]));
            }
        }
    }
    Err(format!(
        "unsupported message length ({} bytes), missing digest prefix, or unsupported digest",
        message.len()
    ))
}

/// A new challenge's message (what follows `#CHALLENGE#`): `{sha256}` and 40 random bytes.
pub(crate) fn new_message() -> Result<Vec<u8>, ConnectionError> {
    let mut random = [0u8; MESSAGE_LENGTH];
    getrandom::fill(&mut random).map_err(|e| ConnectionError::Io {
        context: "reading random bytes for the authentication challenge".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut message = format!("{{{}}}", Digest::Sha256.name()).into_bytes();
    message.extend_from_slice(&random);
    Ok(message)
}

/// The answer to a challenge `message`; Python's `_create_response`.
pub(crate) fn create_response(
    key: &[u8],
    message: &[u8],
    policy: Policy,
) -> Result<Vec<u8>, String> {
    match split_digest(message)?.0 {
        None if policy.allow_md5 => Ok(Digest::Md5.mac(key, message)),
        None => Err(
            "the peer offers only the legacy HMAC-MD5 handshake (Python 3.11 or older), \
             and MD5 is turned off"
                .to_string(),
        ),
        Some(d) => {
            // The MAC covers the whole message, digest prefix included.
            let mut response = format!("{{{}}}", d.name()).into_bytes();
            response.extend_from_slice(&d.mac(key, message));
            Ok(response)
        }
    }
}

/// Checks the answer `response` to our challenge `message`; Python's `_verify_challenge`.
pub(crate) fn verify_response(
    key: &[u8],
    message: &[u8],
    response: &[u8],
    policy: Policy,
) -> Result<(), String> {
    let (digest, mac) = split_digest(response)?;
    let digest = digest.unwrap_or(Digest::Md5);
    if digest == Digest::Md5 && !policy.allow_md5 {
        return Err(
            "the peer answered with HMAC-MD5 (Python 3.11 or older), and MD5 is turned off"
                .to_string(),
        );
    }
    if mac.len() != digest.len() {
        return Err(format!(
            "expected {} of length {}, got {}",
            digest.name(),
            digest.len(),
            mac.len()
        ));
    }
    if !digest.verify(key, message, mac) {
        return Err("digest received was wrong (the peer has a different authkey)".to_string());
    }
    Ok(())
}

/// How the handshake sends and receives its messages (the socket, or a test's stand-in).
pub(crate) trait Transport {
    /// Sends one message.
    fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectionError>;
    /// Receives one message of at most [`MAX_PREAUTH`] bytes.
    fn recv(&mut self) -> Result<Vec<u8>, ConnectionError>;
}

fn fail(reason: impl Into<String>) -> ConnectionError {
    ConnectionError::Authentication(reason.into())
}

/// Sends a challenge and checks the answer; Python's `deliver_challenge`. `message` comes
/// from [`new_message`].
pub(crate) fn deliver_challenge<T: Transport>(
    t: &mut T,
    key: &[u8],
    message: &[u8],
    policy: Policy,
) -> Result<(), ConnectionError> {
    let mut challenge = CHALLENGE.to_vec();
    challenge.extend_from_slice(message);
    t.send(&challenge)?;
    let response = t.recv()?;
    match verify_response(key, message, &response, policy) {
        Ok(()) => t.send(WELCOME),
        Err(why) => {
            // The peer learns it failed, as from Python; a send error changes nothing.
            let _ = t.send(FAILURE);
            Err(fail(why))
        }
    }
}

/// Answers the peer's challenge and reads its verdict; Python's `answer_challenge`.
pub(crate) fn answer_challenge<T: Transport>(
    t: &mut T,
    key: &[u8],
    policy: Policy,
) -> Result<(), ConnectionError> {
    let challenge = t.recv()?;
    let Some(message) = challenge.strip_prefix(CHALLENGE) else {
        return Err(fail(
            "protocol error: expected a challenge (is the peer a multiprocessing listener \
             with an authkey?)",
        ));
    };
    if message.len() < MD5_ONLY_MESSAGE_LENGTH {
        return Err(fail(format!(
            "challenge too short: {} bytes",
            message.len()
        )));
    }
    let response = create_response(key, message, policy).map_err(fail)?;
    t.send(&response)?;
    let verdict = t.recv()?;
    if verdict != WELCOME {
        return Err(fail(
            "digest sent was rejected (the peer has a different authkey)",
        ));
    }
    Ok(())
}

/// The listener's side: challenge the client, then answer its challenge.
pub(crate) fn serve<T: Transport>(
    t: &mut T,
    key: &[u8],
    message: &[u8],
    policy: Policy,
) -> Result<(), ConnectionError> {
    deliver_challenge(t, key, message, policy)?;
    answer_challenge(t, key, policy)
}

/// The client's side: answer the listener's challenge, then challenge it.
pub(crate) fn client<T: Transport>(
    t: &mut T,
    key: &[u8],
    message: &[u8],
    policy: Policy,
) -> Result<(), ConnectionError> {
    answer_challenge(t, key, policy)?;
    deliver_challenge(t, key, message, policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;

    /// One end of an in-memory message stream.
    struct Mem {
        tx: Sender<Vec<u8>>,
        rx: Receiver<Vec<u8>>,
        sent: Vec<Vec<u8>>,
    }

    fn mem_pair() -> (Mem, Mem) {
        let (a_tx, b_rx) = channel();
        let (b_tx, a_rx) = channel();
        (
            Mem {
                tx: a_tx,
                rx: a_rx,
                sent: Vec::new(),
            },
            Mem {
                tx: b_tx,
                rx: b_rx,
                sent: Vec::new(),
            },
        )
    }

    impl Transport for Mem {
        fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
            self.sent.push(bytes.to_vec());
            self.tx
                .send(bytes.to_vec())
                .map_err(|_| ConnectionError::Disconnected)
        }
        fn recv(&mut self) -> Result<Vec<u8>, ConnectionError> {
            let m = self
                .rx
                .recv_timeout(Duration::from_secs(10))
                .map_err(|_| ConnectionError::Disconnected)?;
            if m.len() > MAX_PREAUTH {
                return Err(ConnectionError::TooLarge {
                    size: m.len() as u64,
                    limit: MAX_PREAUTH,
                });
            }
            Ok(m)
        }
    }

    /// A peer that plays back `replies` one per received message and records what it got.
    struct Scripted {
        replies: Vec<Vec<u8>>,
        got: Vec<Vec<u8>>,
    }

    impl Transport for Scripted {
        fn send(&mut self, bytes: &[u8]) -> Result<(), ConnectionError> {
            self.got.push(bytes.to_vec());
            Ok(())
        }
        fn recv(&mut self) -> Result<Vec<u8>, ConnectionError> {
            if self.replies.is_empty() {
                return Err(ConnectionError::Disconnected);
            }
            Ok(self.replies.remove(0))
        }
    }

    fn run_pair(
        server_key: &'static [u8],
        client_key: &'static [u8],
        server_policy: Policy,
        client_policy: Policy,
    ) -> (Result<(), ConnectionError>, Result<(), ConnectionError>) {
        let (mut s, mut c) = mem_pair();
        let server = std::thread::spawn(move || {
            let r = serve(&mut s, server_key, &new_message().unwrap(), server_policy);
            (r, s.sent)
        });
        let cr = client(&mut c, client_key, &new_message().unwrap(), client_policy);
        drop(c);
        let (sr, sent) = server.join().unwrap();
        // The challenge is `#CHALLENGE#{sha256}` + 40 bytes.
        assert!(sent[0].starts_with(b"#CHALLENGE#{sha256}"));
        assert_eq!(sent[0].len(), 11 + 8 + MESSAGE_LENGTH);
        (sr, cr)
    }

    #[test]
    fn same_key_authenticates_both_ways() {
        let (s, c) = run_pair(b"secret", b"secret", Policy::default(), Policy::default());
        s.unwrap();
        c.unwrap();
        let strict = Policy { allow_md5: false };
        let (s, c) = run_pair(b"k", b"k", strict, strict);
        s.unwrap();
        c.unwrap();
    }

    #[test]
    fn different_keys_fail_on_both_sides() {
        let (s, c) = run_pair(b"secret", b"other", Policy::default(), Policy::default());
        let s = s.unwrap_err();
        let c = c.unwrap_err();
        assert!(s.is_authentication(), "{s}");
        assert!(s.to_string().contains("digest received was wrong"), "{s}");
        assert!(c.is_authentication(), "{c}");
        assert!(c.to_string().contains("digest sent was rejected"), "{c}");
    }

    #[test]
    fn a_challenge_is_answered_as_python_does() {
        // A modern challenge: `{sha256}` + HMAC-SHA256 over the whole message.
        let message = b"{sha256}0123456789012345678901234567890123456789";
        let r = create_response(b"key", message, Policy::default()).unwrap();
        assert!(r.starts_with(b"{sha256}"));
        assert_eq!(&r[8..], &Digest::Sha256.mac(b"key", message)[..]);
        verify_response(b"key", message, &r, Policy::default()).unwrap();
        // A legacy challenge (20 bytes): a bare HMAC-MD5.
        let legacy = b"01234567890123456789";
        let r = create_response(b"key", legacy, Policy::default()).unwrap();
        assert_eq!(r.len(), 16);
        assert_eq!(r, Digest::Md5.mac(b"key", legacy));
        verify_response(b"key", legacy, &r, Policy::default()).unwrap();
        // Refused when MD5 is off, on both sides.
        let strict = Policy { allow_md5: false };
        assert!(create_response(b"key", legacy, strict).is_err());
        assert!(verify_response(b"key", legacy, &r, strict).is_err());
        // Other allowed digests are answered in kind.
        for d in ["sha384", "sha3_256", "sha3_384", "md5"] {
            let mut m = format!("{{{d}}}").into_bytes();
            m.extend_from_slice(&[7; 40]);
            let r = create_response(b"key", &m, Policy::default()).unwrap();
            assert!(r.starts_with(format!("{{{d}}}").as_bytes()));
            verify_response(b"key", &m, &r, Policy::default()).unwrap();
        }
    }

    #[test]
    fn digest_prefixes_parse_like_pythons() {
        assert_eq!(
            split_digest(b"{sha256}abc").unwrap(),
            (Some(Digest::Sha256), &b"abc"[..])
        );
        assert_eq!(
            split_digest(b"{sha3_384}").unwrap(),
            (Some(Digest::Sha3_384), &b""[..])
        );
        // 16 and 20 bytes: legacy, whatever they contain.
        assert_eq!(split_digest(&[b'{'; 16]).unwrap().0, None);
        assert_eq!(split_digest(b"{sha256}aaaaaaaaaaaa").unwrap().0, None);
        for bad in [
            &b""[..],
            b"sha256}xxxxxxxxxxxxxxxxxxxxxxx",
            b"{sha1}xxxxxxxxxxxxxxxxxxxxxxxxxxx",
            b"{SHA256}xxxxxxxxxxxxxxxxxxxxxxxxxxx",
            b"{sha256xxxxxxxxxxxxxxxxxxxxxxxxxxx",
            // The closing brace must come within 10 bytes.
            b"{sha3_256xx}xxxxxxxxxxxxxxxxxxxxxxxxx",
            b"{",
            b"{}",
        ] {
            assert!(split_digest(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn wrong_length_and_garbage_answers_are_refused() {
        let m = new_message().unwrap();
        let good = create_response(b"k", &m, Policy::default()).unwrap();
        let mut short = good.clone();
        short.pop();
        let e = verify_response(b"k", &m, &short, Policy::default()).unwrap_err();
        assert!(e.contains("expected sha256 of length 32, got 31"), "{e}");
        // A bare MD5 answer to a modern challenge is accepted (Python 3.11 clients send it).
        let md5 = Digest::Md5.mac(b"k", &m);
        verify_response(b"k", &m, &md5, Policy::default()).unwrap();
        assert!(verify_response(b"x", &m, &md5, Policy::default()).is_err());
        // 20 bytes is read as MD5 of the wrong length.
        assert!(verify_response(b"k", &m, &[0; 20], Policy::default()).is_err());
        assert!(verify_response(b"k", &m, b"garbage garbage garbage", Policy::default()).is_err());
    }

    #[test]
    fn a_legacy_listener_is_answered_with_md5() {
        // Python 3.11's Listener: a 20-byte challenge, then WELCOME; then it answers ours
        // with a bare MD5 over our whole message (its verdict is then read by us).
        let legacy = [9u8; 20];
        let mut ch = CHALLENGE.to_vec();
        ch.extend_from_slice(&legacy);
        let ours = new_message().unwrap();
        let mut t = Scripted {
            replies: vec![ch, WELCOME.to_vec(), Digest::Md5.mac(b"k", &ours)],
            got: Vec::new(),
        };
        client(&mut t, b"k", &ours, Policy::default()).unwrap();
        assert_eq!(t.got[0], Digest::Md5.mac(b"k", &legacy));
        assert_eq!(&t.got[1][..CHALLENGE.len()], CHALLENGE);
        assert_eq!(t.got[2], WELCOME);
    }

    #[test]
    fn protocol_errors_are_authentication_errors() {
        for (replies, want) in [
            (vec![b"hello".to_vec()], "expected a challenge"),
            (vec![b"#CHALLENGE#short".to_vec()], "challenge too short"),
            (
                vec![b"#CHALLENGE#{nope}xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx".to_vec()],
                "unsupported digest",
            ),
            (
                {
                    let mut c = CHALLENGE.to_vec();
                    c.extend_from_slice(&[1; 40]);
                    vec![c, FAILURE.to_vec()]
                },
                "unsupported",
            ),
        ] {
            let mut t = Scripted {
                replies,
                got: Vec::new(),
            };
            let e = client(&mut t, b"k", &new_message().unwrap(), Policy::default()).unwrap_err();
            assert!(e.is_authentication(), "{e}");
            assert!(e.to_string().contains(want), "{e} / {want}");
        }
        // A rejected answer: FAILURE.
        let m = b"{sha256}0123456789012345678901234567890123456789";
        let mut c = CHALLENGE.to_vec();
        c.extend_from_slice(m);
        let mut t = Scripted {
            replies: vec![c, FAILURE.to_vec()],
            got: Vec::new(),
        };
        let e = client(&mut t, b"k", &new_message().unwrap(), Policy::default()).unwrap_err();
        assert!(e.to_string().contains("rejected"), "{e}");
        // The challenger says FAILURE when the answer is wrong.
        let mut t = Scripted {
            replies: vec![b"{sha256}".iter().copied().chain([0; 32]).collect()],
            got: Vec::new(),
        };
        let e = deliver_challenge(&mut t, b"k", &new_message().unwrap(), Policy::default())
            .unwrap_err();
        assert!(e.is_authentication(), "{e}");
        assert_eq!(t.got.last().unwrap(), FAILURE);
    }

    #[test]
    fn challenges_are_random() {
        let a = new_message().unwrap();
        let b = new_message().unwrap();
        assert_eq!(a.len(), 8 + MESSAGE_LENGTH);
        assert_ne!(a, b);
    }

    /// Vectors computed with Python's `hmac` module:
    /// `hmac.new(b"gpuproc-key", b"{sha256}" + bytes(range(40)), "sha256").hexdigest()` and
    /// the same with `"md5"`, `"sha3_256"`.
    #[test]
    fn macs_match_pythons_hmac() {
        let mut m = b"{sha256}".to_vec();
        m.extend(0u8..40);
        let hex = |v: Vec<u8>| v.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(hex(Digest::Sha256.mac(b"gpuproc-key", &m)), PY_SHA256);
        assert_eq!(hex(Digest::Md5.mac(b"gpuproc-key", &m)), PY_MD5);
        assert_eq!(hex(Digest::Sha3_256.mac(b"gpuproc-key", &m)), PY_SHA3_256);
        // Python 3.12's `_create_response(b"gpuproc-key", m)`: `{sha256}` and the MAC.
        let response = create_response(b"gpuproc-key", &m, Policy::default()).unwrap();
        assert_eq!(hex(response), format!("7b7368613235367d{PY_SHA256}"));
        // ... and for a legacy 20-byte challenge, `bytes(range(20))`: a bare HMAC-MD5.
        let legacy: Vec<u8> = (0u8..20).collect();
        let response = create_response(b"gpuproc-key", &legacy, Policy::default()).unwrap();
        assert_eq!(hex(response), "ad7af9e9846f4b00a5da5989d6b481ea");
    }

    const PY_SHA256: &str = "34b4861aba23009d5bbec51d583eaaf1ddac144f0dba6a982a154d50e38c09de";
    const PY_MD5: &str = "08da794f34f030d94567fcffe99142bd";
    const PY_SHA3_256: &str = "a8e948542c54ef89db313a2b95bce1a3b86ce51b26b3248e11dbc2acf6599b8d";
}
