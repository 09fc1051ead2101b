//! Real, deterministic OCI/Docker content (tar.gz layers, configs, manifests, indexes, a Helm chart) and a push/pull client for the registry HTTP API.

use std::io::Write;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use flate2::{Compression, GzBuilder};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use super::tools::http_client;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const HELM_CONFIG: &str = "application/vnd.cncf.helm.config.v1+json";
pub const HELM_CHART_LAYER: &str = "application/vnd.cncf.helm.chart.content.v1.tar+gzip";

/// Accept header listing every manifest type this harness produces.
pub const ACCEPT_ALL_MANIFESTS: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", sha256_hex(bytes))
}

/// OCI (application/vnd.oci.*) or Docker schema 2 (application/vnd.docker.*) media types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MediaKind {
    Oci,
    Docker,
}

impl MediaKind {
    pub fn manifest_type(self) -> &'static str {
        match self {
            MediaKind::Oci => OCI_MANIFEST,
            MediaKind::Docker => DOCKER_MANIFEST,
        }
    }
    pub fn index_type(self) -> &'static str {
        match self {
            MediaKind::Oci => OCI_INDEX,
            MediaKind::Docker => DOCKER_MANIFEST_LIST,
        }
    }
    pub fn config_type(self) -> &'static str {
        match self {
            MediaKind::Oci => OCI_CONFIG,
            MediaKind::Docker => DOCKER_CONFIG,
        }
    }
    pub fn layer_type(self) -> &'static str {
        match self {
            MediaKind::Oci => OCI_LAYER_GZIP,
            MediaKind::Docker => DOCKER_LAYER_GZIP,
        }
    }
}

/// Content-addressed bytes with their media type.
#[derive(Clone, Debug)]
pub struct Blob {
    pub digest: String,
    pub bytes: Bytes,
    pub media_type: String,
}

impl Blob {
    pub fn new(media_type: &str, bytes: impl Into<Bytes>) -> Blob {
        let bytes = bytes.into();
        Blob {
            digest: digest_of(&bytes),
            bytes,
            media_type: media_type.to_string(),
        }
    }

    pub fn size(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// The OCI descriptor `{mediaType, digest, size}`.
    pub fn descriptor(&self) -> Value {
        json!({
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.bytes.len(),
        })
    }
}

/// A single-platform image (or artifact): manifest + config + layers.
#[derive(Clone, Debug)]
pub struct Image {
    pub manifest_bytes: Bytes,
    pub manifest_digest: String,
    pub media_type: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
    pub arch: String,
    pub os: String,
}

impl Image {
    /// Config then layers.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        std::iter::once(&self.config).chain(self.layers.iter())
    }

    /// Sum of config and layer sizes.
    pub fn blob_bytes(&self) -> u64 {
        self.blobs().map(Blob::size).sum()
    }

    pub fn manifest_size(&self) -> u64 {
        self.manifest_bytes.len() as u64
    }
}

/// A multi-platform OCI index or Docker manifest list and its children.
#[derive(Clone, Debug)]
pub struct Index {
    pub manifest_bytes: Bytes,
    pub manifest_digest: String,
    pub media_type: String,
    pub children: Vec<Image>,
}

/// Deterministic pseudo-random bytes (splitmix64): incompressible, so layer sizes are real.
pub fn pseudo_random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed ^ 0x9E37_79B9_7F4A_7C15;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

fn tar_header(path: &str, size: u64, mode: u32, kind: tar::EntryType) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_path(path).expect("tar path");
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h.set_entry_type(kind);
    h.set_cksum();
    h
}

/// An uncompressed tar of `files` (path, contents); parent directories are
/// added as entries before their first file.
pub fn make_tar(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs: Vec<String> = Vec::new();
    for (path, data) in files {
        let parts: Vec<&str> = path.split('/').collect();
        for i in 1..parts.len() {
            let dir = format!("{}/", parts[..i].join("/"));
            if !dirs.contains(&dir) {
                let h = tar_header(&dir, 0, 0o755, tar::EntryType::Directory);
                builder.append(&h, std::io::empty()).expect("tar dir");
                dirs.push(dir);
            }
        }
        let h = tar_header(path, data.len() as u64, 0o644, tar::EntryType::Regular);
        builder.append(&h, data.as_slice()).expect("tar file");
    }
    builder.into_inner().expect("tar finish")
}

/// Deterministic gzip (mtime 0, no file name).
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), Compression::fast());
    enc.write_all(data).expect("gzip write");
    enc.finish().expect("gzip finish")
}

