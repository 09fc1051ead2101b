//! The command line: the clap structs of `berth` and its subcommands. Every
//! flag has a `BERTH_*` environment twin. Definitions only: `main` parses,
//! [`crate::config::Config::from_args`] resolves the `serve` flags, and each
//! command receives the values it uses.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::telemetry::LogFormat;

/// `berth`: a node-local pull-through OCI registry mirror.
#[derive(Debug, Parser)]
#[command(name = "berth", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the mirror.
    Serve(ServeArgs),
    /// Test every configured upstream endpoint: reachability, TLS, auth, rate-limit headroom.
    Check(WithConfig<CheckArgs>),
    /// Point containerd at berth: write or remove `<certs.d>/<registry>/hosts.toml`.
    #[command(subcommand)]
    Containerd(ContainerdCommand),
    /// Print k3s/RKE2 `registries.yaml` mirror entries, or merge them into a file.
    K3s(K3sArgs),
    /// List cached images: tag, digest, platforms, size, last use, pinned, complete.
    Ls(WithConfig<LsArgs>),
    /// Re-hash every cached blob; move mismatches to `<cache>/quarantine/`.
    Verify(ServeArgs),
    /// Remove unpinned content unused for longer than the retention period, now.
    Gc(WithConfig<GcArgs>),
    /// Write cached images to an OCI image layout archive (skopeo `oci-archive:`).
    Export(WithConfig<ExportArgs>),
    /// Seed the cache from an OCI image layout archive, verifying every digest.
    Import(WithConfig<ImportArgs>),
    /// Fetch the images named by the prefetch rules and pins into the cache.
    Prefetch(WithConfig<PrefetchArgs>),
}

/// A command's own flags, then the `serve` flags its config comes from.
#[derive(Debug, Clone, Args)]
pub struct WithConfig<T: Args> {
    /// The command's own flags.
    #[command(flatten)]
    pub flags: T,
    /// Config file, cache directory, upstreams: as for `berth serve`.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Flags of `berth check` (besides those of `serve`).
#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Only these registries (repeatable); all configured ones by default.
    #[arg(long = "registry")]
    pub registries: Vec<String>,
}

/// `berth containerd ...`
#[derive(Debug, Subcommand)]
// Parsed once per process; boxing would only obscure the clap derive.
#[allow(clippy::large_enum_variant)]
pub enum ContainerdCommand {
    /// Write a hosts.toml per mirrored registry (backing up files that are not berth's).
    Install(ContainerdInstallArgs),
    /// Remove berth's hosts.toml files and restore the backed-up ones.
    Uninstall(ContainerdUninstallArgs),
}

/// Which registries to route through berth and where berth listens; shared
/// by `berth containerd install` and `berth k3s`. By default the registries
/// and the listen address are those `berth serve` would use with the same
/// `--config`/`--upstream`/`--listen` (and `BERTH_*` variables).
#[derive(Debug, Clone, Default, Args)]
pub struct MirrorArgs {
    /// berth's TOML config file (read for its registries and listen address).
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// The address `berth serve` listens on; the mirror URL is derived from it.
    #[arg(long, env = "BERTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Extra mirrored registry, as for `berth serve`: `REGISTRY=URL`. Repeatable.
    #[arg(long = "upstream", env = "BERTH_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// Shorthand for a mirror at `http://127.0.0.1:PORT`.
    #[arg(long, env = "BERTH_PORT", conflicts_with = "mirror")]
    pub port: Option<u16>,
    /// The URL containerd/k3s use to reach berth (default: from the listen address).
    #[arg(long, env = "BERTH_MIRROR")]
    pub mirror: Option<String>,
    /// Route only these registries (comma-separated) instead of every mirrored one.
    #[arg(long, env = "BERTH_REGISTRIES", value_delimiter = ',')]
    pub registries: Vec<String>,
    /// Also route every other registry through berth (`_default` / `"*"`).
    #[arg(long = "default", env = "BERTH_MIRROR_DEFAULT")]
    pub default: bool,
}

/// Flags of `berth containerd install`.
#[derive(Debug, Clone, Args)]
pub struct ContainerdInstallArgs {
    /// Registries and mirror address.
    #[command(flatten)]
    pub mirror: MirrorArgs,
    /// containerd's hosts directory (CRI `config_path`) to write into.
    #[arg(long, env = "BERTH_CERTS_DIR", default_value = DEFAULT_CERTS_DIR)]
    pub certs_dir: PathBuf,
    /// The same directory as the host's containerd sees it, when `--certs-dir`
    /// is a mount of it (an init container); used to check `config_path`.
    #[arg(long, env = "BERTH_HOST_CERTS_DIR")]
    pub host_certs_dir: Option<PathBuf>,
    /// containerd's config file, read (never written) to check that `config_path` is set.
    #[arg(long, env = "BERTH_CONTAINERD_CONFIG", default_value = DEFAULT_CONTAINERD_CONFIG)]
    pub containerd_config: PathBuf,
    /// How long containerd (>= 2.1) waits to connect to berth before falling back.
    #[arg(long, env = "BERTH_DIAL_TIMEOUT", default_value = "1s", value_parser = humantime::parse_duration)]
    pub dial_timeout: Duration,
    /// The fallback `server` written for a registry: `REGISTRY=URL` (default:
    /// the registry itself; docker.io -> https://registry-1.docker.io). Repeatable.
    #[arg(
        long = "server",
        alias = "upstream-server",
        env = "BERTH_SERVER",
        value_delimiter = ','
    )]
    pub servers: Vec<String>,
    /// Exit with status 2 (after writing the files) when containerd's
    /// `config_path` does not include the certs dir.
    #[arg(long, env = "BERTH_STRICT")]
    pub strict: bool,
}

