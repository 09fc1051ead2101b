//! The config file, defaults, and the validated [`Config`] the daemon runs
//! on, resolved from the `serve` flags ([`crate::cli::ServeArgs`]).
//!
//! Precedence: flag > environment variable (every flag has a `BERTH_*` twin,
//! via clap) > config file (`--config`, TOML) > embedded defaults. Loading is
//! a pure function of the parsed arguments and the file text, so tests never
//! touch the process environment. Unknown keys in the file are errors that
//! name the key.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::ServeArgs;
use crate::registry::RegistryHost;
use crate::telemetry::LogFormat;

pub mod values;

use values::err;
pub use values::{parse_capacity, parse_rate, Capacity, ConfigError, Credentials};

/// The config file. Every field is optional; unknown keys are errors.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<SocketAddr>,
    cache_dir: Option<PathBuf>,
    default_registry: Option<String>,
    #[serde(with = "humantime_serde")]
    tag_ttl: Option<Duration>,
    cache_capacity: Option<String>,
    #[serde(with = "humantime_serde")]
    connect_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    read_timeout: Option<Duration>,
    min_rate: Option<String>,
    #[serde(with = "humantime_serde")]
    verify_hold: Option<Duration>,
    #[serde(with = "humantime_serde")]
    header_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    idle_timeout: Option<Duration>,
    #[serde(with = "humantime_serde")]
    send_timeout: Option<Duration>,
    metrics_listen: Option<SocketAddr>,
    log_format: Option<LogFormat>,
    docker_config: Option<PathBuf>,
    pins: Vec<String>,
    #[serde(with = "humantime_serde")]
    retention: Option<Duration>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    tls_client_ca: Option<PathBuf>,
    client_token_file: Option<PathBuf>,
    prefetch: FilePrefetch,
    registries: BTreeMap<String, crate::upstream::config::FileRegistry>,
}

/// The `[prefetch]` table.
#[derive(Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct FilePrefetch {
    images: Vec<String>,
    platforms: Vec<String>,
    on_start: bool,
    #[serde(with = "humantime_serde")]
    interval: Option<Duration>,
    concurrency: Option<usize>,
    bandwidth: Option<String>,
    max_tags: Option<usize>,
}

/// What `berth prefetch` (and the daemon's prefetch schedule) fetches ahead.
#[derive(Debug, Clone, Default)]
pub struct PrefetchConfig {
    /// Image rules to fetch (pins are fetched too).
    pub images: crate::pins::Rules,
    /// Platforms (`os/arch[/variant]`, or `all`); empty means all.
    pub platforms: Vec<String>,
    /// Run once when the daemon starts.
    pub on_start: bool,
    /// Run again at this interval in the daemon.
    pub interval: Option<Duration>,
    /// Downloads at once.
    pub concurrency: usize,
    /// Bytes per second for prefetch downloads, all together.
    pub bandwidth: Option<u64>,
    /// Most tags per rule (newest-looking last in the upstream list are taken).
    pub max_tags: usize,
}

pub use crate::upstream::config::{EndpointConfig, RegistryConfig, DEFAULT_REGISTRIES};

/// The validated configuration the daemon runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// Registry API listener.
    pub listen: SocketAddr,
    /// Cache directory.
    pub cache_dir: PathBuf,
    /// Registry used when a request names none.
    pub default_registry: RegistryHost,
    /// Tag revalidation interval.
    pub tag_ttl: Duration,
    /// Cache size bound.
    pub capacity: Capacity,
    /// Upstream connect timeout.
    pub connect_timeout: Duration,
    /// Upstream read (stall) timeout.
    pub read_timeout: Duration,
    /// Minimum upstream body rate in bytes per second (0: none).
    pub min_rate: u64,
    /// How long a download holds its bytes back for verification.
    pub verify_hold: Duration,
    /// Client request-header read timeout (slow-loris guard).
    pub header_timeout: Duration,
    /// Client connection idle timeout (no open request, no traffic).
    pub idle_timeout: Duration,
    /// Client send timeout (a response's bytes not taken).
    pub send_timeout: Duration,
    /// Metrics/probe listener.
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    pub log_format: LogFormat,
    /// Mirrored registries by host.
    pub registries: BTreeMap<RegistryHost, RegistryConfig>,
    /// Images never evicted.
    pub pins: crate::pins::Rules,
    /// Unpinned content unused this long is removed (0 = never).
    pub retention: Duration,
    /// Prefetch rules and schedule.
    pub prefetch: PrefetchConfig,
    /// Serve TLS on the registry listener.
    pub tls: Option<crate::tls::TlsFiles>,
    /// Clients must send this token (`Authorization: Bearer <token>`, or as
    /// the Basic password) on registry API requests.
    pub client_token: Option<Secret>,
}

