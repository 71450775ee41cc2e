// clustergo session client for browsers: a WebSocket session with the game server that
// survives a lost connection or a gateway restart (wire version 2; the README's "Sessions
// that survive" section and `clustergo_client::session` give the format). No dependencies.
//
//   import { SessionClient } from "./clustergo-session.js";
//   const s = new SessionClient(["ws://gw1:7001/ws", "ws://gw2:7001/ws"]);
//   s.addEventListener("frame", (e) => console.log(e.detail));     // Uint8Array
//   s.addEventListener("resumed", (e) => console.log(e.detail));   // { afterMs, replayed, url }
//   await s.connect();
//   s.send("hello");

const MAGIC = [0x00, 0x63, 0x67, 0x73, 0x65, 0x73, 0x73]; // "\0cgsess"
export const VERSION = 2;
const DATA = 1, ACK = 2, WELCOME = 3, BYE = 4;
const TOKEN_LEN = 48;
const ACK_EVERY = 32;
const ACK_DELAY_MS = 100;

/** Stable close codes (the first word of a close reason; the WebSocket close code). */
export const codes = Object.freeze({
  NORMAL: 1000, GOING_AWAY: 1001, SERVER_UNAVAILABLE: 1011, SERVER_RESTART: 1012, TRY_AGAIN: 1013,
  BAD_TOKEN: 4001, EXPIRED: 4002, NO_SESSION: 4003, REPLAY_FULL: 4004,
  VERSION: 4005, PROTOCOL: 4006, REPLACED: 4007,
});

/** Whether a session closed with `code` can be resumed by reconnecting. */
export function resumable(code) {
  return code === codes.GOING_AWAY || code === codes.SERVER_UNAVAILABLE;
}

/** `"4003 session no longer exists"` → `{ code: 4003, text: "session no longer exists" }`. */
export function parseClose(reason) {
  const m = /^(\d{4}) (.*)$/s.exec(reason || "");
  return m ? { code: Number(m[1]), text: m[2] } : { code: null, text: reason || "" };
}

const encoder = new TextEncoder();

function bytes(data) {
  if (typeof data === "string") return encoder.encode(data);
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  throw new TypeError("send takes a string, a Uint8Array or an ArrayBuffer");
}

function u64(n) {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(n));
  return b;
}

function readU64(b, at) {
  return Number(new DataView(b.buffer, b.byteOffset, b.byteLength).getBigUint64(at));
}

function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function helloNew(key) {
  return concat(Uint8Array.from(MAGIC), Uint8Array.of(VERSION, 0), bytes(key));
}

function helloResume(received, token) {
  return concat(Uint8Array.from(MAGIC), Uint8Array.of(VERSION, 1), u64(received), token);
}

/**
 * A session through the gateways' WebSocket listeners at `urls`. Events (all `CustomEvent`s):
 * `frame` (detail: Uint8Array), `disconnected` ({ reason }), `resumed` ({ afterMs, replayed,
 * url }), `ended` ({ code, reason }).
 */
export class SessionClient extends EventTarget {
  constructor(urls, options = {}) {
    super();
    this.urls = Array.isArray(urls) ? [...urls] : [urls];
    this.options = {
      key: "", resume: true, resumeWindowMs: 60000, maxReplayFrames: 4096,
      maxReplayBytes: 1 << 20, heartbeatMs: 2000, idleMs: 6000, backoffMs: 100, ...options,
    };
    this.next = 0;
    this.ws = null;
    this.token = null;
    this.received = 0;  // data frames received in the session
    this.told = 0;      // the count last acknowledged
    this.replay = [];   // encoded data frames not acknowledged, oldest first
    this.sent = 0;      // data frames sent in the session
    this.replayBytes = 0;
    this.ackTimer = null;
    this.lostAt = null;
    this.ended = false;
    this.resuming = false;
  }

  /** Starts a new session through the first gateway that answers. */
  async connect() {
    let last = null;
    for (let i = 0; i < this.urls.length; i++) {
      try {
        const { ws, received, token } = await this.#greet(this.urls[i], helloNew(this.options.key));
        if (received !== 0) throw new Error("a new session's welcome counts frames");
        this.next = i;
        this.token = token;
        this.#attach(ws);
        return;
      } catch (e) { last = e; }
    }
    throw last || new Error("no gateway address");
  }

  /** Sends a frame; kept until the server acknowledges it, sent again after a resume. */
  send(data) {
    if (this.ended) throw new Error("the session ended");
    const frame = concat(Uint8Array.of(DATA), bytes(data));
    if (this.replay.length + 1 > this.options.maxReplayFrames
        || this.replayBytes + frame.length > this.options.maxReplayBytes) {
      this.#end(codes.REPLAY_FULL, "replay buffer full");
      throw new Error(`${codes.REPLAY_FULL} replay buffer full`);
    }
    this.replay.push(frame);
    this.replayBytes += frame.length;
    this.sent += 1;
    if (this.ws && this.ws.readyState === WebSocket.OPEN) this.#write(frame);
  }

  /** Ends the session by choice (the server is told). */
  close() {
    if (this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.#write(Uint8Array.of(BYE));
      this.ws.close(1000, "bye");
    }
    this.#end(codes.NORMAL, "closed by the client", false);
  }

  /** Drops the connection and resumes through `url` (or the next gateway). */
  reconnect(url) {
    if (url) { this.urls.unshift(url); this.next = 0; }
    if (this.ws) this.ws.close(4000, "switching");
  }

