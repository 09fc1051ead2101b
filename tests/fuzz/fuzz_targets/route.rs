//! Request routing: `berth::server::route::parse` on arbitrary methods,
//! paths and queries. Invariants: no panic; every refusal is a client error
//! (4xx); every accepted route is a read (GET/HEAD) of a mirrored registry
//! with a repository that is a safe path (no empty, `.` or `..` component),
//! and routing it again from its own parts gives the same route.
#![no_main]

use berth::error::{Error, Source};
use berth::registry::{RegistryHost, Repository};
use berth::server::route::{parse, Registries, Route, Target};
use http::Method;
use libfuzzer_sys::fuzz_target;

const MIRRORED: [&str; 4] = ["docker.io", "ghcr.io", "localhost:5000", "registry.k8s.io"];

fn method(b: u8) -> Method {
    match b % 8 {
        0 => Method::GET,
        1 => Method::HEAD,
        2 => Method::PUT,
        3 => Method::DELETE,
        4 => Method::POST,
        5 => Method::PATCH,
        6 => Method::OPTIONS,
        _ => Method::from_bytes(b"BREW").expect("extension method"),
    }
}

fn route(m: &Method, path: &str, query: Option<&str>) -> Result<Route, Error> {
    let default: RegistryHost = "docker.io".parse().expect("default registry");
    let mirrored = |h: &RegistryHost| MIRRORED.contains(&h.as_str());
    let regs = Registries {
        default: &default,
        mirrored: &mirrored,
    };
    parse(m, path, query, &regs)
}

fn check_target(t: &Target) {
    assert!(MIRRORED.contains(&t.registry.as_str()), "{t:?}");
    let repo = t.repo.as_str();
    assert!(repo.len() <= 255, "{t:?}");
    assert!(
        repo.split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".."),
        "unsafe repository path {repo:?}"
    );
    let again: Repository = repo.parse().expect("a routed repository re-parses");
    assert_eq!(again, t.repo);
}

fn same_target(a: &Target, b: &Target) {
    assert_eq!((&a.registry, &a.repo), (&b.registry, &b.repo));
}

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let m = method(m);
    let text = String::from_utf8_lossy(rest);
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (&*text, None),
    };
    let parsed = match route(&m, path, query) {
        Ok(r) => r,
        Err(e) => {
            assert_eq!(e.source_kind(), Source::Client, "{e:?}");
            assert!(e.status().is_client_error(), "{e:?}");
            let _ = (e.code(), e.detail(), e.to_string());
            return;
        }
    };
    assert!(m == Method::GET || m == Method::HEAD, "{m} accepted");
    assert!(path.len() <= 2048);
    let _ = parsed.label();
    // Route the canonical form of what was understood: it must mean the same.
    let ns = |t: &Target| format!("ns={}", t.registry);
    match &parsed {
        Route::Manifest(t, r) => {
            check_target(t);
            let again = route(&m, &format!("/v2/{}/manifests/{r}", t.repo), Some(&ns(t)));
            match again {
                Ok(Route::Manifest(t2, r2)) => {
                    same_target(t, &t2);
                    assert_eq!(&r2, r);
                }
                other => panic!("{parsed:?} re-routed as {other:?}"),
            }
        }
        Route::Blob(t, d) | Route::Referrers(t, d) => {
            check_target(t);
            let kind = if matches!(parsed, Route::Blob(..)) {
                "blobs"
            } else {
                "referrers"
            };
            let again = route(&m, &format!("/v2/{}/{kind}/{d}", t.repo), Some(&ns(t)));
            match again {
                Ok(Route::Blob(t2, d2) | Route::Referrers(t2, d2)) => {
                    same_target(t, &t2);
                    assert_eq!(&d2, d);
                }
                other => panic!("{parsed:?} re-routed as {other:?}"),
            }
        }
        Route::Tags(t) => {
            check_target(t);
            match route(&m, &format!("/v2/{}/tags/list", t.repo), Some(&ns(t))) {
                Ok(Route::Tags(t2)) => same_target(t, &t2),
                other => panic!("{parsed:?} re-routed as {other:?}"),
            }
        }
        Route::Ping | Route::Livez | Route::Readyz | Route::Metrics => {}
    }
});
