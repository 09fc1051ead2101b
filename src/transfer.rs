//! A blob body in transit from a source (an upstream endpoint today, a peer
//! tomorrow) and how to blame that source when its bytes turn out bad or
//! too slow. The upstream produces these; downloads ([`crate::cache::flight`])
//! consume them; neither needs to know the other. Also the check that holds
//! a relayed body's last chunk back until its digest matched.

use bytes::Bytes;
use futures_util::stream::{self, BoxStream, StreamExt};

use crate::error::Error;
use crate::registry::digest::Digester;
use crate::registry::Digest;

/// What went wrong with the bytes an upstream endpoint served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The blob's bytes did not match its digest.
    Mismatch,
    /// The body arrived slower than the minimum rate.
    TooSlow,
}

/// Records a [`Fault`] against the endpoint that served a body, so the next
/// attempt for the same blob asks another endpoint first. Returns whether an
/// endpoint not at fault for this blob remains to be asked.
pub type Blame = Box<dyn Fn(Fault) -> bool + Send + Sync>;

/// An upstream body, possibly starting at an offset.
pub struct Body {
    /// Full size of the blob, when the upstream said.
    pub size: Option<u64>,
    /// The bytes from the requested offset on.
    pub stream: BoxStream<'static, Result<Bytes, Error>>,
    /// Who to blame if the bytes turn out bad or too slow.
    pub blame: Option<Blame>,
}

impl Body {
    /// Blame this body's source; whether another source remains.
    pub fn blame(&self, fault: Fault) -> bool {
        self.blame.as_ref().is_some_and(|b| b(fault))
    }
}

/// Take `want` bytes; when `verify` is set, hash them and hold the last
/// chunk back until the digest matched.
pub fn verified(
    upstream: BoxStream<'static, Result<Bytes, Error>>,
    want: u64,
    verify: Option<Digest>,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send {
    struct St {
        up: BoxStream<'static, Result<Bytes, Error>>,
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
