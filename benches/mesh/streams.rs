//! Stream modes of the mesh benchmark. The same client code drives a clustergo stream and a
//! raw TCP connection, so the two differ only in the transport.
//!
//! - `stream-pingpong-s1` / `-s100`: 64-byte write, wait for its echo; 1 or 100 streams
//!   (raw: 1 or 100 TCP connections). Round trips/s, p50/p99.
//! - `stream-pipe-s1` / `-s100`: 64-byte writes without waiting, echoed; writes/s counted from
//!   the echoes that come back.
//! - `stream-bulk`: one stream, 64 KiB writes to a sink; MB/s.

use super::*;
use clustergo::{NodeBuilder, StreamMeta};
use tokio::io::{AsyncRead, AsyncWrite};

/// Streams (and raw connections) of the `-s100` modes.
const MANY: usize = 100;
/// Write size of `stream-bulk`.
const BULK_WRITE: usize = 64 << 10;

/// Which peer-side behaviour a stream or raw connection asks for.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Echo every byte.
    Echo,
    /// Count bytes to EOF, then answer the count (`u64` big-endian).
    Sink,
}

impl Kind {
    fn raw_byte(self) -> u8 {
        match self {
            Kind::Echo => b'B',
            Kind::Sink => b'K',
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Echo => "echo",
            Kind::Sink => "sink",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Peer side

/// The peer's stream acceptor: echo or sink, as the opener's metadata asks.
pub(crate) fn serve(b: NodeBuilder) -> NodeBuilder {
    b.on_stream(|stream| async move {
        let sink = stream.metadata().get("kind") == Some("sink");
        let (r, w) = stream.into_split();
        let result = if sink {
            sink_bytes(r, w).await
        } else {
            echo_bytes(r, w).await
        };
        if let Err(e) = result {
            eprintln!("peer: stream: {e}");
        }
    })
}

async fn echo_bytes<R, W>(mut r: R, mut w: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
    }
}

async fn sink_bytes<R, W>(mut r: R, mut w: W) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; 64 << 10];
    let mut total = 0u64;
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        total += n as u64;
    }
    w.write_all(&total.to_be_bytes()).await?;
    w.shutdown().await
}

/// A raw connection whose kind byte is `B` (echo) or `K` (sink).
pub(crate) async fn raw_conn(
    kind: u8,
    r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
) -> std::io::Result<()> {
    if kind == b'B' {
        raw_echo(r, w).await
    } else {
        sink_bytes(r, w).await
    }
}

