//! [`RouteLayer`]: wraps the service that hands envelopes to neighbours with routing.

use tower_layer::Layer;

use super::service::Route;

/// Builds [`Route`] services that share one source of routes.
#[derive(Debug, Clone)]
pub(crate) struct RouteLayer<R> {
    routes: R,
}

impl<R> RouteLayer<R> {
    pub(crate) fn new(routes: R) -> Self {
        RouteLayer { routes }
    }
}

impl<S, R: Clone> Layer<S> for RouteLayer<R> {
    type Service = Route<S, R>;

    fn layer(&self, inner: S) -> Route<S, R> {
        Route::new(inner, self.routes.clone())
    }
}
