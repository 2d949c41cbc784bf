//! The frame of one message, as Python's `multiprocessing.connection.Connection` writes it on
//! a socket: a 4-byte big-endian signed length, then the payload; a payload over
//! `0x7fffffff` bytes has the length -1 there, then its length as an 8-byte big-endian
//! unsigned number.

/// The longest payload whose length fits the 4-byte form.
pub(crate) const SHORT_MAX: u64 = 0x7fff_ffff;

/// The longest header: the -1 marker and an 8-byte length.
pub(crate) const MAX_HEADER: usize = 12;

/// The header of a payload of `len` bytes, and how many of its bytes are used (4 or 12).
pub(crate) fn header(len: u64) -> ([u8; MAX_HEADER], usize) {
    let mut h = [0u8; MAX_HEADER];
    if len <= SHORT_MAX {
        // Fits: at most 0x7fffffff.
        h[..4].copy_from_slice(&(len as u32).to_be_bytes());
        (h, 4)
    } else {
        h[..4].copy_from_slice(&(-1i32).to_be_bytes());
        h[4..].copy_from_slice(&len.to_be_bytes());
        (h, MAX_HEADER)
    }
}

/// What the header bytes read so far say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Parsed {
    /// The header is this many bytes long in all; fewer have been read.
    Need(usize),
    /// The payload is this many bytes long.
    Len(u64),
    /// A negative length other than the -1 marker: no Python or gpuproc sender writes it.
    Bad(i32),
}

/// Parses the header bytes read so far (`head` is at most [`MAX_HEADER`] long).
pub(crate) fn parse(head: &[u8]) -> Parsed {
    let Some(first) = head.get(..4) else {
        return Parsed::Need(4);
    };
    let short = i32::from_be_bytes([first[0], first[1], first[2], first[3]]);
    match short {
        n if n >= 0 => Parsed::Len(n as u64),
        -1 => match head.get(4..MAX_HEADER) {
            Some(l) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(l);
                Parsed::Len(u64::from_be_bytes(b))
            }
            None => Parsed::Need(MAX_HEADER),
        },
        n => Parsed::Bad(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(len: u64) -> u64 {
        let (h, n) = header(len);
        let mut read = Vec::new();
        for &b in &h[..n] {
            if let Parsed::Len(l) = parse(&read) {
                panic!("length {l} parsed from a partial header");
            }
            read.push(b);
        }
        match parse(&read) {
            Parsed::Len(l) => l,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn headers_are_pythons() {
        // struct.pack("!i", n)
        assert_eq!(header(0), ([0; 12], 4));
        assert_eq!(&header(5).0[..4], &[0, 0, 0, 5]);
        assert_eq!(&header(0x1234_5678).0[..4], &[0x12, 0x34, 0x56, 0x78]);
        assert_eq!(header(SHORT_MAX).1, 4);
        assert_eq!(&header(SHORT_MAX).0[..4], &[0x7f, 0xff, 0xff, 0xff]);
        // struct.pack("!i", -1) + struct.pack("!Q", n)
        let (h, n) = header(SHORT_MAX + 1);
        assert_eq!(n, 12);
        assert_eq!(h, [0xff, 0xff, 0xff, 0xff, 0, 0, 0, 0, 0x80, 0, 0, 0]);
        let (h, _) = header(5 << 30);
        assert_eq!(&h[4..], &(5u64 << 30).to_be_bytes());
    }

    #[test]
    fn headers_round_trip() {
        for len in [
            0,
            1,
            255,
            256,
            65_536,
            SHORT_MAX,
            SHORT_MAX + 1,
            1 << 40,
            u64::MAX,
        ] {
            assert_eq!(round_trip(len), len);
        }
    }

    #[test]
    fn partial_and_bad_headers() {
        assert_eq!(parse(&[]), Parsed::Need(4));
        assert_eq!(parse(&[0, 0, 1]), Parsed::Need(4));
        assert_eq!(parse(&[0xff; 4]), Parsed::Need(12));
        assert_eq!(parse(&[0xff; 11]), Parsed::Need(12));
        assert_eq!(parse(&[0xff; 12]), Parsed::Len(u64::MAX));
        assert_eq!(parse(&[0xff, 0xff, 0xff, 0xfe]), Parsed::Bad(-2));
        assert_eq!(parse(&[0x80, 0, 0, 0]), Parsed::Bad(i32::MIN));
        // Python also accepts the long form for a short payload.
        let mut h = vec![0xff; 4];
        h.extend_from_slice(&3u64.to_be_bytes());
        assert_eq!(parse(&h), Parsed::Len(3));
    }
}
