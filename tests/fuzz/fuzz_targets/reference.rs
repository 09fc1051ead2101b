//! Reference and digest parsing: `Digest`, `Reference`, `Repository`, `Tag`
//! and `RegistryHost` (`FromStr`). Invariants: no panic; whatever parses is
//! safe as a path component and prints back to the same value.
#![no_main]

use berth::registry::{Digest, Reference, RegistryHost, Repository, Tag};
use libfuzzer_sys::fuzz_target;

fn safe_component(c: &str) -> bool {
    !c.is_empty() && c != "." && c != ".." && !c.contains(['/', '\\', '\0'])
}

fuzz_target!(|data: &[u8]| {
    let _ = Digest::of(data);
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(d) = s.parse::<Digest>() {
        assert_eq!(d.to_string(), s);
        assert_eq!(d.hex().len(), 64);
        assert!(d
            .hex()
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    if let Ok(r) = s.parse::<Repository>() {
        assert_eq!(r.as_str(), s);
        assert!(s.len() <= 255);
        assert!(s.split('/').all(safe_component), "{s:?}");
    }
    if let Ok(t) = s.parse::<Tag>() {
        assert_eq!(t.as_str(), s);
        assert!(s.len() <= 128);
        assert!(safe_component(s), "{s:?}");
    }
    if let Ok(r) = s.parse::<Reference>() {
        let again: Reference = r.to_string().parse().expect("a reference re-parses");
        assert_eq!(again, r);
        let _ = format!("{r:?}");
    }
    if let Ok(h) = s.parse::<RegistryHost>() {
        assert_eq!(h.as_str(), s.to_ascii_lowercase());
        assert!(safe_component(h.as_str()), "{s:?}");
        let again: RegistryHost = h.as_str().parse().expect("a host re-parses");
        assert_eq!(again, h);
    }
    let _ = RegistryHost::looks_like_host(s);
});