/// A secret string: `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Default listen address: loopback only; containerd on the node reaches it.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5050";
/// Default cache directory when running as a service.
pub const DEFAULT_CACHE_DIR: &str = "/var/lib/berth";
/// Default retention: Harbor's proxy-project default of 7 days since last use.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default tag TTL.
pub const DEFAULT_TAG_TTL: Duration = Duration::from_secs(300);
/// Default cache bound: half of the cache filesystem.
pub const DEFAULT_CAPACITY: Capacity = Capacity::Share(0.5);
/// Default connect timeout: short, so containerd falls back quickly.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Default read timeout (also the window of the minimum body rate).
pub const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Default minimum upstream body rate (bytes per second).
pub const DEFAULT_MIN_RATE: u64 = crate::cache::flight::DEFAULT_MIN_RATE;
/// Default verification hold of a download.
pub const DEFAULT_VERIFY_HOLD: Duration = crate::cache::flight::DEFAULT_VERIFY_HOLD;
/// Default client header read timeout.
pub const DEFAULT_HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// Default client idle timeout (nginx's `keepalive_timeout` is 75 s).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Default client send timeout (nginx's `send_timeout`): how long a client
/// may take none of a response's bytes (waiting for upstream never counts).
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);

impl Config {
    /// Read the `--config` file if any and build the config.
    pub fn from_args(args: &ServeArgs) -> Result<Config, ConfigError> {
        let text = match &args.config {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| err(format!("cannot read config file {}: {e}", path.display())))?,
            ),
            None => None,
        };
        Config::load(args, text.as_deref(), args.config.as_deref())
    }

    /// Build the config from parsed flags and the file's text, reading
    /// `*_env` indirections from the process environment.
    pub fn load(
        args: &ServeArgs,
        file_text: Option<&str>,
        file_path: Option<&Path>,
    ) -> Result<Config, ConfigError> {
        Config::load_with_env(args, file_text, file_path, &|k| std::env::var(k).ok())
    }

    /// Build the config (pure: the environment is a parameter).
    pub fn load_with_env(
        args: &ServeArgs,
        file_text: Option<&str>,
        file_path: Option<&Path>,
        env: crate::upstream::config::Env<'_>,
    ) -> Result<Config, ConfigError> {
        let where_ = file_path
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        let file: FileConfig = match file_text {
            Some(text) => toml::from_str(text)
                .map_err(|e| err(format!("{where_}: {}", e.to_string().trim())))?,
            None => FileConfig::default(),
        };
        // A flag wins over the file, the file over the default.
        macro_rules! pick {
            ($field:ident, $default:expr) => {
                args.$field.or(file.$field).unwrap_or($default)
            };
        }

        let docker_config = args.docker_config.clone().or(file.docker_config);
        let registries = crate::upstream::config::build(
            file.registries,
            &args.upstreams,
            docker_config.as_deref(),
            &where_,
            env,
        )?;

        let default_registry = args
            .default_registry
            .clone()
            .or(file.default_registry)
            .unwrap_or_else(|| "docker.io".into());
        let default_registry: RegistryHost = default_registry.parse().map_err(|_| {
            err(format!(
                "default registry {default_registry:?} is not a registry host"
            ))
        })?;
        if !registries.contains_key(&default_registry) {
            return Err(err(format!(
                "default registry {default_registry} is not one of the mirrored registries"
            )));
        }
        let capacity = match args
            .cache_capacity
            .as_deref()
            .or(file.cache_capacity.as_deref())
        {
            Some(s) => parse_capacity(s).map_err(|e| err(format!("cache capacity {s:?}: {e}")))?,
            None => DEFAULT_CAPACITY,
        };
        let listen = pick!(listen, DEFAULT_LISTEN.parse().expect("default listen"));
        let tls = match (
            args.tls_cert.clone().or(file.tls_cert),
            args.tls_key.clone().or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => {
                let files = crate::tls::TlsFiles {
                    cert,
                    key,
                    client_ca: args.tls_client_ca.clone().or(file.tls_client_ca),
                };
                crate::tls::server_config(&files).map_err(|e| err(format!("TLS: {e}")))?;
                Some(files)
            }
            (None, None) if args.tls_client_ca.is_some() || file.tls_client_ca.is_some() => {
                return Err(err("tls_client_ca needs tls_cert and tls_key"))
            }
            (None, None) => None,
            _ => return Err(err("tls_cert and tls_key go together")),
        };
        let client_token = match args.client_token_file.clone().or(file.client_token_file) {
            None => None,
            Some(p) => {
                let t = std::fs::read_to_string(&p)
                    .map_err(|e| err(format!("client token file {}: {e}", p.display())))?;
                let t = t.trim().to_owned();
                if t.len() < 16 {
                    return Err(err(format!(
                        "client token file {}: use a token of at least 16 characters",
                        p.display()
                    )));
                }
                Some(Secret(t))
            }
        };
        let header_timeout = pick!(header_timeout, DEFAULT_HEADER_TIMEOUT);
        if header_timeout.is_zero() {
            return Err(err("header timeout must be longer than 0s"));
        }
        let idle_timeout = pick!(idle_timeout, DEFAULT_IDLE_TIMEOUT);
        let send_timeout = pick!(send_timeout, DEFAULT_SEND_TIMEOUT);
        if idle_timeout.is_zero() || send_timeout.is_zero() {
            return Err(err("idle and send timeouts must be longer than 0s"));
        }
        let mut pin_texts = file.pins;
        pin_texts.extend(args.pins.iter().cloned());
        let pins = crate::pins::Rules::parse(&pin_texts).map_err(|e| err(format!("pins: {e}")))?;
        let fp = file.prefetch;
        let mut images = fp.images;
        images.extend(args.prefetch.iter().cloned());
        let prefetch = PrefetchConfig {
            images: crate::pins::Rules::parse(&images)
                .map_err(|e| err(format!("prefetch.images: {e}")))?,
            platforms: fp.platforms,
            on_start: fp.on_start,
            interval: fp.interval,
            concurrency: fp.concurrency.unwrap_or(4).clamp(1, 64),
            bandwidth: match fp.bandwidth.as_deref() {
                None => None,
                Some(s) => Some(parse_rate(s).ok_or_else(|| {
                    err("prefetch.bandwidth: expected a byte rate such as \"20MiB\" (per second)")
                })?),
            },
            max_tags: fp.max_tags.unwrap_or(20).max(1),
        };
        let min_rate = match args.min_rate.as_deref().or(file.min_rate.as_deref()) {
            None => DEFAULT_MIN_RATE,
            Some(s) => parse_rate(s).ok_or_else(|| {
                err("min_rate: expected a byte rate such as \"16KiB\" (per second), or 0")
            })?,
        };
        Ok(Config {
            listen,
            cache_dir: args
                .cache_dir
                .clone()
                .or(file.cache_dir)
                .unwrap_or_else(default_cache_dir),
            default_registry,
            tag_ttl: pick!(tag_ttl, DEFAULT_TAG_TTL),
            capacity,
            connect_timeout: pick!(connect_timeout, DEFAULT_CONNECT_TIMEOUT),
            read_timeout: pick!(read_timeout, DEFAULT_READ_TIMEOUT),
            min_rate,
            verify_hold: pick!(verify_hold, DEFAULT_VERIFY_HOLD),
            header_timeout,
            idle_timeout,
            send_timeout,
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            registries,
            pins,
            retention: pick!(retention, DEFAULT_RETENTION),
            prefetch,
            tls,
            client_token,
        })
    }
}

