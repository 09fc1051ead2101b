//! A Harbor-like hub stand-in made of real software: Debian's nginx (the
//! `nginx-light` package) on 127.0.0.1, rewriting `/v2/<project>/<name>/...`
//! to `/v2/<name>/...` and proxying to a docker-registry (distribution 2.8)
//! in pull-through PROXY mode whose remote is the origin:
//!
//! ```text
//! client -> nginx (/v2/dockerhub-proxy/library/app/...) -> CountingProxy (backend)
//!        -> docker-registry `proxy: remoteurl: <origin>` -> origin
//! ```
//!
//! Options: Basic auth on the hub (nginx `auth_basic`, htpasswd made with
//! `openssl passwd -apr1`), TLS with a test CA ([`Pki`], generated with
//! rcgen) and optional client-certificate verification (mTLS), credentials
//! for the hub's own pulls from the origin, and Harbor's habit of answering
//! 404 to `HEAD` on a blob it has not cached yet (goharbor/harbor#22609), on
//! by default.
//!
//! nginx runs in the foreground as one process (`daemon off; master_process
//! off;`), so stopping it by PID leaves no worker behind; every path it
//! writes (pid, logs, temp dirs) is inside the hub's temp dir.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::origin::Origin;
use super::proxy::CountingProxy;
use super::tools::{free_port, ChildGuard};

pub const NGINX_BIN: &str = "/usr/sbin/nginx";

/// How long `Hub::start` waits for nginx to listen.
const NGINX_START: Duration = Duration::from_secs(15);

/// A test PKI in a temp dir: a CA, a server certificate for 127.0.0.1 (IP
/// SAN) and localhost, and a client certificate, all PEM; keys are PKCS#8.
pub struct Pki {
    dir: TempDir,
}

impl Pki {
    /// Generates a fresh CA named `name` and the certificates it signs.
    pub fn generate(name: &str) -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
            KeyUsagePurpose, SanType,
        };
        let dir = tempfile::Builder::new()
            .prefix("berth-pki-")
            .tempdir()
            .expect("pki tempdir");
        let write = |file: &str, text: String| {
            std::fs::write(dir.path().join(file), text).expect("write pki file")
        };

        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        ca.distinguished_name
            .push(DnType::CommonName, format!("berth test CA {name}"));
        let ca_cert = ca.self_signed(&ca_key).expect("self-sign CA");
        write("ca.pem", ca_cert.pem());

        let server_key = KeyPair::generate().expect("server key");
        let mut server = CertificateParams::new(Vec::<String>::new()).expect("server params");
        server.subject_alt_names = vec![
            SanType::IpAddress("127.0.0.1".parse().expect("ip")),
            SanType::DnsName("localhost".try_into().expect("dns name")),
        ];
        server
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server
            .signed_by(&server_key, &ca_cert, &ca_key)
            .expect("sign server cert");
        write("server.pem", server_cert.pem());
        write("server.key", server_key.serialize_pem());

        let client_key = KeyPair::generate().expect("client key");
        let mut client = CertificateParams::new(Vec::<String>::new()).expect("client params");
        client
            .distinguished_name
            .push(DnType::CommonName, "berth-node");
        client.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_cert = client
            .signed_by(&client_key, &ca_cert, &ca_key)
            .expect("sign client cert");
        write("client.pem", client_cert.pem());
        write("client.key", client_key.serialize_pem());
        Pki { dir }
    }

    /// The CA certificate (what a client trusts, and what nginx checks client certificates against).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }

    pub fn client_cert(&self) -> PathBuf {
        self.dir.path().join("client.pem")
    }

    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client.key")
    }
}

/// TLS settings of the hub's listener.
#[derive(Clone, Debug)]
pub struct HubTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA
    /// (`ssl_verify_client on`); nginx answers 400 to a client without one.
    pub client_ca: Option<PathBuf>,
}

/// How to build the hub.
#[derive(Clone, Debug)]
pub struct HubOptions {
    /// The Harbor project the proxy cache lives under (`dockerhub-proxy`).
    pub project: String,
    /// Basic credentials the hub demands (`auth_basic`).
    pub basic_auth: Option<(String, String)>,
    /// Serve HTTPS instead of HTTP.
    pub tls: Option<HubTls>,
    /// Credentials the hub's registry uses for its own pulls from the origin.
    pub remote_credentials: Option<(String, String)>,
    /// Answer 404 to `HEAD /v2/<project>/.../blobs/...`, as Harbor does for a
    /// blob it has not cached yet (after the auth check).
    pub head_blob_404: bool,
}

