//! Load shedding, as Istio's Mixer does it: over the request rate limit, or
//! while recent requests took longer than the latency threshold on
//! average, a request is answered `UNAVAILABLE` at once rather than queued
//! behind work Mixer cannot finish in time. Proxies fail open or closed on
//! that answer by their own configuration. Wraps the gRPC service, so the
//! latency measured includes decoding and encoding.

use std::{
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use tonic::{
    Status,
    codegen::{BoxFuture, Service, http},
    server::NamedService,
};

/// The limits; zero turns one off.
#[derive(Debug, Clone, Copy, Default, PartialEq, clap::Args)]
pub struct Limits {
    /// Requests admitted per second, with bursts of up to a second's
    /// worth; 0 for no limit.
    #[arg(long, default_value_t = 0.0)]
    pub max_requests_per_second: f64,
    /// Refuse requests while the average latency of the last second or two
    /// is above this; 0s for no limit.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "0s")]
    pub average_latency_threshold: Duration,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabels {
    /// `rate` or `latency`.
    reason: &'static str,
}

/// The shared state of the limits, one per server.
pub struct Shedder {
    limits: Limits,
    bucket: Mutex<TokenBucket>,
    latency: Mutex<LatencyWindow>,
    shed: Family<ShedLabels, Counter>,
}

impl Shedder {
    pub fn new(limits: Limits, registry: &mut prometheus_client::registry::Registry) -> Arc<Self> {
        let burst = limits.max_requests_per_second.ceil().max(1.0);
        let shed = Family::default();
        registry.register(
            "shed_requests",
            "Requests refused with UNAVAILABLE by load shedding, by reason",
            shed.clone(),
        );
        Arc::new(Self {
            limits,
            bucket: Mutex::new(TokenBucket::full(burst, Instant::now())),
            latency: Mutex::new(LatencyWindow::default()),
            shed,
        })
    }

    /// Whether a request arriving `now` may proceed; the reason when not.
    fn admit(&self, now: Instant) -> Result<(), &'static str> {
        let threshold = self.limits.average_latency_threshold;
        if !threshold.is_zero()
            && lock(&self.latency)
                .average(now)
                .is_some_and(|a| a > threshold)
        {
            return Err("latency");
        }
        let rate = self.limits.max_requests_per_second;
        if rate > 0.0 && !lock(&self.bucket).take(rate, now) {
            return Err("rate");
        }
        Ok(())
    }

    fn record(&self, started: Instant, now: Instant) {
        if !self.limits.average_latency_threshold.is_zero() {
            lock(&self.latency).record(now.duration_since(started), now);
        }
    }

    /// `service` behind these limits.
    pub fn wrap<S>(self: &Arc<Self>, service: S) -> Shed<S> {
        Shed {
            inner: service,
            shedder: self.clone(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Tokens refilled at the rate, up to the burst.
struct TokenBucket {
    tokens: f64,
    burst: f64,
    at: Instant,
}

impl TokenBucket {
    fn full(burst: f64, now: Instant) -> Self {
        Self {
            tokens: burst,
            burst,
            at: now,
        }
    }

    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(self.burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Latencies of requests completed in the current and the previous window
/// of [`LatencyWindow::SPAN`]. A quiet second empties it, so refusing
/// everything cannot keep the average high forever.
#[derive(Default)]
struct LatencyWindow {
    started: Option<Instant>,
    current: (Duration, u32),
    previous: (Duration, u32),
}

impl LatencyWindow {
    const SPAN: Duration = Duration::from_secs(1);

    fn advance(&mut self, now: Instant) {
        let started = *self.started.get_or_insert(now);
        let windows = now.saturating_duration_since(started).as_nanos() / Self::SPAN.as_nanos();
        if windows >= 1 {
            self.previous = if windows == 1 {
                self.current
            } else {
                Default::default()
            };
            self.current = Default::default();
            self.started = Some(started + Self::SPAN * windows as u32);
        }
    }

    fn record(&mut self, latency: Duration, now: Instant) {
        self.advance(now);
        self.current.0 += latency;
        self.current.1 += 1;
    }

    fn average(&mut self, now: Instant) -> Option<Duration> {
        self.advance(now);
        let count = self.current.1 + self.previous.1;
        (count > 0).then(|| (self.current.0 + self.previous.0) / count)
    }
}

/// A gRPC service behind a [`Shedder`].
#[derive(Clone)]
pub struct Shed<S> {
    inner: S,
    shedder: Arc<Shedder>,
}

impl<S: NamedService> NamedService for Shed<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Shed<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        if let Err(reason) = self.shedder.admit(started) {
            self.shedder
                .shed
                .get_or_create(&ShedLabels { reason })
                .inc();
            let status = Status::unavailable(format!(
                "mixer is overloaded ({reason} limit); try again later"
            ));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let shedder = self.shedder.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            shedder.record(started, Instant::now());
            response
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shedder(limits: Limits) -> Arc<Shedder> {
        Shedder::new(limits, &mut Default::default())
    }

    #[test]
    fn the_rate_admits_a_burst_then_the_refill() {
        let shedder = shedder(Limits {
            max_requests_per_second: 10.0,
            ..Default::default()
        });
        let start = Instant::now();
        let admitted = (0..30).filter(|_| shedder.admit(start).is_ok()).count();
        assert_eq!(admitted, 10);
        assert_eq!(shedder.admit(start), Err("rate"));
        // A tenth of a second later, one more token.
        let later = start + Duration::from_millis(100);
        assert!(shedder.admit(later).is_ok());
        assert_eq!(shedder.admit(later), Err("rate"));
    }

    #[test]
    fn slow_requests_shed_until_the_window_passes() {
        let shedder = shedder(Limits {
            average_latency_threshold: Duration::from_millis(50),
            ..Default::default()
        });
        let start = Instant::now();
        shedder.record(start, start + Duration::from_millis(10));
        assert!(shedder.admit(start).is_ok());
        shedder.record(start, start + Duration::from_millis(200));
        // (10 + 200) / 2 ms is over the threshold.
        assert_eq!(shedder.admit(start), Err("latency"));
        // The next window still remembers the previous one...
        assert_eq!(
            shedder.admit(start + Duration::from_millis(1500)),
            Err("latency")
        );
        // ...and the one after has forgotten it.
        assert!(shedder.admit(start + Duration::from_millis(2500)).is_ok());
    }

    #[test]
    fn zero_limits_admit_everything() {
        let shedder = shedder(Limits::default());
        let now = Instant::now();
        shedder.record(now, now + Duration::from_secs(10));
        assert!((0..10_000).all(|_| shedder.admit(now).is_ok()));
    }
}
