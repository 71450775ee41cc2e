//! Player sessions that survive a lost connection or a lost gateway: the game server's side.
//!
//! A gateway opens one stream per client connection. With [`crate::NodeBuilder::on_session`]
//! (instead of `on_stream`) the game code gets a [`Session`] per *player session* rather
//! than per connection: when the client's connection drops, or its gateway is killed or
//! rolled, the session waits (detached) for up to [`SessionConfig::resume_window`]; the client
//! reconnects through any gateway with its token, a new stream reattaches the session, and
//! each side sends again exactly what the other missed. The game code sees no interruption:
//! `recv` and `send` go on across reattachments.
//!
//! The protocol is `clustergo_client::session`'s (the client keeps the other end of it). It
//! runs end to end, client to game server; a gateway only reads the client's hello, checks a
//! resume's token and routes it to the game server the token names, so gateways keep no
//! per-session state and can be restarted at will. (The session lives with the game server,
//! whose state it is; a game server that restarts has lost that state, and its clients are
//! told their session no longer exists.)
//!
//! Everything is bounded: sessions per node ([`SessionConfig::max_sessions`]), frames the
//! game has not read ([`SessionConfig::inbox`]), and what the client has not acknowledged
//! ([`SessionConfig::max_replay_frames`], [`SessionConfig::max_replay_bytes`]: past either,
//! the session ends with `4004`, never grows). A detached session holds only its replay
//! buffer and its inbox.
//!
//! Input the game has not read is bounded per session ([`SessionConfig::inbox`],
//! [`SessionConfig::inbox_bytes`]) and for the node beyond one frame per session
//! ([`SessionConfig::max_inbox_total`]): past a bound a session stops reading its stream,
//! whose credit window then holds the client back; nothing is dropped. A session whose game
//! keeps up is never held back by others (a shared pool that everyone waited on would let a
//! few stuck sessions stop every player's input).
//!
//! When the node shuts down, its sessions end as soon as it has left membership, each client
//! told `1012 game server shutting down` (what the game sent before goes first); the game's
//! handler sees [`Session::recv`] fail with that code, and the shutdown waits for the
//! handlers within its grace period before it closes its links, so they can still call other
//! nodes (to save the player). New sessions are refused (`1013`) from then on. Ending them
//! only when the node closes would leave clients to find out by a reset at the end of the
//! grace period, and to try resuming a session that cannot come back. Version 1 sessions are
//! left to the gateway, which closes them when it sees the node leave.
//!
//! A client that speaks no session (version 1: its first frame is not a session hello) still
//! gets a [`Session`], one that ends with its connection ([`Session::resumable`] is false).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clustergo_client::session::{Frame, Receipts, Replay, Token, close_reason, code};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::addr::LogicAddr;
use crate::hash::FastMap;
use crate::stream::{Frames, Stream, StreamMeta};

/// Stream metadata a gateway sets on a session's stream: `new` or `resume`.
pub const META_SESSION: &str = "cg-session";
/// With `resume`: the token (hex).
pub const META_TOKEN: &str = "cg-token";
/// With `resume`: the data frames the client received so far (decimal).
pub const META_RECEIVED: &str = "cg-received";

/// Limits of a node's sessions.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionConfig {
    /// How long a detached session waits for its client to resume (default 60 s).
    pub resume_window: Duration,
    /// Data frames sent to the client and not acknowledged, at most (default 4,096).
    pub max_replay_frames: usize,
    /// Bytes of those, at most (default 1 MiB).
    pub max_replay_bytes: usize,
    /// Largest frame either way (default 64 KiB − 1). A session frame is one byte longer on
    /// the wire, so this must stay below the gateway's `max_frame` (64 KiB by default).
    pub max_frame: usize,
    /// How long a token is accepted (default 1 h); each reattachment gives a fresh one.
    pub token_ttl: Duration,
    /// Sessions per node, attached or not, version 1 ones included (default 100,000); over
    /// it a new one is refused with `1013`.
    pub max_sessions: usize,
    /// Bytes of unacknowledged frames all the node's sessions hold together (default
    /// 256 MiB): a send that would pass it ends its session with `4004`, so no number of
    /// sessions can grow the node's memory past it (each is also bounded by
    /// [`SessionConfig::max_replay_bytes`]).
    pub max_replay_total: usize,
    /// Frames from the client the game has not read yet (default 64); beyond, the session
    /// stops reading, and the stream's credit window holds the client back.
    pub inbox: usize,
    /// Bytes of those, at most (default 256 KiB; a larger frame is taken alone; 0 counts
    /// as 1: one frame at a time).
    pub inbox_bytes: usize,
    /// Bytes from clients the game has not read yet, all the node's sessions together,
    /// beyond one frame each (default 64 MiB; 0 counts as 1). A session's first unread frame
    /// is always its own; past that its frames take from this pool, and when the pool is
    /// spent (the game has left that much unread) a session waits until its own game has read
    /// what it holds, then goes on one frame at a time. So a session whose game keeps up is
    /// never held back by others, and what the node holds for the game is at most this plus
    /// one frame per session (each session's stream holds at most its credit window besides,
    /// [`NodeConfig::stream_window`](crate::NodeConfig::stream_window)).
    pub max_inbox_total: usize,
    /// How long one write toward the client may wait before the connection counts as lost
    /// (default 10 s).
    pub write_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            resume_window: Duration::from_secs(60),
            max_replay_frames: 4096,
            max_replay_bytes: 1 << 20,
            max_frame: (64 << 10) - 1,
            token_ttl: Duration::from_secs(3600),
            max_sessions: 100_000,
            max_replay_total: 256 << 20,
            inbox: 64,
            inbox_bytes: 256 << 10,
            max_inbox_total: 64 << 20,
            write_timeout: Duration::from_secs(10),
        }
    }
}

