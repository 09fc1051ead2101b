//! `berth k3s`: mirror entries for k3s/RKE2 `registries.yaml`
//! (`mirrors: <registry>: endpoint: ["http://127.0.0.1:5050"]`).
//!
//! k3s turns registries.yaml into its own certs.d at each start (removing
//! what it generated before), so berth never writes that directory. k3s
//! appends each registry's default endpoint after the listed ones, so pulls
//! fall back to the origin when berth is down.
//!
//! Without `--merge` the entries are printed on stdout (advice on stderr).
//! `--merge FILE` adds berth's endpoint first in each entry and keeps
//! everything else (other endpoints, `rewrite`, `configs`, other mirrors,
//! unknown keys). YAML comments do not survive a rewrite, so the first
//! change keeps the original as `FILE.berth-backup`. `--merge FILE --remove`
//! takes berth's endpoint out again; if what remains equals the backup, the
//! backup itself is moved back (byte for byte).

use std::io::Write;
use std::path::Path;

use serde_norway::{Mapping, Value};

use super::{files, NodeError, Plan};
use crate::cli::K3sArgs;

/// Suffix of the copy of the file before berth first changed it.
pub const BACKUP_SUFFIX: &str = ".berth-backup";

const RESTART: &str = "k3s reads registries.yaml only at start: restart it on this node \
(systemctl restart k3s, or k3s-agent on agents; rke2-server/rke2-agent for RKE2).";

/// The registries.yaml keys for a plan: each registry, then `"*"` if asked.
pub fn keys(plan: &Plan) -> Vec<String> {
    let mut keys: Vec<String> = plan
        .registries
        .iter()
        .map(|r| r.as_str().to_owned())
        .collect();
    if plan.default {
        keys.push("*".into());
    }
    keys
}

/// A fresh registries.yaml with only berth's entries.
pub fn render(plan: &Plan) -> String {
    let (text, _) = merge(None, plan, false).expect("merging into nothing cannot fail");
    format!(
        "# k3s/RKE2 registries.yaml entries routing pulls through berth at {}.\n\
         # k3s tries berth first and the registry itself after it.\n{text}",
        plan.mirror
    )
}

/// Add (or with `remove`, take out) berth's endpoint in `existing`
/// (a registries.yaml text, `None` for no file). Returns the new text and
/// whether anything changed.
pub fn merge(existing: Option<&str>, plan: &Plan, remove: bool) -> Result<(String, bool), String> {
    let mut doc: Value = match existing {
        Some(t) if !t.trim().is_empty() => {
            serde_norway::from_str(t).map_err(|e| format!("not valid YAML: {e}"))?
        }
        _ => Value::Null,
    };
    if doc.is_null() {
        doc = Value::Mapping(Mapping::new());
    }
    let before = doc.clone();
    let root = doc
        .as_mapping_mut()
        .ok_or("the top level is not a mapping")?;
    let mirrors = child(root, "mirrors", || Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or("`mirrors` is not a mapping")?;
    let ours = plan.mirror.trim_end_matches('/');
    let same = |v: &Value| v.as_str().map(|s| s.trim_end_matches('/')) == Some(ours);
    for key in keys(plan) {
        let k = Value::from(key.as_str());
        if remove {
            let Some(entry) = mirrors.get_mut(&k).and_then(Value::as_mapping_mut) else {
                continue;
            };
            if let Some(eps) = entry.get_mut("endpoint").and_then(Value::as_sequence_mut) {
                eps.retain(|v| !same(v));
                if eps.is_empty() {
                    entry.remove("endpoint");
                }
            }
            if entry.is_empty() {
                mirrors.remove(&k);
            }
            continue;
        }
        let entry = child(mirrors, k, || Value::Mapping(Mapping::new()))
            .as_mapping_mut()
            .ok_or_else(|| format!("mirrors.{key:?} is not a mapping"))?;
        let eps = child(entry, "endpoint", || Value::Sequence(Vec::new()))
            .as_sequence_mut()
            .ok_or_else(|| format!("mirrors.{key:?}.endpoint is not a list"))?;
        if !eps.iter().any(same) {
            eps.insert(0, Value::from(ours));
        }
    }
    if mirrors.is_empty() {
        root.remove("mirrors");
    }
    let changed = doc != before;
    let mut text = serde_norway::to_string(&doc).map_err(|e| e.to_string())?;
    if text.trim() == "{}" {
        text.clear();
    }
    Ok((text, changed))
}

/// `map[key]`, made `empty()` when it is missing or null.
fn child(map: &mut Mapping, key: impl Into<Value>, empty: fn() -> Value) -> &mut Value {
    let v = map.entry(key.into()).or_insert_with(empty);
    if v.is_null() {
        *v = empty();
    }
    v
}

/// Merge into the file at `path`, atomically, keeping a backup of the
/// user's original. Returns whether the file changed.
pub fn merge_file(path: &Path, plan: &Plan, remove: bool) -> Result<bool, NodeError> {
    let invalid = |msg: String| NodeError::Invalid {
        path: path.to_path_buf(),
        msg,
    };
    let existing = files::read_opt(path)?;
    let text = existing
        .as_deref()
        .map(|b| String::from_utf8(b.to_vec()).map_err(|_| invalid("not UTF-8".into())))
        .transpose()?;
    let (new, changed) = merge(text.as_deref(), plan, remove).map_err(invalid)?;
    if !changed {
        return Ok(false);
    }
    let backup = files::with_suffix(path, BACKUP_SUFFIX);
    if remove {
        if let Some(b) = files::read_opt(&backup)? {
            let b = String::from_utf8_lossy(&b);
            let (as_yaml, _) = merge(Some(&b), plan, true).map_err(invalid)?;
            if as_yaml == new {
                files::rename(&backup, path)?;
                return Ok(true);
            }
        }
    } else if existing.is_some() && files::read_opt(&backup)?.is_none() {
        files::link_backup(path, &backup)?;
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| NodeError::io(dir, e))?;
    }
    // registries.yaml may hold registry passwords.
    files::write_atomic(path, new.as_bytes(), 0o600)?;
    Ok(true)
}

