//! A real browser against the gateway: Debian's headless Chromium opens the example web client
//! (`examples/browser/index.html`) as a `file://` page, which connects to the gateway's
//! WebSocket listener and sends a frame; and the session page (`examples/browser/session.html`,
//! served over loopback HTTP with the browser session client) across a gateway's SIGKILL. The test drives the page over the DevTools protocol
//! (a WebSocket carrying JSON), so it needs no Node.js or browser-automation package.

mod bed;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Duration;

use bed::{TEST_LIMITS, TempDir, WAIT, bed};
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The page's heartbeat interval for this test, well under `idle_timeout_ms` of [`TEST_LIMITS`]
/// (3 s), so that heartbeats alone keep the page's session open.
const HEARTBEAT_MS: u64 = 1000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_page_gets_its_echo_keeps_alive_and_sees_the_kick() {
    // Installing Chromium may take a minute; it is not part of the bounded waits.
    let chromium = chromium();
    let bed = bed(&["1.1.1"], TEST_LIMITS).await;
    let url = page_url(&bed.gateway.url("ws"));
    timeout(WAIT, async {
        let mut browser = Browser::launch(&chromium, &url);
        let mut page = browser.open_page().await;

        // The page connected and sent its frame on load; its first echo is the frame.
        let shown = page
            .eval(
                r#"(async () => {
                    // The inline script runs before DOMContentLoaded.
                    if (document.readyState === "loading") {
                        await new Promise((ok) => addEventListener("DOMContentLoaded", ok));
                    }
                    const first = await window.firstEcho;
                    return {
                        first,
                        echo: document.getElementById("echo").textContent,
                        status: document.getElementById("status").textContent,
                    };
                })()"#,
            )
            .await;
        assert_eq!(shown["first"], "hello from the browser", "{shown}");
        assert_eq!(shown["echo"], "hello from the browser", "{shown}");
        let status = shown["status"].as_str().unwrap();
        assert!(
            status.contains("open") && status.contains("connected"),
            "{status}"
        );
        if let Some(path) = std::env::var_os("BROWSER_SCREENSHOT") {
            let shot = page
                .call("Page.captureScreenshot", json!({ "format": "png" }))
                .await;
            let png = base64(shot["data"].as_str().unwrap());
            assert!(png.starts_with(b"\x89PNG"), "not a PNG");
            std::fs::write(&path, png).unwrap();
            println!("screenshot written to {}", Path::new(&path).display());
        }

        // Heartbeats (empty binary messages) are answered, and they keep the session open
        // past the gateway's idle timeout although no data frame is sent.
        let answers = page
            .eval(
                r#"new Promise((ok, fail) => {
                    const socket = window.gatewaySocket;
                    let answers = 0;
                    socket.addEventListener("message", (e) => {
                        if (e.data.byteLength === 0 && ++answers === 4) ok(answers);
                    });
                    socket.addEventListener("close", (e) =>
                        fail(new Error(`closed: code ${e.code}, reason "${e.reason}"`)));
                })"#,
            )
            .await;
        assert_eq!(answers, 4);

        // The game server kicks the client: the page sees a clean close with the reason.
        let closed = page
            .eval(
                r#"new Promise((ok) => {
                    const socket = window.gatewaySocket;
                    const sent = performance.now();
                    socket.addEventListener("close", (e) => {
                        const afterMs = performance.now() - sent;
                        // Let the page's own close listener update #status first.
                        setTimeout(() => ok({
                            code: e.code,
                            reason: e.reason,
                            clean: e.wasClean,
                            afterMs,
                            status: document.getElementById("status").textContent,
                        }));
                    });
                    socket.send(new TextEncoder().encode("kick:bye from the server"));
                })"#,
            )
            .await;
        assert_eq!(closed["code"], 1000, "{closed}");
        assert_eq!(closed["reason"], "bye from the server", "{closed}");
        assert_eq!(closed["clean"], true, "{closed}");
        // The page learns of it at once: the gateway ends the connection as soon as the
        // browser answers its close, not after a linger.
        let after = closed["afterMs"].as_f64().unwrap();
        assert!(
            after < 300.0,
            "the close reached the page {after} ms after the kick"
        );
        println!("the kick's close reached the page {after:.0} ms after it was asked for");
        let status = closed["status"].as_str().unwrap();
        assert!(
            status.contains("1000") && status.contains("bye from the server"),
            "{status}"
        );

        // A message over the gateway's 64 KiB limit: the browser gets 1009 and the reason
        // (the gateway drains the rest of the message, so no reset destroys the close).
        for size in [65_537, 1_000_000] {
            let closed = page
                .eval(&format!(
                    r#"new Promise((ok) => {{
                        const socket = new WebSocket({url:?});
                        socket.binaryType = "arraybuffer";
                        socket.addEventListener("open", () => {{
                            socket.send(new TextEncoder().encode("hello"));
                            socket.send(new Uint8Array({size}));
                        }});
                        socket.addEventListener("close", (e) =>
                            ok({{ code: e.code, reason: e.reason, clean: e.wasClean }}));
                    }})"#,
                    url = bed.gateway.url("ws"),
                ))
                .await;
            assert_eq!(closed["code"], 1009, "{size} bytes: {closed}");
            let reason = closed["reason"].as_str().unwrap();
            assert!(
                reason.contains("is over the limit of 65536"),
                "{size} bytes: {closed}"
            );
        }
    })
    .await
    .expect("timed out driving the browser");
}