impl SessionConfig {
    /// Sets [`SessionConfig::resume_window`].
    pub fn resume_window(mut self, d: Duration) -> Self {
        self.resume_window = d;
        self
    }
    /// Sets [`SessionConfig::max_replay_frames`] and [`SessionConfig::max_replay_bytes`].
    pub fn max_replay(mut self, frames: usize, bytes: usize) -> Self {
        self.max_replay_frames = frames;
        self.max_replay_bytes = bytes;
        self
    }
    /// Sets [`SessionConfig::token_ttl`].
    pub fn token_ttl(mut self, d: Duration) -> Self {
        self.token_ttl = d;
        self
    }
    /// Sets [`SessionConfig::max_replay_total`].
    pub fn max_replay_total(mut self, bytes: usize) -> Self {
        self.max_replay_total = bytes;
        self
    }
    /// Sets [`SessionConfig::max_sessions`].
    pub fn max_sessions(mut self, n: usize) -> Self {
        self.max_sessions = n;
        self
    }
    /// Sets [`SessionConfig::inbox`] (frames) and [`SessionConfig::inbox_bytes`].
    pub fn inbox(mut self, frames: usize, bytes: usize) -> Self {
        self.inbox = frames;
        self.inbox_bytes = bytes;
        self
    }
    /// Sets [`SessionConfig::max_inbox_total`].
    pub fn max_inbox_total(mut self, bytes: usize) -> Self {
        self.max_inbox_total = bytes;
        self
    }

    /// What one frame of `len` bytes takes of the inbox budgets: its size, at least 1 (an
    /// empty frame still takes a place) and at most what the session's budget holds (so a
    /// frame larger than the budget is taken alone instead of waiting forever).
    fn inbox_cost(&self, len: usize) -> u32 {
        let cap = self.inbox_bytes.clamp(1, u32::MAX as usize);
        len.clamp(1, cap) as u32
    }
}

/// A frame from the client on its way to the game, holding its share of the inbox budgets
/// until the game takes it (or it is dropped with the session).
struct Inbound {
    frame: Bytes,
    _held: Held,
}

/// Budget a frame holds: given back when dropped, wherever that happens.
struct Held {
    budget: Arc<InboxBudget>,
    /// Taken of the session's budget.
    mine: u32,
    /// Taken of the node's pool (0 for a session's first unread frame).
    pooled: u32,
    /// The frame's size, for the node's count of what the game has not read.
    bytes: usize,
}

impl Drop for Held {
    fn drop(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        self.budget.mine.add_permits(self.mine as usize);
        self.budget.node.pool.add_permits(self.pooled as usize);
        self.budget.node.held.fetch_sub(self.bytes, Relaxed);
    }
}

/// The node's share of the inbox budgets.
struct NodeInbox {
    /// [`SessionConfig::max_inbox_total`].
    pool: tokio::sync::Semaphore,
    /// Bytes of frames the game has not read, all sessions.
    held: std::sync::atomic::AtomicUsize,
}

/// A session's inbox budget ([`SessionConfig::inbox_bytes`]) and the node's pool
/// ([`SessionConfig::max_inbox_total`]).
struct InboxBudget {
    mine: tokio::sync::Semaphore,
    /// The session's budget, whole (its semaphore's permits when it holds nothing).
    cap: usize,
    node: Arc<NodeInbox>,
}

impl InboxBudget {
    fn new(config: &SessionConfig, node: Arc<NodeInbox>) -> InboxBudget {
        let cap = config.inbox_bytes.clamp(1, u32::MAX as usize);
        InboxBudget {
            mine: tokio::sync::Semaphore::new(cap),
            cap,
            node,
        }
    }

    fn held(self: &Arc<Self>, mine: u32, pooled: u32, bytes: usize) -> Held {
        self.node
            .held
            .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
        Held {
            budget: self.clone(),
            mine,
            pooled,
            bytes,
        }
    }

    /// `n` of the session's budget (already taken) and of the pool, or of nothing when the
    /// session holds nothing else (its first unread frame is its own); `None` when the pool
    /// is spent.
    fn pooled(&self, n: u32) -> Option<u32> {
        if self.mine.available_permits() + n as usize >= self.cap {
            return Some(0);
        }
        let p = self.node.pool.try_acquire_many(n).ok()?;
        p.forget();
        Some(n)
    }

    /// Budget for a frame of `bytes` costing `n`, if there is some now.
    fn try_take(self: &Arc<Self>, n: u32, bytes: usize) -> Option<Held> {
        let mine = self.mine.try_acquire_many(n).ok()?;
        let pooled = self.pooled(n)?;
        mine.forget();
        Some(self.held(n, pooled, bytes))
    }

    /// Waits for budget for a frame of `bytes` costing `n`. Cancel-safe: what was taken is
    /// given back. It never waits on the node's pool (whose waiters would queue behind one
    /// another): when the pool is spent it waits for this session's own game to read what
    /// the session holds, and then the frame is the session's own.
    async fn take(self: &Arc<Self>, n: u32, bytes: usize) -> Option<Held> {
        let mine = self.mine.acquire_many(n).await.ok()?;
        if let Some(pooled) = self.pooled(n) {
            mine.forget();
            return Some(self.held(n, pooled, bytes));
        }
        drop(mine);
        static SPENT: crate::LogGate = crate::LogGate::new();
        if let Some(more) = SPENT.pass() {
            tracing::warn!(
                held_back = more,
                "sessions read their clients one frame at a time: the game has left max_inbox_total bytes of their input unread"
            );
        }
        // Everything back: the game has read all this session held.
        let all = self.mine.acquire_many(self.cap as u32).await.ok()?;
        all.forget();
        self.mine.add_permits(self.cap - n as usize);
        Some(self.held(n, 0, bytes))
    }
}

/// Why a token is not accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Its signature does not check out under the cluster's key.
    #[error("session token is not one this cluster issued")]
    Forged,
    /// Its time is up.
    #[error("session token expired")]
    Expired,
}

impl TokenError {
    /// The close code a client is told.
    pub fn code(self) -> u16 {
        match self {
            TokenError::Forged => code::BAD_TOKEN,
            TokenError::Expired => code::EXPIRED,
        }
    }
}

/// Signs and checks session tokens; derived from the cluster secret, so every gateway and
/// game server of the mesh shares it.
#[derive(Clone)]
pub struct TokenKey([u8; 32]);

