//! Config file parsing (`berth::config::Config::load_with_env`) on arbitrary
//! TOML. Invariants: no panic; an accepted config mirrors its default
//! registry and every registry has an endpoint; a secret that came from the
//! environment never shows in `Debug`.
#![no_main]

use berth::cli::ServeArgs;
use berth::config::Config;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "Zq9-fuzz-env-secret-Xw2";

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // File-valued keys are read; never let the fuzzer name a device or a
    // pseudo-file that blocks or never ends (/dev/zero, /dev/stdin, ...).
    if ["/dev", "/proc", "/sys", "/run"]
        .iter()
        .any(|p| text.contains(p))
    {
        return;
    }
    let args = ServeArgs {
        cache_dir: Some("/nonexistent/berth-fuzz-cache".into()),
        ..Default::default()
    };
    let env = |k: &str| (k == "BERTH_FUZZ_SECRET").then(|| SECRET.to_owned());
    match Config::load_with_env(&args, Some(text), None, &env) {
        Ok(c) => {
            assert!(c.registries.contains_key(&c.default_registry));
            for r in c.registries.values() {
                assert!(!r.endpoints.is_empty(), "{:?}", r.host);
            }
            let shown = format!("{c:?}");
            assert!(
                !shown.contains(SECRET) || text.contains(SECRET),
                "an environment secret leaked into Debug"
            );
        }
        Err(e) => {
            assert!(!e.to_string().contains(SECRET) || text.contains(SECRET));
        }
    }
});
