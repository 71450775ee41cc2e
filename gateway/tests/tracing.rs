//! A client's session is one trace: the gateway's session span, and the game server's work
//! for the client as its child, exported by both processes to a real OTLP receiver.
//! (Its own test binary: it sets the environment of the processes the bed starts.)

mod bed;
#[path = "../../tests/support/otlp.rs"]
mod otlp;

use bed::{TEST_LIMITS, WAIT, bed};
use clustergo_client::Client;
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_session_and_the_game_servers_work_for_it_are_one_trace() {
    let (receiver, endpoint, otlp_task) = otlp::Receiver::start(bed::etcd_server::free_port());
    *bed::ENV.lock().unwrap() = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT".into(), endpoint),
        ("OTEL_BSP_SCHEDULE_DELAY".into(), "100".into()),
    ];
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let mut c = timeout(WAIT, Client::connect(&bed.gateway.url("tcp")))
        .await
        .unwrap()
        .unwrap();
    c.send("hello".to_owned()).await.unwrap();
    assert_eq!(
        &timeout(WAIT, c.recv()).await.unwrap().unwrap()[..],
        b"hello"
    );
    timeout(WAIT, c.close("done")).await.unwrap().unwrap();

    // Both processes export every 100 ms: wait for the session and the game server's
    // stream span under it.
    let found = receiver
        .wait_for(WAIT * 2, |got| {
            let session = got.iter().find(|(svc, s)| {
                svc == "gateway-1.100.1"
                    && s.name == "gateway.session"
                    && otlp::attr(s, "clustergo.end").is_some()
            });
            if let Some((_, session)) = session {
                let served = got.iter().find(|(svc, s)| {
                    svc == "game-server-1.1.1"
                        && s.name == "stream.accept"
                        && s.parent_span_id == session.span_id
                });
                if let Some((_, served)) = served {
                    return Some((session.clone(), served.clone()));
                }
            }
            None
        })
        .await;
    let Some((session, served)) = found else {
        let names: Vec<_> = receiver
            .spans()
            .iter()
            .map(|(svc, s)| format!("{svc}:{} end={:?}", s.name, otlp::attr(s, "clustergo.end")))
            .collect();
        panic!("no session with the game server's span under it among {names:#?}");
    };
    assert_eq!(served.trace_id, session.trace_id);
    assert_eq!(otlp::attr(&session, "clustergo.transport"), Some("tcp"));
    assert_eq!(otlp::attr(&session, "clustergo.server"), Some("1.1.1"));
    assert_eq!(otlp::attr(&session, "clustergo.end"), Some("client_left"));
    assert!(
        otlp::attr(&session, "client.address").is_some_and(|a| a.starts_with("127.0.0.1:")),
        "{session:?}"
    );
    assert_eq!(otlp::attr(&served, "clustergo.from"), Some("1.100.1"));
    otlp_task.abort();
}