impl std::fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl TokenKey {
    /// The key for the cluster `secret` (a key of its own, not the secret itself).
    pub fn from_secret(secret: &[u8]) -> TokenKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
        mac.update(b"clustergo session token v1");
        TokenKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self, token: &Token) -> [u8; 16] {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        mac.update(&token.signed());
        let full = mac.finalize().into_bytes();
        let mut out = [0u8; 16];
        out.copy_from_slice(&full[..16]);
        out
    }

    /// Token `generation` of session `id` on `server`, good for `ttl`.
    pub fn issue(&self, id: [u8; 16], server: LogicAddr, generation: u32, ttl: Duration) -> Token {
        self.sign(Token {
            id,
            server: server.as_u32(),
            generation,
            expires: now_secs().saturating_add(ttl.as_secs().max(1)),
            mac: [0; 16],
        })
    }

    /// `token` with its signature set (for tools and tests: any id, server and expiry).
    pub fn sign(&self, mut token: Token) -> Token {
        token.mac = self.mac(&token);
        token
    }

    /// Whether `token` was issued under this key and is still good.
    pub fn check(&self, token: &Token) -> Result<(), TokenError> {
        let want = self.mac(token);
        // Constant time, as HMAC verification is.
        let diff = want
            .iter()
            .zip(token.mac.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 {
            return Err(TokenError::Forged);
        }
        if token.expires <= now_secs() {
            return Err(TokenError::Expired);
        }
        Ok(())
    }
}

/// A session's id: 16 random bytes, shown as hex.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({self})")
    }
}

/// How a session ended, for the game code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The session is over: a stable `code` (see `clustergo_client::session::code`) and a
    /// reason.
    #[error("session ended ({code}): {reason}")]
    Ended {
        /// The code the client is (or would be) told.
        code: u16,
        /// Why, for the logs.
        reason: String,
    },
    /// A frame over [`SessionConfig::max_frame`] was offered to `send`.
    #[error("frame of {size} bytes is over the session limit of {limit} bytes")]
    TooLarge {
        /// The frame's size.
        size: usize,
        /// The limit.
        limit: usize,
    },
}

/// What the game asked of its session.
enum Out {
    Frame(Bytes),
    Close(String),
}

/// A player's session, for the game code: frames from the client, frames to it, across
/// reattachments. Dropping it ends the session (as [`Session::close`] with no reason).
#[derive(Debug)]
pub struct Session {
    id: SessionId,
    meta: StreamMeta,
    resumable: bool,
    max_frame: usize,
    inbox: mpsc::Receiver<Inbound>,
    out: mpsc::Sender<Out>,
    end: Arc<OnceLock<(u16, String)>>,
}

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Out::Frame(b) => write!(f, "Frame({} bytes)", b.len()),
            Out::Close(r) => write!(f, "Close({r})"),
        }
    }
}

impl Session {
    /// The session's id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The metadata of the stream that started it (the gateway's: `transport`, `client`, …).
    pub fn metadata(&self) -> &StreamMeta {
        &self.meta
    }

    /// Whether the session survives its connection (the client speaks sessions).
    pub fn resumable(&self) -> bool {
        self.resumable
    }

    fn ended(&self) -> SessionError {
        let (code, reason) = self
            .end
            .get()
            .cloned()
            .unwrap_or((code::NO_SESSION, "session ended".into()));
        SessionError::Ended { code, reason }
    }

    /// The next frame from the client; `Ok(None)` when the client ended the session (a bye,
    /// or a version 1 client's connection ended cleanly). Waits across reattachments.
    ///
    /// # Errors
    /// [`SessionError::Ended`] once the session is over otherwise: its resume window passed
    /// (4003), a replay buffer overran (4004), the client broke the protocol (4006), the node
    /// is shutting down (1012), …
    pub async fn recv(&mut self) -> Result<Option<Bytes>, SessionError> {
        match self.inbox.recv().await {
            // Its budget is given back here.
            Some(inbound) => Ok(Some(inbound.frame)),
            None => match self.end.get() {
                Some((code::NORMAL, _)) => Ok(None),
                _ => Err(self.ended()),
            },
        }
    }

    /// Sends a frame to the client: kept until the client acknowledges it, sent again after
    /// a reattachment. Waits while the session is busy writing; fails once it ended.
    pub async fn send(&self, frame: impl Into<Bytes>) -> Result<(), SessionError> {
        let frame = frame.into();
        if frame.len() > self.max_frame {
            return Err(SessionError::TooLarge {
                size: frame.len(),
                limit: self.max_frame,
            });
        }
        self.out
            .send(Out::Frame(frame))
            .await
            .map_err(|_| self.ended())
    }

    /// Ends the session: the client is told `reason` (with code 1000) once what was sent
    /// before is written.
    pub async fn close(self, reason: &str) {
        let _ = self.out.send(Out::Close(reason.to_owned())).await;
    }
}

/// A reattachment: a new stream, what the client received, and the signature of the token
/// it came with.
struct Attach {
    frames: Frames,
    received: u64,
    generation: u32,
}

/// How many of a session's latest tokens a resume may bring.
const KEEP_GENERATIONS: u32 = 3;

/// Ended sessions remembered (for a resume to be told why), at most.
const TOMBSTONES: usize = 4096;

/// A node's sessions.
pub(crate) struct Sessions {
    config: SessionConfig,
    key: TokenKey,
    me: LogicAddr,
    /// Reattachments go to a session boxed: a channel allocates its first slots at once, and
    /// an unboxed `Attach` (a whole `Frames`) made that 7 KB per session.
    table: Mutex<FastMap<[u8; 16], mpsc::Sender<Box<Attach>>>>,
    /// Sessions of version 1 clients (not in the table: they cannot be resumed).
    plain: std::sync::atomic::AtomicUsize,
    /// Bytes all replay buffers hold (see [`SessionConfig::max_replay_total`]).
    replay_total: std::sync::atomic::AtomicUsize,
    /// The latest ended sessions and why, so a late resume is told the real reason.
    ended: Mutex<std::collections::VecDeque<([u8; 16], u16, String)>>,
    /// The node's inbox pool (see [`SessionConfig::max_inbox_total`]).
    inbox: Arc<NodeInbox>,
    /// Game handlers running (a node's shutdown waits for them, within its grace period).
    handlers: std::sync::atomic::AtomicUsize,
    /// Told when the last handler ends.
    handlers_done: tokio::sync::Notify,
    /// What the sessions did, for the node's metrics.
    counts: Counts,
    /// Cancelled when the node's shutdown has left membership: every resumable session ends
    /// with [`code::SERVER_RESTART`], and its handler has what is left of the grace period.
    pub(crate) stop: OnceLock<CancellationToken>,
}

