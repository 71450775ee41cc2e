//! The harbor's relay policy (`[relay]` in its configuration), as one tower layer of its relay
//! stack: cluster pairs it refuses, and a rate for new work. Both apply to new work only —
//! requests, one-way messages, stream opens — so answers and streams under way always pass
//! (refusing an answer would turn a call that ran into a timeout).

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use clustergo::relay::{BoxError, Overloaded, RelayKind, Relayed};
use futures_util::future::{Either, MapErr, TryFutureExt};
use tokio::time::Instant;
use tower::{Layer, Service};

/// The `[relay]` policy.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    deny: Arc<[(u16, u16)]>,
    per_sec: Option<u64>,
}

impl Policy {
    pub(crate) fn new(deny: Vec<(u16, u16)>, per_sec: Option<u64>) -> Policy {
        Policy {
            deny: deny.into(),
            per_sec,
        }
    }

    /// Whether it does anything (else the harbor installs no layer at all).
    pub(crate) fn is_active(&self) -> bool {
        !self.deny.is_empty() || self.per_sec.is_some()
    }
}

impl<S> Layer<S> for Policy {
    type Service = PolicyService<S>;

    fn layer(&self, inner: S) -> PolicyService<S> {
        PolicyService {
            deny: self.deny.clone(),
            rate: self.per_sec.map(|n| Rate {
                per_sec: n as f64,
                tokens: n as f64,
                last: Instant::now(),
            }),
            inner,
        }
    }
}

/// New work per second, with a one-second burst.
#[derive(Debug)]
struct Rate {
    per_sec: f64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    fn take(&mut self) -> bool {
        let now = Instant::now();
        let dt = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.per_sec).min(self.per_sec);
        if self.tokens < 1.0 {
            return false;
        }
        self.tokens -= 1.0;
        true
    }
}

/// The service of [`Policy`].
#[derive(Debug)]
pub(crate) struct PolicyService<S> {
    deny: Arc<[(u16, u16)]>,
    rate: Option<Rate>,
    inner: S,
}

type Boxing<E> = fn(E) -> BoxError;

impl<S> Service<Relayed> for PolicyService<S>
where
    S: Service<Relayed, Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, MapErr<S::Future, Boxing<S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, r: Relayed) -> Self::Future {
        let new_work = matches!(
            r.kind(),
            RelayKind::Request | RelayKind::Message | RelayKind::StreamOpen
        );
        if new_work {
            let pair = (r.from().cluster(), r.to().cluster());
            if self.deny.contains(&pair) {
                let why = format!(
                    "refused by the relay policy: cluster {} may not reach cluster {}",
                    pair.0, pair.1
                );
                return Either::Left(ready(Err(why.into())));
            }
            if let Some(rate) = &mut self.rate
                && !rate.take()
            {
                let why = format!("over the relay rate of {} a second", rate.per_sec as u64);
                return Either::Left(ready(Err(Box::new(Overloaded(why)))));
            }
        }
        Either::Right(self.inner.call(r).map_err(Into::into as Boxing<S::Error>))
    }
}
