//! Response building: the body type, the OCI error envelope, and the
//! headers every registry response carries.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};

use super::checked::{Checked, OnPoison};

use crate::cache::mmap::FRAME;
use crate::error::Error;
use crate::registry::error_code::Envelope;

/// Every response body: mapped cache content, a growing-file stream, or JSON.
pub type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// A body of bytes already in memory (or mapped): no copy is made.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// Mapped (or in-memory) content as a body of [`FRAME`]-sized slices: no
/// copy. If its file turns out truncated the body ends in an error and
/// `on_poison` runs ([`super::checked`]).
pub fn content(bytes: Bytes, on_poison: OnPoison) -> Body {
    let frames = (0..bytes.len())
        .step_by(FRAME)
        .map(move |at| Ok(bytes.slice(at..(at + FRAME).min(bytes.len()))));
    Checked::new(futures_util::stream::iter(frames), on_poison).boxed_unsync()
}

/// An empty body (HEAD, 204-like answers).
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The error (kept for the access log) attached to an error response.
#[derive(Debug, Clone)]
pub struct ErrorNote(pub Error);

/// An error in the OCI envelope. No side effects: the access log reads the
/// [`ErrorNote`] extension.
pub fn error(err: &Error, head: bool) -> Response<Body> {
    let status = err.status();
    let message = err.to_string();
    let detail = err.detail();
    let json = Envelope::json(err.code(), &message, detail.as_deref());
    let len = json.len();
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::CONTENT_LENGTH, len)
        .header("Docker-Distribution-API-Version", "registry/2.0");
    if let Error::RangeInvalid(size) = err {
        resp = resp.header(header::CONTENT_RANGE, format!("bytes */{size}"));
    }
    if status == StatusCode::UNAUTHORIZED {
        resp = resp.header(header::WWW_AUTHENTICATE, "Basic realm=\"berth\"");
    }
    if status == StatusCode::METHOD_NOT_ALLOWED {
        resp = resp.header(header::ALLOW, "GET, HEAD");
    }
    let body = if head {
        empty()
    } else {
        full(Bytes::from(json))
    };
    let mut resp = resp.body(body).expect("valid error response");
    resp.extensions_mut().insert(ErrorNote(err.clone()));
    resp
}

/// A header value from a string we built (digests, media types, numbers).
pub fn value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}