/// What a node's sessions did, counted as it happens.
#[derive(Default)]
struct Counts {
    started: std::sync::atomic::AtomicU64,
    resumed: std::sync::atomic::AtomicU64,
    /// Resumable sessions waiting for their client now.
    detached: std::sync::atomic::AtomicUsize,
    /// Sessions ended, by the code their client was told (a handful of codes).
    ended: Mutex<std::collections::BTreeMap<u16, u64>>,
}

/// A node's sessions now, for its metrics (`clustergo_sessions` and the rest, see `admin`).
#[derive(Debug, Clone, Default)]
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) struct SessionSnapshot {
    /// Resumable sessions with a connection.
    pub(crate) attached: usize,
    /// Resumable sessions waiting for their client to resume.
    pub(crate) detached: usize,
    /// Sessions of version 1 clients.
    pub(crate) plain: usize,
    /// Bytes sent to clients and not acknowledged yet, all sessions.
    pub(crate) replay_bytes: usize,
    /// Bytes from clients the game has not read yet, all sessions.
    pub(crate) inbox_bytes: usize,
    /// Sessions started, in all.
    pub(crate) started: u64,
    /// Reattachments of a session to a new connection, in all.
    pub(crate) resumed: u64,
    /// Sessions ended, by code.
    pub(crate) ended: Vec<(u16, u64)>,
}

/// The game's handler of new sessions.
pub(crate) type SessionHandler =
    Arc<dyn Fn(Session) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

impl Sessions {
    pub(crate) fn new(config: SessionConfig, secret: &[u8], me: LogicAddr) -> Arc<Sessions> {
        Arc::new(Sessions {
            key: TokenKey::from_secret(secret),
            me,
            table: Mutex::new(FastMap::default()),
            plain: Default::default(),
            replay_total: Default::default(),
            ended: Mutex::new(std::collections::VecDeque::new()),
            inbox: Arc::new(NodeInbox {
                pool: tokio::sync::Semaphore::new(
                    config
                        .max_inbox_total
                        .clamp(1, tokio::sync::Semaphore::MAX_PERMITS),
                ),
                held: Default::default(),
            }),
            handlers: Default::default(),
            handlers_done: tokio::sync::Notify::new(),
            counts: Counts::default(),
            config,
            stop: OnceLock::new(),
        })
    }

    /// What the node's sessions hold and did, now (for its metrics).
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn snapshot(&self) -> SessionSnapshot {
        use std::sync::atomic::Ordering::Relaxed;
        let resumable = self.table.lock().unwrap_or_else(|e| e.into_inner()).len();
        let detached = self.counts.detached.load(Relaxed).min(resumable);
        SessionSnapshot {
            attached: resumable - detached,
            detached,
            plain: self.plain.load(Relaxed),
            replay_bytes: self.replay_total.load(Relaxed),
            inbox_bytes: self.inbox.held.load(Relaxed),
            started: self.counts.started.load(Relaxed),
            resumed: self.counts.resumed.load(Relaxed),
            ended: self
                .counts
                .ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(c, n)| (*c, *n))
                .collect(),
        }
    }

    fn stop(&self) -> CancellationToken {
        self.stop.get().cloned().unwrap_or_default()
    }

    /// Serves one stream a gateway opened: a new session, a resume, or a version 1 client.
    pub(crate) async fn accept(self: Arc<Self>, stream: Stream, handler: SessionHandler) {
        let meta = stream.metadata().clone();
        let frames = Frames::new(stream, self.config.max_frame + 1);
        match meta.get(META_SESSION) {
            Some("resume") => self.resume(frames, &meta).await,
            kind => {
                let resumable = kind == Some("new");
                self.start(frames, meta, resumable, handler).await
            }
        }
    }

    async fn start(
        self: Arc<Self>,
        frames: Frames,
        meta: StreamMeta,
        resumable: bool,
        handler: SessionHandler,
    ) {
        if self.stop().is_cancelled() {
            refuse(
                frames,
                code::TRY_AGAIN,
                "game server shutting down, try again",
            )
            .await;
            return;
        }
        let mut id = [0u8; 16];
        if getrandom::fill(&mut id).is_err() {
            id = fastrand::u128(..).to_le_bytes();
        }
        let (attach_tx, attach_rx) = mpsc::channel(1);
        let full = {
            use std::sync::atomic::Ordering::Relaxed;
            let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let full = table.len() + self.plain.load(Relaxed) >= self.config.max_sessions;
            if !full {
                if resumable {
                    table.insert(id, attach_tx);
                } else {
                    self.plain.fetch_add(1, Relaxed);
                }
            }
            full
        };
        if !full {
            self.counts
                .started
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if full {
            tracing::warn!(node = %self.me, max = self.config.max_sessions, "session refused: too many sessions");
            refuse(frames, code::TRY_AGAIN, "game server full, try again later").await;
            return;
        }
        let (in_tx, in_rx) = mpsc::channel(self.config.inbox.max(1));
        let (out_tx, out_rx) = mpsc::channel(self.config.inbox.max(1));
        let end = Arc::new(OnceLock::new());
        let session = Session {
            id: SessionId(id),
            meta,
            resumable,
            max_frame: self.config.max_frame,
            inbox: in_rx,
            out: out_tx,
            end: end.clone(),
        };
        let pump = Pump {
            slot: Slot {
                sessions: self.clone(),
                id,
                resumable,
                held: 0,
                detached: false,
                released: false,
            },
            budget: Arc::new(InboxBudget::new(&self.config, self.inbox.clone())),
            sessions: self.clone(),
            id,
            resumable,
            replay: Replay::new(self.config.max_replay_frames, self.config.max_replay_bytes),
            receipts: Receipts::default(),
            end,
            generation: 0,
            issued: Instant::now(),
        };
        let run = pump.run(frames, out_rx, attach_rx, in_tx);
        let running = Running::start(&self);
        let game = async move {
            handler(session).await;
            drop(running);
        };
        tokio::join!(run, game);
    }

    /// Waits until no game handler runs, or `until`; whether none does.
    pub(crate) async fn handlers_ended(&self, until: Instant) -> bool {
        loop {
            let done = self.handlers_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.handlers.load(std::sync::atomic::Ordering::Acquire) == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, done).await.is_err() {
                return false;
            }
        }
    }

    /// Game handlers running now.
    pub(crate) fn handlers_running(&self) -> usize {
        self.handlers.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn resume(self: Arc<Self>, frames: Frames, meta: &StreamMeta) {
        let token = meta
            .get(META_TOKEN)
            .and_then(unhex)
            .and_then(|b| Token::parse(&b));
        let received = meta.get(META_RECEIVED).and_then(|r| r.parse::<u64>().ok());
        let (Some(token), Some(received)) = (token, received) else {
            return refuse(frames, code::PROTOCOL, "malformed resume").await;
        };
        if let Err(e) = self.key.check(&token) {
            return refuse(frames, e.code(), &e.to_string()).await;
        }
        if token.server != self.me.as_u32() {
            return refuse(
                frames,
                code::BAD_TOKEN,
                "session token is for another server",
            )
            .await;
        }
        let attach_tx = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&token.id)
            .cloned();
        let attach = Attach {
            frames,
            received,
            generation: token.generation,
        };
        let sent = match attach_tx {
            Some(tx) => tx.send(Box::new(attach)).await.map_err(|e| e.0.frames),
            None => Err(attach.frames),
        };
        if let Err(frames) = sent {
            let why = self
                .ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(id, _, _)| *id == token.id)
                .map(|(_, c, r)| (*c, r.clone()));
            match why {
                Some((c, r)) if c != code::NORMAL || !r.is_empty() => {
                    let r = if r.is_empty() {
                        "session ended".into()
                    } else {
                        r
                    };
                    refuse(frames, c, &format!("session ended: {r}")).await
                }
                _ => refuse(frames, code::NO_SESSION, "session no longer exists").await,
            }
        }
    }

    fn forget(&self, id: &[u8; 16], code: u16, reason: &str) {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let mut ended = self.ended.lock().unwrap_or_else(|e| e.into_inner());
        if ended.len() >= TOMBSTONES {
            ended.pop_front();
        }
        ended.push_back((*id, code, reason.to_owned()));
    }
}

