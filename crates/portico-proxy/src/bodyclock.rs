//! The upstream `request` timeout runs until the response headers arrive, counted from
//! the end of the request body: while the body is still being sent (a long upload),
//! only `idle` applies, so a large stream is never cut by `request`.
//!
//! [`BodyClock::wrap`] wraps the request body to record its progress; [`send`] awaits
//! the upstream's answer under those deadlines.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Frame, SizeHint};
use portico_plugins::{Body, BoxError, ErrorKind, GatewayError};
use tokio::time::Instant;

/// Progress of a request body being sent upstream.
pub struct BodyClock {
    base: Instant,
    /// Milliseconds after `base` of the last frame (or of the end).
    last_ms: AtomicU64,
    /// The body ended (or failed).
    done: AtomicBool,
    /// The last poll was pending: waiting on the client, whose own idle timer applies.
    waiting: AtomicBool,
}

impl BodyClock {
    /// Wraps `body` unless it is already complete (then there is nothing to track).
    pub fn wrap(body: Body) -> (Body, Option<Arc<BodyClock>>) {
        if http_body::Body::is_end_stream(&body) {
            return (body, None);
        }
        let clock = Arc::new(BodyClock {
            base: portico_plugins::clock::now(),
            last_ms: AtomicU64::new(0),
            done: AtomicBool::new(false),
            waiting: AtomicBool::new(false),
        });
        let wrapped = Body::boxed(Clocked {
            inner: body,
            clock: clock.clone(),
        });
        (wrapped, Some(clock))
    }

    fn touch(&self) {
        let ms = portico_plugins::clock::since(self.base).as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// The current deadline, and whether the body is still being sent.
    fn deadline(&self, request: Duration, idle: Duration) -> (Instant, bool) {
        let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        if self.done.load(Ordering::Relaxed) {
            (last + request, false)
        } else if self.waiting.load(Ordering::Relaxed) {
            (portico_plugins::clock::now() + idle, true)
        } else {
            (last + idle, true)
        }
    }
}

struct Clocked {
    inner: Body,
    clock: Arc<BodyClock>,
}

impl http_body::Body for Clocked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        let c = &this.clock;
        match &r {
            Poll::Pending => c.waiting.store(true, Ordering::Relaxed),
            Poll::Ready(frame) => {
                c.touch();
                c.waiting.store(false, Ordering::Relaxed);
                if !matches!(frame, Some(Ok(_))) || this.inner.is_end_stream() {
                    c.done.store(true, Ordering::Relaxed);
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Awaits `fut` (the upstream exchange up to the response headers): within `request`
/// of the end of the request body (of the start, without one), and, while the body is
/// being sent, within `idle` of its last progress; never after `total` (the route's
/// `total` timeout, which a body that keeps streaming must not outlast).
/// `start` is now (the caller's clock reading, reused).
pub fn send<F: Future>(
    fut: F,
    clock: Option<&BodyClock>,
    start: Instant,
    (request, idle): (Duration, Duration),
    total: Option<Instant>,
) -> Deadline<'_, F> {
    let first = match clock {
        Some(c) => c.deadline(request, idle).0,
        None => start + request,
    };
    let first = total.map_or(first, |t| first.min(t));
    Deadline {
        fut,
        sleep: PooledSleep::take(first),
        armed: false,
        total,
        clock,
        request,
        idle,
        start,
    }
}

/// A try's timer, taken from (and given back to) a small per-thread pool: a timer
/// reset to a new deadline costs less than one made, registered and cancelled for
/// every request.
pub struct PooledSleep(Option<Pin<Box<tokio::time::Sleep>>>);

const POOLED_SLEEPS: usize = 64;

thread_local! {
    static SLEEPS: std::cell::RefCell<Vec<Pin<Box<tokio::time::Sleep>>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl PooledSleep {
    fn take(at: Instant) -> PooledSleep {
        let pooled = SLEEPS.with(|s| s.borrow_mut().pop());
        PooledSleep(Some(match pooled {
            // As it is: `Deadline::poll` moves it before waiting if it is set after the
            // deadline, and leaves an earlier one (usually the last request's).
            Some(s) => s,
            None => Box::pin(tokio::time::sleep_until(at)),
        }))
    }

    fn get(&mut self) -> &mut Pin<Box<tokio::time::Sleep>> {
        self.0
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(Instant::now())))
    }
}

impl Drop for PooledSleep {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            SLEEPS.with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < POOLED_SLEEPS {
                    p.push(s);
                }
            });
        }
    }
}

pin_project_lite::pin_project! {
    /// The future returned by [`send`]: the exchange under its moving deadline. A
    /// hand-written future (not an `async fn`) so the exchange is stored once, in place.
    pub struct Deadline<'a, F> {
        #[pin]
        fut: F,
        sleep: PooledSleep,
        // The sleep is registered with the task (polled once, pending, not reset since):
        // until it fires, there is no need to poll it again at each wake-up.
        armed: bool,
        total: Option<Instant>,
        clock: Option<&'a BodyClock>,
        request: Duration,
        idle: Duration,
        start: Instant,
    }
}

impl<F: Future> Future for Deadline<'_, F> {
    type Output = Result<F::Output, GatewayError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            return Poll::Ready(Ok(out));
        }
        let (request, idle, start, total) = (*this.request, *this.idle, *this.start, *this.total);
        let deadline = |c: Option<&BodyClock>| {
            let (at, streaming) = match c {
                Some(c) => c.deadline(request, idle),
                None => (start + request, false),
            };
            match total {
                Some(t) if t < at => (t, streaming),
                _ => (at, streaming),
            }
        };
        loop {
            let (at, streaming) = deadline(*this.clock);
            let sleep = this.sleep.get();
            // The timer may be set before the deadline, never after it: a pooled timer
            // keeps the deadline of the request that used it last (a little earlier),
            // since moving it takes the timer driver's lock and a trip through its
            // wheel, on every request, where firing early once in a while costs a check
            // and a reset then.
            if sleep.deadline() > at {
                sleep.as_mut().reset(at);
                *this.armed = false;
            }
            if *this.armed && !sleep.is_elapsed() {
                return Poll::Pending;
            }
            if sleep.as_mut().poll(cx).is_pending() {
                *this.armed = true;
                return Poll::Pending;
            }
            *this.armed = false;
            let (again, _) = deadline(*this.clock);
            if again > Instant::now() {
                // Early (set before the deadline, or the deadline moved): to the
                // deadline itself.
                sleep.as_mut().reset(again);
                continue;
            }
            return Poll::Ready(Err(if streaming {
                GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("the upstream stopped reading the request body for {idle:?}"),
                )
            } else {
                GatewayError::new(
                    ErrorKind::UpstreamTimeout,
                    format!("the upstream did not answer within {request:?}"),
                )
            }));
        }
    }
}
