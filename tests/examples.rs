//! The examples run and do what the README says (`cargo test` builds example targets).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod support;
use support::{Reap, example};

#[test]
fn quickstart_runs() {
    let out = Command::new(example("quickstart")).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "quickstart failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("reply from 1.2.1: \"hello, game server\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("callback reply: \"by callback\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("chat from 1.1.1: \"a chat line\""),
        "{stdout}"
    );
    assert!(
        stdout.contains("has no handler for method \"missing\""),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("quickstart: ok"), "{stdout}");
}

#[test]
fn echo_server_and_client_pair() {
    // Free ports for both nodes, written into a membership file of their own.
    let port = support::ports::free_port;
    let dir = std::env::temp_dir().join(format!("cg-echo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let members = dir.join("members.toml");
    std::fs::write(
        &members,
        format!(
            "[[member]]\naddr = \"1.1.1\"\nnet_addr = \"127.0.0.1:{}\"\n\n\
             [[member]]\naddr = \"1.2.1\"\nnet_addr = \"127.0.0.1:{}\"\n",
            port(),
            port()
        ),
    )
    .unwrap();

    let mut server = Reap(
        Command::new(example("echo_server"))
            .arg(&members)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    // Wait for the server's "listening" line (bounded: the process exits on any start error).
    let mut lines = BufReader::new(server.0.stdout.take().unwrap()).lines();
    let first = lines.next().expect("server printed nothing").unwrap();
    assert!(first.contains("echo server 1.2.1 listening on"), "{first}");
    // Keep draining the server's output so it never blocks on a full pipe.
    let collected = std::thread::spawn(move || lines.map_while(Result::ok).collect::<Vec<_>>());

    let started = Instant::now();
    let out = Command::new(example("echo_client"))
        .arg(&members)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "echo_client failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(stdout.contains("reply from 1.2.1: \"hello\""), "{stdout}");
    assert!(
        stdout.contains("callback reply: \"by callback\""),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("echo client: ok"), "{stdout}");

    drop(server);
    let server_out = collected.join().unwrap().join("\n");
    assert!(
        server_out.contains("echo from 1.1.1: \"one-way\""),
        "{server_out}"
    );
    assert!(
        server_out.contains("chat from player-7 (1.1.1): \"gg\""),
        "{server_out}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