/// Tells the client why (a close frame on the stream, which the gateway passes on: the code,
/// then the public reason) and ends the stream.
async fn refuse(frames: Frames, code: u16, text: &str) {
    close_raw(frames, &close_reason(code, text)).await
}

/// A close frame with `reason` as it is, and the stream's end.
async fn close_raw(frames: Frames, reason: &str) {
    let mut stream = frames.into_stream();
    let mut buf = bytes::BytesMut::new();
    clustergo_client::wire::put_close(&mut buf, reason);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&buf).await?;
        stream.shutdown().await
    })
    .await;
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Hex of `b` (for a token in stream metadata).
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// Drives one session: its current stream (if attached), the game's frames, the replay
/// buffer and acknowledgements, reattachments and the resume window.
struct Pump {
    slot: Slot,
    sessions: Arc<Sessions>,
    id: [u8; 16],
    resumable: bool,
    replay: Replay,
    receipts: Receipts,
    end: Arc<OnceLock<(u16, String)>>,
    /// The inbox budgets frames for the game take.
    budget: Arc<InboxBudget>,
    /// The generation of the last token given (see [`KEEP_GENERATIONS`]).
    generation: u32,
    /// When it was given.
    issued: Instant,
}

/// A game handler counted as running while it lives (a panic unwinding it included).
struct Running(Arc<Sessions>);

impl Running {
    fn start(sessions: &Arc<Sessions>) -> Running {
        sessions
            .handlers
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Running(sessions.clone())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self
            .0
            .handlers
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
        {
            self.0.handlers_done.notify_waiters();
        }
    }
}

/// A session's place in the node: its table entry (or count) and its share of the replay
/// budget, given back when dropped, however the session ends (a panic of the game's handler,
/// which runs in the same task, included).
struct Slot {
    sessions: Arc<Sessions>,
    id: [u8; 16],
    resumable: bool,
    /// Bytes of its replay buffer counted in the node's total.
    held: usize,
    /// Counted as detached.
    detached: bool,
    released: bool,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.release();
    }
}

impl Slot {
    /// Gives the place and the bytes back (once).
    fn release(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.released {
            return;
        }
        self.released = true;
        let s = &self.sessions;
        if self.resumable {
            s.table
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&self.id);
        } else {
            s.plain.fetch_sub(1, Relaxed);
        }
        s.replay_total.fetch_sub(self.held, Relaxed);
        if self.detached {
            s.counts.detached.fetch_sub(1, Relaxed);
        }
    }

    /// Counts the session as detached (waiting for its client) or not.
    fn set_detached(&mut self, detached: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.released || detached == self.detached {
            return;
        }
        self.detached = detached;
        let n = &self.sessions.counts.detached;
        if detached {
            n.fetch_add(1, Relaxed);
        } else {
            n.fetch_sub(1, Relaxed);
        }
    }
}

/// What ended a connection of a session (not necessarily the session).
enum Conn {
    /// The stream went away: detach (or end, for a version 1 client).
    Lost(String),
    /// The session ends, and the client is told: code and public reason.
    End(u16, String),
    /// The game dropped its session.
    GameGone,
    /// The node is shutting down.
    Stopped,
}

impl Pump {
    fn config(&self) -> &SessionConfig {
        &self.sessions.config
    }