impl Default for HubOptions {
    fn default() -> Self {
        HubOptions {
            project: "dockerhub-proxy".to_owned(),
            basic_auth: None,
            tls: None,
            remote_credentials: None,
            head_blob_404: true,
        }
    }
}

impl HubOptions {
    pub fn new() -> HubOptions {
        HubOptions::default()
    }

    pub fn project(mut self, project: &str) -> HubOptions {
        self.project = project.to_owned();
        self
    }

    pub fn basic_auth(mut self, username: &str, password: &str) -> HubOptions {
        self.basic_auth = Some((username.to_owned(), password.to_owned()));
        self
    }

    /// HTTPS with `pki`'s server certificate; with `verify_client`, mTLS
    /// against `pki`'s CA.
    pub fn tls(mut self, pki: &Pki, verify_client: bool) -> HubOptions {
        self.tls = Some(HubTls {
            cert: pki.server_cert(),
            key: pki.server_key(),
            client_ca: verify_client.then(|| pki.ca()),
        });
        self
    }

    pub fn remote_credentials(mut self, username: &str, password: &str) -> HubOptions {
        self.remote_credentials = Some((username.to_owned(), password.to_owned()));
        self
    }

    pub fn head_blob_404(mut self, on: bool) -> HubOptions {
        self.head_blob_404 = on;
        self
    }
}

/// One line of nginx's access log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    /// The request URI as the client sent it (before the rewrite).
    pub uri: String,
    pub status: u16,
    /// Response body bytes sent.
    pub bytes: u64,
    /// `$ssl_client_verify`: `SUCCESS`, `NONE`, `FAILED:...`, or `-` without TLS.
    pub ssl_client_verify: String,
    /// The Basic user name presented, or `-`.
    pub user: String,
    /// The `Range` request header, or `-`.
    pub range: String,
}

/// The running hub: nginx in front of a proxy-mode docker-registry, with a
/// [`CountingProxy`] between them. Stopped by PID when dropped.
pub struct Hub {
    nginx: Option<ChildGuard>,
    port: u16,
    tls: bool,
    project: String,
    backend: CountingProxy,
    registry: Origin,
    dir: TempDir,
}

impl Hub {
    /// Starts the hub's registry (pull-through cache of `remote_url`, which
    /// must already answer: distribution 2.8 panics at start otherwise), the
    /// counting backend proxy and nginx; returns once nginx listens.
    pub async fn start(remote_url: &str, opts: HubOptions) -> Hub {
        let mut yaml = format!("proxy:\n  remoteurl: {remote_url}\n");
        if let Some((u, p)) = &opts.remote_credentials {
            yaml.push_str(&format!("  username: {u}\n  password: {p}\n"));
        }
        let registry = Origin::start_with_config(&yaml).await;
        let backend = CountingProxy::start(&registry.url()).await;
        let dir = tempfile::Builder::new()
            .prefix("berth-hub-")
            .tempdir()
            .expect("hub tempdir");
        for sub in ["tmp", "empty", "logs"] {
            std::fs::create_dir_all(dir.path().join(sub)).expect("hub dirs");
        }
        if let Some((user, password)) = &opts.basic_auth {
            let out = Command::new("openssl")
                .args(["passwd", "-apr1", password])
                .output()
                .expect("run openssl passwd");
            assert!(
                out.status.success(),
                "openssl passwd failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let hash = String::from_utf8(out.stdout).expect("utf-8 hash");
            std::fs::write(
                dir.path().join("htpasswd"),
                format!("{user}:{}\n", hash.trim()),
            )
            .expect("write htpasswd");
        }
        let mut last = String::new();
        for attempt in 0..5 {
            let port = free_port();
            let conf = render_nginx_conf(dir.path(), port, backend.addr().port(), &opts);
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).expect("write nginx.conf");
            let mut cmd = Command::new(NGINX_BIN);
            cmd.arg("-p")
                .arg(dir.path())
                .arg("-e")
                .arg("stderr")
                .arg("-c")
                .arg(&conf_path)
                .arg("-g")
                .arg("daemon off; master_process off;");
            let mut child = ChildGuard::spawn("nginx", cmd).expect("spawn nginx");
            match wait_listening(&mut child, port, NGINX_START) {
                Ok(()) => {
                    return Hub {
                        nginx: Some(child),
                        port,
                        tls: opts.tls.is_some(),
                        project: opts.project.clone(),
                        backend,
                        registry,
                        dir,
                    }
                }
                Err(e) => {
                    last = format!("attempt {attempt}: {e}");
                    if child.log().contains("Address already in use") {
                        continue;
                    }
                    panic!("nginx failed to start: {last}");
                }
            }
        }
        panic!("nginx failed to start after retries: {last}");
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    /// [`Hub::url`] with the project: what a berth endpoint `url` names.
    pub fn project_url(&self) -> String {
        format!("{}/{}", self.url(), self.project)
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Counts what nginx forwarded to the hub's registry (paths without the
    /// project prefix).
    pub fn backend(&self) -> &CountingProxy {
        &self.backend
    }

    /// The proxy-mode docker-registry behind nginx.
    pub fn registry(&self) -> &Origin {
        &self.registry
    }

    /// nginx's access log so far, oldest first.
    pub fn access_log(&self) -> Vec<AccessEntry> {
        let text =
            std::fs::read_to_string(self.dir.path().join("logs/access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() < 7 {
                    return None;
                }
                Some(AccessEntry {
                    method: f[0].to_owned(),
                    uri: f[1].to_owned(),
                    status: f[2].parse().ok()?,
                    bytes: f[3].parse().unwrap_or(0),
                    ssl_client_verify: f[4].to_owned(),
                    user: f[5].to_owned(),
                    range: f[6].to_owned(),
                })
            })
            .collect()
    }

    /// nginx's error log (stderr).
    pub fn log(&self) -> String {
        self.nginx.as_ref().map(|c| c.log()).unwrap_or_default()
    }

    /// Stops nginx: its port then refuses connections. The registry keeps running.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.nginx.take() {
            c.terminate(Duration::from_secs(5));
        }
    }
}