/// The uncompressed tar of layer `index` for `seed` (depends only on both).
pub fn layer_tar(seed: u64, index: usize, layer_size: usize) -> Vec<u8> {
    let base = format!("berth-test/seed-{seed}/layer-{index}");
    let files = vec![
        (
            format!("{base}/data.bin"),
            pseudo_random_bytes(
                seed.wrapping_mul(1_000_003).wrapping_add(index as u64),
                layer_size,
            ),
        ),
        (
            format!("{base}/README.txt"),
            format!(
                "berth integration test layer {index} of seed {seed}, {layer_size} data bytes\n"
            )
            .into_bytes(),
        ),
        (
            format!("etc/berth-test/seed-{seed}-layer-{index}"),
            format!("seed={seed}\nlayer={index}\n").into_bytes(),
        ),
    ];
    make_tar(&files)
}

fn variant_for(arch: &str) -> Option<&'static str> {
    match arch {
        "arm64" => Some("v8"),
        "arm" => Some("v7"),
        _ => None,
    }
}

/// Builds a real image: `n_layers` tar.gz layers (each with `layer_size`
/// incompressible bytes plus small text files), a config whose
/// `rootfs.diff_ids` are the sha256 of the uncompressed tars, and a manifest.
/// Layer contents depend only on (`seed`, layer index); the config (and thus
/// the manifest) also depends on `arch` and `kind`. OS is always linux.
pub fn build_image(
    seed: u64,
    n_layers: usize,
    layer_size: usize,
    kind: MediaKind,
    arch: &str,
) -> Image {
    let mut layers = Vec::with_capacity(n_layers);
    let mut diff_ids = Vec::with_capacity(n_layers);
    let mut history = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let tar = layer_tar(seed, i, layer_size);
        diff_ids.push(digest_of(&tar));
        layers.push(Blob::new(kind.layer_type(), gzip(&tar)));
        history.push(json!({
            "created": "1970-01-01T00:00:00Z",
            "created_by": format!("berth-test seed {seed} layer {i}"),
        }));
    }
    let mut config = json!({
        "architecture": arch,
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "author": "berth integration tests",
        "config": {
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "Cmd": ["/bin/sh"],
            "Labels": {"berth.test.seed": seed.to_string()},
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": history,
    });
    if let Some(v) = variant_for(arch) {
        config["variant"] = json!(v);
    }
    let config = Blob::new(
        kind.config_type(),
        serde_json::to_vec(&config).expect("config json"),
    );
    image_from_parts(kind.manifest_type(), config, layers, arch, "linux", None)
}

/// Assembles a manifest of `media_type` from a config and layers.
pub fn image_from_parts(
    media_type: &str,
    config: Blob,
    layers: Vec<Blob>,
    arch: &str,
    os: &str,
    annotations: Option<Value>,
) -> Image {
    let mut manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "config": config.descriptor(),
        "layers": layers.iter().map(Blob::descriptor).collect::<Vec<_>>(),
    });
    if let Some(a) = annotations {
        manifest["annotations"] = a;
    }
    let manifest_bytes = Bytes::from(serde_json::to_vec(&manifest).expect("manifest json"));
    Image {
        manifest_digest: digest_of(&manifest_bytes),
        manifest_bytes,
        media_type: media_type.to_string(),
        config,
        layers,
        arch: arch.to_string(),
        os: os.to_string(),
    }
}

/// Builds an OCI index / Docker manifest list over `platforms` (arch, image).
pub fn build_index(platforms: &[(&str, Image)], kind: MediaKind) -> Index {
    let manifests: Vec<Value> = platforms
        .iter()
        .map(|(arch, img)| {
            let mut platform = json!({"architecture": arch, "os": img.os});
            if let Some(v) = variant_for(arch) {
                platform["variant"] = json!(v);
            }
            json!({
                "mediaType": img.media_type,
                "digest": img.manifest_digest,
                "size": img.manifest_bytes.len(),
                "platform": platform,
            })
        })
        .collect();
    let index = json!({
        "schemaVersion": 2,
        "mediaType": kind.index_type(),
        "manifests": manifests,
    });
    let manifest_bytes = Bytes::from(serde_json::to_vec(&index).expect("index json"));
    Index {
        manifest_digest: digest_of(&manifest_bytes),
        manifest_bytes,
        media_type: kind.index_type().to_string(),
        children: platforms.iter().map(|(_, i)| i.clone()).collect(),
    }
}

