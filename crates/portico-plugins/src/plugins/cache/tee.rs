//! The body of a response being stored: passed to the client frame by frame as it
//! comes while a copy is kept (at most `max_object_size` bytes; past that the copy is
//! dropped and the rest just streams through). At the body's end the copy is stored;
//! if the body fails or the client goes away first, nothing is stored.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http_body::{Frame, SizeHint};

use super::store::{Entry, Leader};
use super::Sink;
use crate::body::{Body, BoxError};

pub struct Tee {
    inner: Body,
    buf: BytesMut,
    max: u64,
    over: bool,
    /// What to store once the body is complete (`None` once done or abandoned).
    job: Option<Job>,
}

/// A response waiting for its body: where it goes and what else is stored with it.
pub struct Job {
    pub sink: Sink,
    pub key: String,
    /// The primary key and the names its variants differ by, when the response varies.
    pub vary: Option<(String, Arc<[http::HeaderName]>)>,
    pub entry: Entry,
    /// Released (waking the requests waiting for this key) once stored.
    pub leader: Option<Arc<Leader>>,
}

impl Tee {
    pub fn new(inner: Body, max: u64, job: Job) -> Tee {
        let cap = http_body::Body::size_hint(&inner)
            .exact()
            .filter(|n| *n <= max)
            .unwrap_or(0);
        Tee {
            inner,
            buf: BytesMut::with_capacity(usize::try_from(cap).unwrap_or(0)),
            max,
            over: false,
            job: Some(job),
        }
    }

    fn finish(&mut self) {
        if let Some(mut job) = self.job.take() {
            if !self.over {
                job.entry.body = std::mem::take(&mut self.buf).freeze();
                job.sink.store(job.key, job.vary, job.entry, job.leader);
            }
        }
    }
}

impl http_body::Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    if !this.over {
                        if this.buf.len() as u64 + d.len() as u64 > this.max {
                            this.over = true;
                            this.buf = BytesMut::new();
                            // Not stored: the waiting requests may go upstream now.
                            this.job = None;
                        } else {
                            this.buf.extend_from_slice(d);
                        }
                    }
                }
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.job = None;
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// An empty body (a `HEAD` answer, a `204`) ends before any frame is polled: hyper may
/// never poll it, so it is stored at once.
pub fn store_now(job: Job) {
    job.sink.store(job.key, job.vary, job.entry, job.leader);
}

/// Pass-through of [`Tee`] as a pipeline [`Body`].
pub fn body(inner: Body, max: u64, job: Job) -> Body {
    if http_body::Body::is_end_stream(&inner) {
        store_now(job);
        return inner;
    }
    Body::boxed(Tee::new(inner, max, job))
}
