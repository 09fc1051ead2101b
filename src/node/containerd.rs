//! `berth containerd install|uninstall`: one `hosts.toml` per mirrored
//! registry under containerd's hosts directory (plus `_default` on request).
//!
//! - Every file berth writes starts with [`hosts::MARKER`]; nothing else is
//!   ever overwritten or removed without a backup.
//! - A file that is not berth's is kept as `hosts.toml.berth-backup` (a hard
//!   link: same bytes, mode, owner, mtime) before berth's file is renamed
//!   over it; `uninstall` renames the backup back.
//! - Re-running is idempotent: an unchanged file is not rewritten and no
//!   second backup is made.
//! - containerd re-reads hosts.toml on every pull, so no restart is needed,
//!   but only if its `config_path` names the directory: install checks
//!   containerd's config.toml and prints exactly what to add. It still writes
//!   the files and exits 0 (an init container must not keep berth from
//!   starting); `--strict` makes it exit 2 instead.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::hosts::{self, DockerCerts, HostsFile, DEFAULT_DIR};
use super::{cri_config, files, NodeError, Plan, EXIT_NOT_ACTIVE};
use crate::cli::{ContainerdInstallArgs, ContainerdUninstallArgs};
use crate::registry::RegistryHost;

/// Suffix of the backup of a replaced file.
pub const BACKUP_SUFFIX: &str = ".berth-backup";
const FILE: &str = "hosts.toml";

/// What happened to one file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// No file was there; berth's was written.
    Created(PathBuf),
    /// berth's older file was rewritten.
    Updated(PathBuf),
    /// berth's file already had these bytes.
    Unchanged(PathBuf),
    /// A file that was not berth's was backed up to `.1` and replaced.
    Replaced(PathBuf, PathBuf),
    /// (uninstall) berth's file was removed.
    Removed(PathBuf),
    /// (uninstall) the backup was moved back.
    Restored(PathBuf),
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Change::Created(p) => write!(f, "created   {}", p.display()),
            Change::Updated(p) => write!(f, "updated   {}", p.display()),
            Change::Unchanged(p) => write!(f, "unchanged {}", p.display()),
            Change::Replaced(p, b) => {
                write!(
                    f,
                    "replaced  {} (original kept as {})",
                    p.display(),
                    b.display()
                )
            }
            Change::Removed(p) => write!(f, "removed   {}", p.display()),
            Change::Restored(p) => write!(f, "restored  {}", p.display()),
        }
    }
}

/// The result of an install or uninstall.
#[derive(Debug, Default)]
pub struct Report {
    /// One entry per file touched or checked.
    pub changes: Vec<Change>,
    /// Things a person should know (also printed).
    pub warnings: Vec<String>,
}

/// Everything `install` needs, resolved from the flags.
#[derive(Debug, Clone)]
pub struct Install {
    /// Registries and berth's URL.
    pub plan: Plan,
    /// Where to write.
    pub certs_dir: PathBuf,
    /// The same directory as containerd sees it (for file paths inside hosts.toml).
    pub host_certs_dir: PathBuf,
    /// containerd dial timeout for berth.
    pub dial_timeout: std::time::Duration,
    /// Per-registry `server` overrides.
    pub servers: BTreeMap<RegistryHost, String>,
}

