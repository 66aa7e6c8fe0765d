//! Tower layers around every HTTP answer: helmet's security headers, and the access log that
//! also feeds the request metrics and names the allowed methods on a 405.

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hyper::body::Body;
use tokio_util::sync::CancellationToken;
use tower::util::MapResponseLayer;
use tower::{Layer, Service};
use warp::http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, header};

use super::ClientAddr;
use super::limits::{RateLimitLayer, ReplyLimiter};
use super::routes::route_of;
use crate::metrics::Metrics;

/// helmet's default Content-Security-Policy.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self';base-uri 'self';\
    font-src 'self' https: data:;form-action 'self';frame-ancestors 'self';\
    img-src 'self' data:;object-src 'none';script-src 'self';script-src-attr 'none';\
    style-src 'self' https: 'unsafe-inline';upgrade-insecure-requests";

/// The headers helmet sets by default, with its default values.
static SECURITY_HEADERS: [(HeaderName, HeaderValue); 12] = [
    (
        HeaderName::from_static("content-security-policy"),
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    ),
    (
        HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    ),
    (
        HeaderName::from_static("cross-origin-resource-policy"),
        HeaderValue::from_static("same-origin"),
    ),
    (
        HeaderName::from_static("origin-agent-cluster"),
        HeaderValue::from_static("?1"),
    ),
    (
        HeaderName::from_static("referrer-policy"),
        HeaderValue::from_static("no-referrer"),
    ),
    (
        HeaderName::from_static("strict-transport-security"),
        HeaderValue::from_static("max-age=31536000; includeSubDomains"),
    ),
    (
        HeaderName::from_static("x-content-type-options"),
        HeaderValue::from_static("nosniff"),
    ),
    (
        HeaderName::from_static("x-dns-prefetch-control"),
        HeaderValue::from_static("off"),
    ),
    (
        HeaderName::from_static("x-download-options"),
        HeaderValue::from_static("noopen"),
    ),
    (
        HeaderName::from_static("x-frame-options"),
        HeaderValue::from_static("SAMEORIGIN"),
    ),
    (
        HeaderName::from_static("x-permitted-cross-domain-policies"),
        HeaderValue::from_static("none"),
    ),
    (
        HeaderName::from_static("x-xss-protection"),
        HeaderValue::from_static("0"),
    ),
];

/// Sets helmet's default security headers on every answer, replacing any the routes set.
pub fn security_headers<B>() -> MapResponseLayer<fn(Response<B>) -> Response<B>> {
    MapResponseLayer::new(with_security_headers)
}

/// `response` with helmet's headers, in place of any of the same names.
fn with_security_headers<B>(mut response: Response<B>) -> Response<B> {
    let headers = response.headers_mut();
    headers.reserve(SECURITY_HEADERS.len());
    for (name, value) in &SECURITY_HEADERS {
        headers.insert(name.clone(), value.clone());
    }
    response
}

/// Logs one line per answered request (method, path, status, bytes, duration, client address)
/// through `tracing` and counts it in the request metrics.
#[derive(Clone)]
pub struct AccessLogLayer {
    metrics: Arc<Metrics>,
}

impl AccessLogLayer {
    /// An access log recording into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        AccessLogLayer { metrics }
    }
}

impl<S> Layer<S> for AccessLogLayer {
    type Service = AccessLog<S>;

    fn layer(&self, inner: S) -> AccessLog<S> {
        AccessLog {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// The service of [`AccessLogLayer`].
#[derive(Clone)]
pub struct AccessLog<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, ReqBody, ResBody> Service<Request<ReqBody>> for AccessLog<S>
where
    S: Service<Request<ReqBody>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<ReqBody>) -> Self::Future {
        let started = Instant::now();
        let method = method_label(request.method());
        let route = route_of(request.uri().path());
        // The line's own fields are made only when it is written.
        let line = tracing::enabled!(target: "access", tracing::Level::INFO).then(|| {
            let client = request
                .extensions()
                .get::<ClientAddr>()
                .map_or_else(|| "-".to_owned(), ToString::to_string);
            (request.uri().path().to_owned(), client)
        });
        let metrics = self.metrics.clone();
        let answer = self.inner.call(request);
        Box::pin(async move {
            let mut response = answer.await?;
            if response.status() == StatusCode::METHOD_NOT_ALLOWED
                && let Some(route) = route
            {
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static(route.methods));
            }
            let took = started.elapsed();
            let status = response.status().as_u16();
            if let Some((path, client)) = line {
                let size = response.body().size_hint();
                let bytes = size.exact().unwrap_or(size.lower());
                tracing::info!(
                    target: "access",
                    %method,
                    %path,
                    status,
                    bytes,
                    duration_ms = millis(took),
                    %client,
                    "request"
                );
            }
            let label = route.map_or("unmatched", |r| r.template);
            metrics.request_answered(method, label, status, took);
            Ok(response)
        })
    }
}

/// Milliseconds with microsecond precision, for the log.
fn millis(took: Duration) -> f64 {
    (took.as_micros() as f64) / 1000.0
}

/// The method as a label: the standard ones by name, any other as `OTHER`, so a client cannot
/// make new series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        Method::HEAD => "HEAD",
        _ => "OTHER",
    }
}

/// How often [`upkeep`] runs.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Until `stop` is cancelled, every few seconds: folds recorded samples into the metrics'
/// histograms and forgets the rate-limit state of clients and users that have been quiet long
/// enough.
pub async fn upkeep(
    metrics: Arc<Metrics>,
    rate_limit: RateLimitLayer,
    reply_limiter: ReplyLimiter,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval(UPKEEP_INTERVAL);
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                metrics.run_upkeep();
                rate_limit.forget_quiet_clients();
                reply_limiter.forget_quiet_users();
            }
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusual_methods_share_one_label() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "OTHER");
    }
}
