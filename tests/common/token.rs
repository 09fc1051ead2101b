//! An in-process Bearer token server compatible with distribution 2.8's
//! `auth: token:` (realm, service, issuer, rootcertbundle), and a
//! docker-registry origin that uses it.
//!
//! Tokens are ES256 JWTs signed by a P-256 key whose self-signed certificate
//! is the whole `rootcertbundle`. The JWT header names the key by `kid` in
//! libtrust key-ID format, which distribution 2.8 matches against the keys of
//! the bundle's certificates (`token/accesscontroller.go` trustedKeys;
//! `token.go` VerifySigningKey tries `x5c`, then `jwk`, then `kid`). 2.8's
//! claim set has `aud` as a single string, so it is sent as a string.
//!
//! Policy: a repository in [`TokenPolicy::public_repos`] gets `pull` for
//! anonymous requests; with valid Basic credentials every requested action
//! (`pull`, `push`, ...) is granted; anything else is left out of the token
//! (the spec's "subset of the requested access"), so the registry answers 401
//! `insufficient_scope`. Wrong credentials get 401 from the token server.

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tempfile::TempDir;
use tokio::sync::oneshot;

use super::origin::Origin;

/// Who may get which token.
#[derive(Clone, Debug)]
pub struct TokenPolicy {
    /// Repositories (e.g. `library/hello`) anonymous clients may pull.
    pub public_repos: BTreeSet<String>,
    /// Basic credentials that unlock every action on every repository.
    pub username: String,
    pub password: String,
    /// `expires_in` of the response and lifetime of the JWT, in seconds.
    /// (distribution 2.8 allows 60 s of clock leeway on `exp`.)
    pub expires_in: u64,
    /// `service` in the challenge and the JWT `aud`.
    pub service: String,
    /// JWT `iss`.
    pub issuer: String,
}

impl Default for TokenPolicy {
    fn default() -> Self {
        TokenPolicy {
            public_repos: BTreeSet::new(),
            username: "berth".to_owned(),
            password: "s3cret".to_owned(),
            expires_in: 300,
            service: "berth-test-registry".to_owned(),
            issuer: "berth-test-issuer".to_owned(),
        }
    }
}

impl TokenPolicy {
    /// Default policy: nothing public, credentials `berth:s3cret`, 300 s.
    pub fn new() -> TokenPolicy {
        TokenPolicy::default()
    }

    /// Allows anonymous pull of `repo`.
    pub fn public(mut self, repo: &str) -> TokenPolicy {
        self.public_repos.insert(repo.to_owned());
        self
    }

    pub fn credentials(mut self, username: &str, password: &str) -> TokenPolicy {
        self.username = username.to_owned();
        self.password = password.to_owned();
        self
    }

    pub fn expires_in(mut self, seconds: u64) -> TokenPolicy {
        self.expires_in = seconds;
        self
    }
}

/// One request the token server answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRequest {
    /// `GET` (docker style) or `POST` (OAuth2 form, as containerd with credentials).
    pub method: String,
    pub service: Option<String>,
    /// Each requested scope, e.g. `repository:library/hello:pull`.
    pub scopes: Vec<String>,
    /// The user name presented (Basic or OAuth form), if any.
    pub user: Option<String>,
    pub client_id: Option<String>,
    pub status: u16,
}

/// The token server; serves on its own thread and runtime, so it works from
/// sync tests and from any tokio runtime flavor. Shut down on drop.
pub struct TokenServer {
    addr: SocketAddr,
    state: Arc<State>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    cert_path: PathBuf,
    _dir: TempDir,
}

struct State {
    policy: TokenPolicy,
    expires_in: AtomicU64,
    unavailable: AtomicBool,
    count: AtomicUsize,
    log: Mutex<Vec<TokenRequest>>,
    key: EcdsaKeyPair,
    kid: String,
    rng: SystemRandom,
    jti: AtomicU64,
}

