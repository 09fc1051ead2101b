//! `berth import`: read an OCI layout tar in one pass, streaming every
//! `blobs/sha256/<hex>` entry through the digester into the store's
//! `tmp/`; a mismatch ends the import with nothing published. Then walk
//! `index.json` (index -> manifests -> config and layers), check that
//! everything referenced is in the archive or already cached (platforms an
//! index lists but the archive leaves out are allowed), and publish by
//! rename: blobs, then manifests children first (with their media types),
//! then the tag records.
//!
//! Names come from each `index.json` entry: `io.containerd.image.name`
//! (full), else `org.opencontainers.image.ref.name`, which may be a full
//! reference (`docker.io/library/nginx:1.27`), one without a registry
//! (`library/nginx:1.27`, `nginx:1.27`: `--registry`, default the default
//! registry; docker.io single names get `library/`), or a bare tag (`1.27`,
//! what `skopeo copy ... oci-archive:x.tar:1.27` writes: needs `--repo`).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::PathBuf;

use serde::Deserialize;

use super::{CONTAINERD_NAME, REF_NAME};
use crate::admin::{fail, init_logging, lock, AdminError, EXIT_OK};
use crate::cache::store::Store;
use crate::cache::TagRecord;
use crate::cli::ImportArgs;
use crate::config::Config;
use crate::registry::digest::Digester;
use crate::registry::manifest::{children, Descriptor};
use crate::registry::media_type::{self, MAX_MANIFEST_SIZE};
use crate::registry::{Digest, ImageRef, RegistryHost, Repository, Tag};

/// Largest `index.json` / `oci-layout` read.
const MAX_INDEX: u64 = 16 << 20;

/// Where names without a registry or repository go.
#[derive(Debug, Clone)]
pub struct NameDefaults {
    /// Registry for `library/nginx:1.27`.
    pub registry: RegistryHost,
    /// Repository for a bare tag.
    pub repo: Option<Repository>,
}