    async fn run(
        mut self,
        first: Frames,
        mut out: mpsc::Receiver<Out>,
        mut attach: mpsc::Receiver<Box<Attach>>,
        inbox: mpsc::Sender<Inbound>,
    ) {
        // Frames for the game; dropped when the session ends.
        let inbox = Some(inbox);
        // A version 1 client's session is its connection: the gateway closes it when this
        // node leaves membership (with a code that sends it elsewhere), not this.
        let stop = if self.resumable {
            self.sessions.stop()
        } else {
            CancellationToken::new()
        };
        let mut stream = Some(first);
        if self.resumable
            && let Some(s) = stream.as_mut()
            && self.welcome(s).await.is_err()
        {
            stream = None;
        }
        let mut detached_at = stream.is_none().then(Instant::now);
        self.slot.set_detached(detached_at.is_some());
        let budget = self.budget.clone();
        let mut ack_due: Option<Instant> = None;
        // A frame from the client the game has no room for yet: nothing more is read from the
        // stream until it has (the stream's window then holds the client back), while the
        // game's own frames keep going out.
        let mut pending_in: Option<Bytes> = None;
        // One timer for three deadlines (the ack's, the token's refresh, the resume window's):
        // one entry, reset when the earliest moves (not a new timer per frame, and one timer
        // polled per turn, not three).
        let mut timer = Timer::new();
        let (code, reason) = loop {
            if !self.receipts.owed() {
                // Told already (an ack rode with a frame, or a welcome).
                ack_due = None;
            }
            let window_at = detached_at.map(|t| t + self.config().resume_window);
            // A long-attached session gets a fresh token before its current one expires.
            let refresh_at = stream
                .as_ref()
                .map(|_| self.issued + self.config().token_ttl / 2);
            timer.set([ack_due, refresh_at, window_at].into_iter().flatten().min());
            let cost = pending_in
                .as_ref()
                .map(|f| (self.config().inbox_cost(f.len()), f.len()));
            // Not biased: a game that sends without pause must not starve the client's
            // acknowledgements and input, nor the other way round (a close the game sent while
            // client frames arrive still wins: see `GameGone`).
            let outcome: Result<(), Conn> = tokio::select! {
                () = stop.cancelled() => Err(Conn::Stopped),
                a = attach.recv() => match a {
                    // A token older than the last three this session gave (a copy someone
                    // kept): refused; the session goes on. Three, as the newest may have been
                    // lost with the connections that carried them.
                    Some(a) if a.generation + KEEP_GENERATIONS <= self.generation => {
                        refuse(a.frames, code::BAD_TOKEN, "session token was replaced by a newer one").await;
                        Ok(())
                    }
                    Some(a) => {
                        let mut s = a.frames;
                        match self.reattach(&mut s, a.received).await {
                            Ok(()) => {
                                // A newer connection of the session: the old one is stale.
                                if let Some(old) = stream.replace(s) {
                                    refuse(old, code::REPLACED, "session resumed on another connection").await;
                                }
                                detached_at = None;
                                self.slot.set_detached(false);
                                self.sessions.counts.resumed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                ack_due = None;
                                tracing::debug!(session = %SessionId(self.id), "session resumed");
                                Ok(())
                            }
                            // A count this session cannot serve (frames it needs were
                            // acknowledged before): that connection is refused; the session
                            // goes on as it was.
                            Err(Conn::End(c, r)) => {
                                refuse(s, c, &r).await;
                                Ok(())
                            }
                            Err(_) => Ok(()),
                        }
                    }
                    None => Ok(()),
                },
                o = out.recv() => match o {
                    Some(Out::Frame(f)) => self.send_to_client(f, &mut stream).await,
                    Some(Out::Close(reason)) => Err(Conn::End(code::NORMAL, reason)),
                    // Dropped by the game: ended, with no reason to tell.
                    None => Err(Conn::End(code::NORMAL, String::new())),
                },
                p = reserve(&inbox, &budget, cost) => match (p, pending_in.take()) {
                    (Some((permit, held)), Some(frame)) => {
                        permit.send(Inbound { frame, _held: held });
                        Ok(())
                    }
                    _ => Err(Conn::GameGone),
                },
                r = recv_if(&mut stream, pending_in.is_none()) => {
                    match self.on_client_frame(r, &mut ack_due).await {
                        // Straight to the game when there is room (the usual case), else it
                        // waits its turn in the branch above.
                        Ok(Some(frame)) => {
                            let n = self.config().inbox_cost(frame.len());
                            pending_in = try_deliver(&inbox, &budget, n, frame);
                            Ok(())
                        }
                        Ok(None) => Ok(()),
                        Err(e) => Err(e),
                    }
                }
                () = timer.wait() => {
                    let now = Instant::now();
                    if window_at.is_some_and(|t| t <= now) {
                        break (code::NO_SESSION, "resume window passed".to_owned());
                    }
                    let mut r = Ok(());
                    if ack_due.is_some_and(|t| t <= now) {
                        ack_due = None;
                        if let (Some(s), Some(ack)) = (stream.as_mut(), self.receipts.ack()) {
                            r = write(s, ack, self.config().write_timeout).await;
                        }
                    }
                    if r.is_ok()
                        && refresh_at.is_some_and(|t| t <= now)
                        && let Some(s) = stream.as_mut()
                    {
                        r = self.welcome(s).await;
                    }
                    r
                }
            };
            let outcome = match outcome {
                // The node is shutting down: what the client sent is handed to the game
                // (past the budgets: one frame), what the game sent goes out, then the end.
                Err(Conn::Stopped) => {
                    if let (Some(frame), Some(tx)) = (pending_in.take(), inbox.as_ref()) {
                        let held = budget.held(0, 0, frame.len());
                        if tx.try_send(Inbound { frame, _held: held }).is_err() {
                            tracing::debug!(session = %SessionId(self.id), "a frame from the client dropped at shutdown: the game's inbox is full");
                        }
                    }
                    while let Ok(o) = out.try_recv() {
                        match o {
                            Out::Frame(f) => {
                                // A write cut short leaves the stream mid-frame: nothing more
                                // goes on it (the close below would be misread).
                                if let Err(Conn::Lost(_)) =
                                    self.send_to_client(f, &mut stream).await
                                {
                                    stream = None;
                                }
                            }
                            Out::Close(_) => break,
                        }
                    }
                    Err(Conn::End(
                        code::SERVER_RESTART,
                        "game server shutting down".into(),
                    ))
                }
                // The game dropped its session: what it sent before, then its close, if any.
                Err(Conn::GameGone) => {
                    let mut reason = String::new();
                    while let Ok(o) = out.try_recv() {
                        match o {
                            Out::Frame(f) => {
                                // A write cut short leaves the stream mid-frame: nothing more
                                // goes on it (the close below would be misread).
                                if let Err(Conn::Lost(_)) =
                                    self.send_to_client(f, &mut stream).await
                                {
                                    stream = None;
                                }
                            }
                            Out::Close(r) => {
                                reason = r;
                                break;
                            }
                        }
                    }
                    Err(Conn::End(code::NORMAL, reason))
                }
                other => other,
            };
            match outcome {
                Ok(()) => {}
                Err(Conn::Lost(why)) => {
                    // A version 1 client's connection is its session: it ends, and the stream
                    // is ended after the session has left the node (below).
                    if !self.resumable {
                        tracing::debug!(session = %SessionId(self.id), reason = %why, "session ended with its connection");
                        break (code::NORMAL, String::new());
                    }
                    stream = None;
                    if detached_at.is_none() {
                        tracing::debug!(session = %SessionId(self.id), reason = %why, "session detached; waiting for a resume");
                        detached_at = Some(Instant::now());
                        self.slot.set_detached(true);
                    }
                }
                Err(Conn::End(c, r)) => {
                    if let Some(s) = stream.as_mut()
                        && self.resumable
                        && c == code::NORMAL
                    {
                        let _ = write(s, Frame::Bye.encode(), self.config().write_timeout).await;
                    }
                    break (c, r);
                }
                // Turned into an end above.
                Err(Conn::GameGone | Conn::Stopped) => break (code::NORMAL, String::new()),
            }
        };
        // Ends the game's side: its recv sees the end, its sends fail.
        let _ = self.end.set((code, reason.clone()));
        drop(inbox);
        if self.resumable {
            self.sessions.forget(&self.id, code, &reason);
        }
        *self
            .sessions
            .counts
            .ended
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(code)
            .or_default() += 1;
        out.close();
        // Out of the node before the stream ends: whoever sees the end can count on the place.
        self.slot.release();
        let text = if reason.is_empty() {
            "session ended"
        } else {
            &reason
        };
        // Resumes that reached the session as it ended are told why, as later ones are.
        attach.close();
        while let Ok(a) = attach.try_recv() {
            refuse(a.frames, code, text).await;
        }
        match stream {
            Some(s) if self.resumable => refuse(s, code, text).await,
            // A version 1 client: a clean end, or a close frame with the game's own reason.
            Some(s) if code == code::NORMAL && reason.is_empty() => {
                let _ = tokio::time::timeout(Duration::from_secs(5), s.close()).await;
            }
            Some(s) => close_raw(s, &reason).await,
            None => {}
        }
        tracing::debug!(session = %SessionId(self.id), code, %reason, "session ended");
    }

