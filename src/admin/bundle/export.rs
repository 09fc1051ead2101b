//! `berth export`: plan which manifests and blobs the named images need
//! (the selected platforms of each index, whose bytes are kept as they are
//! so digests do not change), refuse with the list of what is missing from
//! the cache, then stream everything into a tar, re-hashing on the way so
//! a corrupt cache file cannot end up in a bundle.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::{CONTAINERD_NAME, OCI_LAYOUT, REF_NAME};
use crate::admin::image::{self, Tree};
use crate::admin::{fail, init_logging, AdminError, EXIT_OK};
use crate::cache::store::Store;
use crate::cache::TagRecord;
use crate::cli::{ExportArgs, RefNames};
use crate::config::Config;
use crate::registry::digest::Digester;
use crate::registry::manifest::{platform_matches, Descriptor};
use crate::registry::{Digest, ImageRef};

/// Why a bundle could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// A reference names nothing in the cache.
    #[error("{0} is not in the cache (no tag record); pull or prefetch it first")]
    NotCached(String),
    /// Content the bundle needs is missing.
    #[error("cannot export: missing from the cache:\n  {}", .0.join("\n  "))]
    Missing(Vec<String>),
    /// No platform of an index matches the selection.
    #[error("{image}: no platform matching {wanted:?} is in the cache (cached: {cached:?})")]
    NoPlatform {
        /// The image.
        image: String,
        /// The selection.
        wanted: Vec<String>,
        /// What the cache has.
        cached: Vec<String>,
    },
    /// Two images would get the same ref name.
    #[error("two images would both be named {0:?} in index.json; use --ref-names full")]
    Ambiguous(String),
    /// A cache file did not match its digest while being written.
    #[error("{0} in the cache does not match its digest; run `berth verify`")]
    Corrupt(Digest),
}

/// One image to write.
struct Planned {
    name: ImageRef,
    tree: Tree,
    files: Vec<Digest>,
}

/// `berth export`.
pub fn export(config: Config, args: &ExportArgs) -> i32 {
    match run(config, args) {
        Ok((images, files, bytes)) => {
            eprintln!(
                "berth: wrote {images} image(s), {files} blob(s), {} to {}",
                crate::admin::human_bytes(bytes),
                args.output.display()
            );
            EXIT_OK
        }
        Err(e) => fail(&e),
    }
}

fn run(config: Config, args: &ExportArgs) -> Result<(usize, usize, u64), AdminError> {
    init_logging(config.log_format, "warn", Default::default());
    let store = Store::open_existing(&config.cache_dir)
        .map_err(|e| AdminError::io(&config.cache_dir, e))?;
    let refs = args
        .refs
        .iter()
        .map(|r| ImageRef::parse(r, &config.default_registry))
        .collect::<Result<Vec<_>, _>>()
        .map_err(AdminError::Usage)?;
    let platforms = if args.all_platforms {
        vec!["all".to_owned()]
    } else {
        args.platforms.clone()
    };
    let to_admin = |e: ExportError| AdminError::Failed(e.to_string());
    let planned = plan(&store, &refs, &platforms).map_err(to_admin)?;
    for p in planned.iter().filter(|p| {
        p.tree
            .root
            .media_type
            .starts_with("application/vnd.docker.")
    }) {
        tracing::warn!(image = %p.name, media_type = %p.tree.root.media_type,
            "a Docker schema 2 image: `berth import` and `ctr images import` read it from the bundle, but skopeo finds only OCI-typed images by name in an OCI layout");
    }
    let index = index_json(&planned, args.ref_names).map_err(to_admin)?;
    let (files, bytes) = if args.output.as_os_str() == "-" {
        let out = io::stdout().lock();
        write_bundle(&store, &planned_files(&planned), &index, out)?
    } else {
        write_file(&store, &planned_files(&planned), &index, &args.output)?
    };
    Ok((planned.len(), files, bytes))
}

/// Resolve each reference and choose what to write.
fn plan(
    store: &Store,
    refs: &[ImageRef],
    platforms: &[String],
) -> Result<Vec<Planned>, ExportError> {
    let all = platforms.iter().any(|p| p == "all");
    let mut missing = Vec::new();
    let mut out = Vec::new();
    for r in refs {
        let (digest, media_type, size) = match (&r.digest, &r.tag) {
            (Some(d), _) => (d.clone(), String::new(), 0),
            (None, Some(tag)) => {
                let rec = store
                    .read_tag(&r.registry, &r.repo, tag)
                    .ok()
                    .flatten()
                    .and_then(|b| serde_json::from_slice::<TagRecord>(&b).ok())
                    .ok_or_else(|| ExportError::NotCached(r.to_string()))?;
                let d = rec
                    .digest()
                    .ok_or_else(|| ExportError::NotCached(r.to_string()))?;
                (d, rec.media_type, rec.size)
            }
            (None, None) => return Err(ExportError::NotCached(r.to_string())),
        };
        let mut tree = image::walk(
            store,
            Descriptor::manifest(digest.clone(), &media_type, size),
        );
        if !tree.present {
            missing.push(format!("manifest {digest} of {r}"));
            continue;
        }
        let label = |p: &Option<String>| p.clone().unwrap_or_else(|| "unknown".into());
        if tree.is_index {
            let cached: Vec<String> = tree
                .images
                .iter()
                .filter(|i| i.present)
                .map(|i| label(&i.platform))
                .collect();
            tree.images.retain(|i| {
                if all {
                    true
                } else if platforms.is_empty() {
                    i.present
                } else {
                    platform_matches(platforms, i.platform.as_deref())
                }
            });
            if tree.images.is_empty() {
                return Err(ExportError::NoPlatform {
                    image: r.to_string(),
                    wanted: platforms.to_vec(),
                    cached,
                });
            }
        } else if let Some(p) = tree.images[0].platform.clone() {
            if !all && !platforms.is_empty() && !platform_matches(platforms, Some(&p)) {
                return Err(ExportError::NoPlatform {
                    image: r.to_string(),
                    wanted: platforms.to_vec(),
                    cached: vec![p],
                });
            }
        }
        let mut files = vec![tree.root.digest.clone()];
        files.extend(tree.nested.iter().map(|n| n.digest.clone()));
        for img in &tree.images {
            let what = format!("{r} ({})", label(&img.platform));
            if !img.present {
                missing.push(format!("manifest {} of {what}", img.manifest.digest));
                continue;
            }
            for d in &img.missing {
                missing.push(format!("blob {d} of {what}"));
            }
            files.push(img.manifest.digest.clone());
            files.extend(img.blobs.iter().map(|b| b.digest.clone()));
        }
        out.push(Planned {
            name: r.clone(),
            tree,
            files,
        });
    }
    if !missing.is_empty() {
        return Err(ExportError::Missing(missing));
    }
    Ok(out)
}

