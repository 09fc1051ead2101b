//! Read containerd's `config.toml` (never written) to learn whether the CRI
//! plugin reads a hosts directory (`config_path`) and, if not, say exactly
//! what to add.
//!
//! | config `version` | containerd | table |
//! |---|---|---|
//! | 3 | 2.x | `[plugins."io.containerd.cri.v1.images".registry]` |
//! | 2 | 1.5-1.7 (2.x migrates it) | `[plugins."io.containerd.grpc.v1.cri".registry]` |
//! | 1 or absent | 1.x | `[plugins.cri.registry]` (the v2 table is accepted too) |
//!
//! `config_path` may list several roots separated by `:` (2.x). Files named
//! in `imports` are read too; the last one that sets `config_path` wins.
//! Changing `config_path` needs a containerd restart; files under it do not.

use std::path::{Path, PathBuf};

use super::NodeError;

/// The CRI registry table for a config version.
pub fn registry_table(version: i64) -> &'static str {
    match version {
        v if v >= 3 => r#"plugins."io.containerd.cri.v1.images".registry"#,
        2 => r#"plugins."io.containerd.grpc.v1.cri".registry"#,
        _ => "plugins.cri.registry",
    }
}

/// What containerd's config says about registry hosts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CriRegistry {
    /// The file read (the main config).
    pub file: PathBuf,
    /// Its `version` (1 when absent).
    pub version: i64,
    /// `config_path` split into its roots, if set and non-empty.
    pub config_path: Option<Vec<String>>,
    /// The file that set `config_path` (the main file or an import).
    pub set_in: Option<PathBuf>,
    /// The deprecated `registry.mirrors` table is present (fatal together
    /// with `config_path`).
    pub legacy_mirrors: bool,
    /// The registry table exists already (so the advice is "add a key").
    pub has_table: bool,
}

/// Read `path` and its imports; `Ok(None)` if `path` does not exist.
pub fn read(path: &Path) -> Result<Option<CriRegistry>, NodeError> {
    let Some(text) = super::files::read_opt(path)? else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&text);
    let mut reg = parse(&text).map_err(|msg| NodeError::Invalid {
        path: path.to_path_buf(),
        msg,
    })?;
    reg.file = path.to_path_buf();
    if reg.config_path.is_some() {
        reg.set_in = Some(path.to_path_buf());
    }
    let table: toml::Table = toml::from_str(&text).unwrap_or_default();
    let base = path.parent().unwrap_or(Path::new("/"));
    for import in imports(&table, base) {
        let Ok(text) = std::fs::read_to_string(&import) else {
            continue;
        };
        let Ok(sub) = toml::from_str::<toml::Table>(&text) else {
            continue;
        };
        // An import without its own `version` is read with the main one.
        let sub = from_table(&sub, reg.version);
        if sub.config_path.is_some() {
            reg.config_path = sub.config_path;
            reg.set_in = Some(import);
        }
        reg.legacy_mirrors |= sub.legacy_mirrors;
        reg.has_table |= sub.has_table;
    }
    Ok(Some(reg))
}

/// Parse one config file's text (pure).
pub fn parse(text: &str) -> Result<CriRegistry, String> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| format!("not valid TOML: {}", e.to_string().trim()))?;
    Ok(from_table(&table, 1))
}

/// Read one parsed file; `default_version` applies when it has no `version`.
fn from_table(table: &toml::Table, default_version: i64) -> CriRegistry {
    let version = table
        .get("version")
        .and_then(|v| v.as_integer())
        .unwrap_or(default_version);
    let plugins = table.get("plugins").and_then(|p| p.as_table());
    let plugin_names: &[&str] = match version {
        v if v >= 3 => &["io.containerd.cri.v1.images"],
        2 => &["io.containerd.grpc.v1.cri"],
        _ => &["cri", "io.containerd.grpc.v1.cri"],
    };
    let mut out = CriRegistry {
        version,
        ..CriRegistry::default()
    };
    for name in plugin_names {
        let Some(registry) = plugins
            .and_then(|p| p.get(*name))
            .and_then(|c| c.get("registry"))
            .and_then(|r| r.as_table())
        else {
            continue;
        };
        out.has_table = true;
        out.legacy_mirrors |= registry
            .get("mirrors")
            .and_then(|m| m.as_table())
            .is_some_and(|m| !m.is_empty());
        if let Some(cp) = registry.get("config_path").and_then(|c| c.as_str()) {
            let roots: Vec<String> = cp
                .split(':')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            if !roots.is_empty() {
                out.config_path = Some(roots);
            }
        }
    }
    out
}

/// The files named by `imports` (relative to the config's directory;
/// `*` in the file name matches like a shell glob).
fn imports(table: &toml::Table, base: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Some(list) = table.get("imports").and_then(|i| i.as_array()) else {
        return out;
    };
    for pattern in list.iter().filter_map(|v| v.as_str()) {
        let p = base.join(pattern);
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if !name.contains('*') {
            out.push(p);
            continue;
        }
        let dir = p.parent().unwrap_or(Path::new("/"));
        let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| glob_match(&name, &e.file_name().to_string_lossy()))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default();
        found.sort();
        out.extend(found);
    }
    out
}

/// `*` matches any run of characters; nothing else is special.
fn glob_match(pattern: &str, name: &str) -> bool {
    let literal: Vec<String> = pattern.split('*').map(globset::escape).collect();
    globset::Glob::new(&literal.join("*")).is_ok_and(|g| g.compile_matcher().is_match(name))
}

/// Does containerd read `certs_dir` (as the host sees it)?
pub fn reads(reg: &CriRegistry, certs_dir: &Path) -> bool {
    let want = normalize(certs_dir);
    reg.config_path
        .iter()
        .flatten()
        .any(|root| normalize(Path::new(root)) == want)
}

