//! The codec against postcard: same bytes, same values, same refusals.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};

use super::bulk::Slice;

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Batch {
    ids: Vec<u32>,
    x: Vec<f32>,
    name: String,
    mask: Vec<bool>,
    raw: Vec<u8>,
    deltas: Vec<i64>,
    boxed: Box<[f64]>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Msg {
    Empty,
    Tokens(Vec<u16>),
    Pair(Vec<i8>, Vec<usize>),
    Wide {
        big: Vec<u128>,
        neg: Vec<i128>,
        small: Vec<i16>,
        sizes: Vec<isize>,
    },
    Nested(Vec<Vec<i32>>),
    Other(
        VecDeque<u32>,
        BTreeMap<u8, Vec<u64>>,
        Option<Vec<f64>>,
        char,
    ),
}

fn batch() -> impl Strategy<Value = Batch> {
    (
        prop::collection::vec(any::<u32>(), 0..300),
        prop::collection::vec(any::<f32>(), 0..300),
        ".{0,20}",
        prop::collection::vec(any::<bool>(), 0..50),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(any::<i64>(), 0..100),
        prop::collection::vec(any::<f64>(), 0..50),
    )
        .prop_map(|(ids, x, name, mask, raw, deltas, boxed)| Batch {
            ids,
            x,
            name,
            mask,
            raw,
            deltas,
            boxed: boxed.into(),
        })
}

fn msg() -> impl Strategy<Value = Msg> {
    prop_oneof![
        Just(Msg::Empty),
        prop::collection::vec(any::<u16>(), 0..100).prop_map(Msg::Tokens),
        (
            prop::collection::vec(any::<i8>(), 0..100),
            prop::collection::vec(any::<usize>(), 0..100)
        )
            .prop_map(|(a, b)| Msg::Pair(a, b)),
        (
            prop::collection::vec(any::<u128>(), 0..30),
            prop::collection::vec(any::<i128>(), 0..30),
            prop::collection::vec(any::<i16>(), 0..30),
            prop::collection::vec(any::<isize>(), 0..30),
        )
            .prop_map(|(big, neg, small, sizes)| Msg::Wide {
                big,
                neg,
                small,
                sizes
            }),
        prop::collection::vec(prop::collection::vec(any::<i32>(), 0..20), 0..10)
            .prop_map(Msg::Nested),
        (
            prop::collection::vec_deque(any::<u32>(), 0..20),
            prop::collection::btree_map(
                any::<u8>(),
                prop::collection::vec(any::<u64>(), 0..5),
                0..5
            ),
            prop::option::of(prop::collection::vec(any::<f64>(), 0..20)),
            any::<char>(),
        )
            .prop_map(|(a, b, c, d)| Msg::Other(a, b, c, d)),
    ]
}

/// Both decoders on the same bytes: the same outcome (compared through postcard's encoding,
/// so NaNs compare equal), or the same error.
fn same_decoding<T: Serialize + DeserializeOwned>(bytes: &[u8]) {
    let ours = super::from_bytes::<T>(bytes);
    let theirs = postcard::from_bytes::<T>(bytes);
    match (ours, theirs) {
        (Ok(a), Ok(b)) => assert_eq!(
            postcard::to_stdvec(&a).unwrap(),
            postcard::to_stdvec(&b).unwrap()
        ),
        (Err(a), Err(b)) => assert_eq!(a.kind(), &b),
        (a, b) => panic!(
            "codec gave {:?}, postcard {:?}",
            a.map(|_| ()),
            b.map(|_| ())
        ),
    }
}

fn round_trip<T: Serialize + DeserializeOwned>(value: &T) {
    let ours = super::to_vec(value).unwrap();
    assert_eq!(
        ours,
        postcard::to_stdvec(value).unwrap(),
        "encodings differ"
    );
    assert_eq!(super::encoded_len(value).unwrap(), ours.len());
    same_decoding::<T>(&ours);
    let mut buf = vec![0u8; ours.len()];
    assert_eq!(super::to_slice(value, &mut buf).unwrap(), &ours[..]);
    if !ours.is_empty() {
        let mut short = vec![0u8; ours.len() - 1];
        assert_eq!(
            super::to_slice(value, &mut short).map_err(|e| e.kind().clone()),
            Err(postcard::Error::SerializeBufferFull)
        );
    }
    // Every truncation is refused the same way by both.
    for cut in [
        0,
        ours.len() / 3,
        ours.len() / 2,
        ours.len().saturating_sub(1),
    ] {
        same_decoding::<T>(&ours[..cut]);
    }
}

proptest! {
    #[test]
    fn bulk_and_element_wise_encodings_are_the_same_bytes_and_values(b in batch(), m in msg()) {
        round_trip(&b);
        round_trip(&m);
        round_trip(&(b.x.clone(), m.clone()));
        prop_assert_eq!(super::to_vec(b.x.as_slice()).unwrap(), postcard::to_stdvec(&b.x).unwrap());
        prop_assert_eq!(super::to_vec(&b.boxed).unwrap(), postcard::to_stdvec(&b.boxed).unwrap());
        round_trip(&vec![m.clone(), m]);
    }

    #[test]
    fn any_bytes_decode_as_postcard_decodes_them(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        same_decoding::<Batch>(&bytes);
        same_decoding::<Msg>(&bytes);
        same_decoding::<Vec<bool>>(&bytes);
        same_decoding::<Vec<f32>>(&bytes);
        same_decoding::<Vec<u16>>(&bytes);
        same_decoding::<Vec<i128>>(&bytes);
        same_decoding::<(Vec<u8>, String, char)>(&bytes);
    }
}

#[test]
fn vectors_and_slices_of_numbers_take_the_bulk_path() {
    let v = vec![1.5f32, 2.5];
    assert!(matches!(Slice::of(&&v), Some(Slice::Raw { count: 2, .. })));
    assert!(matches!(
        Slice::of(&v.as_slice()),
        Some(Slice::Raw { count: 2, .. })
    ));
    assert!(Slice::of(&&vec![1u32]).is_some());
    assert!(Slice::of(&&vec![1i128]).is_some());
    assert!(Slice::of(&&vec!["a"]).is_none());
    assert!(Slice::of(&&VecDeque::from([1u8])).is_none());
    assert!(Slice::of(&&[[1u8; 2]][..]).is_none());
    // Decoding: the visitor of `Vec<T>` was recognised for every bulk `T`.
    let kinds = if cfg!(target_endian = "little") {
        15
    } else {
        13
    };
    assert_eq!(super::bulk::bulk_vec_kinds(), kinds);
}

#[test]
fn a_hostile_length_allocates_nothing_before_the_input_runs_out() {
    // 2^62 f32s announced in 10 bytes.
    let mut bytes = Vec::new();
    super::append(&(1u64 << 62), &mut bytes).unwrap();
    assert_eq!(
        super::from_bytes::<Vec<f32>>(&bytes).map_err(|e| e.kind().clone()),
        Err(postcard::Error::DeserializeUnexpectedEnd)
    );
    assert_eq!(
        super::from_bytes::<Vec<u64>>(&bytes).map_err(|e| e.kind().clone()),
        Err(postcard::Error::DeserializeUnexpectedEnd)
    );
    // A bad bool before the end is reported as such, as postcard does.
    let bytes = [3, 1, 2];
    assert_eq!(
        super::from_bytes::<Vec<bool>>(&bytes).map_err(|e| e.kind().clone()),
        Err(postcard::Error::DeserializeBadBool)
    );
}

/// A `Vec<f32>` built by a custom visitor (here, doubling each element) keeps its visitor.
#[derive(Deserialize, Debug, PartialEq)]
struct Doubled(#[serde(deserialize_with = "doubled")] Vec<f32>);

fn doubled<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<f32>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("floats")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut s: A) -> Result<Vec<f32>, A::Error> {
            let mut out = Vec::new();
            while let Some(x) = s.next_element::<f32>()? {
                out.push(2.0 * x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V)
}

#[test]
fn a_custom_visitor_producing_a_vector_is_not_bypassed() {
    let bytes = super::to_vec(&vec![1.0f32, 2.0]).unwrap();
    assert_eq!(
        super::from_bytes::<Doubled>(&bytes).unwrap(),
        Doubled(vec![2.0, 4.0])
    );
}
