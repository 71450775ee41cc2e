//! Start, membership updates, and shutdown.
//!
//! Shutdown order: stop accepting → let in-flight RPC handlers finish within the grace period
//! → close links after their queues are written → cancel every task → report closed.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_stream::StreamExt;

use super::dispatch::MeshService;
use super::inner::{Inner, Phase};
use crate::addr::LogicAddr;
use crate::error::{DiscoveryError, RpcError, StartError};
use crate::link::LinkState;
use crate::link::incoming::{Admission, PreProofLimit, incoming};
use crate::task;

/// HTTP/2 streams (link calls) one connection may have open at once.
const MAX_CALLS_PER_CONNECTION: u32 = 4;
/// Largest header block a dialer may send.
const MAX_HEADER_BYTES: u32 = 16 << 10;
use crate::membership::view::{Change, View};
use crate::membership::{MembershipEvent, MembershipStream};
use crate::proto::mesh_server::MeshServer;

impl Inner {
    pub(crate) async fn start(self: &Arc<Self>) -> Result<(), StartError> {
        if !self.transition(Phase::Created, Phase::Starting) {
            return Err(StartError::AlreadyStarted(self.addr));
        }
        match self.try_start().await {
            Ok(()) => {
                self.set_phase(Phase::Running);
                tracing::info!(node = %self.addr, listen = ?self.local_addr.get(), "node started");
                Ok(())
            }
            Err(e) => {
                self.set_phase(Phase::Created);
                Err(e)
            }
        }
    }

    async fn try_start(self: &Arc<Self>) -> Result<(), StartError> {
        let node = self.addr;
        if let Some(dup) = self.duplicates.first() {
            return Err(StartError::Config {
                node,
                reason: format!("{dup} is registered twice"),
            });
        }
        self.config
            .validate()
            .map_err(|reason| StartError::Config { node, reason })?;
        #[cfg(feature = "tls")]
        if let Some(tls) = &self.config.tls {
            tls.check_own(node)
                .map_err(|reason| StartError::Config { node, reason })?;
        }
        // Under mutual TLS, certificates say who may join; the secret is a second lock.
        if self.dev_secret && !self.config.mutual_tls() {
            tracing::warn!(%node, "running on the public development secret: anyone can join this mesh (set NodeConfig::secret or CLUSTERGO_SECRET)");
        }
        let _ = self.server.runtime.set(tokio::runtime::Handle::current());
        let mut stream = self.discovery.subscribe();
        let first = match tokio::time::timeout(self.config.start_timeout, stream.next()).await {
            Err(_) => {
                return Err(StartError::MembershipTimeout {
                    node,
                    after: self.config.start_timeout,
                });
            }
            Ok(None) => {
                return Err(StartError::Discovery {
                    node,
                    source: DiscoveryError::Ended,
                });
            }
            Ok(Some(Err(source))) => return Err(StartError::Discovery { node, source }),
            Ok(Some(Ok(MembershipEvent::Snapshot(members)))) => members,
            Ok(Some(Ok(other))) => {
                return Err(StartError::Discovery {
                    node,
                    source: DiscoveryError::Malformed {
                        source_name: "membership stream".into(),
                        reason: format!("first item must be a snapshot, got {other:?}"),
                    },
                });
            }
        };
        let view = View::new(node, first);
        let Some(me) = view.get(node).cloned() else {
            return Err(StartError::NotInMembership(node));
        };
        let listener = match self
            .listener
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            Some(l) => l,
            None => {
                std::net::TcpListener::bind(&me.net_addr).map_err(|source| StartError::Bind {
                    node,
                    net_addr: me.net_addr.clone(),
                    source,
                })?
            }
        };
        let bind_err = |source| StartError::Bind {
            node,
            net_addr: me.net_addr.clone(),
            source,
        };
        listener.set_nonblocking(true).map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let listener = tokio::net::TcpListener::from_std(listener).map_err(bind_err)?;
        let _ = self.local_addr.set(local);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
        {
            let mut st = self.self_peer.state();
            self.self_peer.set_state(
                &mut st,
                LinkState::Up {
                    link_gen: 0,
                    tokens: Default::default(),
                    dialed: false,
                    incarnation: self.links.incarnation,
                    since: Instant::now(),
                },
            );
        }

