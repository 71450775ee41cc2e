// Types of clustergo-session.js (the browser session client).

/** The session wire version this client speaks. */
export declare const VERSION: 2;

/** Stable close codes: the first word of a close reason, and the WebSocket close code. */
export declare const codes: Readonly<{
  NORMAL: 1000; GOING_AWAY: 1001; SERVER_UNAVAILABLE: 1011; SERVER_RESTART: 1012; TRY_AGAIN: 1013;
  BAD_TOKEN: 4001; EXPIRED: 4002; NO_SESSION: 4003; REPLAY_FULL: 4004;
  VERSION: 4005; PROTOCOL: 4006; REPLACED: 4007;
}>;

/** Whether a session closed with `code` can be resumed by reconnecting. */
export declare function resumable(code: number): boolean;

/** Splits `"4003 session no longer exists"` into its code and text. */
export declare function parseClose(reason: string): { code: number | null; text: string };

export interface SessionOptions {
  /** Routing key of a new session (a sticky gateway picks the server by it). Default "". */
  key?: string | Uint8Array;
  /** Resume automatically when the connection is lost. Default true. */
  resume?: boolean;
  /** How long to keep trying to resume, ms. Default 60000. */
  resumeWindowMs?: number;
  /** Frames sent and not acknowledged, at most. Default 4096. */
  maxReplayFrames?: number;
  /** Bytes of those, at most. Default 1 MiB. */
  maxReplayBytes?: number;
  /** Heartbeat after this much silence, ms. Default 2000. */
  heartbeatMs?: number;
  /** The connection counts as lost after this long without a word, ms. Default 6000. */
  idleMs?: number;
  /** First wait between resume attempts, ms (doubling to 2 s, with jitter). Default 100. */
  backoffMs?: number;
}

export interface SessionEvents {
  frame: CustomEvent<Uint8Array>;
  disconnected: CustomEvent<{ reason: string }>;
  resumed: CustomEvent<{ afterMs: number; replayed: number; url: string }>;
  ended: CustomEvent<{ code: number | null; reason: string }>;
}

export declare class SessionClient extends EventTarget {
  constructor(urls: string | string[], options?: SessionOptions);
  /** Starts a new session through the first gateway that answers. */
  connect(): Promise<void>;
  /** Sends a frame: kept until acknowledged, sent again after a resume. Throws once ended. */
  send(data: string | Uint8Array | ArrayBuffer): void;
  /** Ends the session by choice. */
  close(): void;
  /** Drops the connection and resumes through `url` (or the next gateway). */
  reconnect(url?: string): void;
  addEventListener<K extends keyof SessionEvents>(
    type: K, listener: (ev: SessionEvents[K]) => void, options?: boolean | AddEventListenerOptions): void;
  addEventListener(type: string, listener: EventListenerOrEventListenerObject | null,
    options?: boolean | AddEventListenerOptions): void;
}
