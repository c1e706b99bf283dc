//! A small circuit breaker as a tower [`Layer`] / [`Service`].
//!
//! Why our own: the PEP must *fail fast* when the PDP is down (every
//! connection attempt would otherwise wait for the full deadline), and it must
//! never let readiness hang (a proxy that blocks in `poll_ready` stalls every
//! client). tower has no breaker, and the crates that exist either block
//! readiness while open or count every error (a `PermissionDenied` answer
//! means the PDP is alive and must not open the breaker).
//!
//! State machine:
//!
//! * **Closed**: calls pass. `failure_threshold` consecutive *counted*
//!   failures open the breaker. Any answer from the PDP (success or a
//!   non-counted error such as `PermissionDenied`) resets the count.
//! * **Open** until `now + cool_down`: calls are rejected with
//!   [`BreakerOpen`] from `call` without touching the inner service
//!   (`poll_ready` returns `Ready` immediately).
//! * **Half-open**: after the cool-down exactly one call (the probe) goes
//!   through; every other call is rejected while it is in flight. Probe
//!   success closes the breaker and resets the cool-down to `base`; a counted
//!   probe failure re-opens it with the cool-down doubled (capped at `max`).
//!   A probe that is abandoned (dropped) before the failure horizon releases
//!   the slot so the next call probes.
//!
//! A call whose response future is dropped after running for at least
//! [`BreakerConfig::abandon_counts_as_failure_after`] counts as a failure:
//! this is how an *outer* deadline (which drops the future) is seen by the
//! breaker; a shorter-lived drop is a caller cancellation and counts as
//! nothing.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use tower_layer::Layer;
use tower_service::Service;

/// Returned (as the boxed error) when the breaker rejects a call.
#[derive(Debug, Clone, Copy, thiserror::Error, PartialEq, Eq)]
#[error("circuit breaker open")]
pub struct BreakerOpen;

/// Breaker tuning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive counted failures that open the breaker.
    pub failure_threshold: u32,
    /// First cool-down after opening.
    pub base_cool_down: Duration,
    /// Cap of the exponential cool-down.
    pub max_cool_down: Duration,
    /// A dropped in-flight call older than this is a failure (outer timeout).
    pub abandon_counts_as_failure_after: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: 5,
            base_cool_down: Duration::from_millis(500),
            max_cool_down: Duration::from_secs(30),
            abandon_counts_as_failure_after: Duration::from_millis(45),
        }
    }
}

/// Observable breaker state (also exported as a gauge: 0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    /// Gauge value: closed 0, open 1, half-open 2.
    pub fn as_gauge(self) -> i64 {
        match self {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        }
    }
}

#[derive(Debug)]
enum Inner {
    Closed {
        consecutive_failures: u32,
    },
    Open {
        until: Instant,
        cool_down: Duration,
    },
    HalfOpen {
        cool_down: Duration,
        probe_in_flight: bool,
    },
}

type StateListener = Arc<dyn Fn(BreakerState) + Send + Sync>;

/// Shared breaker state; every clone of the service (one per call) shares it.
#[derive(Clone)]
pub struct Breaker {
    cfg: BreakerConfig,
    state: Arc<Mutex<Inner>>,
    listener: Option<StateListener>,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker")
            .field("cfg", &self.cfg)
            .field("state", &self.state())
            .finish()
    }
}

/// What `poll_ready` decided for the next `call`.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Admission {
    Normal,
    Probe,
}

