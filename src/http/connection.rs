//! Time limits on an HTTP connection between its requests. A request head must arrive whole
//! within `HTTP_HEADER_TIMEOUT_MS` of its first byte, and a connection with nothing in progress
//! that receives nothing is closed after `HTTP_KEEPALIVE_TIMEOUT_MS`. A request is in progress
//! from its head until both its body and its answer's body are done with, however long that
//! takes (a Socket.IO long-polling request waits for events); a connection that switched
//! protocols (a WebSocket) has no such limits.
//!
//! The socket is wrapped ([`Watched`]) so that a read waiting past the deadline ends: with the
//! end of the stream for an idle connection, which hyper closes quietly, or with an error for a
//! head that stopped halfway. The requests are tracked by a tower layer ([`TrackingLayer`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker, ready};
use std::time::Duration;

use futures::future::BoxFuture;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};
use tower::{Layer, Service};
use warp::http::{Request, Response, StatusCode};

/// `HTTP_HEADER_TIMEOUT_MS` and `HTTP_KEEPALIVE_TIMEOUT_MS`.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// From the first byte of a request head to its end.
    pub header: Duration,
    /// For a connection with nothing in progress to start its next request.
    pub keep_alive: Duration,
}

/// What one connection is doing, shared by its socket and its requests.
#[derive(Debug)]
pub struct Activity(Mutex<State>);

#[derive(Debug)]
struct State {
    phase: Phase,
    /// The waker of the socket's latest read, woken when a deadline begins.
    reader: Option<Waker>,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    /// Nothing in progress since `since`; `head_from` is when the next request's first byte came.
    Waiting {
        since: Instant,
        head_from: Option<Instant>,
    },
    /// This many requests, or their bodies, in progress.
    Busy(usize),
    /// The connection switched protocols.
    Upgraded,
}

/// Which limit a deadline is.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Limit {
    KeepAlive,
    Header,
}

impl Activity {
    /// A connection just accepted: waiting for its first request.
    pub fn new() -> Arc<Self> {
        Arc::new(Activity(Mutex::new(State {
            phase: Phase::Waiting {
                since: Instant::now(),
                head_from: None,
            },
            reader: None,
        })))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// When a read by `reader` must stop, and which limit that is; none while a request is in
    /// progress. The reader is woken when the last request in progress ends, as its deadline
    /// begins then.
    fn deadline(&self, timeouts: Timeouts, reader: &Waker) -> Option<(Instant, Limit)> {
        let mut state = self.state();
        if matches!(state.phase, Phase::Upgraded) {
            return None;
        }
        if !state.reader.as_ref().is_some_and(|r| r.will_wake(reader)) {
            state.reader = Some(reader.clone());
        }
        match state.phase {
            Phase::Waiting {
                head_from: Some(first_byte),
                ..
            } => Some((first_byte + timeouts.header, Limit::Header)),
            Phase::Waiting { since, .. } => Some((since + timeouts.keep_alive, Limit::KeepAlive)),
            Phase::Busy(_) | Phase::Upgraded => None,
        }
    }

    /// Bytes arrived: while waiting, the first ones start a request head.
    fn received(&self) {
        if let Phase::Waiting { head_from, .. } = &mut self.state().phase {
            head_from.get_or_insert_with(Instant::now);
        }
    }

    /// Counts a request, or its body, in progress until the returned guard is dropped.
    fn start(self: &Arc<Self>) -> InProgress {
        let mut state = self.state();
        state.phase = match state.phase {
            Phase::Waiting { .. } => Phase::Busy(1),
            Phase::Busy(n) => Phase::Busy(n + 1),
            Phase::Upgraded => Phase::Upgraded,
        };
        InProgress(self.clone())
    }

    fn upgrade(&self) {
        let mut state = self.state();
        state.phase = Phase::Upgraded;
        state.reader = None;
    }
}

/// A request, or its body, in progress.
#[derive(Debug)]
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        let mut state = self.0.state();
        match state.phase {
            Phase::Busy(1) => {
                state.phase = Phase::Waiting {
                    since: Instant::now(),
                    head_from: None,
                };
                let reader = state.reader.take();
                drop(state);
                if let Some(reader) = reader {
                    reader.wake();
                }
            }
            Phase::Busy(n) => state.phase = Phase::Busy(n - 1),
            Phase::Waiting { .. } | Phase::Upgraded => {}
        }
    }
}