/// What an import did.
#[derive(Debug, Default)]
pub struct ImportSummary {
    /// Blobs (and manifests) newly published.
    pub published: usize,
    /// Referenced content that was already cached.
    pub already: usize,
    /// Bytes verified.
    pub bytes: u64,
    /// Tags recorded: `registry/repo:tag -> digest`.
    pub tags: Vec<(String, Digest)>,
    /// Platforms an index lists that the archive does not include.
    pub skipped_platforms: Vec<String>,
    /// Archive blobs nothing in `index.json` references (not published).
    pub unreferenced: usize,
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// Temporary files of verified entries; removed unless published.
#[derive(Default)]
struct Staged {
    files: HashMap<Digest, (PathBuf, u64)>,
}

impl Drop for Staged {
    fn drop(&mut self) {
        for (path, _) in self.files.values() {
            let _ = fs::remove_file(path);
        }
    }
}

/// `berth import`.
pub fn import(config: Config, args: &ImportArgs) -> i32 {
    match run(config, args) {
        Ok(s) => {
            for (name, d) in &s.tags {
                println!("tagged {name} -> {d}");
            }
            for p in &s.skipped_platforms {
                println!("not in the archive (skipped): {p}");
            }
            println!(
                "imported {} new file(s) ({} already cached), {} verified{}",
                s.published,
                s.already,
                crate::admin::human_bytes(s.bytes),
                if s.unreferenced > 0 {
                    format!("; {} unreferenced blob(s) ignored", s.unreferenced)
                } else {
                    String::new()
                }
            );
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

fn run(config: Config, args: &ImportArgs) -> Result<ImportSummary, AdminError> {
    init_logging(config.log_format, "warn", Default::default());
    let registry = match &args.registry {
        Some(r) => r
            .parse()
            .map_err(|_| AdminError::Usage(format!("--registry {r:?} is not a registry host")))?,
        None => config.default_registry.clone(),
    };
    let repo = args
        .repo
        .as_deref()
        .map(|r| {
            r.parse::<Repository>()
                .map_err(|_| AdminError::Usage(format!("--repo {r:?} is not a repository name")))
        })
        .transpose()?;
    let file = File::open(&args.archive).map_err(|e| AdminError::io(&args.archive, e))?;
    let dir = &config.cache_dir;
    let _lock = lock(dir, ", or import into another cache directory")?;
    let store = Store::open(dir).map_err(|e| AdminError::io(dir, e))?;
    let defaults = NameDefaults { registry, repo };
    let summary = import_archive(
        &store,
        io::BufReader::with_capacity(1 << 20, file),
        &defaults,
    )?;
    for (reg, _) in summary.tags.iter().filter_map(|(n, _)| n.split_once('/')) {
        if reg
            .parse::<RegistryHost>()
            .is_ok_and(|r| !config.registries.contains_key(&r))
        {
            tracing::warn!(
                registry = reg,
                "imported a tag of a registry this config does not mirror"
            );
        }
    }
    Ok(summary)
}

/// Import an OCI layout tar into `store` (whose lock the caller holds).
pub fn import_archive(
    store: &Store,
    archive: impl Read,
    defaults: &NameDefaults,
) -> Result<ImportSummary, AdminError> {
    let mut summary = ImportSummary::default();
    let mut staged = Staged::default();
    let mut index_json = None;
    let mut tar = tar::Archive::new(archive);
    let bad = |msg: String| AdminError::Failed(format!("{msg}; nothing was imported"));
    let entries = tar
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| bad(format!("reading the archive: {e}")))?;
        let raw = entry
            .path()
            .map_err(|e| bad(format!("bad path in the archive: {e}")))?
            .to_string_lossy()
            .into_owned();
        let path = raw.trim_start_matches("./").trim_start_matches('/');
        match entry.header().entry_type() {
            tar::EntryType::Directory => continue,
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            other => {
                return Err(bad(format!(
                    "archive entry {raw} is a {other:?}, not a regular file"
                )))
            }
        }
        if path == "index.json" {
            index_json = Some(
                read_small(&mut entry, MAX_INDEX).map_err(|e| bad(format!("index.json: {e}")))?,
            );
        } else if let Some(name) = path.strip_prefix("blobs/") {
            let (alg, hex) = name.split_once('/').unwrap_or((name, ""));
            let digest: Digest = format!("{alg}:{hex}")
                .parse()
                .map_err(|e| bad(format!("archive entry {raw}: {e}")))?;
            let (tmp, size) = stage(store, &mut entry, &digest).map_err(bad)?;
            summary.bytes += size;
            if let Some((old, _)) = staged.files.insert(digest, (tmp, size)) {
                let _ = fs::remove_file(old);
            }
        }
        // `oci-layout` and anything else: not needed.
    }
    let index_json = index_json
        .ok_or_else(|| bad("the archive has no index.json: not an OCI image layout".into()))?;
    let index: IndexJson =
        serde_json::from_slice(&index_json).map_err(|e| bad(format!("index.json: {e}")))?;
    let plan = walk(store, &staged, &index, defaults, &mut summary).map_err(bad)?;
    publish(store, &mut staged, &plan, &mut summary)?;
    summary.unreferenced = staged.files.len();
    Ok(summary)
}

/// Stream one blob entry into `tmp/`, verifying it.
fn stage(store: &Store, entry: &mut impl Read, digest: &Digest) -> Result<(PathBuf, u64), String> {
    let (mut f, tmp) = store
        .create_tmp()
        .map_err(|e| format!("cannot create a temporary file: {e}"))?;
    let result = (|| -> Result<u64, String> {
        let mut h = Digester::default();
        let mut buf = vec![0u8; 256 << 10];
        let mut size = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| format!("reading blob {digest} from the archive: {e}"))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
            f.write_all(&buf[..n])
                .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
            size += n as u64;
        }
        let actual = h.finish();
        if &actual != digest {
            return Err(format!(
                "archive entry blobs/sha256/{} does not match its digest (its content hashes to {actual}): the archive is corrupt",
                digest.hex()
            ));
        }
        f.sync_data()
            .map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        Ok(size)
    })();
    match result {
        Ok(size) => Ok((tmp, size)),
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn read_small(r: &mut impl Read, max: u64) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    r.take(max + 1).read_to_end(&mut out)?;
    if out.len() as u64 > max {
        return Err(io::Error::other("too large"));
    }
    Ok(out)
}

/// What to publish, in order.
#[derive(Default)]
struct Plan {
    blobs: Vec<Digest>,
    /// Children before parents, with media types.
    manifests: Vec<(Digest, String)>,
    tags: Vec<(RegistryHost, Repository, Tag, Digest, String, u64)>,
}

/// Walk `index.json` and check that every referenced file is available.
fn walk(
    store: &Store,
    staged: &Staged,
    index: &IndexJson,
    defaults: &NameDefaults,
    summary: &mut ImportSummary,
) -> Result<Plan, String> {
    let mut plan = Plan::default();
    let mut missing = Vec::new();
    let mut seen = HashSet::new();
    let read = |d: &Digest| -> Option<Vec<u8>> {
        match staged.files.get(d) {
            Some((p, size)) if *size <= MAX_MANIFEST_SIZE => fs::read(p).ok(),
            Some(_) => None,
            None => fs::read(store.blob_path(d)).ok(),
        }
    };
    for root in &index.manifests {
        let digest = root.digest.clone();
        let name = name_of(&root.annotations, defaults)?;
        let Some(bytes) = read(&digest) else {
            missing.push(format!("manifest {digest} (index.json)"));
            continue;
        };
        let mt = media_type::sniff_or(&bytes, &root.media_type);
        check_size(&digest, root.size, bytes.len() as u64)?;
        // Depth-first, post-order: children are published before parents.
        let mut stack = vec![(digest.clone(), bytes, mt.clone(), false)];
        while let Some((d, bytes, mt, expanded)) = stack.pop() {
            if expanded {
                plan.manifests.push((d, mt));
                continue;
            }
            if !seen.insert(d.clone()) {
                continue;
            }
            let kids = children(&bytes).map_err(|e| format!("manifest {d}: {e}"))?;
            stack.push((d.clone(), bytes, mt, true));
            for c in kids {
                if c.is_manifest {
                    match read(&c.digest) {
                        Some(b) => {
                            check_size(&c.digest, c.size, b.len() as u64)?;
                            let mt = media_type::sniff_or(&b, &c.media_type);
                            stack.push((c.digest, b, mt, false));
                        }
                        // An index entry the archive leaves out: a platform not exported.
                        None => summary.skipped_platforms.push(format!(
                            "{} of {d} ({})",
                            c.digest,
                            c.platform.as_deref().unwrap_or("unknown platform")
                        )),
                    }
                } else if seen.insert(c.digest.clone()) {
                    match staged.files.get(&c.digest) {
                        Some((_, size)) => {
                            check_size(&c.digest, c.size, *size)?;
                            plan.blobs.push(c.digest);
                        }
                        None if store.blob_path(&c.digest).is_file() => summary.already += 1,
                        None => missing.push(format!("blob {} of manifest {d}", c.digest)),
                    }
                }
            }
        }
        if let Some((reg, repo, tag)) = name {
            let size = root
                .size
                .max(read(&digest).map(|b| b.len() as u64).unwrap_or(0));
            plan.tags.push((reg, repo, tag, digest, mt, size));
        }
    }
    if !missing.is_empty() {
        return Err(format!(
            "the archive is incomplete; missing:\n  {}",
            missing.join("\n  ")
        ));
    }
    Ok(plan)
}

fn check_size(d: &Digest, declared: u64, actual: u64) -> Result<(), String> {
    if declared != 0 && declared != actual {
        return Err(format!(
            "{d} is {actual} bytes but its descriptor says {declared}"
        ));
    }
    Ok(())
}

/// The tag an `index.json` entry names, if any.
fn name_of(
    annotations: &HashMap<String, String>,
    defaults: &NameDefaults,
) -> Result<Option<(RegistryHost, Repository, Tag)>, String> {
    let parsed = |s: &str| -> Result<Option<(RegistryHost, Repository, Tag)>, String> {
        let r = ImageRef::parse(s, &defaults.registry).map_err(|e| format!("ref name {e}"))?;
        Ok(r.tag.map(|t| (r.registry, r.repo, t)))
    };
    if let Some(full) = annotations.get(CONTAINERD_NAME) {
        return parsed(full);
    }
    let Some(name) = annotations.get(REF_NAME) else {
        return Ok(None);
    };
    if name.contains('/') || name.contains(':') {
        return parsed(name);
    }
    let tag: Tag = name
        .parse()
        .map_err(|_| format!("ref name {name:?} is neither a tag nor an image reference"))?;
    match &defaults.repo {
        Some(repo) => Ok(Some((defaults.registry.clone(), repo.clone(), tag))),
        None => Err(format!(
            "ref name {name:?} is a bare tag: pass --repo REPOSITORY (and --registry if not {}) to say which image it is",
            defaults.registry
        )),
    }
}

/// Publish blobs, then manifests (children first), then tag records.
fn publish(
    store: &Store,
    staged: &mut Staged,
    plan: &Plan,
    summary: &mut ImportSummary,
) -> Result<(), AdminError> {
    let mut put = |d: &Digest, summary: &mut ImportSummary| -> Result<(), AdminError> {
        let Some((tmp, _)) = staged.files.remove(d) else {
            return Ok(());
        };
        if store.blob_path(d).is_file() {
            let _ = fs::remove_file(&tmp);
            summary.already += 1;
            return Ok(());
        }
        store
            .publish(&tmp, d)
            .map_err(|e| AdminError::io(store.blob_path(d), e))?;
        summary.published += 1;
        Ok(())
    };
    for d in &plan.blobs {
        put(d, summary)?;
    }
    for (d, mt) in &plan.manifests {
        store
            .write_media_type(d, mt)
            .map_err(|e| AdminError::io(store.root().join("manifests"), e))?;
        put(d, summary)?;
    }
    for (reg, repo, tag, d, mt, size) in &plan.tags {
        let rec = TagRecord::now(d, mt, *size);
        let bytes = serde_json::to_vec(&rec).expect("tag record serialises");
        store
            .write_tag(reg, repo, tag, &bytes)
            .map_err(|e| AdminError::io(store.tag_path(reg, repo, tag), e))?;
        summary
            .tags
            .push((format!("{reg}/{repo}:{tag}"), d.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults(repo: Option<&str>) -> NameDefaults {
        NameDefaults {
            registry: "docker.io".parse().unwrap(),
            repo: repo.map(|r| r.parse().unwrap()),
        }
    }

    fn ann(k: &str, v: &str) -> HashMap<String, String> {
        HashMap::from([(k.to_owned(), v.to_owned())])
    }

    #[test]
    fn names() {
        let n = |a: &HashMap<String, String>, r: Option<&str>| {
            name_of(a, &defaults(r)).map(|o| o.map(|(g, r, t)| format!("{g}/{r}:{t}")))
        };
        assert_eq!(
            n(&ann(REF_NAME, "library/nginx:1.27"), None)
                .unwrap()
                .unwrap(),
            "docker.io/library/nginx:1.27"
        );
        assert_eq!(
            n(&ann(REF_NAME, "ghcr.io/org/app:v1"), None)
                .unwrap()
                .unwrap(),
            "ghcr.io/org/app:v1"
        );
        assert_eq!(
            n(&ann(REF_NAME, "nginx:1.27"), None).unwrap().unwrap(),
            "docker.io/library/nginx:1.27"
        );
        assert!(n(&ann(REF_NAME, "1.27"), None)
            .unwrap_err()
            .contains("--repo"));
        assert_eq!(
            n(&ann(REF_NAME, "1.27"), Some("team/app"))
                .unwrap()
                .unwrap(),
            "docker.io/team/app:1.27"
        );
        assert_eq!(
            n(&ann(CONTAINERD_NAME, "quay.io/a/b:c"), None)
                .unwrap()
                .unwrap(),
            "quay.io/a/b:c"
        );
        assert!(n(&HashMap::new(), None).unwrap().is_none());
    }
}
