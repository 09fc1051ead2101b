//! Node integration: make the node's container runtime pull through berth.
//!
//! - [`containerd`]: `berth containerd install|uninstall` writes (and takes
//!   back) one `hosts.toml` per mirrored registry under containerd's
//!   `config_path`, each with berth first and the origin as `server`, so
//!   containerd falls back when berth is down.
//! - [`hosts`]: renders one `hosts.toml`.
//! - [`cri_config`]: reads containerd's `config.toml` (1.x and 2.x syntax)
//!   to check that `config_path` is set, and says what to add if not.
//! - [`k3s`]: `berth k3s` prints or merges `registries.yaml` mirror entries
//!   (k3s regenerates its own certs.d at each start; berth never writes it).
//! - [`files`]: atomic writes and hard-link backups.
//!
//! [`Plan`] turns the shared flags into the list of registries and the URL
//! containerd or k3s reach berth at.

pub mod containerd;
pub mod cri_config;
pub mod files;
pub mod hosts;
pub mod k3s;

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use crate::cli::{ContainerdCommand, K3sArgs, MirrorArgs, ServeArgs};
use crate::config::{Config, ConfigError, DEFAULT_CACHE_DIR};
use crate::registry::RegistryHost;

/// sysexits.h EX_USAGE: a bad command line or config.
pub const EXIT_USAGE: i32 = 64;
/// `--strict` and containerd will not read the files berth wrote.
pub const EXIT_NOT_ACTIVE: i32 = 2;

/// What can go wrong while configuring the node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// berth's own config (file, flags) is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A flag value is invalid.
    #[error("{0}")]
    Usage(String),
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A file berth must edit has content it cannot safely edit.
    #[error("{}: {msg}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, for a person.
        msg: String,
    },
}

impl NodeError {
    pub(crate) fn io(path: &Path, source: io::Error) -> Self {
        NodeError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// The process exit status for this error.
    pub fn exit_code(&self) -> i32 {
        match self {
            NodeError::Config(_) | NodeError::Usage(_) => EXIT_USAGE,
            NodeError::Io { .. } | NodeError::Invalid { .. } => 1,
        }
    }
}

/// The registries to route through berth and the URL to reach berth at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// `scheme://host:port` without a trailing slash.
    pub mirror: String,
    /// Registries that get their own entry, sorted.
    pub registries: Vec<RegistryHost>,
    /// Also a catch-all (`_default` / `"*"`).
    pub default: bool,
}

