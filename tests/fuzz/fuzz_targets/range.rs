//! `Range` header parsing (`berth::server::range::parse_range`).
//! Invariants: no panic; a range that is accepted lies inside the blob and
//! is not empty; a refusal is a 416.
#![no_main]

use berth::server::range::parse_range;
use http::HeaderValue;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let raw = u64::from_le_bytes(data[..8].try_into().expect("8 bytes"));
    // Mostly small sizes (where off-by-ones live), sometimes huge ones.
    let size = if raw & 1 == 0 { raw % 4096 } else { raw };
    let Ok(h) = HeaderValue::from_bytes(&data[8..]) else {
        return;
    };
    match parse_range(Some(&h), size) {
        Ok(Some(r)) => assert!(r.start < r.end && r.end <= size, "{r:?} of {size}"),
        Ok(None) => {}
        Err(e) => assert_eq!(e.status().as_u16(), 416),
    }
});
