//! A rolling restart without loss, with real processes: every game server in turn drains
//! (SIGTERM), stops and starts again, while 100 clients echo through the gateway and another
//! node calls the game servers continuously.

mod bed;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bed::*;
use bytes::Bytes;
use clustergo::{EtcdDiscovery, EtcdOptions, Member, Node, NodeConfig};
use clustergo_client::{Client, ClientError};
use tokio::sync::Mutex;

/// What one client saw.
#[derive(Debug, Default)]
struct Seen {
    echoed: u64,
    /// Closes with a reason (the client was told), by reason.
    moved: Vec<String>,
    /// Anything else: a frame lost without a word, a wrong echo, a failed reconnect.
    faults: Vec<String>,
}

async fn client_loop(url: String, id: usize, stop: Arc<AtomicBool>, seen: Arc<Mutex<Seen>>) {
    let mut seq = 0u64;
    'connect: while !stop.load(Ordering::Relaxed) {
        let mut c = match tokio::time::timeout(WAIT, Client::connect(&url)).await {
            Ok(Ok(c)) => c,
            other => {
                seen.lock().await.faults.push(format!("connect: {other:?}"));
                return;
            }
        };
        while !stop.load(Ordering::Relaxed) {
            seq += 1;
            let frame = format!("c{id}-{seq}");
            if let Err(e) = c.send(Bytes::from(frame.clone())).await {
                // A send cannot carry the close; the next receive does.
                let _ = e;
            }
            match tokio::time::timeout(WAIT, c.recv()).await {
                Ok(Ok(echo)) if echo == frame.as_bytes() => seen.lock().await.echoed += 1,
                Ok(Ok(other)) => {
                    let other = String::from_utf8_lossy(&other).into_owned();
                    seen.lock()
                        .await
                        .faults
                        .push(format!("sent {frame}, got {other}"));
                    return;
                }
                // Told why, before its frame was dropped: reconnect, as a game client does.
                Ok(Err(ClientError::Closed { reason, .. })) => {
                    seen.lock().await.moved.push(reason);
                    continue 'connect;
                }
                Ok(Err(e)) => {
                    seen.lock().await.faults.push(format!("{frame}: {e}"));
                    return;
                }
                Err(_) => {
                    seen.lock()
                        .await
                        .faults
                        .push(format!("{frame}: no answer within {WAIT:?}"));
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = c.close("done").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_fails_no_call_and_loses_no_client_frame_silently() {
    let servers = ["1.1.1", "1.1.2"];
    // All 100 clients come from 127.0.0.1 and the moved ones reconnect at once: the per-source
    // handshake cap (which stops one address from filling the gateway) is lifted for them, as
    // if they came from many addresses, as players do.
    let limits = format!("{TEST_LIMITS}max_handshakes_per_source = 1000\n");
    // The calling node, listed like the others from the start (listed after the game servers
    // started, its first link could reach a server whose view had not caught up, and be
    // refused as no member).
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let caller_addr = a("1.50.1");
    let caller_member = Member::new(caller_addr, listener.local_addr().unwrap().to_string());
    let mut bed = bed_listing(&servers, &limits, "", "", &[caller_member]).await;
    let caller = Node::builder(caller_addr)
        .discovery(EtcdDiscovery::connect(
            [bed.etcd.endpoint.clone()],
            PREFIX,
            EtcdOptions::default().lease_ttl(Duration::from_secs(2)),
        ))
        .listener(listener)
        .config(NodeConfig::default().secret(SECRET))
        .build();
    caller.start().await.unwrap();
    for s in servers {
        assert!(
            caller
                .wait_for_member(a(s), |m| m.is_some_and(|m| m.available), WAIT)
                .await
        );
    }

    let stop = Arc::new(AtomicBool::new(false));
    // Calls: one after another, each to a game server picked by type, each with a deadline.
    let calls_ok = Arc::new(AtomicU64::new(0));
    let call_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let calling = {
        let (caller, stop, ok, failures) = (
            caller.clone(),
            stop.clone(),
            calls_ok.clone(),
            call_failures.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let result = match caller.get_addr_by_type(1) {
                    Ok(to) => caller
                        .call_timeout(to, "game.whoami", Bytes::new(), Duration::from_secs(5))
                        .await
                        .map_err(|e| format!("call to {to}: {e}")),
                    Err(e) => Err(format!("no game server to pick: {e}")),
                };
                match result {
                    Ok(_) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => failures.lock().await.push(e),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        })
    };
    // 100 clients echoing through the gateway.
    let url = bed.gateway.url("tcp");
    let seen: Vec<Arc<Mutex<Seen>>> = (0..100).map(|_| Arc::default()).collect();
    let clients: Vec<_> = seen
        .iter()
        .enumerate()
        .map(|(i, s)| tokio::spawn(client_loop(url.clone(), i, stop.clone(), s.clone())))
        .collect();
    // Everyone is under way before the first restart.
    let warm = async {
        for s in &seen {
            while s.lock().await.echoed == 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    tokio::time::timeout(WAIT, warm)
        .await
        .expect("clients did not start echoing");

    // The rolling restart: each server drains on SIGTERM, stops, and starts again.
    for (i, s) in servers.iter().enumerate() {
        bed.servers[i].terminate();
        let exit = tokio::time::timeout(WAIT, async {
            loop {
                if let Some(status) = bed.servers[i].child.try_wait().unwrap() {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("the game server did not stop within the wait");
        assert!(exit.success(), "{s} exited {exit}");
        // It reads the new process's first line: off the runtime's worker.
        bed.servers[i] = tokio::task::block_in_place(|| game_server(&bed.etcd, s));
        assert!(
            caller
                .wait_for_member(a(s), |m| m.is_some_and(|m| m.available), WAIT)
                .await,
            "{s} did not come back"
        );
    }
    // Traffic goes on for a moment on the restarted servers, then everything stops.
    let before = calls_ok.load(Ordering::Relaxed);
    tokio::time::timeout(WAIT, async {
        while calls_ok.load(Ordering::Relaxed) < before + 100 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("calls did not go on after the restart");
    stop.store(true, Ordering::Relaxed);
    calling.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }

    let failures = call_failures.lock().await;
    let calls = calls_ok.load(Ordering::Relaxed);
    eprintln!("calls: {calls} answered, {} failed", failures.len());
    assert!(
        failures.is_empty(),
        "failed calls: {:?}",
        &failures[..failures.len().min(10)]
    );
    let mut moved = 0usize;
    let mut echoed = 0;
    for (i, s) in seen.iter().enumerate() {
        let s = s.lock().await;
        assert!(s.faults.is_empty(), "client {i}: {:?}", s.faults);
        for reason in &s.moved {
            assert!(
                reason.contains("is leaving: reconnect"),
                "client {i} was closed for another reason: {reason}"
            );
        }
        moved += s.moved.len();
        echoed += s.echoed;
    }
    eprintln!("clients: {echoed} frames echoed, {moved} moves to another server");
    // Each server held clients when it left: they were told and moved.
    for s in servers {
        let mut told = 0;
        for c in &seen {
            told += c
                .lock()
                .await
                .moved
                .iter()
                .filter(|r| r.contains(&format!("game server {s} is leaving")))
                .count();
        }
        assert!(told > 0, "no client of {s} was told it moved");
    }
    caller.shutdown().await;
}