/// Flags of `berth containerd uninstall`.
#[derive(Debug, Clone, Args)]
pub struct ContainerdUninstallArgs {
    /// containerd's hosts directory (CRI `config_path`).
    #[arg(long, env = "BERTH_CERTS_DIR", default_value = DEFAULT_CERTS_DIR)]
    pub certs_dir: PathBuf,
}

/// Flags of `berth k3s`.
#[derive(Debug, Clone, Args)]
pub struct K3sArgs {
    /// Registries and mirror address.
    #[command(flatten)]
    pub mirror: MirrorArgs,
    /// Merge the entries into this registries.yaml (created if missing)
    /// instead of printing them, e.g. /etc/rancher/k3s/registries.yaml.
    #[arg(long, alias = "write", env = "BERTH_K3S_REGISTRIES")]
    pub merge: Option<PathBuf>,
    /// With `--merge`: take berth's endpoint out again instead of adding it.
    #[arg(long, requires = "merge")]
    pub remove: bool,
}

/// Flags of `berth ls`.
#[derive(Debug, Clone, Args)]
pub struct LsArgs {
    /// One JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Show full digests in the table.
    #[arg(long)]
    pub no_trunc: bool,
}

/// Flags of `berth gc` (`--retention` comes from the `serve` flags).
#[derive(Debug, Clone, Args)]
pub struct GcArgs {
    /// Only list what would be removed.
    #[arg(long)]
    pub dry_run: bool,
}

/// How `berth export` names images in `index.json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum RefNames {
    /// `org.opencontainers.image.ref.name` is the tag (`1.27`), as skopeo and containerd write it.
    #[default]
    Tag,
    /// The full reference (`docker.io/library/nginx:1.27`), for bundles with one tag in several repositories.
    Full,
}

/// Flags of `berth export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Images to export: `[registry/]repository:tag`, `...@sha256:...`.
    #[arg(required = true)]
    pub refs: Vec<String>,
    /// The archive to write (`-` for stdout).
    #[arg(long, short = 'o')]
    pub output: PathBuf,
    /// Only these platforms of multi-platform images (`os/arch[/variant]`); repeatable.
    /// Default: every platform in the cache.
    #[arg(long = "platform", conflicts_with = "all_platforms")]
    pub platforms: Vec<String>,
    /// Every platform of each index; a platform missing from the cache is an error.
    #[arg(long)]
    pub all_platforms: bool,
    /// What `org.opencontainers.image.ref.name` holds.
    #[arg(long, value_enum, default_value_t)]
    pub ref_names: RefNames,
}

/// Flags of `berth import`.
#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// An OCI image layout tar (`berth export`, `skopeo copy ... oci-archive:`).
    pub archive: PathBuf,
    /// Registry of ref names without one (`library/nginx:1.27`); default: the default registry.
    #[arg(long)]
    pub registry: Option<String>,
    /// Repository for ref names that are a bare tag (`1.27`, as `oci-archive:x.tar:1.27` writes).
    #[arg(long)]
    pub repo: Option<String>,
}

/// Flags of `berth prefetch` (rules come from `--prefetch`, `--pin` and the config file).
#[derive(Debug, Clone, Args)]
pub struct PrefetchArgs {
    /// Only these platforms (`os/arch[/variant]`); repeatable. Default: `[prefetch] platforms`, else all.
    #[arg(long = "platform", conflicts_with = "all_platforms")]
    pub platforms: Vec<String>,
    /// Every platform.
    #[arg(long)]
    pub all_platforms: bool,
    /// Downloads at once (default: `[prefetch] concurrency`, 4).
    #[arg(long)]
    pub concurrency: Option<usize>,
    /// Bytes per second for all prefetch downloads together (`20MiB`); default: `[prefetch] bandwidth`.
    #[arg(long)]
    pub bandwidth: Option<String>,
    /// Entries asked for per `tags/list` and `_catalog` page.
    #[arg(long, default_value_t = 100)]
    pub page_size: usize,
}