impl Plan {
    /// Resolve the flags: explicit `--registries`, else every registry
    /// `berth serve` would mirror with the same config; `--mirror`, else
    /// `--port`, else the listen address (an unspecified IP becomes loopback).
    pub fn from_args(args: &MirrorArgs) -> Result<Plan, NodeError> {
        let serve = ServeArgs {
            config: args.config.clone(),
            listen: args.listen,
            upstreams: args.upstreams.clone(),
            // Only to skip probing for a default cache dir (a side effect).
            cache_dir: Some(PathBuf::from(DEFAULT_CACHE_DIR)),
            ..ServeArgs::default()
        };
        let config = Config::from_args(&serve)?;
        let registries = if args.registries.is_empty() {
            config.registries.keys().cloned().collect()
        } else {
            let mut v = args
                .registries
                .iter()
                .map(|r| {
                    r.trim().parse::<RegistryHost>().map_err(|_| {
                        NodeError::Usage(format!("--registries: {r:?} is not a registry host"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            v.sort();
            v.dedup();
            v
        };
        let mirror = match (&args.mirror, args.port) {
            (Some(m), _) => parse_mirror(m)?,
            (None, Some(port)) => format!("http://127.0.0.1:{port}"),
            (None, None) => mirror_for_listen(config.listen),
        };
        Ok(Plan {
            mirror,
            registries,
            default: args.default,
        })
    }
}

/// The URL a local client uses to reach a listener on `listen`.
pub fn mirror_for_listen(listen: SocketAddr) -> String {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    format!("http://{}", SocketAddr::new(ip, listen.port()))
}

fn parse_mirror(s: &str) -> Result<String, NodeError> {
    let bad = |why: &str| NodeError::Usage(format!("--mirror {s:?}: {why}"));
    let url = url::Url::parse(s).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    let host = url.host_str().ok_or_else(|| bad("no host"))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(bad("no credentials in the URL"));
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(bad("give only scheme://host[:port]"));
    }
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    Ok(format!("{}://{host}{port}", url.scheme()))
}

/// `berth containerd ...`: run it, print what changed, return the exit status.
pub fn run_containerd(cmd: &ContainerdCommand) -> i32 {
    let (out, err) = (&mut io::stdout(), &mut io::stderr());
    let result = match cmd {
        ContainerdCommand::Install(a) => containerd::install_cli(a, out, err),
        ContainerdCommand::Uninstall(a) => containerd::uninstall_cli(a, out, err),
    };
    finish(result, err)
}

/// `berth k3s`: print or merge, return the exit status.
pub fn run_k3s(args: &K3sArgs) -> i32 {
    let (out, err) = (&mut io::stdout(), &mut io::stderr());
    finish(k3s::run_cli(args, out, err), err)
}

fn finish(result: Result<i32, NodeError>, err: &mut dyn Write) -> i32 {
    match result {
        Ok(code) => code,
        Err(e) => {
            let _ = writeln!(err, "berth: {e}");
            e.exit_code()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_defaults_to_serve_config() {
        let p = Plan::from_args(&MirrorArgs::default()).unwrap();
        assert_eq!(p.mirror, "http://127.0.0.1:5050");
        assert!(p.registries.iter().any(|r| r.as_str() == "docker.io"));
        assert!(!p.default);
        let a = MirrorArgs {
            upstreams: vec!["my.reg:5000=http://10.0.0.1:5000".into()],
            listen: Some("0.0.0.0:6000".parse().unwrap()),
            ..MirrorArgs::default()
        };
        let p = Plan::from_args(&a).unwrap();
        assert_eq!(p.mirror, "http://127.0.0.1:6000");
        assert!(p.registries.iter().any(|r| r.as_str() == "my.reg:5000"));
    }

    #[test]
    fn explicit_registries_port_and_mirror() {
        let a = MirrorArgs {
            registries: vec!["quay.io".into(), "docker.io".into(), "quay.io".into()],
            port: Some(7000),
            ..MirrorArgs::default()
        };
        let p = Plan::from_args(&a).unwrap();
        let names: Vec<&str> = p.registries.iter().map(|r| r.as_str()).collect();
        assert_eq!(names, ["docker.io", "quay.io"]);
        assert_eq!(p.mirror, "http://127.0.0.1:7000");
        let a = MirrorArgs {
            mirror: Some("http://[::1]:5050/".into()),
            ..MirrorArgs::default()
        };
        assert_eq!(Plan::from_args(&a).unwrap().mirror, "http://[::1]:5050");
        for bad in ["ftp://x", "http://u:p@x", "http://x/v2/p", "nope"] {
            let a = MirrorArgs {
                mirror: Some(bad.into()),
                ..MirrorArgs::default()
            };
            assert_eq!(Plan::from_args(&a).unwrap_err().exit_code(), EXIT_USAGE);
        }
        let a = MirrorArgs {
            registries: vec!["Not A Host".into()],
            ..MirrorArgs::default()
        };
        assert!(Plan::from_args(&a).is_err());
    }

    #[test]
    fn unspecified_listen_maps_to_loopback() {
        assert_eq!(
            mirror_for_listen("[::]:5050".parse().unwrap()),
            "http://[::1]:5050"
        );
        assert_eq!(
            mirror_for_listen("10.1.2.3:5050".parse().unwrap()),
            "http://10.1.2.3:5050"
        );
    }
}