/// The browser session client (`client/js/clustergo-session.js`, through
/// `examples/browser/session.html`) survives a gateway's SIGKILL: 300 numbered frames, sent
/// every 10 ms while the gateway it started on dies, all come back once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_browser_session_survives_a_gateway_sigkill() {
    use bed::etcd_server::Etcd;
    use clustergo::Member;
    let chromium = chromium();
    let etcd = Etcd::start();
    let members: Vec<Member> = ["1.100.1", "1.100.2", "1.1.1"]
        .iter()
        .map(|m| Member::new(bed::a(m), bed::free_port()))
        .collect();
    etcd.list(bed::PREFIX, &members).await;
    let _server = bed::game_server(&etcd, "1.1.1");
    let mut g1 = bed::gateway_as(&etcd, "1.100.1", TEST_LIMITS, "", "");
    let g2 = bed::gateway_as(&etcd, "1.100.2", TEST_LIMITS, "", "");
    for g in [&g1, &g2] {
        g.log
            .wait(&["game servers of type 1 available: [1.1.1]"])
            .await;
    }
    let files = serve_files().await;
    let url = format!(
        "http://{files}/examples/browser/session.html?gw={}&gw={}",
        percent_encode(&g1.url("ws"), b""),
        percent_encode(&g2.url("ws"), b"")
    );
    timeout(WAIT, async {
        let mut browser = Browser::launch(&chromium, &url);
        let mut page = browser.open_page().await;
        // Connected (its first frame, `whoami`, came back from 1.1.1), then the numbered run.
        let first = page
            .eval(
                r#"(async () => {
                    while (!window.sessionReady) await new Promise((r) => setTimeout(r, 10));
                    await window.sessionReady;
                    const s = window.session;
                    const whoami = await new Promise((ok) => s.addEventListener("frame",
                        (e) => ok(new TextDecoder().decode(e.detail)), { once: true }));
                    window.echoes = [];
                    s.addEventListener("frame", (e) => window.echoes.push(new TextDecoder().decode(e.detail)));
                    window.sending = (async () => {
                        for (let i = 1; i <= 300; i++) {
                            s.send(`n${i}`);
                            await new Promise((r) => setTimeout(r, 10));
                        }
                    })();
                    return whoami;
                })()"#,
            )
            .await;
        assert_eq!(first, "1.1.1");
        // Mid-run (some echoes back), its gateway dies.
        page.eval(
            r#"new Promise((ok) => { const t = setInterval(() => {
                if (window.echoes.length >= 50) { clearInterval(t); ok(true); } }, 5); })"#,
        )
        .await;
        g1.proc.kill();
        let seen = page
            .eval(
                r#"new Promise((ok) => {
                    const done = () => ok({
                        echoes: window.echoes,
                        events: window.sessionEvents.filter((e) => e.type !== "frame"),
                    });
                    const t = setInterval(() => {
                        const ended = window.sessionEvents.some((e) => e.type === "ended");
                        if (window.echoes.length >= 300 || ended) { clearInterval(t); done(); }
                    }, 10);
                })"#,
            )
            .await;
        let echoes: Vec<&str> = seen["echoes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        let want: Vec<String> = (1..=300).map(|i| format!("n{i}")).collect();
        assert_eq!(echoes, want, "events: {}", seen["events"]);
        let events = seen["events"].as_array().unwrap();
        let resumed = events
            .iter()
            .find(|e| e["type"] == "resumed")
            .unwrap_or_else(|| panic!("no resume: {events:?}"));
        assert_eq!(resumed["detail"]["url"], g2.url("ws"), "{resumed}");
        println!(
            "browser session: 300 frames back in order across a gateway SIGKILL; resumed in {} ms",
            resumed["detail"]["afterMs"]
        );
    })
    .await
    .expect("the browser session test timed out");
}