  #emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  #write(frame) {
    this.lastSent = Date.now();
    this.ws.send(frame);
  }

  // Opens `url`, sends `hello`, and waits for the welcome (or the refusal's close).
  #greet(url, hello) {
    return new Promise((ok, fail) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      const timer = setTimeout(() => { ws.close(); fail(new Error("no welcome in time")); },
        this.options.idleMs);
      ws.onopen = () => ws.send(hello);
      ws.onmessage = (e) => {
        const b = new Uint8Array(e.data);
        if (b.length === 0) return;
        clearTimeout(timer);
        ws.onmessage = ws.onclose = null;
        if (b[0] !== WELCOME || b.length !== 9 + TOKEN_LEN) {
          ws.close();
          return fail(new Error(`${codes.PROTOCOL} expected the session's welcome`));
        }
        ok({ ws, received: readU64(b, 1), token: b.slice(9) });
      };
      ws.onclose = (e) => {
        clearTimeout(timer);
        const { code, text } = parseClose(e.reason);
        const err = new Error(e.reason || `closed (${e.code})`);
        err.code = code; // null: the connection failed, not the session
        err.text = text;
        fail(err);
      };
    });
  }

  #attach(ws) {
    this.ws = ws;
    this.lastHeard = this.lastSent = Date.now();
    this.told = this.received;
    ws.onmessage = (e) => this.#onMessage(new Uint8Array(e.data));
    ws.onclose = (e) => this.#onClose(ws, e);
    clearInterval(this.tick);
    this.tick = setInterval(() => {
      const now = Date.now();
      if (now - this.lastHeard > this.options.idleMs) return ws.close(4000, "silent");
      if (now - this.lastSent >= this.options.heartbeatMs && ws.readyState === WebSocket.OPEN) {
        this.#write(new Uint8Array(0));
      }
    }, Math.min(500, this.options.heartbeatMs));
  }

  #onMessage(b) {
    this.lastHeard = Date.now();
    if (b.length === 0) return; // a heartbeat's answer
    switch (b[0]) {
      case DATA:
        this.received += 1;
        if (this.received - this.told >= ACK_EVERY) this.#ack();
        else if (!this.ackTimer) this.ackTimer = setTimeout(() => this.#ack(), ACK_DELAY_MS);
        this.#emit("frame", b.subarray(1));
        return;
      case ACK:
        if (b.length === 9) return void this.#acked(readU64(b, 1));
        break;
      case WELCOME: // a long-attached session's fresh token
        if (b.length === 9 + TOKEN_LEN) {
          if (this.#acked(readU64(b, 1))) this.token = b.slice(9);
          return;
        }
        break;
      case BYE:
        return this.#end(codes.NORMAL, "the game server ended the session");
    }
    this.#end(codes.PROTOCOL, "unexpected session frame");
  }

  #ack() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.received > this.told && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.told = this.received;
      this.#write(concat(Uint8Array.of(ACK), u64(this.received)));
    }
  }

  // The server received `n` data frames: forget those. False for an impossible count.
  #acked(n) {
    const keptFrom = this.sent + 1 - this.replay.length;
    if (n > this.sent || n + 1 < keptFrom) { this.#end(codes.PROTOCOL, "impossible count"); return false; }
    while (this.sent + 1 - this.replay.length <= n) this.replayBytes -= this.replay.shift().length;
    return true;
  }

  #onClose(ws, e) {
    if (ws !== this.ws || this.ended) return;
    this.ws = null;
    clearInterval(this.tick);
    // A session's end comes with its code first in the reason; a close without one (a
    // dropped connection: 1006, or this client's own 4000 to switch) only lost the connection.
    const { code: c, text } = parseClose(e.reason);
    if (c !== null && !resumable(c)) return this.#end(c, text);
    if (!this.options.resume) return this.#end(c, e.reason || "connection lost");
    this.lostAt = Date.now();
    this.#emit("disconnected", { reason: e.reason || `connection closed (${e.code})` });
    this.#resume();
  }

  async #resume() {
    if (this.resuming) return;
    this.resuming = true;
    const end = this.lostAt + this.options.resumeWindowMs;
    let wait = this.options.backoffMs;
    let last = "no gateway answered";
    while (!this.ended && Date.now() < end) {
      const url = this.urls[this.next++ % this.urls.length];
      try {
        const { ws, received, token } = await this.#greet(url, helloResume(this.received, this.token));
        if (this.ended || !this.#acked(received)) { ws.onclose = null; ws.close(); break; }
        this.token = token;
        this.#attach(ws);
        for (const f of this.replay) this.#write(f);
        this.resuming = false;
        this.#emit("resumed", { afterMs: Date.now() - this.lostAt, replayed: this.replay.length, url });
        return;
      } catch (e) {
        // A close with a session code that cannot be resumed: the session is over.
        if (e.code !== null && !resumable(e.code) && e.code !== codes.TRY_AGAIN) {
          this.resuming = false;
          return this.#end(e.code, e.text || e.message);
        }
        last = e.message;
      }
      await new Promise((r) => setTimeout(r, wait + Math.random() * wait / 2));
      wait = Math.min(wait * 2, 2000);
    }
    this.resuming = false;
    if (!this.ended) this.#end(codes.NO_SESSION, `could not resume in time: ${last}`);
  }

  #end(code, reason, emit = true) {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.tick);
    clearTimeout(this.ackTimer);
    if (this.ws) { const ws = this.ws; this.ws = null; ws.onclose = null; ws.close(); }
    if (emit) this.#emit("ended", { code, reason });
  }
}
