//! The OCI distribution error codes and the JSON error envelope
//! (`{"errors":[{"code","message","detail"}]}`).

use serde::Serialize;

/// Error codes from the distribution spec, plus distribution's `RANGE_INVALID`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
#[allow(missing_docs)]
pub enum ErrorCode {
    BlobUnknown,
    DigestInvalid,
    ManifestUnknown,
    ManifestInvalid,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    Toomanyrequests,
    RangeInvalid,
    /// Not in the spec; used for berth's own faults and upstream faults.
    Unknown,
}

/// The envelope every error response carries.
#[derive(Debug, Serialize)]
pub struct Envelope<'a> {
    /// One entry per error; berth always sends one.
    pub errors: [EnvelopeError<'a>; 1],
}

/// One error in the envelope.
#[derive(Debug, Serialize)]
pub struct EnvelopeError<'a> {
    /// Machine-readable code.
    pub code: ErrorCode,
    /// A sentence a person can act on.
    pub message: &'a str,
    /// Extra structured detail (the offending value).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'a str>,
}

impl Envelope<'_> {
    /// Serialise one error.
    pub fn json(code: ErrorCode, message: &str, detail: Option<&str>) -> Vec<u8> {
        serde_json::to_vec(&Envelope {
            errors: [EnvelopeError {
                code,
                message,
                detail,
            }],
        })
        .expect("envelope serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_shape() {
        let j = Envelope::json(ErrorCode::BlobUnknown, "blob unknown", Some("sha256:x"));
        assert_eq!(
            std::str::from_utf8(&j).unwrap(),
            r#"{"errors":[{"code":"BLOB_UNKNOWN","message":"blob unknown","detail":"sha256:x"}]}"#
        );
    }
}