/// A connection's socket, whose reads end at the [`Activity`]'s deadline.
pub struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
    timeouts: Timeouts,
    /// Set while a read waits under a deadline.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<T> Watched<T> {
    /// Watches `io`, the socket of the connection `activity` tracks.
    pub fn new(io: T, activity: Arc<Activity>, timeouts: Timeouts) -> Self {
        Watched {
            io,
            activity,
            timeouts,
            timer: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let Some((deadline, limit)) = this.activity.deadline(this.timeouts, cx.waker()) else {
            this.timer = None;
            return Pin::new(&mut this.io).poll_read(cx, buf);
        };
        let before = buf.filled().len();
        if let Poll::Ready(read) = Pin::new(&mut this.io).poll_read(cx, buf) {
            if buf.filled().len() > before {
                this.activity.received();
            }
            return Poll::Ready(read);
        }
        let timer = match &mut this.timer {
            Some(timer) => {
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                timer
            }
            None => this
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        ready!(timer.as_mut().poll(cx));
        this.timer = None;
        Poll::Ready(match limit {
            Limit::KeepAlive => Ok(()),
            Limit::Header => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the request head did not arrive in time",
            )),
        })
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// A request or answer body that keeps its request in progress until it ends or is dropped.
#[derive(Debug)]
pub struct Tracked<B> {
    body: B,
    in_progress: Option<InProgress>,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.body).poll_frame(cx));
        if frame.is_none() {
            this.in_progress = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// Tracks one connection's requests in its [`Activity`].
#[derive(Clone)]
pub struct TrackingLayer(Arc<Activity>);

impl TrackingLayer {
    /// Tracks the requests of the connection `activity` belongs to.
    pub fn new(activity: Arc<Activity>) -> Self {
        TrackingLayer(activity)
    }
}

impl<S> Layer<S> for TrackingLayer {
    type Service = Tracking<S>;

    fn layer(&self, inner: S) -> Tracking<S> {
        Tracking {
            inner,
            activity: self.0.clone(),
        }
    }
}

/// The service of [`TrackingLayer`].
#[derive(Clone)]
pub struct Tracking<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for Tracking<S>
where
    S: Service<Request<Tracked<ReqBody>>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Tracked<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let answer = self.activity.start();
        let request = request.map(|body| Tracked {
            body,
            in_progress: Some(self.activity.start()),
        });
        let response = self.inner.call(request);
        let activity = self.activity.clone();
        Box::pin(async move {
            let response = response.await?;
            if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                activity.upgrade();
            }
            Ok(response.map(|body| Tracked {
                body,
                in_progress: Some(answer),
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::task::{ArcWake, waker};
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TIMEOUTS: Timeouts = Timeouts {
        header: Duration::from_secs(30),
        keep_alive: Duration::from_secs(5),
    };

    fn limit(activity: &Activity) -> Option<Limit> {
        activity
            .deadline(TIMEOUTS, Waker::noop())
            .map(|(_, limit)| limit)
    }

    #[test]
    fn a_head_started_has_the_header_limit() {
        let activity = Activity::new();
        assert_eq!(limit(&activity), Some(Limit::KeepAlive));
        activity.received();
        assert_eq!(limit(&activity), Some(Limit::Header));
        let request = activity.start();
        assert_eq!(limit(&activity), None);
        drop(request);
        assert_eq!(limit(&activity), Some(Limit::KeepAlive));
    }

    #[test]
    fn a_request_is_in_progress_until_its_body_and_answer_are_done() {
        let activity = Activity::new();
        let answer = activity.start();
        let body = activity.start();
        activity.received();
        drop(answer);
        assert_eq!(limit(&activity), None);
        drop(body);
        assert_eq!(limit(&activity), Some(Limit::KeepAlive));
    }

    #[test]
    fn a_read_waiting_out_a_request_is_woken_when_it_ends() {
        struct Wakes(AtomicUsize);
        impl ArcWake for Wakes {
            fn wake_by_ref(wakes: &Arc<Self>) {
                wakes.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let wakes = Arc::new(Wakes(AtomicUsize::new(0)));
        let activity = Activity::new();
        let request = activity.start();
        assert!(activity.deadline(TIMEOUTS, &waker(wakes.clone())).is_none());
        drop(request);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_upgraded_connection_has_no_limit() {
        let activity = Activity::new();
        let request = activity.start();
        activity.upgrade();
        drop(request);
        activity.received();
        assert_eq!(limit(&activity), None);
        drop(activity.start());
        assert_eq!(limit(&activity), None);
    }
}