fn planned_files(planned: &[Planned]) -> Vec<Digest> {
    let mut seen = HashSet::new();
    planned
        .iter()
        .flat_map(|p| p.files.iter())
        .filter(|d| seen.insert((*d).clone()))
        .cloned()
        .collect()
}

/// `index.json`: one descriptor per image, named.
fn index_json(planned: &[Planned], names: RefNames) -> Result<Vec<u8>, ExportError> {
    let mut used = BTreeMap::new();
    let mut manifests = Vec::new();
    for p in planned {
        let mut annotations = serde_json::Map::new();
        annotations.insert(CONTAINERD_NAME.into(), json!(p.name.to_string()));
        if let Some(tag) = &p.name.tag {
            let ref_name = match names {
                RefNames::Tag => tag.to_string(),
                RefNames::Full => format!("{}/{}:{tag}", p.name.registry, p.name.repo),
            };
            if used
                .insert(ref_name.clone(), p.tree.root.digest.clone())
                .is_some_and(|d| d != p.tree.root.digest)
            {
                return Err(ExportError::Ambiguous(ref_name));
            }
            annotations.insert(REF_NAME.into(), json!(ref_name));
        }
        manifests.push(json!({
            "mediaType": p.tree.root.media_type,
            "digest": p.tree.root.digest.to_string(),
            "size": p.tree.root.size,
            "annotations": Value::Object(annotations),
        }));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": crate::registry::media_type::OCI_INDEX,
        "manifests": manifests,
    });
    Ok(serde_json::to_vec_pretty(&index).expect("index.json serialises"))
}

/// Write to `<output>.partial` and rename when complete.
fn write_file(
    store: &Store,
    files: &[Digest],
    index: &[u8],
    output: &Path,
) -> Result<(usize, u64), AdminError> {
    let partial = PathBuf::from(format!("{}.partial", output.display()));
    let f = File::create(&partial).map_err(|e| AdminError::io(&partial, e))?;
    let written = write_bundle(
        store,
        files,
        index,
        io::BufWriter::with_capacity(1 << 20, f),
    )
    .and_then(|r| {
        fs::rename(&partial, output).map_err(|e| AdminError::io(output, e))?;
        Ok(r)
    });
    if written.is_err() {
        let _ = fs::remove_file(&partial);
    }
    written
}

/// Stream the layout into `out`: `oci-layout`, `index.json`, then the blobs.
pub fn write_bundle(
    store: &Store,
    files: &[Digest],
    index: &[u8],
    out: impl Write,
) -> Result<(usize, u64), AdminError> {
    let io_err = |e: io::Error| AdminError::Failed(format!("writing the archive: {e}"));
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    append_bytes(&mut tar, "oci-layout", OCI_LAYOUT).map_err(io_err)?;
    append_bytes(&mut tar, "index.json", index).map_err(io_err)?;
    for dir in ["blobs/", "blobs/sha256/"] {
        let mut h = header(0, tar::EntryType::Directory);
        h.set_mode(0o755);
        tar.append_data(&mut h, dir, io::empty()).map_err(io_err)?;
    }
    let mut bytes = 0;
    for d in files {
        let path = store.blob_path(d);
        let f = File::open(&path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => {
                AdminError::Failed(ExportError::Missing(vec![format!("blob {d}")]).to_string())
            }
            _ => AdminError::io(&path, e),
        })?;
        let size = f.metadata().map_err(|e| AdminError::io(&path, e))?.len();
        let mut h = header(size, tar::EntryType::Regular);
        let mut reader = Hashing {
            inner: f.take(size),
            digester: Digester::default(),
        };
        tar.append_data(&mut h, format!("blobs/sha256/{}", d.hex()), &mut reader)
            .map_err(io_err)?;
        if &reader.digester.finish() != d {
            return Err(AdminError::Failed(
                ExportError::Corrupt(d.clone()).to_string(),
            ));
        }
        bytes += size;
    }
    tar.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(io_err)?;
    Ok((files.len(), bytes))
}

fn header(size: u64, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h
}

fn append_bytes<W: Write>(tar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> io::Result<()> {
    let mut h = header(data.len() as u64, tar::EntryType::Regular);
    tar.append_data(&mut h, path, data)
}

/// A reader that hashes what passes through.
struct Hashing<R> {
    inner: R,
    digester: Digester,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.digester.update(&buf[..n]);
        Ok(n)
    }
}
