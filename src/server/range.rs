//! `Range` request headers (RFC 9110 14.1), single range only: `bytes=a-b`,
//! `bytes=a-` (containerd's resume, PROTOCOL.md 4.1), `bytes=-n`.

use http::HeaderValue;

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
    let Ok(s) = h.to_str() else {
        return Err(Error::RangeInvalid(size));
    };
    let Some(spec) = s.trim().strip_prefix("bytes=") else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let (a, b) = spec
        .trim()
        .split_once('-')
        .ok_or(Error::RangeInvalid(size))?;
    let num = |x: &str| -> Result<u64, Error> {
        if x.is_empty() || x.len() > 20 || !x.bytes().all(|c| c.is_ascii_digit()) {
            return Err(Error::RangeInvalid(size));
        }
        x.parse().map_err(|_| Error::RangeInvalid(size))
    };
    let (a, b) = (a.trim(), b.trim());
    let r = if a.is_empty() {
        let n = num(b)?;
        if n == 0 || size == 0 {
            return Err(Error::RangeInvalid(size));
        }
        ByteRange {
            start: size.saturating_sub(n),
            end: size,
        }
    } else {
        let start = num(a)?;
        let last = if b.is_empty() {
            size.saturating_sub(1)
        } else {
            num(b)?.min(size.saturating_sub(1))
        };
        if start >= size || (!b.is_empty() && num(b)? < start) {
            return Err(Error::RangeInvalid(size));
        }
        ByteRange {
            start,
            end: last + 1,
        }
    };
    Ok(Some(r))
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
