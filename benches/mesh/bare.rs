//! The transport's floor: the work of a mode done by tonic alone, over one long-lived
//! bidi-streaming gRPC call between the same two processes, with nothing of the framework in
//! between (no links, envelopes, batches, routing, pending map). Each mode then reads against
//! raw TCP (the physical limit) and against this (the transport) in one run.
//!
//! - `rpc-c1` and `stream-pingpong-s1`: one caller sends 64 bytes and awaits the answer
//!   itself; the peer answers through its response stream (the request stream, echoed as it
//!   is read). `stream-pingpong-s100`: 100 such calls on one connection.
//! - `stream-pipe-s1` / `-s100`: 64-byte messages on 1 or 100 calls without waiting, counted
//!   from their echoes; `stream-bulk`: 64 KiB messages to the sink on one call, MB/s.
//! - `rpc-c128`: 128 callers share the one call; the peer answers in order, so a reader hands
//!   each answer to the oldest waiting caller.
//! - `msg`: 64-byte messages on a call of their own, counted by the peer as the raw baseline's
//!   sink counts them (`R` resets, `Q` asks for the counts, answered on the response stream).
//!
//! The harbor mode has no bare row (bare tonic has no harbors); its raw row is direct.

use std::collections::VecDeque;
use std::sync::Mutex;

use futures_util::StreamExt;
use tonic::codegen::http;

use super::*;

const ECHO: &str = "/clustergo.bench.Bare/Echo";
const SINK: &str = "/clustergo.bench.Bare/Sink";
type Codec = tonic_prost::ProstCodec<Bytes, Bytes>;
type BoxStream = std::pin::Pin<
    Box<dyn futures_util::Stream<Item = Result<Bytes, tonic::Status>> + Send + 'static>,
>;

/// Whether `mode` has a bare row: all but the harbor mode (bare tonic has no harbors).
pub(crate) fn covers(mode: &str) -> bool {
    MODES.contains(&mode) && mode != "rpc-c128-harbor"
}

/// Mode `name` over one bare call to the peer's bare server at `to`; `None` if it has no bare
/// row.
pub(crate) async fn run(
    name: &str,
    to: SocketAddr,
    warmup: Duration,
    measure: Duration,
) -> Option<Result<Measure, String>> {
    if !covers(name) {
        return None;
    }
    Some(match name {
        "rpc-c128" => rpc_concurrent(to, CONCURRENCY, warmup, measure).await,
        "msg" => msg(to, warmup, measure).await,
        "stream-pingpong-s100" => pingpong(to, 100, warmup, measure).await,
        "stream-pipe-s1" => pipe(to, 1, warmup, measure).await,
        "stream-pipe-s100" => pipe(to, 100, warmup, measure).await,
        "stream-bulk" => bulk(to, warmup, measure).await,
        _ => rpc_c1(to, warmup, measure).await,
    })
}

/// The peer's service: `Echo` and `Sink`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Service;

impl tonic::server::NamedService for Service {
    const NAME: &'static str = "clustergo.bench.Bare";
}

/// One of the two calls.
#[derive(Debug, Clone, Copy)]
struct Call {
    sink: bool,
}

impl tonic::server::StreamingService<Bytes> for Call {
    type Response = Bytes;
    type ResponseStream = BoxStream;
    type Future = std::future::Ready<Result<tonic::Response<Self::ResponseStream>, tonic::Status>>;

    fn call(&mut self, request: tonic::Request<tonic::Streaming<Bytes>>) -> Self::Future {
        let inbound = request.into_inner();
        let out: BoxStream = if self.sink {
            let state = (inbound, SinkStats::new());
            Box::pin(futures_util::stream::unfold(
                state,
                |(mut inbound, sink)| async move {
                    loop {
                        match inbound.message().await {
                            Ok(Some(m)) if &m[..] == b"R" => sink.reset(),
                            Ok(Some(m)) if &m[..] == b"Q" => {
                                let stats = Bytes::copy_from_slice(&sink.encode());
                                return Some((Ok(stats), (inbound, sink)));
                            }
                            Ok(Some(_)) => sink.hit(),
                            Ok(None) => return None,
                            Err(e) => return Some((Err(e), (inbound, sink))),
                        }
                    }
                },
            ))
        } else {
            Box::pin(inbound)
        };
        std::future::ready(Ok(tonic::Response::new(out)))
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for Service
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = match req.uri().path() {
            ECHO => Call { sink: false },
            SINK => Call { sink: true },
            _ => {
                return Box::pin(async {
                    Ok(tonic::Status::unimplemented("no such call").into_http())
                });
            }
        };
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(Codec::default());
            Ok(grpc.streaming(call, req).await)
        })
    }
}

