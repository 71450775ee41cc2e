//! [`SessionClient`]: a [`Client`] whose session survives a lost connection or a lost gateway.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::session::{
    ACK_DELAY, ACK_RIDE, DATA, Frame, Hello, Receipts, Replay, Token, close_reason, code,
    parse_close,
};
use crate::{Client, ClientConfig, ClientError};

/// Settings of a [`SessionClient`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct SessionClientConfig {
    /// The connection's settings.
    pub client: ClientConfig,
    /// Resume automatically when the connection is lost (default on). Off: a lost connection
    /// ends the session ([`SessionEvent::Ended`]).
    pub resume: bool,
    /// How long after losing its connection the client keeps trying to resume (default 60 s,
    /// the game server's default window).
    pub resume_window: Duration,
    /// Frames sent and not acknowledged, at most (default 4,096); past it, or
    /// [`SessionClientConfig::max_replay_bytes`], `send` fails and the session ends.
    pub max_replay_frames: usize,
    /// Bytes of those, at most (default 1 MiB).
    pub max_replay_bytes: usize,
    /// The first wait between resume attempts (default 100 ms), doubling to 2 s, with jitter.
    pub backoff: Duration,
}

impl Default for SessionClientConfig {
    /// Resume on, within 60 s; the connection sends a heartbeat after 2 s of silence and
    /// counts as lost after 6 s without a word (a session client notices a dead gateway, or a
    /// KCP path that went silent, within seconds: it has a session to resume); replay bound
    /// 4,096 frames / 1 MiB; backoff from 100 ms.
    fn default() -> Self {
        SessionClientConfig {
            client: ClientConfig::default()
                .heartbeat(Some(Duration::from_secs(2)))
                .idle_timeout(Some(Duration::from_secs(6))),
            resume: true,
            resume_window: Duration::from_secs(60),
            max_replay_frames: 4096,
            max_replay_bytes: 1 << 20,
            backoff: Duration::from_millis(100),
        }
    }
}

impl SessionClientConfig {
    /// Sets [`SessionClientConfig::resume`].
    pub fn resume(mut self, on: bool) -> Self {
        self.resume = on;
        self
    }
    /// Sets [`SessionClientConfig::resume_window`].
    pub fn resume_window(mut self, d: Duration) -> Self {
        self.resume_window = d;
        self
    }
    /// Sets [`SessionClientConfig::client`].
    pub fn client(mut self, c: ClientConfig) -> Self {
        self.client = c;
        self
    }
    /// Sets [`SessionClientConfig::max_replay_frames`] and
    /// [`SessionClientConfig::max_replay_bytes`].
    pub fn max_replay(mut self, frames: usize, bytes: usize) -> Self {
        self.max_replay_frames = frames;
        self.max_replay_bytes = bytes;
        self
    }
}

/// What [`SessionClient::recv`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SessionEvent {
    /// A frame from the game server.
    Frame(Bytes),
    /// The connection was lost; the client is resuming (frames sent meanwhile are kept).
    Disconnected {
        /// Why, as the gateway said it or as the connection failed.
        reason: String,
    },
    /// The session resumed on a new connection: `replayed` frames were sent again to the
    /// server, which sent again what this client missed (the next `Frame` events).
    Resumed {
        /// From losing the connection to the server's welcome on the new one.
        after: Duration,
        /// Frames this client sent again.
        replayed: usize,
        /// The address it resumed through.
        url: String,
    },
    /// The session is over; the client may start a new one. `code` is the stable code
    /// (`crate::session::code`), when the other side gave one.
    Ended {
        /// The code.
        code: Option<u16>,
        /// The public reason.
        reason: String,
    },
}

