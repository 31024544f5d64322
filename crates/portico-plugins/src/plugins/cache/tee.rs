//! The body of a response being stored: passed to the client frame by frame as it
//! comes while a copy is kept (at most `max_object_size` bytes; past that the copy is
//! dropped and the rest just streams through). At the body's end the copy is stored;
//! if the body fails or the client goes away first, nothing is stored.

use std::sync::Arc;

use bytes::Bytes;

use super::store::{Entry, Leader};
use super::Sink;
use crate::body::{Body, CopySink, Tee};

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

impl CopySink for Job {
    /// Too large to store: dropped at once, so that the requests waiting for this key
    /// may go upstream now.
    const WANTS_OVERFLOW: bool = false;

    fn complete(mut self, copy: Option<Bytes>) {
        if let Some(body) = copy {
            self.entry.body = body;
            store_now(self);
        }
    }
}

/// An empty body (a `HEAD` answer, a `204`) ends before any frame is polled: hyper may
/// never poll it, so it is stored at once.
pub fn store_now(job: Job) {
    job.sink.store(job.key, job.vary, job.entry, job.leader);
}

/// Pass-through of the response body as a pipeline [`Body`], storing its copy at the end.
pub fn body(inner: Body, max: u64, job: Job) -> Body {
    if http_body::Body::is_end_stream(&inner) {
        store_now(job);
        return inner;
    }
    Body::boxed(Tee::new(inner, max, job))
}
