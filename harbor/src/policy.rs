//! The harbor's relay policy (`[relay]` in its configuration): cluster pairs it refuses, as a
//! tower layer of its relay stack.

use std::future::{Ready, ready};
use std::sync::Arc;
use std::task::{Context, Poll};

use clustergo::relay::{BoxError, RelayKind, Relayed};
use futures_util::future::{Either, MapErr, TryFutureExt};
use tower::{Layer, Service};

/// Refuses what goes from a cluster to another listed as denied (answers pass, so a call
/// made before the policy changed still gets its answer).
#[derive(Debug, Clone)]
pub(crate) struct DenyPairs(Arc<[(u16, u16)]>);

impl DenyPairs {
    pub(crate) fn new(pairs: Vec<(u16, u16)>) -> DenyPairs {
        DenyPairs(pairs.into())
    }
}

impl<S> Layer<S> for DenyPairs {
    type Service = DenyPairsService<S>;

    fn layer(&self, inner: S) -> DenyPairsService<S> {
        DenyPairsService {
            pairs: self.0.clone(),
            inner,
        }
    }
}

/// The service of [`DenyPairs`].
#[derive(Debug, Clone)]
pub(crate) struct DenyPairsService<S> {
    pairs: Arc<[(u16, u16)]>,
    inner: S,
}

type Boxing<E> = fn(E) -> BoxError;

impl<S> Service<Relayed> for DenyPairsService<S>
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
        let pair = (r.from().cluster(), r.to().cluster());
        if r.kind() != RelayKind::Response && self.pairs.contains(&pair) {
            let why = format!(
                "refused by the relay policy: cluster {} may not reach cluster {}",
                pair.0, pair.1
            );
            return Either::Left(ready(Err(why.into())));
        }
        Either::Right(self.inner.call(r).map_err(Into::into as Boxing<S::Error>))
    }
}
