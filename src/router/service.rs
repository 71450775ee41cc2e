//! [`Route`]: the forwarding service of a harbor.

use std::future::{Ready, ready};
use std::task::{Context, Poll};

use futures_util::future::{Either, MapErr, TryFutureExt};
use tower_service::Service;

use super::{MAX_HOPS, NextHop, RouteError};
use crate::addr::LogicAddr;
use crate::proto::Envelope;

/// Boxed errors, as tower middleware passes them on.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Where routes come from: the node's own address and its next hop for a destination.
pub(crate) trait Routes {
    /// The routing node.
    fn me(&self) -> LogicAddr;
    /// The next hop toward `to`, harbors picked by `key` (see [`super::route_key`]).
    fn next_hop(&self, to: LogicAddr, key: u64) -> Result<NextHop, RouteError>;
}

/// Forwards an envelope one hop: counts the hop, stops it at [`MAX_HOPS`], picks the next hop
/// and hands `(next hop, envelope)` to the inner service. Readiness is the inner service's.
#[derive(Clone)]
pub(crate) struct Route<S, R> {
    inner: S,
    routes: R,
}

impl<S, R: Routes> std::fmt::Debug for Route<S, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("me", &self.routes.me())
            .finish_non_exhaustive()
    }
}

impl<S, R> Route<S, R> {
    pub(crate) fn new(inner: S, routes: R) -> Self {
        Route { inner, routes }
    }
}

type Boxing<E> = fn(E) -> BoxError;

impl<S, R> Service<Envelope> for Route<S, R>
where
    R: Routes,
    S: Service<(NextHop, Envelope), Response = ()>,
    S::Error: Into<BoxError>,
{
    type Response = ();
    type Error = BoxError;
    type Future = Either<Ready<Result<(), BoxError>>, MapErr<S::Future, Boxing<S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut env: Envelope) -> Self::Future {
        let to = LogicAddr::from_u32(env.to).ok();
        let at = self.routes.me();
        env.hops = env.hops.saturating_add(1);
        let Some(to) = to else {
            return Either::Left(ready(Err(format!(
                "{at} cannot route to raw address {:#x}",
                env.to
            )
            .into())));
        };
        if env.hops > MAX_HOPS {
            let hops = env.hops;
            return Either::Left(ready(Err(RouteError::HopLimit { at, to, hops }.into())));
        }
        let key = super::route_key(LogicAddr::from_u32(env.from).unwrap_or(to), to);
        match self.routes.next_hop(to, key) {
            Ok(hop) => Either::Right(
                self.inner
                    .call((hop, env))
                    .map_err(Into::into as Boxing<S::Error>),
            ),
            Err(e) => Either::Left(ready(Err(e.into()))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tower_test::mock;

    #[derive(Clone)]
    struct Fixed {
        me: LogicAddr,
        hop: Result<NextHop, RouteError>,
    }

    impl Routes for Fixed {
        fn me(&self) -> LogicAddr {
            self.me
        }
        fn next_hop(&self, _to: LogicAddr, _key: u64) -> Result<NextHop, RouteError> {
            self.hop.clone()
        }
    }

    fn a(s: &str) -> LogicAddr {
        s.parse().unwrap()
    }

    fn env(to: &str, hops: u32) -> Envelope {
        Envelope {
            to: a(to).as_u32(),
            from: a("2.1.1").as_u32(),
            hops,
            trace: Bytes::new(),
            body: None,
        }
    }

    fn layer(hop: Result<NextHop, RouteError>) -> super::super::RouteLayer<Fixed> {
        super::super::RouteLayer::new(Fixed {
            me: a("2.255.1"),
            hop,
        })
    }

    #[tokio::test]
    async fn forwards_to_the_next_hop_counting_the_hop() {
        let (mut svc, mut handle) = mock::spawn_layer::<(NextHop, Envelope), (), _>(layer(Ok(
            NextHop::Harbor(a("1.255.1")),
        )));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(env("1.1.1", 1));
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req.0, NextHop::Harbor(a("1.255.1")));
        assert_eq!(req.1.hops, 2);
        assert_eq!(req.1.to, a("1.1.1").as_u32());
        send.send_response(());
        fut.await.unwrap();
    }

    #[tokio::test]
    async fn readiness_is_the_inner_services() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<(NextHop, Envelope), (), _>(layer(Ok(NextHop::Direct(a("1.1.1")))));
        handle.allow(0);
        assert!(svc.poll_ready().is_pending());
        handle.allow(1);
        assert!(svc.is_woken());
        assert!(svc.poll_ready().is_ready());
    }

    #[tokio::test]
    async fn hop_limit_and_no_route_fail_without_reaching_the_inner_service() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<(NextHop, Envelope), (), _>(layer(Ok(NextHop::Direct(a("1.1.1")))));
        handle.allow(2);
        assert!(svc.poll_ready().is_ready());
        let e = svc.call(env("1.1.1", MAX_HOPS)).await.unwrap_err();
        let e = e.downcast_ref::<RouteError>().unwrap();
        assert!(
            matches!(e, RouteError::HopLimit { hops, .. } if *hops == MAX_HOPS + 1),
            "{e}"
        );

        let no = RouteError::NoRoute {
            at: a("2.255.1"),
            to: a("1.1.1"),
            reason: "no available harbor in cluster 1".into(),
        };
        let (mut svc, mut handle) =
            mock::spawn_layer::<(NextHop, Envelope), (), _>(layer(Err(no.clone())));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let e = svc.call(env("1.1.1", 0)).await.unwrap_err();
        assert_eq!(e.downcast_ref::<RouteError>(), Some(&no));
        // Nothing reached the inner service.
        assert!(handle.poll_request().is_pending());
    }

    #[tokio::test]
    async fn inner_failures_pass_through() {
        let (mut svc, mut handle) =
            mock::spawn_layer::<(NextHop, Envelope), (), _>(layer(Ok(NextHop::Direct(a("1.1.1")))));
        handle.allow(1);
        assert!(svc.poll_ready().is_ready());
        let fut = svc.call(env("1.1.1", 0));
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error("queue full");
        assert_eq!(fut.await.unwrap_err().to_string(), "queue full");
    }
}