/// Serves the repository's `examples/` and `client/js/` over HTTP on loopback (a page's ES
/// modules do not load from `file://`); returns `host:port`. Bounded: one request per
/// connection, requests of at most 8 KiB, only those two directories.
async fn serve_files() -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let root = root.canonicalize().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let root = root.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                while n < buf.len() && !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    match sock.read(&mut buf[n..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(k) => n += k,
                    }
                }
                let head = String::from_utf8_lossy(&buf[..n]);
                let path = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or("/")
                    .split('?')
                    .next()
                    .unwrap_or("/")
                    .to_owned();
                let allowed = (path.starts_with("/examples/") || path.starts_with("/client/js/"))
                    && !path.contains("..");
                let file = allowed
                    .then(|| std::fs::read(root.join(&path[1..])).ok())
                    .flatten();
                let reply = match file {
                    Some(body) => {
                        let kind = if path.ends_with(".js") {
                            "text/javascript"
                        } else {
                            "text/html; charset=utf-8"
                        };
                        let mut r = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: {kind}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                            body.len()
                        )
                        .into_bytes();
                        r.extend_from_slice(&body);
                        r
                    }
                    None => {
                        b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
                            .to_vec()
                    }
                };
                let _ = sock.write_all(&reply).await;
            });
        }
    });
    at
}

/// The `chromium` binary, installed with apt-get when missing.
fn chromium() -> PathBuf {
    if let Some(path) = find_chromium() {
        return path;
    }
    eprintln!("no chromium binary: installing Debian's chromium package");
    let install = || {
        Command::new("apt-get")
            .args(["install", "-y", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success())
    };
    if !install() || find_chromium().is_none() {
        let _ = Command::new("apt-get").arg("update").status();
        install();
    }
    find_chromium().unwrap_or_else(|| {
        panic!(
            "this test needs a headless browser: install Debian's `chromium` package \
             (apt-get install chromium)"
        )
    })
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("chromium"))
        .chain([PathBuf::from("/usr/bin/chromium")])
        .find(|p| p.is_file())
}

/// The example page as a `file://` URL that connects to `gateway` on load.
fn page_url(gateway: &str) -> String {
    let page = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/browser/index.html")
        .canonicalize()
        .expect("examples/browser/index.html");
    format!(
        "file://{}?gw={}&auto=1&hb={HEARTBEAT_MS}",
        percent_encode(page.to_str().unwrap(), b"/"),
        percent_encode(gateway, b"")
    )
}

/// Percent-encodes every byte but unreserved characters and `keep`.
fn percent_encode(text: &str, keep: &[u8]) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || keep.contains(&b) {
                char::from(b).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A Chromium process with its own profile directory; killed (by its handle) and its profile
/// removed when dropped, on every path.
struct Browser {
    child: Child,
    /// Disconnected once every Chromium process has closed the stderr pipe, that is exited.
    stderr_closed: mpsc::Receiver<()>,
    profile: TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Chromium's helper processes (GPU, renderer, ...) outlive it by a few milliseconds
        // and may still write to the profile; they share its stderr, so the pipe's end says
        // they are gone. Then `profile` is removed, when the field drops.
        let waited = self.stderr_closed.recv_timeout(Duration::from_secs(5));
        if waited != Err(RecvTimeoutError::Disconnected) {
            println!("[chromium] helper processes still running; removing the profile anyway");
        }
    }
}