/// Waits until something accepts on 127.0.0.1:`port`, failing early if the child exits.
fn wait_listening(child: &mut ChildGuard, port: u16, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let addr = format!("127.0.0.1:{port}").parse().expect("addr");
    loop {
        if let Some(st) = child.try_wait() {
            return Err(format!("nginx exited ({st}); log:\n{}", child.log()));
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "nginx did not listen on {port} within {timeout:?}; log:\n{}",
                child.log()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn render_nginx_conf(dir: &Path, port: u16, backend_port: u16, opts: &HubOptions) -> String {
    let d = dir.display();
    let p = &opts.project;
    let mut server = String::new();
    match &opts.tls {
        None => server.push_str(&format!("        listen 127.0.0.1:{port};\n")),
        Some(tls) => {
            server.push_str(&format!(
                "        listen 127.0.0.1:{port} ssl;\n        ssl_certificate {};\n        ssl_certificate_key {};\n        ssl_protocols TLSv1.2 TLSv1.3;\n",
                tls.cert.display(),
                tls.key.display()
            ));
            if let Some(ca) = &tls.client_ca {
                server.push_str(&format!(
                    "        ssl_verify_client on;\n        ssl_client_certificate {};\n        ssl_verify_depth 2;\n",
                    ca.display()
                ));
            }
        }
    }
    if opts.basic_auth.is_some() {
        server.push_str(&format!(
            "        auth_basic \"berth-test-hub\";\n        auth_basic_user_file {d}/htpasswd;\n"
        ));
    }
    let head_quirk = if opts.head_blob_404 {
        "            if ($request_method = HEAD) { rewrite ^ /__harbor_blob_head last; }\n"
    } else {
        ""
    };
    format!(
        r#"pid {d}/nginx.pid;
error_log stderr info;
events {{
    worker_connections 256;
}}
http {{
    log_format hub '$request_method $request_uri $status $body_bytes_sent $ssl_client_verify $remote_user $http_range';
    access_log {d}/logs/access.log hub;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    upstream registry_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 8;
    }}
    server {{
{server}        client_max_body_size 0;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;
        proxy_request_buffering off;
        proxy_read_timeout 60s;
        location = /v2/ {{
            proxy_pass http://registry_backend;
        }}
        location ~ ^/v2/{p}/.+/blobs/ {{
{head_quirk}            rewrite ^/v2/{p}/(.*)$ /v2/$1 break;
            proxy_pass http://registry_backend;
        }}
        location /v2/{p}/ {{
            rewrite ^/v2/{p}/(.*)$ /v2/$1 break;
            proxy_pass http://registry_backend;
        }}
        location = /__harbor_blob_head {{
            internal;
            root {d}/empty;
            try_files /nonexistent =404;
        }}
        location / {{
            return 404;
        }}
    }}
}}
"#
    )
}