    /// Brings the node's replay total in line with this session's buffer.
    fn sync_held(&mut self) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.replay.bytes();
        let total = &self.sessions.replay_total;
        if now > self.slot.held {
            total.fetch_add(now - self.slot.held, Relaxed);
        } else {
            total.fetch_sub(self.slot.held - now, Relaxed);
        }
        self.slot.held = now;
    }

    /// The greeting on a connection: what the server received, and a fresh token.
    async fn welcome(&mut self, s: &mut Frames) -> Result<(), Conn> {
        self.generation += 1;
        self.issued = Instant::now();
        let token = self.sessions.key.issue(
            self.id,
            self.sessions.me,
            self.generation,
            self.config().token_ttl,
        );
        self.receipts.told = self.receipts.received;
        let w = Frame::Welcome {
            received: self.receipts.received,
            token,
        };
        write(s, w.encode(), self.config().write_timeout).await
    }

    /// A client reattached, having received `received`: welcome it and send again what it
    /// missed.
    async fn reattach(&mut self, s: &mut Frames, received: u64) -> Result<(), Conn> {
        let again: Vec<Bytes> = match self.replay.after(received) {
            Ok(frames) => frames.cloned().collect(),
            Err(e) => {
                return Err(Conn::End(code::PROTOCOL, format!("cannot resume: {e}")));
            }
        };
        self.sync_held();
        self.welcome(s).await?;
        for f in again {
            write_data(s, &f, self.config().write_timeout).await?;
        }
        Ok(())
    }

    /// Handles a frame from the client; returns a payload for the game, if it carried one.
    async fn on_client_frame(
        &mut self,
        r: Result<Option<Bytes>, crate::FrameError>,
        ack_due: &mut Option<Instant>,
    ) -> Result<Option<Bytes>, Conn> {
        let frame = match r {
            Ok(Some(f)) => f,
            Ok(None) => return Err(Conn::Lost("the gateway ended the stream".into())),
            Err(e) => return Err(Conn::Lost(e.to_string())),
        };
        if frame.len() > self.config().max_frame + 1 {
            return Err(Conn::End(
                code::PROTOCOL,
                "frame over the session limit".into(),
            ));
        }
        if !self.resumable {
            return Ok(Some(frame));
        }
        match Frame::decode(frame) {
            Ok(Frame::Data(p)) => {
                // The ack is written by the loop (at once when due): a failing write never
                // takes the frame with it.
                // Due: it rides with the next frame to the client, or goes alone soon.
                if self.receipts.got() {
                    let ride = Instant::now() + clustergo_client::session::ACK_RIDE;
                    *ack_due = Some(ack_due.map_or(ride, |t| t.min(ride)));
                } else if ack_due.is_none() {
                    *ack_due = Some(Instant::now() + clustergo_client::session::ACK_DELAY);
                }
                Ok(Some(p))
            }
            Ok(Frame::Ack(n)) => {
                let r = self.replay.ack(n);
                self.sync_held();
                r.map(|()| None)
                    .map_err(|e| Conn::End(code::PROTOCOL, e.to_string()))
            }
            Ok(Frame::Bye) => Err(Conn::End(
                code::NORMAL,
                "the client ended the session".into(),
            )),
            Ok(Frame::Welcome { .. }) => {
                Err(Conn::End(code::PROTOCOL, "a client sent a welcome".into()))
            }
            Err(e) => Err(Conn::End(code::PROTOCOL, e.to_string())),
        }
    }

    async fn send_to_client(
        &mut self,
        frame: Bytes,
        stream: &mut Option<Frames>,
    ) -> Result<(), Conn> {
        if !self.resumable {
            return match stream.as_mut() {
                Some(s) => write(s, frame, self.config().write_timeout).await,
                None => Ok(()),
            };
        }
        let total = self
            .sessions
            .replay_total
            .load(std::sync::atomic::Ordering::Relaxed);
        if total + 1 + frame.len() > self.config().max_replay_total {
            tracing::warn!(session = %SessionId(self.id), total, max = self.config().max_replay_total, "session ended: the node's replay budget is full");
            return Err(Conn::End(code::REPLAY_FULL, "replay buffer full".into()));
        }
        // A copy is kept (see `Replay::keep`); the type byte is written with the frame.
        if let Err(full) = self.replay.keep(&frame) {
            tracing::warn!(session = %SessionId(self.id), error = %full, "session ended: replay buffer full");
            return Err(Conn::End(code::REPLAY_FULL, "replay buffer full".into()));
        }
        self.sync_held();
        match stream.as_mut() {
            Some(s) => {
                // An ack that is due rides with the frame (one write for both).
                if self.receipts.due()
                    && let Some(ack) = self.receipts.ack()
                {
                    s.buffer(&ack);
                }
                write_data(s, &frame, self.config().write_timeout).await
            }
            // Detached: kept for the resume.
            None => Ok(()),
        }
    }
}