impl Browser {
    fn launch(chromium: &Path, url: &str) -> Browser {
        let profile = TempDir::new("chromium");
        let mut child = Command::new(chromium)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.0.display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", chromium.display()));
        // Drained on a thread so that Chromium never blocks on a full pipe.
        let stderr = child.stderr.take().unwrap();
        let (stderr_open, stderr_closed) = mpsc::channel::<()>();
        std::thread::spawn(move || {
            let _open = stderr_open; // dropped (disconnecting the channel) at the pipe's end
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                // Chromium complains at length about the missing D-Bus in containers.
                if !line.contains(":ERROR:dbus/") {
                    println!("[chromium] {line}");
                }
            }
        });
        Browser {
            child,
            stderr_closed,
            profile,
        }
    }

    /// Connects to the DevTools endpoint of the page target, once its document exists.
    async fn open_page(&mut self) -> DevTools {
        let port = self.devtools_port().await;
        let list: Value = serde_json::from_str(&http_get(port, "/json/list").await).unwrap();
        let target = list
            .as_array()
            .unwrap()
            .iter()
            .find(|t| {
                let url = t["url"].as_str().unwrap_or("");
                t["type"] == "page" && (url.starts_with("file://") || url.starts_with("http://"))
            })
            .unwrap_or_else(|| panic!("no page target in {list:#}"));
        let (ws, _) =
            tokio_tungstenite::connect_async(target["webSocketDebuggerUrl"].as_str().unwrap())
                .await
                .unwrap();
        let mut page = DevTools {
            ws,
            last_id: 0,
            events: VecDeque::new(),
            context: 0,
        };
        // Runtime.enable reports every existing JavaScript context and each new one; evaluate
        // in the page's own (not a blank document's that may precede it).
        page.call("Runtime.enable", json!({})).await;
        let created = page
            .event("Runtime.executionContextCreated", |p| {
                let ctx = &p["context"];
                ctx["origin"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("file://") || o.starts_with("http://"))
                    && ctx["auxData"]["isDefault"] == true
            })
            .await;
        page.context = created["context"]["id"].as_i64().unwrap();
        page
    }

    /// Waits for Chromium to write its DevTools port to `DevToolsActivePort` (first line).
    async fn devtools_port(&mut self) -> u16 {
        let file = self.profile.0.join("DevToolsActivePort");
        loop {
            if let Ok(text) = std::fs::read_to_string(&file) {
                // Complete once the first line (the port) is followed by the second.
                if let Some((port, _)) = text.split_once('\n') {
                    return port.trim().parse().expect("DevToolsActivePort");
                }
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("chromium exited early: {status}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A minimal HTTP/1.1 GET on loopback; returns the body of a 200 answer.
async fn http_get(port: u16, path: &str) -> String {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    sock.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    loop {
        let n = sock.read_buf(&mut buf).await.unwrap();
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]);
            assert!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
            let length = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse::<usize>().unwrap())
            });
            let body = &buf[end + 4..];
            match length {
                Some(len) if body.len() >= len => {
                    return String::from_utf8(body[..len].to_vec()).unwrap();
                }
                None if n == 0 => return String::from_utf8(body.to_vec()).unwrap(),
                _ => {}
            }
        }
        assert!(
            n > 0,
            "GET {path}: connection closed early: {}",
            String::from_utf8_lossy(&buf)
        );
    }
}

/// One DevTools protocol connection (to a page target).
struct DevTools {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    last_id: u64,
    /// Events that arrived while waiting for something else.
    events: VecDeque<Value>,
    /// The page's JavaScript context.
    context: i64,
}

impl DevTools {
    /// Sends a command and returns its result; panics on a protocol error.
    async fn call(&mut self, method: &str, params: Value) -> Value {
        self.last_id += 1;
        let id = self.last_id;
        let command = json!({ "id": id, "method": method, "params": params });
        self.ws
            .send(Message::text(command.to_string()))
            .await
            .unwrap();
        loop {
            let msg = self.next().await;
            if msg["id"] == id {
                assert!(msg.get("error").is_none(), "{method}: {msg}");
                return msg["result"].clone();
            }
            if msg.get("method").is_some() {
                self.events.push_back(msg);
            }
        }
    }

    /// Waits for the event `method` whose params satisfy `wanted`; returns the params.
    async fn event(&mut self, method: &str, wanted: impl Fn(&Value) -> bool) -> Value {
        let matches = |msg: &Value| msg["method"] == method && wanted(&msg["params"]);
        if let Some(i) = self.events.iter().position(matches) {
            return self.events.remove(i).unwrap()["params"].take();
        }
        loop {
            let mut msg = self.next().await;
            if matches(&msg) {
                return msg["params"].take();
            }
            self.events.push_back(msg);
        }
    }

    /// Evaluates `expression` in the page, awaiting it if it is a promise; returns its value
    /// and panics with the exception if it throws or rejects.
    async fn eval(&mut self, expression: &str) -> Value {
        let params = json!({
            "expression": expression,
            "contextId": self.context,
            "awaitPromise": true,
            "returnByValue": true,
        });
        let mut r = self.call("Runtime.evaluate", params).await;
        if let Some(e) = r.get("exceptionDetails") {
            let what = e["exception"]["description"].as_str().unwrap_or("");
            panic!("the page threw: {what} ({})", e["text"]);
        }
        r["result"]["value"].take()
    }

    async fn next(&mut self) -> Value {
        loop {
            match self.ws.next().await {
                Some(Ok(Message::Text(text))) => return serde_json::from_str(&text).unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("the DevTools connection ended: {other:?}"),
            }
        }
    }
}

/// Decodes standard base64 (DevTools sends screenshots so).
fn base64(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let six = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c:#x}"),
        };
        acc = (acc << 6 | u32::from(six)) & 0xffff;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}