impl TokenServer {
    /// Generates the signing key and certificate, writes the root cert
    /// bundle, and starts serving `GET|POST /token` on 127.0.0.1:0.
    pub fn start(policy: TokenPolicy) -> TokenServer {
        let dir = tempfile::Builder::new()
            .prefix("berth-token-")
            .tempdir()
            .expect("token tempdir");
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generate P-256 key");
        let mut params = rcgen::CertificateParams::new(vec!["berth-token-signer".to_owned()])
            .expect("cert params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "berth test token signer");
        let cert = params.self_signed(&key_pair).expect("self-signed cert");
        let cert_path = dir.path().join("rootcertbundle.pem");
        std::fs::write(&cert_path, cert.pem()).expect("write rootcertbundle");
        let rng = SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            &key_pair.serialize_der(),
            &rng,
        )
        .expect("load signing key");
        let state = Arc::new(State {
            expires_in: AtomicU64::new(policy.expires_in),
            policy,
            unavailable: AtomicBool::new(false),
            count: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
            key,
            kid: libtrust_key_id(&key_pair.public_key_der()),
            rng,
            jti: AtomicU64::new(0),
        });

        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let addr = listener.local_addr().expect("token server addr");
        let (tx, rx) = oneshot::channel();
        let serve_state = state.clone();
        let thread = thread::Builder::new()
            .name("token-server".to_owned())
            .spawn(move || serve(listener, serve_state, rx))
            .expect("spawn token server thread");
        TokenServer {
            addr,
            state,
            shutdown: Some(tx),
            thread: Some(thread),
            cert_path,
            _dir: dir,
        }
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn service(&self) -> &str {
        &self.state.policy.service
    }

    pub fn issuer(&self) -> &str {
        &self.state.policy.issuer
    }

    /// PEM file with the signing certificate (distribution's `rootcertbundle`).
    pub fn rootcertbundle_path(&self) -> &Path {
        &self.cert_path
    }

    /// The libtrust key ID the tokens carry as `kid`.
    pub fn key_id(&self) -> &str {
        &self.state.kid
    }

    /// `(username, password)` that the policy accepts.
    pub fn credentials(&self) -> (&str, &str) {
        (&self.state.policy.username, &self.state.policy.password)
    }

    /// `Basic base64(user:pass)` for the policy's credentials.
    pub fn basic_auth(&self) -> String {
        basic_auth(&self.state.policy.username, &self.state.policy.password)
    }

    /// Number of HTTP token requests answered (any status).
    pub fn token_requests(&self) -> usize {
        self.state.count.load(Ordering::SeqCst)
    }

    /// Every HTTP token request so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().expect("token log").clone()
    }

    /// Changes `expires_in` (and JWT lifetime) for later tokens.
    pub fn set_expires_in(&self, seconds: u64) {
        self.state.expires_in.store(seconds, Ordering::SeqCst);
    }

