//! `Range` request headers (RFC 9110 14.1), single range only: `bytes=a-b`,
//! `bytes=a-` (containerd's resume, PROTOCOL.md 4.1), `bytes=-n`; the
//! grammar and the clamping to the size are `http-range-header`'s.

use http::HeaderValue;
use http_range_header::{parse_range_header, RangeInvalid, RangeUnsatisfiableError};

use crate::error::Error;

/// A satisfiable byte range, end exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// `None` means "send everything": no header, another unit, or several
/// ranges (which a server may ignore). A malformed or unsatisfiable
/// `bytes=` range is a 416 carrying the size.
pub fn parse_range(header: Option<&HeaderValue>, size: u64) -> Result<Option<ByteRange>, Error> {
    let Some(h) = header else { return Ok(None) };
    let Ok(s) = h.to_str().map(str::trim) else {
        return Err(Error::RangeInvalid(size));
    };
    let parsed = match parse_range_header(s) {
        Err(RangeUnsatisfiableError::Invalid(RangeInvalid::DoesNotStartWithToken)) => {
            return Ok(None)
        }
        _ if s.contains(',') => return Ok(None),
        p => p,
    };
    // The crate reads a position past u64 as u64::MAX (the whole blob); a
    // number that is not a u64 stays a 416 here.
    let huge = s
        .split(|c: char| !c.is_ascii_digit())
        .any(|d| d.len() > 20 || (!d.is_empty() && d.parse::<u64>().is_err()));
    match parsed.and_then(|p| p.validate(size)).as_deref() {
        Ok([r]) if !huge => Ok(Some(ByteRange {
            start: *r.start(),
            end: r.end() + 1,
        })),
        _ => Err(Error::RangeInvalid(size)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str, size: u64) -> Result<Option<(u64, u64)>, u16> {
        parse_range(Some(&HeaderValue::from_str(s).unwrap()), size)
            .map(|o| o.map(|r| (r.start, r.end)))
            .map_err(|e| e.status().as_u16())
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range(None, 10).unwrap(), None);
        assert_eq!(p("bytes=0-4", 10), Ok(Some((0, 5))));
        assert_eq!(p("bytes=5-", 10), Ok(Some((5, 10))));
        assert_eq!(p("bytes=-3", 10), Ok(Some((7, 10))));
        assert_eq!(p("bytes=-30", 10), Ok(Some((0, 10))));
        assert_eq!(p("bytes=8-100", 10), Ok(Some((8, 10))));
        assert_eq!(p("bytes=9-9", 10), Ok(Some((9, 10))));
        assert_eq!(p("items=0-1", 10), Ok(None));
        assert_eq!(p("bytes=0-1,3-4", 10), Ok(None));
    }

    #[test]
    fn invalid_ranges_are_416() {
        for bad in [
            "bytes=10-",
            "bytes=5-2",
            "bytes=-0",
            "bytes=abc",
            "bytes=1-x",
            "bytes=",
            "bytes=-",
            "bytes=99999999999999999999999-",
        ] {
            assert_eq!(p(bad, 10), Err(416), "{bad}");
        }
        assert_eq!(p("bytes=0-", 0), Err(416));
    }
}