/// The CLI.
pub fn run_cli(a: &K3sArgs, out: &mut dyn Write, err: &mut dyn Write) -> Result<i32, NodeError> {
    let plan = Plan::from_args(&a.mirror)?;
    match &a.merge {
        None => {
            let _ = write!(out, "{}", render(&plan));
            let _ = writeln!(
                err,
                "berth: add these entries to /etc/rancher/k3s/registries.yaml (RKE2: /etc/rancher/rke2/registries.yaml),\n\
                 or run `berth k3s --merge /etc/rancher/k3s/registries.yaml`. {RESTART}"
            );
        }
        Some(path) => {
            let changed = merge_file(path, &plan, a.remove)?;
            if changed {
                let what = if a.remove {
                    "removed berth from"
                } else {
                    "merged berth into"
                };
                let _ = writeln!(out, "{what} {}", path.display());
                let _ = writeln!(err, "berth: {RESTART}");
            } else {
                let _ = writeln!(out, "unchanged {}", path.display());
            }
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(default: bool) -> Plan {
        Plan {
            mirror: "http://127.0.0.1:5050".into(),
            registries: vec!["docker.io".parse().unwrap(), "quay.io".parse().unwrap()],
            default,
        }
    }

    const USER: &str = r#"
mirrors:
  docker.io:
    endpoint:
      - "https://mirror.corp:5000"
    rewrite:
      "^rancher/(.*)": "mirrorproject/rancher-images/$1"
  registry.corp:
    endpoint: ["https://registry.corp"]
configs:
  "mirror.corp:5000":
    auth:
      username: robot
      password: s3cret
    tls:
      ca_file: /etc/ssl/corp.pem
"#;

    #[test]
    fn merge_preserves_the_users_settings() {
        let (text, changed) = merge(Some(USER), &plan(true), false).unwrap();
        assert!(changed);
        let v: Value = serde_norway::from_str(&text).unwrap();
        let before: Value = serde_norway::from_str(USER).unwrap();
        assert_eq!(v["configs"], before["configs"], "configs untouched");
        assert_eq!(
            v["mirrors"]["registry.corp"],
            before["mirrors"]["registry.corp"]
        );
        let d = &v["mirrors"]["docker.io"];
        assert_eq!(d["rewrite"], before["mirrors"]["docker.io"]["rewrite"]);
        assert_eq!(d["endpoint"][0].as_str(), Some("http://127.0.0.1:5050"));
        assert_eq!(d["endpoint"][1].as_str(), Some("https://mirror.corp:5000"));
        assert_eq!(
            v["mirrors"]["quay.io"]["endpoint"][0].as_str(),
            Some("http://127.0.0.1:5050")
        );
        assert_eq!(
            v["mirrors"]["*"]["endpoint"][0].as_str(),
            Some("http://127.0.0.1:5050")
        );
        // Idempotent.
        let (again, changed) = merge(Some(&text), &plan(true), false).unwrap();
        assert!(!changed);
        assert_eq!(again, text);
        // Remove gives back the user's document.
        let (removed, changed) = merge(Some(&text), &plan(true), true).unwrap();
        assert!(changed);
        let v: Value = serde_norway::from_str(&removed).unwrap();
        assert_eq!(v, before);
    }

    #[test]
    fn rejects_what_it_cannot_edit() {
        assert!(merge(Some("- a list"), &plan(false), false).is_err());
        assert!(merge(Some("mirrors: [1]"), &plan(false), false).is_err());
        assert!(merge(
            Some("mirrors:\n  docker.io:\n    endpoint: x\n"),
            &plan(false),
            false
        )
        .is_err());
        assert!(merge(Some("mirrors: {"), &plan(false), false).is_err());
    }

    #[test]
    fn print_mode_is_a_valid_document() {
        let text = render(&plan(false));
        let v: Value = serde_norway::from_str(&text).unwrap();
        assert_eq!(
            v["mirrors"]["docker.io"]["endpoint"][0].as_str(),
            Some("http://127.0.0.1:5050")
        );
        assert!(v["mirrors"].get("*").is_none());
    }

    #[test]
    fn merge_file_backs_up_and_remove_restores_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registries.yaml");
        let original = format!("# my comment\n{USER}");
        std::fs::write(&path, &original).unwrap();
        assert!(merge_file(&path, &plan(false), false).unwrap());
        assert!(
            !merge_file(&path, &plan(false), false).unwrap(),
            "idempotent"
        );
        let backup = files::with_suffix(&path, BACKUP_SUFFIX);
        assert_eq!(std::fs::read_to_string(&backup).unwrap(), original);
        assert!(merge_file(&path, &plan(false), true).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), original);
        assert!(!backup.exists());
        // A missing file is created.
        let fresh = dir.path().join("new/registries.yaml");
        assert!(merge_file(&fresh, &plan(false), false).unwrap());
        assert!(std::fs::read_to_string(&fresh)
            .unwrap()
            .contains("127.0.0.1:5050"));
    }
}
