//! A blob body in transit from a source (an upstream endpoint today, a peer
//! tomorrow) and how to blame that source when its bytes turn out bad or
//! too slow. The upstream produces these; downloads ([`crate::cache::flight`])
//! consume them; neither needs to know the other.

use bytes::Bytes;
use futures_util::stream::BoxStream;

use crate::error::Error;

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