/// containerd's usual hosts directory.
pub const DEFAULT_CERTS_DIR: &str = "/etc/containerd/certs.d";
/// containerd's usual config file.
pub const DEFAULT_CONTAINERD_CONFIG: &str = "/etc/containerd/config.toml";

/// Flags of `berth serve`. Every one has an environment twin.
#[derive(Debug, Clone, Default, Args)]
pub struct ServeArgs {
    /// TOML config file adding or overriding registries and settings.
    #[arg(long, short = 'c', env = "BERTH_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to serve the registry API on.
    #[arg(long, env = "BERTH_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Directory of the on-disk cache.
    #[arg(long, env = "BERTH_CACHE_DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Mirror a registry from an upstream URL: `REGISTRY=URL`, e.g.
    /// `docker.io=http://127.0.0.1:5001`. Repeatable; comma-separated in the env var.
    #[arg(long = "upstream", env = "BERTH_UPSTREAM", value_delimiter = ',')]
    pub upstreams: Vec<String>,
    /// A docker `config.json` (or mounted `.dockerconfigjson`) whose `auths`
    /// supply credentials for endpoints that have none in the config file.
    #[arg(long, env = "BERTH_DOCKER_CONFIG")]
    pub docker_config: Option<PathBuf>,
    /// Never evict images matching this rule (`[registry/]repo[:tag]` with
    /// `*`/`**` globs). Repeatable; added to the config file's `pins`.
    #[arg(long = "pin", env = "BERTH_PINS", value_delimiter = ',')]
    pub pins: Vec<String>,
    /// Prefetch images matching this rule. Repeatable; added to `[prefetch] images`.
    #[arg(long = "prefetch", env = "BERTH_PREFETCH", value_delimiter = ',')]
    pub prefetch: Vec<String>,
    /// Remove unpinned content not used for this long (`0s` keeps it until the LRU needs room).
    #[arg(long, env = "BERTH_RETENTION", value_parser = humantime::parse_duration)]
    pub retention: Option<Duration>,
    /// Serve TLS with this PEM certificate chain (reloaded when it changes).
    #[arg(long, env = "BERTH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for `--tls-cert`.
    #[arg(long, env = "BERTH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by this PEM CA bundle (mTLS).
    #[arg(long, env = "BERTH_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// Require clients to send the token in this file (Bearer, or as the Basic password).
    #[arg(long, env = "BERTH_CLIENT_TOKEN_FILE")]
    pub client_token_file: Option<PathBuf>,
    /// Registry for requests that name none (no `?ns=`, no host in the path).
    #[arg(long, env = "BERTH_DEFAULT_REGISTRY")]
    pub default_registry: Option<String>,
    /// How long a tag->digest answer is trusted before it is revalidated with a HEAD.
    #[arg(long, env = "BERTH_TAG_TTL", value_parser = humantime::parse_duration)]
    pub tag_ttl: Option<Duration>,
    /// Cache size bound: bytes with a unit (`20GiB`) or a share of the filesystem (`50%`).
    #[arg(long, env = "BERTH_CACHE_CAPACITY")]
    pub cache_capacity: Option<String>,
    /// Upstream connect timeout; a miss whose upstream is unreachable fails this fast.
    #[arg(long, env = "BERTH_CONNECT_TIMEOUT", value_parser = humantime::parse_duration)]
    pub connect_timeout: Option<Duration>,
    /// Upstream read timeout: a stalled upstream body fails after this long.
    #[arg(long, env = "BERTH_READ_TIMEOUT", value_parser = humantime::parse_duration)]
    pub read_timeout: Option<Duration>,
    /// Minimum upstream body rate (`16KiB` per second, `0` = none), averaged
    /// over each read-timeout window; a slower body moves to the next endpoint.
    #[arg(long, env = "BERTH_MIN_RATE")]
    pub min_rate: Option<String>,
    /// A download hands out no byte for this long, so a blob that arrives
    /// within it is verified before any byte is served; one whose rate shows
    /// it will outlast the hold streams at once (`0s`: always stream at once).
    #[arg(long, env = "BERTH_VERIFY_HOLD", value_parser = humantime::parse_duration)]
    pub verify_hold: Option<Duration>,
    /// Clients must send a request's headers within this time; slower (or
    /// silent) connections are closed (slow-loris guard).
    #[arg(long, env = "BERTH_HEADER_TIMEOUT", value_parser = humantime::parse_duration)]
    pub header_timeout: Option<Duration>,
    /// A connection with no open request and no traffic is closed after this long.
    #[arg(long, env = "BERTH_IDLE_TIMEOUT", value_parser = humantime::parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// A connection whose client takes none of a response's bytes for this long is closed.
    #[arg(long, env = "BERTH_SEND_TIMEOUT", value_parser = humantime::parse_duration)]
    pub send_timeout: Option<Duration>,
    /// Separate listener for /metrics, /livez and /readyz (e.g. the node IP).
    #[arg(long, env = "BERTH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Log format.
    #[arg(long, env = "BERTH_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
}