impl Install {
    /// Resolve the flags.
    pub fn from_args(a: &ContainerdInstallArgs) -> Result<Install, NodeError> {
        refuse_k3s_dir(&a.certs_dir)?;
        let mut servers = BTreeMap::new();
        for spec in &a.servers {
            let (reg, url) = spec.split_once('=').ok_or_else(|| {
                NodeError::Usage(format!("--server {spec:?}: expected REGISTRY=URL"))
            })?;
            let reg: RegistryHost = reg.trim().parse().map_err(|_| {
                NodeError::Usage(format!("--server {spec:?}: {reg:?} is not a registry host"))
            })?;
            let parsed = url::Url::parse(url.trim())
                .map_err(|e| NodeError::Usage(format!("--server {spec:?}: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(NodeError::Usage(format!(
                    "--server {spec:?}: expected an http(s) URL"
                )));
            }
            servers.insert(reg, url.trim().trim_end_matches('/').to_owned());
        }
        Ok(Install {
            plan: Plan::from_args(&a.mirror)?,
            host_certs_dir: a.host_certs_dir.clone().unwrap_or(a.certs_dir.clone()),
            certs_dir: a.certs_dir.clone(),
            dial_timeout: a.dial_timeout,
            servers,
        })
    }

    /// Write every file; see the module doc for the rules.
    pub fn run(&self) -> Result<Report, NodeError> {
        let mut report = Report::default();
        std::fs::create_dir_all(&self.certs_dir).map_err(|e| NodeError::io(&self.certs_dir, e))?;
        let mut targets: Vec<(String, Option<String>)> = self
            .plan
            .registries
            .iter()
            .map(|r| {
                let server = self
                    .servers
                    .get(r)
                    .cloned()
                    .unwrap_or_else(|| hosts::origin_of(r));
                (r.as_str().to_owned(), Some(server))
            })
            .collect();
        if self.plan.default {
            targets.push((DEFAULT_DIR.to_owned(), None));
        }
        for (name, server) in &targets {
            self.write_one(name, server.as_deref(), &mut report)?;
        }
        Ok(report)
    }

    fn write_one(
        &self,
        name: &str,
        server: Option<&str>,
        report: &mut Report,
    ) -> Result<(), NodeError> {
        let dir = self.certs_dir.join(name);
        std::fs::create_dir_all(&dir).map_err(|e| NodeError::io(&dir, e))?;
        if let Some((host, port)) = name.rsplit_once(':') {
            let shadow = self.certs_dir.join(format!("{host}_{port}_")).join(FILE);
            if shadow.exists() {
                report.warnings.push(format!(
                    "{} exists and containerd reads it before {}: remove it or merge it by hand",
                    shadow.display(),
                    dir.join(FILE).display()
                ));
            }
        }
        let certs = DockerCerts::scan(&dir, &self.host_certs_dir.join(name));
        let text = HostsFile {
            name,
            server,
            mirror: &self.plan.mirror,
            dial_timeout: self.dial_timeout,
            certs: &certs,
        }
        .render();
        let path = dir.join(FILE);
        let backup = files::with_suffix(&path, BACKUP_SUFFIX);
        let change = match files::read_opt(&path)? {
            None => {
                files::write_atomic(&path, text.as_bytes(), 0o644)?;
                Change::Created(path)
            }
            Some(old) if hosts::is_ours(&old) => {
                if old == text.as_bytes() {
                    Change::Unchanged(path)
                } else {
                    files::write_atomic(&path, text.as_bytes(), 0o644)?;
                    Change::Updated(path)
                }
            }
            Some(old) => {
                let saved = match files::read_opt(&backup)? {
                    None => {
                        files::link_backup(&path, &backup)?;
                        backup
                    }
                    // An install that stopped between backup and write.
                    Some(b) if b == old => backup,
                    Some(_) => {
                        // Someone replaced berth's file after an install: keep
                        // both their file and the first original.
                        let extra = free_name(&backup)?;
                        files::link_backup(&path, &extra)?;
                        report.warnings.push(format!(
                            "{} was changed after berth installed it; that version is kept as {} \
                             (uninstall restores {})",
                            path.display(),
                            extra.display(),
                            backup.display()
                        ));
                        extra
                    }
                };
                files::write_atomic(&path, text.as_bytes(), 0o644)?;
                Change::Replaced(path, saved)
            }
        };
        report.changes.push(change);
        Ok(())
    }
}

fn free_name(backup: &Path) -> Result<PathBuf, NodeError> {
    for n in 1..1000 {
        let p = files::with_suffix(backup, &format!(".{n}"));
        if files::read_opt(&p)?.is_none() {
            return Ok(p);
        }
    }
    Err(NodeError::Invalid {
        path: backup.to_path_buf(),
        msg: "too many backups; clean them up".into(),
    })
}