/// A real Helm chart (`mychart/Chart.yaml`, `values.yaml`, `templates/cm.yaml`)
/// packaged as an OCI artifact; `version` goes into Chart.yaml and the config.
pub fn build_helm_chart(name: &str, version: &str) -> Image {
    let chart_yaml = format!(
        "apiVersion: v2\nname: {name}\ndescription: A Helm chart for berth integration tests\n\
type: application\nversion: {version}\nappVersion: \"1.0.0\"\n"
    );
    let values = "replicaCount: 1\ngreeting: hello from berth\n".to_string();
    let cm = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-cm\n\
data:\n  greeting: {{ .Values.greeting | quote }}\n"
        .to_string();
    let files = vec![
        (format!("{name}/Chart.yaml"), chart_yaml.into_bytes()),
        (format!("{name}/values.yaml"), values.into_bytes()),
        (format!("{name}/templates/cm.yaml"), cm.into_bytes()),
    ];
    let layer = Blob::new(HELM_CHART_LAYER, gzip(&make_tar(&files)));
    let config = json!({
        "name": name,
        "version": version,
        "description": "A Helm chart for berth integration tests",
        "apiVersion": "v2",
        "appVersion": "1.0.0",
        "type": "application",
    });
    let config = Blob::new(
        HELM_CONFIG,
        serde_json::to_vec(&config).expect("helm config json"),
    );
    image_from_parts(OCI_MANIFEST, config, vec![layer], "", "", None)
}

/// A manifest fetched from a registry.
#[derive(Clone, Debug)]
pub struct Fetched {
    pub status: u16,
    pub content_type: Option<String>,
    pub docker_content_digest: Option<String>,
    pub bytes: Bytes,
}

/// Minimal registry v2 client for pushing and pulling test content.
#[derive(Clone)]
pub struct RegistryClient {
    base: String,
    auth: Option<String>,
    http: reqwest::Client,
}

impl RegistryClient {
    /// `base_url` like `http://127.0.0.1:PORT` (no trailing `/v2`).
    pub fn new(base_url: &str) -> RegistryClient {
        RegistryClient {
            base: base_url.trim_end_matches('/').to_string(),
            auth: None,
            http: http_client(),
        }
    }

    /// Sends `Authorization: <auth>` (e.g. `Bearer xyz` or `Basic ...`) on every request.
    pub fn with_auth(mut self, auth: Option<String>) -> RegistryClient {
        self.auth = auth;
        self
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn req(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, url);
        if let Some(a) = &self.auth {
            rb = rb.header(reqwest::header::AUTHORIZATION, a);
        }
        rb
    }

    /// True if the blob exists (HEAD 200).
    pub async fn blob_exists(&self, repo: &str, digest: &str) -> Result<bool> {
        let url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        let resp = self.req(reqwest::Method::HEAD, &url).send().await?;
        Ok(resp.status().as_u16() == 200)
    }

    /// Monolithic upload: `POST /blobs/uploads/` then `PUT <location>&digest=`.
    pub async fn push_blob(&self, repo: &str, blob: &Blob) -> Result<()> {
        let url = format!("{}/v2/{repo}/blobs/uploads/", self.base);
        let resp = self
            .req(reqwest::Method::POST, &url)
            .header(reqwest::header::CONTENT_LENGTH, "0")
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        if resp.status().as_u16() != 202 {
            let st = resp.status();
            bail!(
                "POST {url}: {st}: {}",
                resp.text().await.unwrap_or_default()
            );
        }
        let location = resp
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .context("upload POST without Location")?
            .to_string();
        let mut put_url = url::Url::parse(&format!("{}/", self.base))?.join(&location)?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", &blob.digest);
        let resp = self
            .req(reqwest::Method::PUT, put_url.as_str())
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(
                reqwest::header::CONTENT_LENGTH,
                blob.bytes.len().to_string(),
            )
            .body(blob.bytes.clone())
            .send()
            .await
            .with_context(|| format!("PUT {put_url}"))?;
        if resp.status().as_u16() != 201 {
            let st = resp.status();
            bail!(
                "PUT blob {}: {st}: {}",
                blob.digest,
                resp.text().await.unwrap_or_default()
            );
        }
        Ok(())
    }