/// Echoes with the buffers of the framed raw server: flushes once nothing more is buffered,
/// so echoes go out in batches as they would from any sensible server.
async fn raw_echo(
    mut r: BufReader<tokio::net::tcp::OwnedReadHalf>,
    mut w: BufWriter<tokio::net::tcp::OwnedWriteHalf>,
) -> std::io::Result<()> {
    let mut buf = vec![0; 64 << 10];
    loop {
        let n = r.read(&mut buf).await?;
        if n == 0 {
            w.flush().await?;
            return w.shutdown().await;
        }
        w.write_all(&buf[..n]).await?;
        if r.buffer().is_empty() {
            w.flush().await?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Client side

type Halves = (
    Box<dyn AsyncRead + Unpin + Send>,
    Box<dyn AsyncWrite + Unpin + Send>,
);

/// Opens `n` channels of `kind` through the mesh (streams) or raw TCP (connections).
async fn open(
    target: &Target<'_>,
    kind: Kind,
    n: usize,
    pipelined: bool,
) -> Result<Vec<Halves>, String> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        match target {
            Target::Mesh(node, to) => {
                let s = node
                    .open_stream_with(*to, StreamMeta::new().with("kind", kind.name()))
                    .await
                    .map_err(|e| format!("open_stream: {e}"))?;
                let (r, w) = s.into_split();
                out.push((
                    Box::new(r) as Box<dyn AsyncRead + Unpin + Send>,
                    Box::new(w) as Box<dyn AsyncWrite + Unpin + Send>,
                ));
            }
            Target::Raw(addr) => {
                let s = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                let (r, mut w) = s.into_split();
                w.write_u8(kind.raw_byte())
                    .await
                    .map_err(|e| e.to_string())?;
                // Pipelined writers go through a buffer (as any raw sender would); ping-pong
                // writes one 64-byte write per round trip either way.
                let w: Box<dyn AsyncWrite + Unpin + Send> = if pipelined {
                    Box::new(BufWriter::with_capacity(64 << 10, w))
                } else {
                    Box::new(w)
                };
                out.push((Box::new(r) as Box<dyn AsyncRead + Unpin + Send>, w));
            }
        }
    }
    Ok(out)
}

/// Where a stream mode sends.
pub(crate) enum Target<'a> {
    Mesh(&'a Node, LogicAddr),
    Raw(SocketAddr),
}

/// Runs stream mode `name` against `target`.
pub(crate) async fn run(
    target: Target<'_>,
    name: &str,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    match name {
        "stream-pingpong-s1" => pingpong(&target, 1, warmup, measure).await,
        "stream-pingpong-s100" => pingpong(&target, MANY, warmup, measure).await,
        "stream-pipe-s1" => pipe(&target, 1, warmup, measure).await,
        "stream-pipe-s100" => pipe(&target, MANY, warmup, measure).await,
        "stream-bulk" => bulk(&target, warmup, measure).await,
        other => Err(format!("not a stream mode: {other}")),
    }
}

/// Closed-loop 64-byte echoes on each of `n` channels.
async fn pingpong(
    target: &Target<'_>,
    n: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let channels = open(target, Kind::Echo, n, false).await?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut tasks = Vec::with_capacity(n);
    for (mut r, mut w) in channels {
        tasks.push(tokio::spawn(async move {
            let io = |e: std::io::Error| e.to_string();
            let mut lat = latency_vec(measure, n);
            let mut back = [0u8; 64];
            loop {
                let t0 = Instant::now();
                if t0 >= end {
                    w.shutdown().await.map_err(io)?;
                    return Ok(lat);
                }
                w.write_all(&PAYLOAD).await.map_err(io)?;
                r.read_exact(&mut back).await.map_err(io)?;
                if back != PAYLOAD {
                    return Err("echo differs".to_string());
                }
                if t0 >= start {
                    lat.push(nanos(t0.elapsed()));
                }
            }
        }));
    }
    let all = join_latencies(tasks).await?;
    Ok(summarize(
        all,
        Instant::now().saturating_duration_since(start),
    ))
}

/// 64-byte writes as fast as each channel takes them, echoed; the rate of echoes that came back
/// after warm-up, up to the last one.
async fn pipe(
    target: &Target<'_>,
    n: usize,
    warmup: Duration,
    measure: Duration,
) -> Result<Measure, String> {
    let channels = open(target, Kind::Echo, n, true).await?;
    let start = Instant::now() + warmup;
    let end = start + measure;
    let mut readers = Vec::with_capacity(n);
    let mut writers = Vec::with_capacity(n);
    for (mut r, mut w) in channels {
        writers.push(tokio::spawn(async move {
            let mut writes = 0u64;
            loop {
                if writes % 32 == 0 && Instant::now() >= end {
                    w.shutdown().await?;
                    return Ok::<_, std::io::Error>(writes);
                }
                w.write_all(&PAYLOAD).await?;
                writes += 1;
            }
        }));
        readers.push(tokio::spawn(async move {
            let mut buf = vec![0u8; 64 << 10];
            // Bytes echoed before the measured window, all bytes, and when the last came.
            let (mut before, mut total, mut last) = (0u64, 0u64, Instant::now());
            loop {
                let k = r.read(&mut buf).await?;
                if k == 0 {
                    return Ok::<_, std::io::Error>((before, total, last));
                }
                total += k as u64;
                last = Instant::now();
                if last < start {
                    before += k as u64;
                }
            }
        }));
    }
    let mut written = 0;
    for t in writers {
        written += t
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let (mut echoed, mut total, mut last) = (0, 0, start);
    for t in readers {
        let (b, t, l) = t
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        echoed += t - b;
        total += t;
        last = last.max(l);
    }
    if total != written * PAYLOAD.len() as u64 {
        return Err(format!("{} bytes written, {total} echoed", written * 64));
    }
    // Writers stop at the end of the window; what they wrote is counted until its echo is
    // back, so a sender that buffers is not penalised for its last buffer.
    let ops = echoed / PAYLOAD.len() as u64;
    let elapsed = last.saturating_duration_since(start);
    Ok(Measure {
        ops,
        ops_per_sec: ops as f64 / elapsed.as_secs_f64().max(1e-9),
        p50_us: None,
        p99_us: None,
    })
}

/// 64 KiB writes to a sink on one channel; `ops_per_sec` is MB/s (10^6 bytes), timed from the
/// end of warm-up until the sink has counted everything.
async fn bulk(target: &Target<'_>, warmup: Duration, measure: Duration) -> Result<Measure, String> {
    let io = |e: std::io::Error| e.to_string();
    let (mut r, mut w) = open(target, Kind::Sink, 1, true)
        .await?
        .pop()
        .ok_or("no channel")?;
    let chunk = vec![0xa5u8; BULK_WRITE];
    let mut written = 0u64;
    let warm_end = Instant::now() + warmup;
    while Instant::now() < warm_end {
        w.write_all(&chunk).await.map_err(io)?;
        written += chunk.len() as u64;
    }
    let start = Instant::now();
    let end = start + measure;
    let mut measured = 0u64;
    while Instant::now() < end {
        w.write_all(&chunk).await.map_err(io)?;
        measured += chunk.len() as u64;
    }
    w.shutdown().await.map_err(io)?;
    let mut count = [0u8; 8];
    r.read_exact(&mut count).await.map_err(io)?;
    let elapsed = start.elapsed();
    let counted = u64::from_be_bytes(count);
    if counted != written + measured {
        return Err(format!(
            "{} bytes written, the sink counted {counted}",
            written + measured
        ));
    }
    Ok(Measure {
        ops: measured,
        ops_per_sec: measured as f64 / 1e6 / elapsed.as_secs_f64(),
        p50_us: None,
        p99_us: None,
    })
}