/// k3s and RKE2 regenerate their certs.d at each start: use registries.yaml.
fn refuse_k3s_dir(dir: &Path) -> Result<(), NodeError> {
    let s = dir.to_string_lossy();
    if s.contains("/rancher/k3s/") || s.contains("/rancher/rke2/") {
        return Err(NodeError::Usage(format!(
            "{s} is generated by k3s/RKE2 at each start; use `berth k3s --merge /etc/rancher/k3s/registries.yaml` instead"
        )));
    }
    Ok(())
}

/// Remove berth's files under `certs_dir` and restore what they replaced.
/// Every registry directory is looked at (not only the configured ones), so
/// a changed config does not leave files behind.
pub fn uninstall(certs_dir: &Path) -> Result<Report, NodeError> {
    let mut report = Report::default();
    let entries = match std::fs::read_dir(certs_dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(report),
        Err(e) => return Err(NodeError::io(certs_dir, e)),
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .map(|e| e.path())
        .collect();
    dirs.sort();
    for dir in dirs {
        let path = dir.join(FILE);
        let backup = files::with_suffix(&path, BACKUP_SUFFIX);
        let current = files::read_opt(&path)?;
        let has_backup = files::read_opt(&backup)?.is_some();
        match (current, has_backup) {
            (c, true) if c.as_deref().is_none_or(hosts::is_ours) => {
                files::rename(&backup, &path)?;
                report.changes.push(Change::Restored(path.clone()));
            }
            (Some(c), false) if hosts::is_ours(&c) => {
                files::remove(&path)?;
                report.changes.push(Change::Removed(path.clone()));
                // Only succeeds if the directory is now empty.
                let _ = std::fs::remove_dir(&dir);
            }
            (Some(_), true) => report.warnings.push(format!(
                "{} is not berth's (it changed after install); left alone, the original is {}",
                path.display(),
                backup.display()
            )),
            _ => {}
        }
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!(".{FILE}.berth-tmp-")) {
                let _ = files::remove(&e.path());
            } else if name.starts_with(&format!("{FILE}{BACKUP_SUFFIX}.")) {
                report.warnings.push(format!(
                    "{} is an extra backup berth kept; remove it when no longer needed",
                    e.path().display()
                ));
            }
        }
    }
    Ok(report)
}