/// A session with the game server through the gateways at `urls`: frames both ways, in
/// order, each exactly once, across reconnections (to any of the `urls`, over any
/// transport) within the resume window.
///
/// ```no_run
/// # async fn run() -> Result<(), clustergo_client::ClientError> {
/// use clustergo_client::{SessionClient, SessionClientConfig, SessionEvent};
/// let urls = ["tcp://gw1:7000", "ws://gw2:7001/"];
/// let mut s = SessionClient::connect(&urls, b"account-42", SessionClientConfig::default()).await?;
/// s.send("hello").await?;
/// loop {
///     match s.recv().await? {
///         SessionEvent::Frame(f) => println!("{f:?}"),
///         SessionEvent::Disconnected { reason } => println!("lost: {reason}; resuming"),
///         SessionEvent::Resumed { after, .. } => println!("resumed after {after:?}"),
///         SessionEvent::Ended { reason, .. } => break println!("over: {reason}"),
///         _ => {}
///     }
/// }
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct SessionClient {
    urls: Vec<String>,
    next_url: usize,
    config: SessionClientConfig,
    conn: Option<Client>,
    token: Token,
    replay: Replay,
    receipts: Receipts,
    ack_due: Option<Instant>,
    /// Fires at `ack_due`: one timer entry, reset when the deadline moves.
    ack_timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    ack_armed: Option<Instant>,
    lost_at: Option<Instant>,
    events: VecDeque<SessionEvent>,
    ended: bool,
    /// A write is under way: still set at the next call, the call that made it was dropped
    /// in the middle, and what the connection carried is unknown.
    writing: bool,
}

