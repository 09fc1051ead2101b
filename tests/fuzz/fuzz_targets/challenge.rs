//! `WWW-Authenticate` parsing (`berth::upstream::auth::parse_challenge`)
//! and the realm check that decides where credentials may be sent
//! (`realm_allowed`). Invariants: no panic; a realm is only allowed on the
//! upstream's own registrable domain, or on loopback for a loopback upstream.
#![no_main]

use berth::upstream::auth::{parse_challenge, realm_allowed, Challenge};
use libfuzzer_sys::fuzz_target;
use url::Url;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let Some(Challenge::Bearer { realm, .. }) = parse_challenge(s) else {
        return;
    };
    let Ok(realm) = Url::parse(&realm) else {
        return;
    };
    let host = realm.host_str().unwrap_or("").to_ascii_lowercase();
    let hub = Url::parse("https://registry-1.docker.io/").expect("url");
    if realm_allowed(&hub, &realm) {
        assert!(
            host == "docker.io" || host.ends_with(".docker.io"),
            "credentials for docker.io would go to {host:?}"
        );
    }
    let local = Url::parse("http://127.0.0.1:5000/").expect("url");
    if realm_allowed(&local, &realm) {
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        assert!(loopback, "credentials for 127.0.0.1 would go to {host:?}");
    }
});
