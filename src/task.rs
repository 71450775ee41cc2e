//! The one way the library spawns a task: on a tracker (so shutdown waits for it), inside a
//! span that names it (`task`, plus whatever the caller adds: node, peer, method), so every
//! log line and, once tracing is exported, every span of the task says what it belongs to.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// Spawns `fut` on `tracker` on the current runtime, inside `span`.
pub(crate) fn spawn<F>(tracker: &TaskTracker, span: tracing::Span, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tracker.spawn(fut.instrument(span))
}

/// As [`spawn`], on runtime `rt` (from a thread that may not be on one).
pub(crate) fn spawn_on<F>(
    tracker: &TaskTracker,
    rt: &tokio::runtime::Handle,
    span: tracing::Span,
    fut: F,
) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tracker.spawn_on(fut.instrument(span), rt)
}

/// As [`spawn`], untracked: for a task that shutdown itself waits on (the shutdown started by
/// membership, say), or one with its own stop (the admin listener, membership watches that end
/// when their node drops its stream).
pub(crate) fn spawn_untracked<F>(span: tracing::Span, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(span))
}