/// The CLI: install, print the changes, check containerd's config.
pub fn install_cli(
    a: &ContainerdInstallArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, NodeError> {
    let install = Install::from_args(a)?;
    let report = install.run()?;
    print(&report, out, err);
    let reg = match cri_config::read(&a.containerd_config) {
        Ok(r) => r,
        Err(e) => {
            let _ = writeln!(err, "berth: warning: cannot check containerd's config: {e}");
            return Ok(if a.strict { EXIT_NOT_ACTIVE } else { 0 });
        }
    };
    if reg
        .as_ref()
        .is_some_and(|r| cri_config::reads(r, &install.host_certs_dir))
    {
        let _ = writeln!(
            out,
            "containerd reads {} (config_path); no restart needed",
            install.host_certs_dir.display()
        );
        return Ok(0);
    }
    let _ = writeln!(
        err,
        "berth: warning: containerd does not read these files yet.\n{}",
        cri_config::advice(reg.as_ref(), &a.containerd_config, &install.host_certs_dir)
    );
    Ok(if a.strict { EXIT_NOT_ACTIVE } else { 0 })
}

/// The CLI: uninstall and print the changes.
pub fn uninstall_cli(
    a: &ContainerdUninstallArgs,
    out: &mut dyn Write,
    err: &mut dyn Write,
) -> Result<i32, NodeError> {
    let report = uninstall(&a.certs_dir)?;
    if report.changes.is_empty() {
        let _ = writeln!(out, "nothing of berth's under {}", a.certs_dir.display());
    }
    print(&report, out, err);
    Ok(0)
}

fn print(report: &Report, out: &mut dyn Write, err: &mut dyn Write) {
    for c in &report.changes {
        let _ = writeln!(out, "{c}");
    }
    for w in &report.warnings {
        let _ = writeln!(err, "berth: warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::time::Duration;

    fn install(dir: &Path, registries: &[&str], default: bool) -> Install {
        Install {
            plan: Plan {
                mirror: "http://127.0.0.1:5050".into(),
                registries: registries.iter().map(|r| r.parse().unwrap()).collect(),
                default,
            },
            certs_dir: dir.to_path_buf(),
            host_certs_dir: dir.to_path_buf(),
            dial_timeout: Duration::from_secs(1),
            servers: BTreeMap::new(),
        }
    }

    /// Every file under `dir`, with its bytes.
    fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
        let mut m = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in fs::read_dir(&d).unwrap().flatten() {
                if e.file_type().unwrap().is_dir() {
                    m.insert(e.path(), b"<dir>".to_vec());
                    stack.push(e.path());
                } else {
                    m.insert(e.path(), fs::read(e.path()).unwrap());
                }
            }
        }
        m
    }

    #[test]
    fn install_over_existing_then_uninstall_restores_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("docker.io")).unwrap();
        fs::write(
            d.join("docker.io/hosts.toml"),
            "server = \"https://mine\"\n# keep me\n",
        )
        .unwrap();
        fs::create_dir_all(d.join("other.io")).unwrap();
        fs::write(
            d.join("other.io/hosts.toml"),
            "server = \"https://other\"\n",
        )
        .unwrap();
        let before = snapshot(d);

        let i = install(d, &["docker.io", "quay.io"], true);
        let r = i.run().unwrap();
        assert!(
            matches!(r.changes[0], Change::Replaced(..)),
            "{:?}",
            r.changes
        );
        assert!(matches!(r.changes[1], Change::Created(..)));
        assert!(matches!(r.changes[2], Change::Created(..)), "_default");
        let after_first = snapshot(d);
        assert!(hosts::is_ours(
            &after_first[&d.join("docker.io/hosts.toml")]
        ));

        // Idempotent: same bytes, no new backup.
        let r = i.run().unwrap();
        assert!(r.changes.iter().all(|c| matches!(c, Change::Unchanged(_))));
        assert_eq!(snapshot(d), after_first);

        let r = uninstall(d).unwrap();
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert_eq!(snapshot(d), before, "uninstall restores byte for byte");
        // And again: nothing left to do.
        assert!(uninstall(d).unwrap().changes.is_empty());
    }

    #[test]
    fn a_file_replaced_after_install_is_never_lost() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        fs::create_dir_all(d.join("docker.io")).unwrap();
        fs::write(d.join("docker.io/hosts.toml"), "# original\n").unwrap();
        let i = install(d, &["docker.io"], false);
        i.run().unwrap();
        fs::write(d.join("docker.io/hosts.toml"), "# someone else\n").unwrap();
        let r = i.run().unwrap();
        assert_eq!(r.warnings.len(), 1);
        assert_eq!(
            fs::read(d.join("docker.io/hosts.toml.berth-backup.1")).unwrap(),
            b"# someone else\n"
        );
        let r = uninstall(d).unwrap();
        assert_eq!(
            fs::read(d.join("docker.io/hosts.toml")).unwrap(),
            b"# original\n"
        );
        assert_eq!(r.warnings.len(), 1, "{:?}", r.warnings);
    }

    #[test]
    fn changed_plan_updates_and_k3s_dirs_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut i = install(tmp.path(), &["ghcr.io"], false);
        i.run().unwrap();
        i.plan.mirror = "http://127.0.0.1:6000".into();
        let r = i.run().unwrap();
        assert!(matches!(r.changes[0], Change::Updated(_)));
        let text = fs::read_to_string(tmp.path().join("ghcr.io/hosts.toml")).unwrap();
        assert!(text.contains("[host.\"http://127.0.0.1:6000\"]"), "{text}");
        assert!(refuse_k3s_dir(Path::new(
            "/var/lib/rancher/k3s/agent/etc/containerd/certs.d"
        ))
        .is_err());
        assert!(refuse_k3s_dir(Path::new("/etc/containerd/certs.d")).is_ok());
    }
}
