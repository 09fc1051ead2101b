//! Blobs served straight from upstream without caching: the fallback while
//! the cache filesystem is full. Nothing touches the disk. A full-body
//! response is still verified: its last chunk is held back until the sha256
//! matched, so a client never receives a complete but wrong blob.

use std::sync::Arc;

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use http::{HeaderValue, Response};
use http_body::Frame;
use http_body_util::{BodyExt, StreamBody};

use super::handlers::{ranged, with_result};
use super::range::parse_range;
use super::response::{Body, CacheResult};
use super::route::Target;
use crate::error::{Error, Result};
use crate::registry::digest::Digester;
use crate::registry::Digest;
use crate::state::AppState;
use crate::upstream::Upstream;

/// `GET /v2/<name>/blobs/<digest>` relayed from upstream.
pub async fn blob(
    state: &AppState,
    upstream: &Arc<Upstream>,
    t: &Target,
    d: &Digest,
    range_header: Option<&HeaderValue>,
) -> Result<Response<Body>> {
    tracing::debug!(digest = %d, "cache full: relaying blob without caching");
    let (size, range) = match range_header {
        None => (None, None),
        Some(_) => {
            let size = upstream.head_blob(&t.repo, d).await?;
            (Some(size), parse_range(range_header, size)?)
        }
    };
    let start = range.map(|r| r.start).unwrap_or(0);
    let body = upstream.open_blob(&t.repo, d, start).await?;
    let size = size
        .or(body.size)
        .ok_or_else(|| Error::UpstreamFailed("blob size unknown".into()))?;
    let (b, start, end) = ranged(t, d, range, size);
    let want = end - start;
    state
        .metrics
        .served_bytes
        .with_label_values(&["upstream"])
        .inc_by(want);
    let verify = (start == 0 && end == size).then(|| d.clone());
    let frames = verified(body.stream, want, verify).map(|r| r.map(Frame::data));
    let body = BodyExt::boxed_unsync(StreamBody::new(frames));
    Ok(with_result(
        b.body(body).expect("blob response"),
        CacheResult::Pass,
    ))
}

/// Take `want` bytes; when `verify` is set, hash them and hold the last
/// chunk back until the digest matched.
fn verified(
    upstream: futures_util::stream::BoxStream<'static, Result<Bytes, Error>>,
    want: u64,
    verify: Option<Digest>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    struct St {
        up: futures_util::stream::BoxStream<'static, Result<Bytes, Error>>,
        left: u64,
        held: Option<Bytes>,
        hasher: Digester,
        verify: Option<Digest>,
        done: bool,
    }
    let st = St {
        up: upstream,
        left: want,
        held: None,
        hasher: Digester::default(),
        verify,
        done: false,
    };
    stream::unfold(st, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if st.left == 0 {
                st.done = true;
                if let Some(expected) = st.verify.take() {
                    let actual = std::mem::take(&mut st.hasher).finish();
                    if actual != expected {
                        let e = std::io::Error::other(format!(
                            "upstream blob does not match {expected}"
                        ));
                        return Some((Err(e), st));
                    }
                }
                return st.held.take().map(|b| (Ok(b), st));
            }
            match st.up.next().await {
                Some(Ok(mut chunk)) => {
                    if chunk.len() as u64 > st.left {
                        chunk.truncate(st.left as usize);
                    }
                    st.left -= chunk.len() as u64;
                    st.hasher.update(&chunk);
                    if st.verify.is_none() {
                        return Some((Ok(chunk), st));
                    }
                    if let Some(prev) = st.held.replace(chunk) {
                        return Some((Ok(prev), st));
                    }
                }
                Some(Err(e)) => {
                    st.done = true;
                    return Some((Err(std::io::Error::other(e.to_string())), st));
                }
                None => {
                    st.done = true;
                    return Some((Err(std::io::Error::other("upstream body ended early")), st));
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::TryStreamExt;

    async fn run(
        chunks: &[&'static [u8]],
        want: u64,
        verify: Option<Digest>,
    ) -> std::io::Result<Vec<u8>> {
        let owned: Vec<Result<Bytes, Error>> =
            chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
        let up = stream::iter(owned).boxed();
        let parts: Vec<Bytes> = verified(up, want, verify).try_collect().await?;
        Ok(parts.concat())
    }

    #[tokio::test]
    async fn verifies_and_holds_back_the_tail() {
        let ok = Digest::of(b"hello world");
        assert_eq!(
            run(&[b"hello ", b"world"], 11, Some(ok)).await.unwrap(),
            b"hello world"
        );
        let wrong = Digest::of(b"something else");
        assert!(run(&[b"hello ", b"world"], 11, Some(wrong)).await.is_err());
        assert!(
            run(&[b"hello "], 11, None).await.is_err(),
            "short body is an error"
        );
        assert_eq!(
            run(&[b"hello world"], 5, None).await.unwrap(),
            b"hello",
            "ranges are cut to size"
        );
    }
}