/// Outcome classes the breaker reacts to.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum CallResult {
    /// The downstream answered (including answers like `PermissionDenied`).
    Answered,
    /// Unavailable / DeadlineExceeded / transport error / timeout.
    Failed,
    /// Neither (local overload, caller cancellation): no state change except
    /// releasing a probe slot.
    Neutral,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker {
            cfg,
            state: Arc::new(Mutex::new(Inner::Closed {
                consecutive_failures: 0,
            })),
            listener: None,
        }
    }

    /// Call `f` on every state transition (metrics gauge, logs).
    pub fn with_listener(mut self, f: impl Fn(BreakerState) + Send + Sync + 'static) -> Self {
        self.listener = Some(Arc::new(f));
        self
    }

    pub fn config(&self) -> &BreakerConfig {
        &self.cfg
    }

    /// Current state (an `Open` breaker whose cool-down elapsed still reports
    /// `Open` until a call probes).
    pub fn state(&self) -> BreakerState {
        match *self.state.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn notify(&self, s: BreakerState) {
        if let Some(l) = &self.listener {
            l(s);
        }
        match s {
            BreakerState::Open => tracing::warn!("pdp circuit breaker open"),
            BreakerState::HalfOpen => tracing::info!("pdp circuit breaker half-open: probing"),
            BreakerState::Closed => tracing::info!("pdp circuit breaker closed"),
        }
    }

    /// Decide whether a call may pass now. `None` = reject.
    fn admit(&self) -> Option<Admission> {
        let mut st = self.state.lock();
        match &mut *st {
            Inner::Closed { .. } => Some(Admission::Normal),
            Inner::Open { until, cool_down } => {
                if Instant::now() >= *until {
                    let cool_down = *cool_down;
                    *st = Inner::HalfOpen {
                        cool_down,
                        probe_in_flight: true,
                    };
                    drop(st);
                    self.notify(BreakerState::HalfOpen);
                    Some(Admission::Probe)
                } else {
                    None
                }
            }
            Inner::HalfOpen {
                probe_in_flight, ..
            } => {
                if *probe_in_flight {
                    None
                } else {
                    *probe_in_flight = true;
                    Some(Admission::Probe)
                }
            }
        }
    }

    /// Feed the result of an admitted call back.
    fn record(&self, admission: Admission, result: CallResult) {
        let mut st = self.state.lock();
        let mut transition = None;
        match (&mut *st, admission, result) {
            (Inner::Closed { .. }, _, CallResult::Answered) => {
                *st = Inner::Closed {
                    consecutive_failures: 0,
                };
            }
            (
                Inner::Closed {
                    consecutive_failures,
                },
                _,
                CallResult::Failed,
            ) => {
                *consecutive_failures += 1;
                if *consecutive_failures >= self.cfg.failure_threshold {
                    *st = Inner::Open {
                        until: Instant::now() + self.cfg.base_cool_down,
                        cool_down: self.cfg.base_cool_down,
                    };
                    transition = Some(BreakerState::Open);
                }
            }
            (Inner::HalfOpen { .. }, Admission::Probe, CallResult::Answered) => {
                *st = Inner::Closed {
                    consecutive_failures: 0,
                };
                transition = Some(BreakerState::Closed);
            }
            (Inner::HalfOpen { cool_down, .. }, Admission::Probe, CallResult::Failed) => {
                let next = cool_down
                    .saturating_mul(2)
                    .min(self.cfg.max_cool_down)
                    .max(self.cfg.base_cool_down);
                *st = Inner::Open {
                    until: Instant::now() + next,
                    cool_down: next,
                };
                transition = Some(BreakerState::Open);
            }
            (
                Inner::HalfOpen {
                    probe_in_flight, ..
                },
                Admission::Probe,
                CallResult::Neutral,
            ) => {
                *probe_in_flight = false;
            }
            // Results of calls admitted in an earlier phase (e.g. a slow
            // normal call finishing while open) do not move the machine.
            _ => {}
        }
        drop(st);
        if let Some(t) = transition {
            self.notify(t);
        }
    }
}

/// [`Layer`] producing [`BreakerService`]s that share one [`Breaker`].
#[derive(Clone, Debug)]
pub struct BreakerLayer<C> {
    breaker: Breaker,
    classify: C,
}

impl<C> BreakerLayer<C> {
    /// `classify(&err)` returns true for errors that count as failures.
    pub fn new(breaker: Breaker, classify: C) -> Self {
        BreakerLayer { breaker, classify }
    }
}

impl<S, C: Clone> Layer<S> for BreakerLayer<C> {
    type Service = BreakerService<S, C>;
    fn layer(&self, inner: S) -> Self::Service {
        BreakerService {
            inner,
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
            ticket: None,
        }
    }
}

/// An admission taken in `poll_ready`; released if never used.
struct Ticket {
    breaker: Breaker,
    admission: Option<Admission>,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            self.breaker.record(a, CallResult::Neutral);
        }
    }
}

enum Slot {
    Admitted(Ticket),
    Rejected,
}

/// The breaker service. Clone per call (clones do not share the pending
/// admission, only the breaker).
pub struct BreakerService<S, C> {
    inner: S,
    breaker: Breaker,
    classify: C,
    ticket: Option<Slot>,
}

impl<S: Clone, C: Clone> Clone for BreakerService<S, C> {
    fn clone(&self) -> Self {
        BreakerService {
            inner: self.inner.clone(),
            breaker: self.breaker.clone(),
            classify: self.classify.clone(),
            ticket: None,
        }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, C, Req> Service<Req> for BreakerService<S, C>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    C: Fn(&BoxError) -> bool + Clone + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if self.ticket.is_none() {
            self.ticket = Some(match self.breaker.admit() {
                Some(a) => Slot::Admitted(Ticket {
                    breaker: self.breaker.clone(),
                    admission: Some(a),
                }),
                None => Slot::Rejected,
            });
        }
        match self.ticket {
            // Never touch (or wait for) the inner service while open.
            Some(Slot::Rejected) | None => Poll::Ready(Ok(())),
            Some(Slot::Admitted(_)) => match self.inner.poll_ready(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
                Poll::Ready(Err(e)) => {
                    let e: BoxError = e.into();
                    if let Some(Slot::Admitted(mut t)) = self.ticket.take()
                        && let Some(a) = t.admission.take()
                    {
                        let r = if (self.classify)(&e) {
                            CallResult::Failed
                        } else {
                            CallResult::Neutral
                        };
                        self.breaker.record(a, r);
                    }
                    Poll::Ready(Err(e))
                }
            },
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let mut ticket = match self.ticket.take() {
            Some(Slot::Admitted(t)) => t,
            // Rejected, or `call` without `poll_ready` (contract violation):
            // fail closed without reaching the inner service.
            Some(Slot::Rejected) | None => {
                return Box::pin(std::future::ready(Err(Box::new(BreakerOpen) as BoxError)));
            }
        };
        let admission = ticket.admission.take();
        let guard = InFlight {
            breaker: self.breaker.clone(),
            admission,
            started: Instant::now(),
        };
        let classify = self.classify.clone();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let mut guard = guard;
            let res = fut.await.map_err(Into::into);
            let result = match &res {
                Ok(_) => CallResult::Answered,
                Err(e) if classify(e) => CallResult::Failed,
                Err(e) if e.is::<tower::load_shed::error::Overloaded>() => CallResult::Neutral,
                Err(_) => CallResult::Answered,
            };
            if let Some(a) = guard.admission.take() {
                guard.breaker.record(a, result);
            }
            res
        })
    }
}