        let max = self.config.max_batch_message();
        let service = MeshServer::new(MeshService {
            inner: self.clone(),
        })
        .max_decoding_message_size(max)
        .max_encoding_message_size(max);
        let admission = Admission::new(
            self.config.max_pending_connections,
            self.config.max_pending_per_source,
            self.config.dial_timeout,
            self.stats.clone(),
            #[cfg(feature = "tls")]
            self.config.tls.clone(),
        );
        let serve = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.config.keepalive_interval))
            .http2_keepalive_timeout(Some(self.config.keepalive_timeout))
            .max_frame_size(self.config.link_frame_size)
            // A link is one call per connection; a few more leave room for a redial racing
            // the old link's end. Hello metadata is a few hundred bytes.
            .max_concurrent_streams(MAX_CALLS_PER_CONNECTION)
            .http2_max_header_list_size(MAX_HEADER_BYTES)
            .layer(PreProofLimit)
            .add_service(service)
            .serve_with_incoming_shutdown(
                incoming(listener, admission),
                self.accept_stop.clone().cancelled_owned(),
            );
        let root = self.root.clone();
        let span = |name: &'static str| tracing::info_span!("node", %node, task = name);
        task::spawn(&self.tracker, span("accept"), async move {
            tokio::select! {
                r = serve => if let Err(e) = r { tracing::error!(%node, error = %e, "server failed") },
                _ = root.cancelled() => {}
            }
        });
        task::spawn(&self.tracker, span("local"), self.clone().local_loop());
        let this = self.clone();
        task::spawn(&self.tracker, span("acks"), async move {
            this.links.acknowledge().await
        });
        task::spawn(
            &self.tracker,
            span("membership"),
            self.clone().follow_membership(stream),
        );
        if let Some(liveness) = self.discovery.keep_alive(node) {
            self.has_liveness.store(true, Ordering::Release);
            task::spawn(
                &self.tracker,
                span("drain-report"),
                self.clone().report_drains(),
            );
            let stop = self.liveness_stop.clone();
            let this = self.clone();
            task::spawn(&self.tracker, span("liveness"), async move {
                tokio::select! {
                    biased;
                    _ = stop.cancelled() => {}
                    // The source can no longer keep this node alive under its address (a
                    // claimed server id's lease was lost): the address may be another node's
                    // now, so this one stops.
                    _ = liveness => {
                        tracing::error!(node = %this.addr, "shutting down: membership can no longer keep this node alive under its address");
                        // The address may be someone else's: nothing new is taken under it.
                        this.refusing.store(true, Ordering::Release);
                        this.spawn_shutdown();
                    }
                }
            });
        }
        Ok(())
    }

    async fn follow_membership(self: Arc<Self>, mut stream: MembershipStream) {
        loop {
            let event = tokio::select! {
                _ = self.root.cancelled() => return,
                e = stream.next() => e,
            };
            match event {
                Some(Ok(e)) => self.apply(e),
                Some(Err(e)) => {
                    tracing::warn!(node = %self.addr, error = %e, "membership source error; keeping the last known membership")
                }
                None => {
                    tracing::warn!(node = %self.addr, "membership source ended; keeping the last known membership");
                    return;
                }
            }
        }
    }

    fn apply(self: &Arc<Self>, event: MembershipEvent) {
        // Only this node's membership task applies events, so the view cannot change
        // between the reads and the swap below; readers keep the view they hold.
        let changes = match event {
            MembershipEvent::Snapshot(ms) => {
                let new = View::new(self.addr, ms);
                let changes = self.view().changes(&new);
                *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
                changes
            }
            MembershipEvent::Upsert(m) => self.edit_view(|v| v.upsert(self.addr, m)),
            MembershipEvent::Remove(a) => self.edit_view(|v| v.remove(a)),
        };
        if changes.is_empty() {
            return;
        }
        self.view_changed.notify_waiters();
        for (addr, change) in changes {
            if addr == self.addr {
                let why = match change {
                    Change::Removed => "removed from membership",
                    Change::NetAddrChanged => "its network address changed in membership",
                    Change::FlagsChanged | Change::Added => continue,
                };
                tracing::warn!(node = %self.addr, "shutting down: {why}");
                self.spawn_shutdown();
                return;
            }
            match change {
                Change::Removed => crate::link::peer_left(self, addr),
                Change::NetAddrChanged => {
                    crate::link::drop_peer(&**self, addr, "its network address changed")
                }
                // The peer may be back (listed again, available again): a dial waiting for its
                // backoff goes now.
                Change::Added | Change::FlagsChanged => {
                    match self.links.peer_slot(addr) {
                        // Listed again while its old link was kept: that link may lead to
                        // the old process; the next send dials afresh.
                        Some(p) if p.is_leaving() => crate::link::drop_peer(
                            &**self,
                            addr,
                            "listed again: the old link is closed",
                        ),
                        Some(p) => {
                            p.redial_hint
                                .store(true, std::sync::atomic::Ordering::Release);
                            p.redial_now.notify_waiters();
                        }
                        None => {}
                    }
                }
            }
        }
    }

    /// Changes one member of the view: in place when no reader holds the view (the usual
    /// case: readers hold it for a moment), so a change costs the same at 50,000 members as
    /// at 10; else on a copy made outside the lock, then swapped in.
    fn edit_view(
        &self,
        edit: impl FnOnce(&mut View) -> Option<(LogicAddr, Change)>,
    ) -> Vec<(LogicAddr, Change)> {
        let shared = {
            let mut view = self.view.write().unwrap_or_else(|e| e.into_inner());
            match Arc::get_mut(&mut view) {
                Some(v) => return edit(v).into_iter().collect(),
                None => view.clone(),
            }
        };
        let mut copy = (*shared).clone();
        drop(shared);
        let change = edit(&mut copy);
        *self.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(copy);
        change.into_iter().collect()
    }

    pub(crate) async fn shutdown(self: &Arc<Self>) {
        loop {
            let changed = self.phase_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.phase() {
                Phase::Created if self.transition(Phase::Created, Phase::Closed) => {
                    // Never started (or its start failed): what the source holds for it (a
                    // claimed id) is released all the same.
                    let release = self.discovery.release(self.addr);
                    let _ = tokio::time::timeout(Duration::from_secs(5), release).await;
                    self.closed.send_replace(true);
                    return;
                }
                Phase::Running if self.transition(Phase::Running, Phase::Draining) => {
                    self.drain().await;
                    break;
                }
                // A start in progress ends either way; shut down what it leaves.
                Phase::Starting => changed.await,
                Phase::Draining | Phase::Closed => break,
                // Lost a race with another transition: look again.
                Phase::Created | Phase::Running => {}
            }
        }
        let mut closed = self.closed.subscribe();
        // The sender lives in `self`, so this ends when the node closes.
        let _ = closed.wait_for(|c| *c).await;
    }

    /// Shuts the node down from one of its own tasks.
    fn spawn_shutdown(self: &Arc<Self>) {
        let this = self.clone();
        // Not tracked: shutdown waits for the tracked tasks, the caller among them.
        let span = tracing::info_span!("node", node = %self.addr, task = "shutdown");
        task::spawn_untracked(span, async move { this.shutdown().await });
    }

    /// While the node runs with a liveness-tracking source: whenever membership says it is
    /// unavailable (an operator's drain), reports the drain's progress to the source — when
    /// the figures change, and every 2 s regardless (a write that failed, or a value replaced
    /// by a lease renewal or a repeated drain, is written anew). It follows the *state*, looked
    /// at on every view change and twice a second, not the changes: a source may fold several
    /// (alive, then drained) into one, so a drain need not show as a change of this node.
    async fn report_drains(self: Arc<Self>) {
        let mut last: Option<(crate::membership::DrainProgress, Instant)> = None;
        // Polls in a row that found the node unavailable: a node is unavailable for a moment
        // while its alive key is first put, which is not a drain to speak of.
        let mut polls = 0u32;
        loop {
            let changed = self.view_changed.notified();
            tokio::select! {
                () = changed => {}
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = self.root.cancelled() => return,
            }
            if self.phase() != Phase::Running {
                return;
            }
            let unavailable = self.view().get(self.addr).is_some_and(|m| !m.available);
            if !unavailable {
                if polls >= 2 {
                    tracing::info!(node = %self.addr, "available again in membership");
                }
                polls = 0;
                last = None;
                continue;
            }
            polls += 1;
            if polls == 2 {
                tracing::info!(node = %self.addr, "unavailable in membership while running (drained by an operator, or its lease is being renewed): new picks go elsewhere, what arrives is still served");
            }
            let now = self.drain_progress();
            if last.is_none_or(|(p, at)| p != now || at.elapsed() >= Duration::from_secs(2)) {
                self.discovery.report_drain(self.addr, now).await;
                last = Some((now, Instant::now()));
            }
        }
    }

    /// What the node still serves.
    pub(crate) fn drain_progress(&self) -> crate::membership::DrainProgress {
        crate::membership::DrainProgress::new(
            self.live_streams.active(),
            self.server.inflight.load(Ordering::Acquire) as u64,
        )
    }

    /// Waits until nothing new has arrived for [`NodeConfig::drain_quiet`] (calls, messages,
    /// streams), or `until`.
    ///
    /// [`NodeConfig::drain_quiet`]: crate::NodeConfig::drain_quiet
    async fn wait_quiet(&self, grace_end: Instant) {
        let quiet = self.config.drain_quiet;
        let refusing = self.refusing.load(Ordering::Acquire);
        if !quiet.is_zero() && !refusing && self.has_liveness.load(Ordering::Acquire) {
            // At most half the grace period: what was taken needs the rest to finish (a peer
            // that keeps sending by address, not by pick, would otherwise hold it all).
            let now = Instant::now();
            let until = grace_end.min(now + grace_end.saturating_duration_since(now) / 2);
            self.wait_quiet_inner(quiet, until).await;
        }
        self.refusing.store(true, Ordering::Release);
    }

    async fn wait_quiet_inner(&self, quiet: Duration, until: Instant) {
        let arrivals = || {
            let s = &self.stats;
            s.requests_received.load(Ordering::Relaxed)
                + s.messages_received.load(Ordering::Relaxed)
                + s.streams_accepted.load(Ordering::Relaxed)
                + s.envelopes_forwarded.load(Ordering::Relaxed)
        };
        loop {
            let before = arrivals();
            let end = (Instant::now() + quiet).min(until);
            tokio::time::sleep_until(end).await;
            if arrivals() == before || end >= until {
                return;
            }
        }
    }

    async fn drain(self: &Arc<Self>) {
        let grace_end = Instant::now() + self.config.shutdown_grace;
        tracing::info!(node = %self.addr, "shutting down");
        // Leave membership first, so peers stop picking this node before it stops serving.
        self.liveness_stop.cancel();
        let leave = self.discovery.leave(self.addr);
        if tokio::time::timeout_at(grace_end, leave).await.is_err() {
            tracing::warn!(node = %self.addr, "leaving membership did not finish within the grace period");
        }
        // Player sessions end now, their clients told (1012): they cannot outlive the node,
        // and new ones are refused (1013) while peers learn of the leave.
        self.sessions_stop.cancel();
        // Peers learn of the leave a little later: what they send meanwhile is served (links
        // are still accepted too: a peer may dial to send it).
        self.wait_quiet(grace_end).await;
        self.accept_stop.cancel();
        loop {
            let drained = self.server.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let n = self.server.inflight.load(Ordering::Acquire);
            if n == 0 {
                break;
            }
            if tokio::time::timeout_at(grace_end, drained).await.is_err() {
                tracing::warn!(node = %self.addr, in_flight = n, "grace period over with handlers still running");
                break;
            }
        }
        // The game's session handlers finish too (saving what they must: links are still up).
        if let Some(sessions) = &self.sessions
            && !sessions.handlers_ended(grace_end).await
        {
            tracing::warn!(node = %self.addr, handlers = sessions.handlers_running(), "grace period over with session handlers still running");
        }
        // A harbor lets the answers of the calls it relayed pass before its links close; new
        // calls are sent back meanwhile (see `forward`).
        if self.addr.is_harbor() {
            self.drain_relays(grace_end).await;
        }
        // Streams close within the same grace period; the rest are reset (the resets are
        // written before the links close, below).
        self.close_streams(grace_end).await;
        // Close links once their queues (replies included) are written.
        let peers = self.links.peer_list();
        for p in &peers {
            if let LinkState::Up { tokens, .. } = &*p.state() {
                tokens.close.cancel();
            }
        }
        let flush_end = grace_end.max(Instant::now() + Duration::from_millis(100));
        loop {
            let changed = self.links.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if peers.iter().all(|p| !p.is_up()) {
                break;
            }
            if tokio::time::timeout_at(flush_end, changed).await.is_err() {
                break;
            }
        }
        // Nothing is served any more: let the source release what it holds for this node
        // (a claimed server id becomes free only now, not while peers still had links to it).
        let release = self.discovery.release(self.addr);
        if tokio::time::timeout(Duration::from_secs(5), release)
            .await
            .is_err()
        {
            tracing::warn!(node = %self.addr, "releasing membership did not finish within 5 s");
        }
        self.set_phase(Phase::Closed);
        self.root.cancel();
        let error = RpcError::Shutdown { node: self.addr };
        for p in peers.iter().chain(std::iter::once(&self.self_peer)) {
            // Closed: nothing can be answered any more.
            let _unanswered = p.fail_all(&error, &self.stats);
        }
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(node = %self.addr, "some tasks did not end within 5 s of shutdown");
        }
        tracing::info!(node = %self.addr, "node closed");
        self.closed.send_replace(true);
    }
}