/// `/var/lib/berth` when it is usable (a service), else the user's cache
/// directory, so `cargo run -- serve` works without root.
fn default_cache_dir() -> PathBuf {
    let system = PathBuf::from(DEFAULT_CACHE_DIR);
    let usable = std::fs::create_dir_all(&system).is_ok() && tempfile_probe(&system);
    if usable {
        return system;
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("berth")
}

fn tempfile_probe(dir: &Path) -> bool {
    let probe = dir.join(format!(".probe-{}", std::process::id()));
    let ok = std::fs::write(&probe, b"").is_ok();
    let _ = std::fs::remove_file(&probe);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ServeArgs {
        ServeArgs::default()
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::load(&args(), None, None).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.default_registry.as_str(), "docker.io");
        let dh = &c.registries[&"docker.io".parse().unwrap()];
        assert_eq!(dh.primary_url().as_str(), "https://registry-1.docker.io/");
        for (h, _) in DEFAULT_REGISTRIES {
            assert!(c.registries.contains_key(&h.parse().unwrap()), "{h}");
        }
    }

    #[test]
    fn flags_override_file_and_add_registries() {
        let mut a = args();
        a.upstreams = vec![
            "docker.io=http://127.0.0.1:5001".into(),
            "my.reg:5000=http://127.0.0.1:5002".into(),
        ];
        a.tag_ttl = Some(Duration::from_secs(7));
        let file = r#"
            tag_ttl = "1m"
            cache_capacity = "10GiB"
            [registries."docker.io"]
            url = "https://hub.example.com"
            username = "robot"
            password = "s3cret"
        "#;
        let c = Config::load(&a, Some(file), None).unwrap();
        assert_eq!(c.tag_ttl, Duration::from_secs(7));
        assert_eq!(c.capacity, Capacity::Bytes(10 << 30));
        let dh = &c.registries[&"docker.io".parse().unwrap()];
        assert_eq!(dh.primary_url().as_str(), "http://127.0.0.1:5001/");
        assert!(matches!(
            dh.endpoints[0].credentials,
            Some(Credentials::Basic { .. })
        ));
        assert!(c.registries.contains_key(&"my.reg:5000".parse().unwrap()));
    }

    #[test]
    fn unknown_keys_are_named() {
        refused(None, Some("listen_addr = \"x\""), "listen_addr");
        refused(None, Some("[registries.\"docker.io\"]\nusr = \"x\""), "usr");
    }

    /// Loading `upstreams` flags and `file` fails with an error naming `what`.
    fn refused(upstreams: Option<&str>, file: Option<&str>, what: &str) {
        let mut a = args();
        a.upstreams = upstreams.into_iter().map(Into::into).collect();
        let e = Config::load(&a, file, None).unwrap_err();
        assert!(e.0.contains(what), "{e}");
    }

    #[test]
    fn bad_values_are_explained() {
        refused(Some("docker.io"), None, "REGISTRY=URL");
        refused(Some("docker.io=ftp://x"), None, "scheme");
        refused(
            None,
            Some("[registries.\"new.io\"]\ninsecure = true"),
            "url",
        );
        let file = "[registries.\"docker.io\"]\nusername = \"u\"";
        refused(None, Some(file), "password");
        let mut a = args();
        a.default_registry = Some("nope.io".into());
        assert!(Config::load(&a, None, None).is_err());
    }

    #[test]
    fn capacities() {
        assert_eq!(parse_capacity("50%").unwrap(), Capacity::Share(0.5));
        assert_eq!(parse_capacity("1GiB").unwrap(), Capacity::Bytes(1 << 30));
        assert_eq!(
            parse_capacity("1.5 GB").unwrap(),
            Capacity::Bytes(1_500_000_000)
        );
        assert_eq!(parse_capacity("4096").unwrap(), Capacity::Bytes(4096));
        assert!(parse_capacity("0").is_err());
        assert!(parse_capacity("150%").is_err());
        assert!(parse_capacity("3 parsecs").is_err());
    }

    #[test]
    fn shipped_example_config_loads() {
        let text = include_str!("../deploy/config.example.toml");
        let ca = tempfile::NamedTempFile::new().unwrap();
        let text = text.replace("/etc/berth/internal-ca.pem", ca.path().to_str().unwrap());
        let c = Config::load(&args(), Some(&text), None).unwrap();
        assert!(c
            .registries
            .contains_key(&"registry.internal:5000".parse().unwrap()));
        assert_eq!(c.tag_ttl, Duration::from_secs(300));
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let c = Credentials::Basic {
            username: "robot".into(),
            password: "hunter2".into(),
        };
        let d = format!("{c:?}");
        assert!(d.contains("robot") && !d.contains("hunter2"), "{d}");
        assert!(!format!("{:?}", Credentials::Token("tok123".into())).contains("tok123"));
    }
}