    /// While set, every token request gets 503.
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state.unavailable.store(unavailable, Ordering::SeqCst);
    }

    /// Mints a token directly (not counted as a request): `access` lists
    /// `(repository, actions)`.
    pub fn issue(&self, subject: &str, access: &[(&str, &[&str])]) -> String {
        let access: Vec<Value> = access
            .iter()
            .map(|(name, actions)| json!({"type": "repository", "name": name, "actions": actions}))
            .collect();
        self.state.sign(subject, access)
    }

    /// A `pull,push` token for `repo`, for pushing test content.
    pub fn push_token(&self, repo: &str) -> String {
        let user = self.state.policy.username.clone();
        self.issue(&user, &[(repo, &["pull", "push"])])
    }

    /// `Bearer <push_token(repo)>`, for `content::push_image_auth`.
    pub fn push_authorization(&self, repo: &str) -> String {
        format!("Bearer {}", self.push_token(repo))
    }

    /// The `auth:` section for a distribution config.yml (top-level key).
    pub fn registry_auth_yaml(&self) -> String {
        format!(
            "auth:\n  token:\n    realm: {realm}\n    service: {service}\n    issuer: {issuer}\n    rootcertbundle: {bundle}\n",
            realm = self.realm(),
            service = self.service(),
            issuer = self.issuer(),
            bundle = self.cert_path.display(),
        )
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Starts a docker-registry whose `auth.token` points at `tokens`.
pub async fn start_token_origin(tokens: &TokenServer) -> Origin {
    Origin::start_with_config(&tokens.registry_auth_yaml()).await
}

/// `Basic base64(user:pass)`.
pub fn basic_auth(username: &str, password: &str) -> String {
    format!(
        "Basic {}",
        STANDARD.encode(format!("{username}:{password}"))
    )
}

/// libtrust key ID: SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits,
/// base32 (no padding), in 12 groups of 4 joined by ':'.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let hash = Sha256::digest(spki_der);
    let b32 = base32(&hash[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| std::str::from_utf8(c).expect("ascii"))
        .collect::<Vec<_>>()
        .join(":")
}

/// RFC 4648 base32 without padding.
fn base32(data: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buffer, mut bits) = (0u32, 0u32);
    for &byte in data {
        buffer = (buffer << 8) | u32::from(byte);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buffer >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buffer << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

impl State {
    fn sign(&self, subject: &str, access: Vec<Value>) -> String {
        let now = unix_now();
        let header = json!({"typ": "JWT", "alg": "ES256", "kid": self.kid});
        let claims = json!({
            "iss": self.policy.issuer,
            "sub": subject,
            "aud": self.policy.service,
            "exp": now + self.expires_in.load(Ordering::SeqCst),
            "nbf": now.saturating_sub(1),
            "iat": now,
            "jti": format!("berth-{}-{now}", self.jti.fetch_add(1, Ordering::SeqCst)),
            "access": access,
        });
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature = self
            .key
            .sign(&self.rng, signing_input.as_bytes())
            .expect("sign token");
        format!(
            "{signing_input}.{}",
            URL_SAFE_NO_PAD.encode(signature.as_ref())
        )
    }

    /// Access granted for one `type:name:actions` scope, if any.
    fn grant(&self, scope: &str, authenticated: bool) -> Option<Value> {
        let (kind, rest) = scope.split_once(':')?;
        let (name, actions) = rest.rsplit_once(':')?;
        let requested: Vec<&str> = actions.split(',').filter(|a| !a.is_empty()).collect();
        let granted: Vec<&str> = if authenticated {
            requested
        } else if kind == "repository" && self.policy.public_repos.contains(name) {
            requested.into_iter().filter(|a| *a == "pull").collect()
        } else {
            Vec::new()
        };
        Some(json!({"type": kind, "name": name, "actions": granted}))
    }

    fn handle(
        &self,
        method: &Method,
        params: &[(String, String)],
        basic: Option<(String, String)>,
    ) -> (StatusCode, Value, TokenRequest) {
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let is_post = method == Method::POST;
        let scopes: Vec<String> = params
            .iter()
            .filter(|(k, _)| k == "scope")
            .flat_map(|(_, v)| {
                // The OAuth form joins scopes with spaces; GET repeats `scope`.
                v.split(' ')
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect();
        let service = get("service");
        // GET: Basic header. POST: grant_type=password with username/password.
        let credentials = if is_post {
            match get("grant_type").as_deref() {
                Some("password") => Some((
                    get("username").unwrap_or_default(),
                    get("password").unwrap_or_default(),
                )),
                _ => None,
            }
        } else {
            basic
        };
        let mut record = TokenRequest {
            method: method.to_string(),
            service: service.clone(),
            scopes: scopes.clone(),
            user: credentials.as_ref().map(|(u, _)| u.clone()),
            client_id: get("client_id"),
            status: 200,
        };
        let error = |status: StatusCode, code: &str, message: &str, mut record: TokenRequest| {
            record.status = status.as_u16();
            let body = json!({"errors": [{"code": code, "message": message}], "error": code.to_lowercase()});
            (status, body, record)
        };
        if self.unavailable.load(Ordering::SeqCst) {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
                "token server unavailable",
                record,
            );
        }
        if is_post && get("grant_type").as_deref() != Some("password") {
            return error(
                StatusCode::BAD_REQUEST,
                "UNSUPPORTED",
                "only grant_type=password is supported",
                record,
            );
        }
        if let Some(s) = &service {
            if s != &self.policy.service {
                return error(
                    StatusCode::BAD_REQUEST,
                    "INVALID_SERVICE",
                    "unknown service",
                    record,
                );
            }
        }
        let authenticated = match &credentials {
            None => false,
            Some((u, p)) if *u == self.policy.username && *p == self.policy.password => true,
            Some(_) => {
                return error(
                    StatusCode::UNAUTHORIZED,
                    "UNAUTHORIZED",
                    "invalid credentials",
                    record,
                );
            }
        };
        let access: Vec<Value> = scopes
            .iter()
            .filter_map(|s| self.grant(s, authenticated))
            .collect();
        let subject = if authenticated {
            self.policy.username.clone()
        } else {
            String::new()
        };
        let token = self.sign(&subject, access);
        record.status = 200;
        let issued_at = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let body = json!({
            "token": token,
            "access_token": token,
            "expires_in": self.expires_in.load(Ordering::SeqCst),
            "issued_at": issued_at,
        });
        (StatusCode::OK, body, record)
    }
}

fn serve(listener: std::net::TcpListener, state: Arc<State>, shutdown: oneshot::Receiver<()>) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("token server runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let accept = async {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(respond(&state, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        };
        tokio::select! {
            _ = accept => {}
            _ = shutdown => {}
        }
    });
    // Dropping the runtime cancels the connection tasks.
}

async fn respond(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    if parts.uri.path() != "/token"
        || !(parts.method == Method::GET || parts.method == Method::POST)
    {
        return Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"not found\n")))
            .expect("response");
    }
    let mut params: Vec<(String, String)> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    if parts.method == Method::POST {
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        params.extend(url::form_urlencoded::parse(&body).into_owned());
    }
    let basic = parts
        .headers
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_basic);
    let (status, body, record) = state.handle(&parts.method, &params, basic);
    state.count.fetch_add(1, Ordering::SeqCst);
    state.log.lock().expect("token log").push(record);
    let mut resp = Response::builder()
        .status(status)
        .header(hyper::header::CONTENT_TYPE, "application/json");
    if status == StatusCode::UNAUTHORIZED {
        resp = resp.header(
            hyper::header::WWW_AUTHENTICATE,
            "Basic realm=\"berth-test-token\"",
        );
    }
    resp.body(Full::new(Bytes::from(body.to_string())))
        .expect("response")
}

fn parse_basic(header: &str) -> Option<(String, String)> {
    let (scheme, value) = header.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(value.trim()).ok()?).ok()?;
    let (user, pass) = decoded.split_once(':')?;
    Some((user.to_owned(), pass.to_owned()))
}