fn normalize(p: &Path) -> PathBuf {
    p.components().collect()
}

/// Exactly what to add so that containerd reads `certs_dir`, for a person.
pub fn advice(reg: Option<&CriRegistry>, config_file: &Path, certs_dir: &Path) -> String {
    let dir = certs_dir.display();
    let mut s = String::new();
    match reg {
        None => {
            s.push_str(&format!(
                "{} does not exist, so containerd has no config_path. Create it with\n\
                 (containerd 2.x):\n\n\
                 version = 3\n\
                 [{}]\n  config_path = \"{dir}\"\n\n\
                 or (containerd 1.6/1.7):\n\n\
                 version = 2\n\
                 [{}]\n  config_path = \"{dir}\"\n",
                config_file.display(),
                registry_table(3),
                registry_table(2),
            ));
        }
        Some(reg) => {
            let table = registry_table(reg.version);
            if let Some(roots) = &reg.config_path {
                s.push_str(&format!(
                    "containerd reads hosts.toml from {} (config_path in {}), not from {dir}.\n\
                     Run `berth containerd install --certs-dir {}`, or change config_path in [{table}] to:\n\n\
                     [{table}]\n  config_path = \"{}\"\n",
                    roots.join(":"),
                    reg.set_in.as_deref().unwrap_or(&reg.file).display(),
                    roots[0],
                    std::iter::once(dir.to_string())
                        .chain(roots.iter().cloned())
                        .collect::<Vec<_>>()
                        .join(":"),
                ));
            } else if reg.has_table {
                s.push_str(&format!(
                    "{} has a [{table}] table without config_path. Add this key to it:\n\n  config_path = \"{dir}\"\n",
                    reg.file.display()
                ));
            } else {
                s.push_str(&format!(
                    "{} (version {}) does not set config_path. Add:\n\n[{table}]\n  config_path = \"{dir}\"\n",
                    reg.file.display(),
                    reg.version
                ));
            }
            if reg.legacy_mirrors {
                s.push_str(&format!(
                    "\nand delete the [{table}.mirrors] tables: containerd refuses to start with both\n\
                     `mirrors` and `config_path` (move each mirror into a hosts.toml).\n"
                ));
            }
        }
    }
    s.push_str(
        "\nThen restart containerd (systemctl restart containerd): config_path is read at start;\n\
         files under it are re-read on every pull. containerd >= 2.2 with neither config_path\n\
         nor mirrors set reads /etc/containerd/certs.d already.\n",
    );
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_1x_version_2() {
        let r = parse(
            r#"
version = 2
[plugins."io.containerd.grpc.v1.cri".registry]
  config_path = "/etc/containerd/certs.d"
"#,
        )
        .unwrap();
        assert_eq!(r.version, 2);
        assert_eq!(
            r.config_path.as_deref(),
            Some(&["/etc/containerd/certs.d".to_string()][..])
        );
        assert!(reads(&r, Path::new("/etc/containerd/certs.d/")));
        assert!(!reads(&r, Path::new("/etc/docker/certs.d")));
    }

    #[test]
    fn containerd_2x_version_3_with_two_roots() {
        let r = parse(
            r#"
version = 3
[plugins.'io.containerd.cri.v1.images'.registry]
  config_path = '/etc/containerd/certs.d:/etc/docker/certs.d'
"#,
        )
        .unwrap();
        assert_eq!(r.version, 3);
        assert!(reads(&r, Path::new("/etc/docker/certs.d")));
        // A v2 table in a v3 file is not what containerd 2.x reads.
        let r = parse(
            "version = 3\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/x\"\n",
        )
        .unwrap();
        assert_eq!(r.config_path, None);
    }

    #[test]
    fn version_1_and_missing_config_path() {
        let r = parse("[plugins.cri.registry]\nconfig_path = \"/x\"\n").unwrap();
        assert_eq!((r.version, r.config_path.unwrap()[0].as_str()), (1, "/x"));
        let r = parse(
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\nendpoint = [\"https://m\"]\n",
        )
        .unwrap();
        assert_eq!(r.config_path, None);
        assert!(r.legacy_mirrors && r.has_table);
        let text = advice(
            Some(&r),
            Path::new("/etc/containerd/config.toml"),
            Path::new("/etc/containerd/certs.d"),
        );
        assert!(
            text.contains("config_path = \"/etc/containerd/certs.d\""),
            "{text}"
        );
        assert!(text.contains("mirrors"), "{text}");
        let r = parse("version = 3\n").unwrap();
        let a = advice(
            Some(&r),
            Path::new("c"),
            Path::new("/etc/containerd/certs.d"),
        );
        assert!(
            a.contains("[plugins.\"io.containerd.cri.v1.images\".registry]\n  config_path = \"/etc/containerd/certs.d\""),
            "{a}"
        );
        assert!(parse("version = [").is_err());
    }

    #[test]
    fn imports_can_set_config_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("conf.d")).unwrap();
        std::fs::write(
            dir.path().join("conf.d/10-registry.toml"),
            "[plugins.\"io.containerd.grpc.v1.cri\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        let main = dir.path().join("config.toml");
        std::fs::write(&main, "version = 2\nimports = [\"conf.d/*.toml\"]\n").unwrap();
        let r = read(&main).unwrap().unwrap();
        assert!(reads(&r, Path::new("/etc/containerd/certs.d")));
        assert!(r.set_in.unwrap().ends_with("10-registry.toml"));
        assert!(read(&dir.path().join("missing.toml")).unwrap().is_none());
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.toml", "a.toml"));
        assert!(glob_match("a*b*c", "axxbyyc"));
        assert!(!glob_match("*.toml", "a.yaml"));
        assert!(!glob_match("ab*ba", "aba"));
    }
}
