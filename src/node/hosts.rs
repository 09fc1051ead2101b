//! One containerd `hosts.toml` (containerd `docs/hosts.md`): berth as the
//! first host with `pull` + `resolve` and a short `dial_timeout`, then the
//! origin as `server`, tried when berth is down or answers an error.

use std::path::Path;
use std::time::Duration;

use crate::registry::RegistryHost;

/// The first line of every file berth writes; how berth recognises its own files.
pub const MARKER: &str = "# Managed by berth";

/// The directory name containerd looks up for requests naming no configured registry.
pub const DEFAULT_DIR: &str = "_default";

/// Where containerd's fallback for `registry` goes when nothing else is
/// said: the registry itself (`docker.io` is served by `registry-1.docker.io`).
pub fn origin_of(registry: &RegistryHost) -> String {
    match registry.as_str() {
        "docker.io" => "https://registry-1.docker.io".into(),
        host => format!("https://{host}"),
    }
}

/// Docker-style certificate files found in a registry's hosts directory.
/// containerd only uses them when there is no `hosts.toml`, so berth carries
/// them over to `server` in the file it writes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DockerCerts {
    /// `*.crt`: CA bundles.
    pub ca: Vec<String>,
    /// `X.cert` + `X.key`: client certificate pairs.
    pub client: Vec<(String, String)>,
}

impl DockerCerts {
    /// Scan `dir` (as berth sees it) and name the files as `host_dir`
    /// (the same directory as containerd sees it).
    pub fn scan(dir: &Path, host_dir: &Path) -> DockerCerts {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_type().map(|t| t.is_file()).unwrap_or(false))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        let path = |n: &str| host_dir.join(n).to_string_lossy().into_owned();
        let mut certs = DockerCerts::default();
        for n in &names {
            if n.ends_with(".crt") {
                certs.ca.push(path(n));
            } else if let Some(base) = n.strip_suffix(".cert") {
                let key = format!("{base}.key");
                if names.contains(&key) {
                    certs.client.push((path(n), path(&key)));
                }
            }
        }
        certs
    }

    fn is_empty(&self) -> bool {
        self.ca.is_empty() && self.client.is_empty()
    }
}

/// What to write for one registry directory.
#[derive(Debug, Clone)]
pub struct HostsFile<'a> {
    /// The directory name (`docker.io`, `my.reg:5000`, `_default`).
    pub name: &'a str,
    /// Fallback origin; `None` for `_default` (each image's own registry).
    pub server: Option<&'a str>,
    /// berth's URL.
    pub mirror: &'a str,
    /// containerd (>= 2.1) dial timeout for berth.
    pub dial_timeout: Duration,
    /// Certificates carried over for `server`.
    pub certs: &'a DockerCerts,
}

impl HostsFile<'_> {
    /// The file's text. It always parses as TOML (checked in debug builds and tests).
    pub fn render(&self) -> String {
        let mut s = format!(
            "{MARKER}: written by `berth containerd install`, removed by\n\
             # `berth containerd uninstall` (which restores any file it replaced).\n\
             # Edits are overwritten on the next install.\n\
             #\n\
             # containerd asks berth first (adding ?ns={name}) and falls back to\n\
             # `server` when berth is down or answers an error.\n",
            name = self.name
        );
        if let Some(server) = self.server {
            s.push_str(&format!("server = {}\n", quote(server)));
        }
        if !self.certs.is_empty() {
            s.push_str(
                "# carried over from the Docker-style certificate files in this directory\n",
            );
            if !self.certs.ca.is_empty() {
                s.push_str(&format!("ca = {}\n", list(&self.certs.ca)));
            }
            if !self.certs.client.is_empty() {
                let pairs: Vec<String> = self
                    .certs
                    .client
                    .iter()
                    .map(|(c, k)| format!("[{}, {}]", quote(c), quote(k)))
                    .collect();
                s.push_str(&format!("client = [{}]\n", pairs.join(", ")));
            }
        }
        s.push_str(&format!(
            "\n[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n  dial_timeout = {}\n",
            quote(self.mirror),
            quote(&go_duration(self.dial_timeout))
        ));
        debug_assert!(toml::from_str::<toml::Table>(&s).is_ok(), "{s}");
        s
    }
}

/// True if `text` is a file berth wrote.
pub fn is_ours(text: &[u8]) -> bool {
    text.starts_with(MARKER.as_bytes())
}

/// A Go `time.ParseDuration` string: `1s`, `200ms`, `1500ms`.
pub fn go_duration(d: Duration) -> String {
    if d.subsec_nanos() == 0 {
        format!("{}s", d.as_secs())
    } else if d.subsec_nanos().is_multiple_of(1_000_000) {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}us", d.as_micros())
    }
}

fn quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn list(items: &[String]) -> String {
    let q: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", q.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_parseable_file_with_berth_first_and_the_origin_as_server() {
        let docker: RegistryHost = "docker.io".parse().unwrap();
        let origin = origin_of(&docker);
        let certs = DockerCerts::default();
        let f = HostsFile {
            name: "docker.io",
            server: Some(&origin),
            mirror: "http://127.0.0.1:5050",
            dial_timeout: Duration::from_millis(200),
            certs: &certs,
        };
        let text = f.render();
        assert!(is_ours(text.as_bytes()));
        let t: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(t["server"].as_str(), Some("https://registry-1.docker.io"));
        let host = &t["host"]["http://127.0.0.1:5050"];
        assert_eq!(
            host["capabilities"].as_array().unwrap().len(),
            2,
            "pull + resolve"
        );
        assert_eq!(host["dial_timeout"].as_str(), Some("200ms"));
    }

    #[test]
    fn default_has_no_server_and_certs_are_carried_over() {
        let dir = tempfile::tempdir().unwrap();
        for f in [
            "ca.crt",
            "client.cert",
            "client.key",
            "lonely.cert",
            "x.txt",
        ] {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        let certs = DockerCerts::scan(dir.path(), Path::new("/etc/containerd/certs.d/r"));
        assert_eq!(certs.ca, ["/etc/containerd/certs.d/r/ca.crt"]);
        assert_eq!(certs.client.len(), 1);
        let f = HostsFile {
            name: DEFAULT_DIR,
            server: None,
            mirror: "http://127.0.0.1:5050",
            dial_timeout: Duration::from_secs(1),
            certs: &certs,
        };
        let t: toml::Table = toml::from_str(&f.render()).unwrap();
        assert!(t.get("server").is_none());
        assert_eq!(t["ca"].as_array().unwrap().len(), 1);
        assert_eq!(t["client"][0].as_array().unwrap().len(), 2);
        assert_eq!(
            t["host"]["http://127.0.0.1:5050"]["dial_timeout"].as_str(),
            Some("1s")
        );
    }

    #[test]
    fn origins_and_durations() {
        assert_eq!(origin_of(&"quay.io".parse().unwrap()), "https://quay.io");
        assert_eq!(
            origin_of(&"my.reg:5000".parse().unwrap()),
            "https://my.reg:5000"
        );
        assert_eq!(go_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(go_duration(Duration::from_secs(2)), "2s");
    }
}