/// Serves the bare calls on `listener` until the process ends.
pub(crate) fn serve(listener: tokio::net::TcpListener) {
    tokio::spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        if let Err(e) = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .add_service(Service)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("peer: bare tonic server: {e}");
        }
    });
}

/// A connection to the peer's bare server at `to`.
async fn connect(to: SocketAddr) -> Result<tonic::transport::Channel, String> {
    tonic::transport::Endpoint::from_shared(format!("http://{to}"))
        .map_err(|e| e.to_string())?
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))
}

/// One call on `channel`: the sender of its requests and the stream of its answers.
async fn call(
    channel: tonic::transport::Channel,
    path: &'static str,
) -> Result<(mpsc::Sender<Bytes>, tonic::Streaming<Bytes>), String> {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| format!("ready: {e}"))?;
    let (tx, rx) = mpsc::channel::<Bytes>(CONCURRENCY * 2);
    let requests = tokio_stream::wrappers::ReceiverStream::new(rx);
    let answers = grpc
        .streaming(
            tonic::Request::new(requests),
            http::uri::PathAndQuery::from_static(path),
            Codec::default(),
        )
        .await
        .map_err(|e| format!("call: {e}"))?
        .into_inner();
    Ok((tx, answers))
}

/// Sends `payload` on a call until `end` (the clock read every 32 sends); how many it sent.
async fn send_until(tx: &mpsc::Sender<Bytes>, payload: Bytes, end: Instant) -> Result<u64, String> {
    let mut sent = 0u64;
    loop {
        if sent % 32 == 0 && Instant::now() >= end {
            return Ok(sent);
        }
        tx.send(payload.clone())
            .await
            .map_err(|_| "the call ended".to_string())?;
        sent += 1;
    }
}

/// One call on a connection of its own.
async fn open(
    to: SocketAddr,
    path: &'static str,
) -> Result<(mpsc::Sender<Bytes>, tonic::Streaming<Bytes>), String> {
    call(connect(to).await?, path).await
}

/// `rpc-c1` / `stream-pingpong-s1`: one caller, one message in flight.
async fn rpc_c1(to: SocketAddr, warmup: Duration, measure: Duration) -> Result<Measure, String> {
    pingpong(to, 1, warmup, measure).await
}

/// `n` calls on one connection (HTTP/2 streams, as the framework's streams share its link),
/// each with one message in flight, its caller awaiting each answer.
async fn pingpong(
    to: SocketAddr,
    n: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let channel = connect(to).await?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, mut answers) = call(channel.clone(), ECHO).await?;
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from_static(&PAYLOAD);
            let mut lat = latency_vec(measure, n);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return Ok::<_, String>(lat);
                }
                tx.send(payload.clone())
                    .await
                    .map_err(|_| "the call ended".to_string())?;
                match answers.message().await {
                    Ok(Some(a)) if a.len() == PAYLOAD.len() => {}
                    other => return Err(format!("bad echo: {other:?}")),
                }
                if t0 >= start {
                    lat.push(nanos(t0.elapsed()));
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    Ok(summarize(
        all,
        Instant::now().saturating_duration_since(start),
    ))
}

/// `stream-pipe-s1` / `-s100`: on each of `n` calls, 64-byte messages without waiting; counted
/// from the echoes that come back, as the raw and framework rows count.
async fn pipe(
    to: SocketAddr,
    n: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let channel = connect(to).await?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut writers = Vec::with_capacity(n);
    let mut readers = Vec::with_capacity(n);
    for _ in 0..n {
        let (tx, mut answers) = call(channel.clone(), ECHO).await?;
        // Dropping the sender at the end ends the call's request side.
        writers.push(tokio::spawn(async move {
            send_until(&tx, Bytes::from_static(&PAYLOAD), end).await
        }));
        readers.push(tokio::spawn(async move {
            // Echoes before the measured window, all echoes, and when the last came.
            let (mut before, mut total, mut last) = (0u64, 0u64, Instant::now());
            while let Some(m) = answers.message().await.map_err(|e| e.to_string())? {
                if m.len() != PAYLOAD.len() {
                    return Err(format!("an echo of {} bytes", m.len()));
                }
                total += 1;
                last = Instant::now();
                if last < start {
                    before += 1;
                }
            }
            Ok::<_, String>((before, total, last))
        }));
    }
    let mut written = 0;
    for t in writers {
        written += t.await.map_err(|e| e.to_string())??;
    }
    let (mut echoed, mut total, mut last) = (0, 0, start);
    for t in readers {
        let (b, t, l) = t.await.map_err(|e| e.to_string())??;
        echoed += t - b;
        total += t;
        last = last.max(l);
    }
    if total != written {
        return Err(format!("{written} messages written, {total} echoed"));
    }
    let elapsed = last.saturating_duration_since(start);
    Ok(Measure {
        ops: echoed,
        ops_per_sec: echoed as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: None,
        p99_us: None,
    })
}