impl SessionClient {
    /// Starts a new session through the first of `urls` that answers; `key` routes it (a
    /// sticky gateway picks the game server by it; may be empty).
    pub async fn connect(
        urls: &[&str],
        key: &[u8],
        config: SessionClientConfig,
    ) -> Result<SessionClient, ClientError> {
        let urls: Vec<String> = urls.iter().map(|u| (*u).to_owned()).collect();
        let mut last = None;
        for (i, url) in urls.iter().enumerate() {
            let hello = Hello::New {
                key: Bytes::copy_from_slice(key),
            };
            match Self::greet(url, &config.client, hello).await {
                Ok((conn, received, token)) => {
                    let mut s = SessionClient {
                        next_url: i,
                        urls,
                        conn: Some(conn),
                        token,
                        replay: Replay::new(config.max_replay_frames, config.max_replay_bytes),
                        receipts: Receipts::default(),
                        ack_due: None,
                        ack_timer: Box::pin(tokio::time::sleep(Duration::from_secs(86_400))),
                        ack_armed: None,
                        lost_at: None,
                        events: VecDeque::new(),
                        ended: false,
                        writing: false,
                        config,
                    };
                    if received != 0 {
                        return Err(s.protocol("a new session's welcome counts frames"));
                    }
                    s.receipts.told = 0;
                    return Ok(s);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or(ClientError::Url {
            url: String::new(),
            reason: "no gateway address".into(),
        }))
    }

    /// Connects to `url`, says `hello`, and reads the welcome: what the server received and
    /// the next token.
    async fn greet(
        url: &str,
        config: &ClientConfig,
        hello: Hello,
    ) -> Result<(Client, u64, Token), ClientError> {
        let mut conn = Client::connect_with(url, config.clone()).await?;
        // A refusal's code is the reason's first word on every transport (on WebSocket it is
        // also the close code): the caller gets it either way.
        let coded = |e: ClientError| match e {
            ClientError::Closed { reason, code } => ClientError::Closed {
                code: parse_close(&reason).0.or(code),
                reason,
            },
            other => other,
        };
        conn.send(hello.encode()).await.map_err(coded)?;
        let first = conn.recv().await.map_err(coded)?;
        match Frame::decode(first) {
            Ok(Frame::Welcome { received, token }) => Ok((conn, received, token)),
            _ => Err(ClientError::Closed {
                reason: close_reason(code::PROTOCOL, "expected the session's welcome"),
                code: Some(code::PROTOCOL),
            }),
        }
    }

    fn protocol(&mut self, what: &str) -> ClientError {
        self.ended = true;
        self.conn = None;
        ClientError::Closed {
            reason: close_reason(code::PROTOCOL, what),
            code: Some(code::PROTOCOL),
        }
    }

    /// The token the session would resume with.
    pub fn token(&self) -> Token {
        self.token
    }

    /// Whether a connection is up now.
    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    /// Frames sent and not acknowledged by the server yet.
    pub fn unacknowledged(&self) -> usize {
        self.replay.len()
    }

    /// Sends a frame: kept until the server acknowledges it, sent again after a resume.
    /// While the connection is down it is only kept (sent at the resume). Fails when the
    /// session ended or the replay buffer is full (which ends the session).
    ///
    /// Dropping the call while it writes (a `select!` that took another branch) loses
    /// nothing: the frame is kept, and the next call treats the connection, whose state is
    /// then unknown, as lost and resumes, so each side learns what the other received.
    pub async fn send(&mut self, frame: impl Into<Bytes>) -> Result<(), ClientError> {
        if self.ended {
            return Err(ClientError::Closed {
                reason: "the session ended".into(),
                code: None,
            });
        }
        let frame = frame.into();
        // One byte more on the wire: the connection's limit applies to that.
        let limit = self.config.client.max_frame.saturating_sub(1);
        if frame.len() > limit {
            return Err(ClientError::TooLarge {
                size: frame.len(),
                limit,
            });
        }
        // A copy is kept (see `Replay::keep`); the type byte is written with the frame.
        self.check_writes();
        if let Err(full) = self.replay.keep(&frame) {
            self.ended = true;
            self.conn = None;
            return Err(ClientError::Closed {
                reason: close_reason(code::REPLAY_FULL, &full.to_string()),
                code: Some(code::REPLAY_FULL),
            });
        }
        if let Some(conn) = self.conn.as_mut() {
            self.writing = true;
            // An ack that is due rides with the frame (one write for both on TCP, TLS and
            // KCP; on WebSocket two messages go out back to back).
            let ack = if self.receipts.due() {
                self.receipts.ack()
            } else {
                None
            };
            let sent = match ack {
                Some(ack) => match conn.buffer(ack).await {
                    Ok(()) => conn.send_tagged(DATA, &frame).await,
                    Err(e) => Err(e),
                },
                None => conn.send_tagged(DATA, &frame).await,
            };
            self.writing = false;
            if let Err(e) = sent {
                self.lost(e.to_string());
            } else if !self.receipts.owed() {
                self.ack_due = None;
            }
        }
        Ok(())
    }

    /// A write of an earlier call was cut short (the call was dropped): the connection is
    /// treated as lost.
    fn check_writes(&mut self) {
        if std::mem::take(&mut self.writing) {
            self.lost("a send was dropped in the middle of its write".into());
        }
    }

    fn lost(&mut self, reason: String) {
        if self.conn.take().is_some() {
            self.lost_at = Some(Instant::now());
            self.ack_due = None;
            self.events.push_back(SessionEvent::Disconnected { reason });
        }
    }

    /// Drops the connection and resumes through `url` (a transport switch, e.g. from
    /// `tcp://` to `ws://`); the next [`SessionClient::recv`] reports the resume.
    pub fn switch_to(&mut self, url: &str) {
        self.urls.insert(0, url.to_owned());
        self.next_url = 0;
        self.lost(format!("switching to {url}"));
    }

    /// The next event: a frame, a lost connection (then the client resumes by itself, within
    /// the window), a resume, or the end of the session. Acknowledges what arrived as it
    /// goes. After [`SessionEvent::Ended`], every call fails.
    pub async fn recv(&mut self) -> Result<SessionEvent, ClientError> {
        self.check_writes();
        loop {
            if let Some(ev) = self.events.pop_front() {
                if matches!(ev, SessionEvent::Ended { .. }) {
                    self.ended = true;
                    self.conn = None;
                }
                return Ok(ev);
            }
            if self.ended {
                return Err(ClientError::Closed {
                    reason: "the session ended".into(),
                    code: None,
                });
            }
            let Some(conn) = self.conn.as_mut() else {
                self.resume().await;
                continue;
            };
            if self.ack_due != self.ack_armed {
                if let Some(t) = self.ack_due {
                    self.ack_timer.as_mut().reset(t);
                }
                self.ack_armed = self.ack_due;
            }
            let got = tokio::select! {
                r = conn.recv() => r,
                () = self.ack_timer.as_mut(), if self.ack_armed.is_some() => {
                    self.ack_due = None;
                    self.send_ack().await;
                    continue;
                }
            };
            match got {
                Ok(bytes) => match Frame::decode(bytes) {
                    Ok(Frame::Data(p)) => {
                        // The ack goes out with the next frame sent, or from a later call
                        // (soon when due): returning the frame never waits on a write, so
                        // `recv` stays cancel-safe.
                        if self.receipts.got() {
                            let ride = Instant::now() + ACK_RIDE;
                            self.ack_due = Some(self.ack_due.map_or(ride, |t| t.min(ride)));
                        } else if self.ack_due.is_none() {
                            self.ack_due = Some(Instant::now() + ACK_DELAY);
                        }
                        return Ok(SessionEvent::Frame(p));
                    }
                    // A long-attached session's fresh token (and what the server received).
                    Ok(Frame::Welcome { received, token }) => {
                        if let Err(e) = self.replay.ack(received) {
                            return Err(self.protocol(&e.to_string()));
                        }
                        self.token = token;
                    }
                    Ok(Frame::Ack(n)) => {
                        if let Err(e) = self.replay.ack(n) {
                            return Err(self.protocol(&e.to_string()));
                        }
                    }
                    Ok(Frame::Bye) => self.events.push_back(SessionEvent::Ended {
                        code: Some(code::NORMAL),
                        reason: "the game server ended the session".into(),
                    }),
                    Err(_) => return Err(self.protocol("malformed session frame")),
                },
                Err(ClientError::Closed { reason, code: ws }) => {
                    let (c, text) = parse_close(&reason);
                    let c = c.or(ws);
                    match c {
                        Some(c) if code::resumable(c) && self.config.resume => self.lost(reason),
                        Some(c) => self.events.push_back(SessionEvent::Ended {
                            code: Some(c),
                            reason: text.to_owned(),
                        }),
                        // Closed without a code: the connection, not the session, ended.
                        None if self.config.resume => self.lost(reason),
                        None => self
                            .events
                            .push_back(SessionEvent::Ended { code: None, reason }),
                    }
                }
                Err(e) if self.config.resume => self.lost(e.to_string()),
                Err(e) => self.events.push_back(SessionEvent::Ended {
                    code: None,
                    reason: e.to_string(),
                }),
            }
        }
    }

    async fn send_ack(&mut self) {
        if let (Some(conn), Some(ack)) = (self.conn.as_mut(), self.receipts.ack()) {
            self.writing = true;
            let sent = conn.send(ack).await;
            self.writing = false;
            if let Err(e) = sent {
                self.lost(e.to_string());
            }
        }
    }

    /// Tries to resume, with backoff, until the window passes: queues `Resumed`, or `Ended`.
    async fn resume(&mut self) {
        let lost_at = *self.lost_at.get_or_insert_with(Instant::now);
        if !self.config.resume {
            return self.events.push_back(SessionEvent::Ended {
                code: None,
                reason: "connection lost (resume is off)".into(),
            });
        }
        let end = lost_at + self.config.resume_window;
        let mut wait = self.config.backoff;
        let mut last = String::from("no gateway answered");
        while Instant::now() < end {
            let url = self.urls[self.next_url % self.urls.len()].clone();
            self.next_url += 1;
            let hello = Hello::Resume {
                token: self.token,
                received: self.receipts.received,
            };
            let attempt =
                tokio::time::timeout_at(end, Self::greet(&url, &self.config.client, hello)).await;
            match attempt {
                Ok(Ok((mut conn, received, token))) => {
                    let again: Vec<Bytes> = match self.replay.after(received) {
                        Ok(frames) => frames.cloned().collect(),
                        Err(e) => {
                            let reason = format!("cannot resume: {e}");
                            return self.events.push_back(SessionEvent::Ended {
                                code: Some(code::PROTOCOL),
                                reason,
                            });
                        }
                    };
                    let mut ok = true;
                    for f in &again {
                        if let Err(e) = conn.send_tagged(DATA, f).await {
                            last = e.to_string();
                            ok = false;
                            break;
                        }
                    }
                    if ok {
                        self.token = token;
                        self.receipts.told = self.receipts.received;
                        self.conn = Some(conn);
                        self.lost_at = None;
                        return self.events.push_back(SessionEvent::Resumed {
                            after: lost_at.elapsed(),
                            replayed: again.len(),
                            url,
                        });
                    }
                }
                Ok(Err(ClientError::Closed { reason, code: ws })) => {
                    let (c, text) = parse_close(&reason);
                    match c.or(ws) {
                        // The session cannot come back: say why.
                        Some(c) if !code::resumable(c) && c != code::TRY_AGAIN => {
                            return self.events.push_back(SessionEvent::Ended {
                                code: Some(c),
                                reason: text.to_owned(),
                            });
                        }
                        _ => last = reason,
                    }
                }
                Ok(Err(e)) => last = e.to_string(),
                Err(_) => break,
            }
            // Up to half the wait again, so clients a gateway dropped together spread out.
            let jitter = Duration::from_millis(random() % (wait.as_millis() as u64 / 2 + 1));
            tokio::time::sleep_until((Instant::now() + wait + jitter).min(end)).await;
            wait = (wait * 2).min(Duration::from_secs(2));
        }
        self.events.push_back(SessionEvent::Ended {
            code: Some(code::NO_SESSION),
            reason: format!(
                "could not resume within {:?}: {last}",
                self.config.resume_window
            ),
        });
    }

    /// Ends the session by choice: the server is told (a bye), then the connection closes.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.ended = true;
        match self.conn.take() {
            Some(mut conn) => {
                conn.send(Frame::Bye.encode()).await?;
                conn.close("bye").await
            }
            None => Ok(()),
        }
    }
}

/// A random number (the standard library's per-map random keys).
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A `send` dropped while its write waits (the server stopped reading, the socket's
    /// buffers are full) loses nothing: the next call treats the connection as lost, so the
    /// session resumes and each side learns what the other got, instead of writing on after
    /// half a frame.
    #[tokio::test]
    async fn a_send_dropped_mid_write_makes_the_connection_count_as_lost() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("tcp://{}", listener.local_addr().unwrap());
        // A server that welcomes the session, then never reads again.
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 4];
            sock.read_exact(&mut hello).await.unwrap();
            let mut rest = vec![0u8; u32::from_be_bytes(hello) as usize];
            sock.read_exact(&mut rest).await.unwrap();
            let token = Token {
                id: [1; 16],
                server: 0x0101_0001,
                generation: 1,
                expires: u64::MAX,
                mac: [0; 16],
            };
            let mut out = bytes::BytesMut::new();
            crate::wire::put_frame(&mut out, &Frame::Welcome { received: 0, token }.encode());
            sock.write_all(&out).await.unwrap();
            std::future::pending::<()>().await;
            drop(sock);
        });
        let config = SessionClientConfig {
            max_replay_frames: 1 << 20,
            max_replay_bytes: 1 << 30,
            ..SessionClientConfig::default()
        };
        let mut s = SessionClient::connect(&[&url], b"", config).await.unwrap();
        let frame = Bytes::from(vec![7u8; 60_000]);
        let mut cut = false;
        for _ in 0..10_000 {
            if tokio::time::timeout(Duration::from_millis(100), s.send(frame.clone()))
                .await
                .is_err()
            {
                cut = true;
                break;
            }
        }
        assert!(cut, "the socket's buffers never filled");
        let sent = s.unacknowledged();
        match tokio::time::timeout(Duration::from_secs(5), s.recv()).await {
            Ok(Ok(SessionEvent::Disconnected { reason })) => {
                assert!(reason.contains("dropped in the middle"), "{reason}")
            }
            other => panic!("{other:?}"),
        }
        // The frame of the dropped call is kept, to be sent again at the resume.
        assert_eq!(s.unacknowledged(), sent);
        server.abort();
    }
}
