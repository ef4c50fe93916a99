//! The metadata store's records (`snapshots` table values): decoding any bytes gives a record
//! or `Corrupt`, never a panic; a decoded record re-encodes to bytes that decode the same; and
//! any record built from the input survives encode then decode.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use rustfuse_snapshotter::Error;
use rustfuse_snapshotter::store::{Record, decode, encode};

fn timestamp(u: &mut Unstructured<'_>) -> Result<Option<prost_types::Timestamp>> {
    Ok(if u.arbitrary()? {
        Some(prost_types::Timestamp {
            seconds: u.arbitrary()?,
            nanos: u.arbitrary()?,
        })
    } else {
        None
    })
}

fn record(u: &mut Unstructured<'_>) -> Result<Record> {
    let mut labels = HashMap::new();
    for _ in 0..u.int_in_range(0..=4)? {
        labels.insert(u.arbitrary::<String>()?, u.arbitrary::<String>()?);
    }
    Ok(Record {
        id: u.arbitrary()?,
        kind: u.arbitrary()?,
        parent: u.arbitrary()?,
        created: timestamp(u)?,
        updated: timestamp(u)?,
        labels,
        size: u.arbitrary()?,
        inodes: u.arbitrary()?,
        parent_ids: u.arbitrary()?,
        redirect_dirs: u.arbitrary()?,
        fuse_upper: u.arbitrary()?,
    })
}

fuzz_target!(|data: &[u8]| {
    // The input as stored bytes.
    match decode("k", data) {
        Ok(r) => {
            let again = decode("k", &encode(&r)).expect("a decoded record re-encodes");
            assert_eq!(again, r, "decode(encode(decode(bytes))) differs");
            // A kind the store does not know is corruption naming the key, never a default.
            if let Err(e) = r.kind("k") {
                assert!(
                    matches!(&e, Error::Corrupt(msg) if msg.contains("\"k\"")),
                    "an unknown kind gives {e:?}, not Corrupt naming the key"
                );
            }
        }
        Err(Error::Corrupt(msg)) => assert!(msg.contains("\"k\""), "the error names the key"),
        Err(e) => panic!("decode failed with {e:?}, not Corrupt"),
    }
    // The input as the fields of a record.
    if let Ok(r) = record(&mut Unstructured::new(data)) {
        let back = decode("k", &encode(&r)).expect("an encoded record decodes");
        assert_eq!(back, r, "encode then decode changed the record");
    }
});