/// `stream-bulk`: 64 KiB messages to the sink on one call; `ops_per_sec` is MB/s (10^6
/// bytes), from the end of warm-up until the sink has answered its count.
async fn bulk(to: SocketAddr, warmup: Duration, measure: Duration) -> Result<Measure, String> {
    const WRITE: usize = 64 << 10;
    let (tx, mut answers) = open(to, SINK).await?;
    let chunk = Bytes::from(vec![0xa5u8; WRITE]);
    let closed = |_| "the call ended".to_string();
    send_until(&tx, chunk.clone(), Instant::now() + warmup).await?;
    tx.send(Bytes::from_static(b"R")).await.map_err(closed)?;
    let start = Instant::now();
    let sent = send_until(&tx, chunk, start + measure).await?;
    tx.send(Bytes::from_static(b"Q")).await.map_err(closed)?;
    let stats = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .map_err(|_| "sink count timed out".to_string())?
        .ok_or("the call ended")?
        .map_err(|e| e.to_string())?;
    let elapsed = start.elapsed();
    let counted = receiver_measure(&stats)?.ops;
    if counted != sent {
        return Err(format!("{sent} writes sent, the sink counted {counted}"));
    }
    let bytes = sent * WRITE as u64;
    Ok(Measure {
        ops: bytes,
        ops_per_sec: bytes as f64 / 1e6 / elapsed.as_secs_f64(),
        p50_us: None,
        p99_us: None,
    })
}

/// `rpc-c128`: `callers` callers on one call; answers handed out in order.
async fn rpc_concurrent(
    to: SocketAddr,
    callers: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let (tx, mut answers) = open(to, ECHO).await?;
    // Waiting callers, oldest first; a caller queues itself and sends under the lock, so the
    // queue's order is the order of the requests on the call.
    let waiting: Arc<Mutex<VecDeque<tokio::sync::oneshot::Sender<()>>>> = Default::default();
    let reader = {
        let waiting = waiting.clone();
        tokio::spawn(async move {
            while let Ok(Some(_)) = answers.message().await {
                let next = waiting.lock().expect("not poisoned").pop_front();
                match next {
                    Some(w) => {
                        let _ = w.send(());
                    }
                    None => return Err("an answer nobody waited for".to_string()),
                }
            }
            Ok(())
        })
    };
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::with_capacity(callers);
    for _ in 0..callers {
        let (tx, waiting) = (tx.clone(), waiting.clone());
        tasks.push(tokio::spawn(async move {
            let payload = Bytes::from_static(&PAYLOAD);
            let mut lat = latency_vec(measure, callers);
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    return Ok::<_, String>(lat);
                }
                let (done, answered) = tokio::sync::oneshot::channel();
                let sent = {
                    let mut queue = waiting.lock().expect("not poisoned");
                    queue.push_back(done);
                    tx.try_send(payload.clone())
                };
                match sent {
                    Ok(()) => {}
                    // The queue holds twice the callers, each with one request at most.
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        return Err("the request queue was full".into());
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => {
                        return Err("the call ended".into());
                    }
                }
                answered.await.map_err(|_| "no answer".to_string())?;
                if t0 >= start {
                    lat.push(nanos(t0.elapsed()));
                }
            }
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())??);
    }
    drop(tx);
    reader.abort();
    Ok(summarize(
        all,
        Instant::now().saturating_duration_since(start),
    ))
}

/// `msg`: one-way messages, counted by the peer.
async fn msg(to: SocketAddr, warmup: Duration, measure: Duration) -> Result<Measure, String> {
    let (tx, mut answers) = open(to, SINK).await?;
    let payload = Bytes::from_static(&PAYLOAD);
    send_until(&tx, payload.clone(), Instant::now() + warmup).await?;
    let closed = |_| "the call ended".to_string();
    tx.send(Bytes::from_static(b"R")).await.map_err(closed)?;
    let sent = send_until(&tx, payload, Instant::now() + measure).await?;
    tx.send(Bytes::from_static(b"Q")).await.map_err(closed)?;
    let stats = tokio::time::timeout(Duration::from_secs(10), answers.next())
        .await
        .map_err(|_| "sink stats timed out".to_string())?
        .ok_or("the call ended")?
        .map_err(|e| e.to_string())?;
    let m = receiver_measure(&stats)?;
    if m.ops != sent {
        return Err(format!("bare msg: {sent} sent, {} received", m.ops));
    }
    Ok(m)
}