/// Reads the current stream when `want`; never resolves while detached.
async fn recv_if(
    stream: &mut Option<Frames>,
    want: bool,
) -> Result<Option<Bytes>, crate::FrameError> {
    match stream.as_mut() {
        Some(s) if want => s.recv().await,
        _ => std::future::pending().await,
    }
}

/// Room in the game's inbox, then budget, for a frame that costs `cost.0` and is `cost.1`
/// bytes, when there is one (`None`: never resolves); `None` when the game is gone.
/// Cancel-safe (the loop makes it anew each turn; only this session waits on either).
async fn reserve<'a>(
    inbox: &'a Option<mpsc::Sender<Inbound>>,
    budget: &Arc<InboxBudget>,
    cost: Option<(u32, usize)>,
) -> Option<(mpsc::Permit<'a, Inbound>, Held)> {
    let Some((n, bytes)) = cost else {
        return std::future::pending().await;
    };
    let tx = inbox.as_ref()?;
    let permit = tx.reserve().await.ok()?;
    let held = budget.take(n, bytes).await?;
    Some((permit, held))
}

/// Hands `frame` (costing `n`) to the game if there is room and budget now; gives it back if
/// not (or if the game is gone: the waiting branch finds that out).
fn try_deliver(
    inbox: &Option<mpsc::Sender<Inbound>>,
    budget: &Arc<InboxBudget>,
    n: u32,
    frame: Bytes,
) -> Option<Bytes> {
    let Some(tx) = inbox else {
        return Some(frame);
    };
    let Ok(permit) = tx.try_reserve() else {
        return Some(frame);
    };
    let Some(held) = budget.try_take(n, frame.len()) else {
        return Some(frame);
    };
    permit.send(Inbound { frame, _held: held });
    None
}

/// A timer that is set, moved and cleared without a new timer entry each time.
struct Timer {
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    at: Option<Instant>,
}

impl Timer {
    fn new() -> Timer {
        Timer {
            sleep: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
            at: None,
        }
    }

    /// Fires at `at`; never, for `None`.
    fn set(&mut self, at: Option<Instant>) {
        if at != self.at {
            if let Some(t) = at {
                self.sleep.as_mut().reset(t);
            }
            self.at = at;
        }
    }

    /// Resolves when the deadline set passes; never while none is.
    async fn wait(&mut self) {
        match self.at {
            Some(_) => self.sleep.as_mut().await,
            None => std::future::pending().await,
        }
    }
}

/// Writes a data frame of `payload`, bounded by `limit`.
async fn write_data(s: &mut Frames, payload: &[u8], limit: Duration) -> Result<(), Conn> {
    bounded(
        s.send_tagged(clustergo_client::session::DATA, payload),
        limit,
    )
    .await
}

async fn write(s: &mut Frames, frame: Bytes, limit: Duration) -> Result<(), Conn> {
    bounded(s.send(frame), limit).await
}

/// A write that takes longer than `limit` counts as the connection's loss.
async fn bounded(
    sent: impl std::future::Future<Output = Result<(), crate::FrameError>>,
    limit: Duration,
) -> Result<(), Conn> {
    match tokio::time::timeout(limit, sent).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Conn::Lost(e.to_string())),
        Err(_) => Err(Conn::Lost(format!("a write waited {limit:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_check_out_only_when_issued_and_unexpired() {
        let key = TokenKey::from_secret(b"secret");
        let server: LogicAddr = "1.1.1".parse().unwrap();
        let t = key.issue([1; 16], server, 1, Duration::from_secs(60));
        assert_eq!(key.check(&t), Ok(()));
        let mut forged = t;
        forged.server += 1;
        assert_eq!(key.check(&forged), Err(TokenError::Forged));
        assert_eq!(
            TokenKey::from_secret(b"other").check(&t),
            Err(TokenError::Forged)
        );
        let mut old = key.issue([1; 16], server, 1, Duration::from_secs(60));
        old.expires = now_secs() - 1;
        old.mac = key.mac(&old);
        assert_eq!(key.check(&old), Err(TokenError::Expired));
        assert_eq!(
            unhex(&hex(&t.to_bytes())).as_deref(),
            Some(&t.to_bytes()[..])
        );
        assert_eq!(unhex("zz"), None);
    }
}