/// Records the result of a call whose future was dropped mid-flight.
struct InFlight {
    breaker: Breaker,
    admission: Option<Admission>,
    started: Instant,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(a) = self.admission.take() {
            let r = if self.started.elapsed() >= self.breaker.cfg.abandon_counts_as_failure_after {
                CallResult::Failed
            } else {
                CallResult::Neutral
            };
            self.breaker.record(a, r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failure_threshold: 3,
            base_cool_down: Duration::from_millis(20),
            max_cool_down: Duration::from_millis(80),
            abandon_counts_as_failure_after: Duration::from_millis(10),
        }
    }

    #[test]
    fn opens_after_threshold_and_probes_once() {
        let b = Breaker::new(cfg());
        for _ in 0..2 {
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
        }
        assert_eq!(b.state(), BreakerState::Closed);
        let a = b.admit().unwrap();
        b.record(a, CallResult::Failed);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.admit().is_none());
        std::thread::sleep(Duration::from_millis(25));
        let probe = b.admit().unwrap();
        assert_eq!(probe, Admission::Probe);
        assert!(b.admit().is_none(), "only one probe in flight");
        b.record(probe, CallResult::Failed);
        assert_eq!(b.state(), BreakerState::Open);
        match *b.state.lock() {
            Inner::Open { cool_down, .. } => assert_eq!(cool_down, Duration::from_millis(40)),
            _ => unreachable!(),
        }
        std::thread::sleep(Duration::from_millis(45));
        let probe = b.admit().unwrap();
        b.record(probe, CallResult::Answered);
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn answers_reset_the_count() {
        let b = Breaker::new(cfg());
        for _ in 0..10 {
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
            let a = b.admit().unwrap();
            b.record(a, CallResult::Answered);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn cool_down_is_capped() {
        let b = Breaker::new(cfg());
        for _ in 0..3 {
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
        }
        for _ in 0..5 {
            {
                let mut st = b.state.lock();
                if let Inner::Open { until, .. } = &mut *st {
                    *until = Instant::now();
                }
            }
            let p = b.admit().unwrap();
            b.record(p, CallResult::Failed);
        }
        match *b.state.lock() {
            Inner::Open { cool_down, .. } => assert_eq!(cool_down, Duration::from_millis(80)),
            _ => unreachable!(),
        }
    }

    /// A downstream that is never ready and counts calls.
    #[derive(Clone, Default)]
    struct Stuck(Arc<std::sync::atomic::AtomicUsize>);

    impl Service<()> for Stuck {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;
        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Pending
        }
        fn call(&mut self, _req: ()) -> Self::Future {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::future::ready(Ok(()))
        }
    }

    #[test]
    fn open_breaker_is_ready_at_once_and_never_calls_inner() {
        let b = Breaker::new(cfg());
        for _ in 0..3 {
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
        }
        let inner = Stuck::default();
        let calls = inner.0.clone();
        let mut svc = BreakerLayer::new(b, |_: &BoxError| true).layer(inner);
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        // Open: readiness is immediate although the inner service never is.
        assert!(matches!(svc.poll_ready(&mut cx), Poll::Ready(Ok(()))));
        let mut fut = svc.call(());
        match fut.as_mut().poll(&mut cx) {
            Poll::Ready(Err(e)) => assert!(e.is::<BreakerOpen>()),
            _ => panic!("open breaker must fail fast"),
        }
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
        // Closed: readiness is the inner service's (pending), as tower expects.
        let mut closed =
            BreakerLayer::new(Breaker::new(cfg()), |_: &BoxError| true).layer(Stuck::default());
        assert!(closed.poll_ready(&mut cx).is_pending());
    }

    #[test]
    fn neutral_probe_releases_slot() {
        let b = Breaker::new(cfg());
        for _ in 0..3 {
            let a = b.admit().unwrap();
            b.record(a, CallResult::Failed);
        }
        std::thread::sleep(Duration::from_millis(25));
        let p = b.admit().unwrap();
        b.record(p, CallResult::Neutral);
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert_eq!(b.admit(), Some(Admission::Probe));
    }
}