    /// `PUT /v2/<repo>/manifests/<reference>` with `Content-Type: media_type`.
    pub async fn push_manifest(
        &self,
        repo: &str,
        reference: &str,
        bytes: &Bytes,
        media_type: &str,
    ) -> Result<()> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let resp = self
            .req(reqwest::Method::PUT, &url)
            .header(reqwest::header::CONTENT_TYPE, media_type)
            .body(bytes.clone())
            .send()
            .await
            .with_context(|| format!("PUT {url}"))?;
        if resp.status().as_u16() != 201 {
            let st = resp.status();
            bail!("PUT {url}: {st}: {}", resp.text().await.unwrap_or_default());
        }
        let expected = digest_of(bytes);
        if let Some(d) = resp.headers().get("docker-content-digest") {
            if d.to_str().unwrap_or_default() != expected {
                bail!("PUT {url}: registry digest {d:?} != {expected}");
            }
        }
        Ok(())
    }

    /// Pushes config and layers (skipping those already present), then the
    /// manifest under `tag` (use the manifest digest as tag to push by digest).
    pub async fn push_image(&self, repo: &str, tag: &str, image: &Image) -> Result<()> {
        for blob in image.blobs() {
            if !self.blob_exists(repo, &blob.digest).await? {
                self.push_blob(repo, blob).await?;
            }
        }
        self.push_manifest(repo, tag, &image.manifest_bytes, &image.media_type)
            .await
    }

    /// Pushes every child image by digest, then the index under `tag`.
    pub async fn push_index(&self, repo: &str, tag: &str, index: &Index) -> Result<()> {
        for child in &index.children {
            self.push_image(repo, &child.manifest_digest, child).await?;
        }
        self.push_manifest(repo, tag, &index.manifest_bytes, &index.media_type)
            .await
    }

    /// GET a manifest with an Accept header listing all manifest types.
    pub async fn get_manifest(&self, repo: &str, reference: &str) -> Result<Fetched> {
        self.fetch_manifest(reqwest::Method::GET, repo, reference, ACCEPT_ALL_MANIFESTS)
            .await
    }

    /// GET or HEAD a manifest with an explicit Accept header (any status is returned).
    pub async fn fetch_manifest(
        &self,
        method: reqwest::Method,
        repo: &str,
        reference: &str,
        accept: &str,
    ) -> Result<Fetched> {
        let url = format!("{}/v2/{repo}/manifests/{reference}", self.base);
        let mut rb = self.req(method, &url);
        if !accept.is_empty() {
            rb = rb.header(reqwest::header::ACCEPT, accept);
        }
        let resp = rb.send().await.with_context(|| format!("GET {url}"))?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let content_type = header("content-type");
        let docker_content_digest = header("docker-content-digest");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        Ok(Fetched {
            status,
            content_type,
            docker_content_digest,
            bytes,
        })
    }

    /// GET a blob (following one redirect, if any); fails unless 200.
    pub async fn get_blob(&self, repo: &str, digest: &str) -> Result<Bytes> {
        let mut url = format!("{}/v2/{repo}/blobs/{digest}", self.base);
        for _ in 0..3 {
            let resp = self
                .req(reqwest::Method::GET, &url)
                .send()
                .await
                .with_context(|| format!("GET {url}"))?;
            let st = resp.status().as_u16();
            if (300..400).contains(&st) {
                let loc = resp
                    .headers()
                    .get(reqwest::header::LOCATION)
                    .and_then(|v| v.to_str().ok())
                    .context("redirect without Location")?;
                url = url::Url::parse(&url)?.join(loc)?.to_string();
                continue;
            }
            if st != 200 {
                bail!("GET {url}: {st}: {}", resp.text().await.unwrap_or_default());
            }
            return Ok(resp.bytes().await?);
        }
        bail!("too many redirects for {digest}")
    }
}

/// Pushes `image` to `base_url` under `repo:tag` (no auth).
pub async fn push_image(base_url: &str, repo: &str, tag: &str, image: &Image) -> Result<()> {
    RegistryClient::new(base_url)
        .push_image(repo, tag, image)
        .await
}

/// Same as [`push_image`] with an optional `Authorization` header value.
pub async fn push_image_auth(
    base_url: &str,
    repo: &str,
    tag: &str,
    image: &Image,
    auth: Option<String>,
) -> Result<()> {
    RegistryClient::new(base_url)
        .with_auth(auth)
        .push_image(repo, tag, image)
        .await
}

/// Builds an OCI index or Docker manifest list over `platforms`, pushes the
/// children by digest and then the index under `repo:tag`.
pub async fn push_index(
    base_url: &str,
    repo: &str,
    tag: &str,
    platforms: &[(&str, Image)],
    kind: MediaKind,
) -> Result<Index> {
    push_index_auth(base_url, repo, tag, platforms, kind, None).await
}

/// Same as [`push_index`] with an optional `Authorization` header value.
pub async fn push_index_auth(
    base_url: &str,
    repo: &str,
    tag: &str,
    platforms: &[(&str, Image)],
    kind: MediaKind,
    auth: Option<String>,
) -> Result<Index> {
    let index = build_index(platforms, kind);
    RegistryClient::new(base_url)
        .with_auth(auth)
        .push_index(repo, tag, &index)
        .await?;
    Ok(index)
}

/// Pushes a Helm chart artifact (chart `mychart`, version = `tag`) under `repo:tag`.
pub async fn push_helm_chart(base_url: &str, repo: &str, tag: &str) -> Result<Image> {
    push_helm_chart_auth(base_url, repo, tag, None).await
}

/// Same as [`push_helm_chart`] with an optional `Authorization` header value.
pub async fn push_helm_chart_auth(
    base_url: &str,
    repo: &str,
    tag: &str,
    auth: Option<String>,
) -> Result<Image> {
    let chart = build_helm_chart("mychart", tag);
    RegistryClient::new(base_url)
        .with_auth(auth)
        .push_image(repo, tag, &chart)
        .await?;
    Ok(chart)
}
