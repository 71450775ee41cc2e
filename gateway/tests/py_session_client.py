"""A session client (wire version 2) written from the README alone, in Python.

Usage: py_session_client.py TCP_HOST:PORT KCP_HOST:PORT

Starts a session over TCP, sends numbered frames and checks their echoes, drops the
connection with frames in flight both ways, sends more while offline, resumes the session over KCP (another transport,
and the address may be another gateway's) with the token and the count it received, sends
again what the server did not receive, and checks that every echo arrives once and in order.
Then it ends the session with a bye. Prints what happened; exits non-zero on any failure.

KCP goes through the C ikcp (PyPI `kcp`), after the gateway's cookie handshake in plain UDP.
"""

import os
import socket
import struct
import sys
import time

CLOSE_BIT = 1 << 31
HELLO = b"\x00cgsess\x02"
DATA, ACK, WELCOME, BYE = 1, 2, 3, 4
ACK_EVERY = 32
DEADLINE = time.monotonic() + 20


class Framing:
    """Frames of a u32 big-endian length and that many bytes, over a byte stream."""

    def __init__(self):
        self.received = bytearray()

    def next_frame(self):
        """The next frame in what was received: ("data", bytes), ("close", str) or None."""
        while len(self.received) >= 4:
            (length,) = struct.unpack_from(">I", self.received)
            if length == 0:  # a heartbeat
                del self.received[:4]
                continue
            if length & CLOSE_BIT:  # a close frame: its reason follows
                n = length & ~CLOSE_BIT
                if len(self.received) < 4 + n:
                    return None
                reason = bytes(self.received[4 : 4 + n]).decode()
                del self.received[: 4 + n]
                return ("close", reason)
            if len(self.received) < 4 + length:
                return None
            data = bytes(self.received[4 : 4 + length])
            del self.received[: 4 + length]
            return ("data", data)
        return None


class Tcp(Framing):
    def __init__(self, addr):
        super().__init__()
        host, port = addr.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=5)

    def send(self, frame):
        self.sock.sendall(struct.pack(">I", len(frame)) + frame)

    def recv(self):
        while time.monotonic() < DEADLINE:
            f = self.next_frame()
            if f:
                return f
            self.sock.settimeout(0.5)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                sys.exit("tcp: connection ended")
            self.received.extend(chunk)
        sys.exit("tcp: timed out")

    def drop(self):
        """Ends the connection abruptly (a reset, as when a phone loses its network)."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


class Kcp(Framing):
    MAGIC = b"\x00\x00\x00\x00cgk1"

    def __init__(self, addr):
        super().__init__()
        from kcp import KCP

        host, port = addr.rsplit(":", 1)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect((host, int(port)))
        nonce = struct.unpack("<Q", os.urandom(8))[0]
        hello = (self.MAGIC + b"\x01" + struct.pack("<Q", nonce)).ljust(64, b"\x00")
        cookie = self.exchange(hello, (2,))
        echoed, conv, issued = struct.unpack_from("<QII", cookie, 9)
        assert echoed == nonce, "cookie for another hello"
        mac = cookie[9 + 16 : 9 + 32]
        connect = (self.MAGIC + b"\x03" + struct.pack("<QII", nonce, conv, issued) + mac).ljust(
            64, b"\x00"
        )
        answer = self.exchange(connect, (4, 5))
        if answer[8] == 5:
            sys.exit("kcp: refused: " + answer[15:].decode(errors="replace"))
        self.kcp = KCP(conv_id=conv, no_delay=True, update_interval=10, resend_count=2,
                       no_congestion_control=True, send_window_size=128,
                       receive_window_size=128)

        @self.kcp.outbound_handler
        def out(_, data):
            self.sock.send(data)

    def exchange(self, request, want):
        while time.monotonic() < DEADLINE:
            self.sock.send(request)
            self.sock.settimeout(0.2)
            try:
                data = self.sock.recv(2048)
            except socket.timeout:
                continue
            if data.startswith(self.MAGIC) and len(data) > 8 and data[8] in want:
                return data
        sys.exit("kcp: no answer to the handshake")

    def send(self, frame):
        self.kcp.enqueue(struct.pack(">I", len(frame)) + frame)
        self.kcp.flush()

    def recv(self):
        self.sock.settimeout(0.01)
        while time.monotonic() < DEADLINE:
            f = self.next_frame()
            if f:
                return f
            self.kcp.update()
            try:
                self.kcp.receive(self.sock.recv(2048))
            except socket.timeout:
                pass
            for chunk in self.kcp.get_all_received():
                self.received.extend(chunk)
        sys.exit("kcp: timed out")


class Session:
    """The session's state on the client: what it sent (kept until acknowledged), what it
    received, and its token."""

    def __init__(self):
        self.sent = []  # payloads of data frames, in order; frame n is sent[n - 1]
        self.acked = 0  # frames the server acknowledged (dropped from the replay)
        self.received = 0  # data frames received
        self.told = 0  # the count last acknowledged
        self.token = None
        self.echoes = []

    def greet(self, conn):
        """Reads the welcome: the server's count and a fresh token."""
        kind, frame = conn.recv()
        if kind == "close":
            sys.exit("refused: " + frame)
        assert frame[0] == WELCOME and len(frame) == 1 + 8 + 48, frame
        (server_received,) = struct.unpack_from(">Q", frame, 1)
        self.token = frame[9:]
        self.acked = max(self.acked, server_received)
        return server_received

    def send(self, conn, payload):
        self.sent.append(payload)
        conn.send(bytes([DATA]) + payload)

    def ack(self, conn):
        if self.received > self.told:
            conn.send(bytes([ACK]) + struct.pack(">Q", self.received))
            self.told = self.received

    def read_echo(self, conn):
        """The next data frame's payload (acknowledging as the README says)."""
        while True:
            kind, frame = conn.recv()
            if kind == "close":
                sys.exit("closed: " + frame)
            if frame[0] == ACK:
                (n,) = struct.unpack_from(">Q", frame, 1)
                assert n <= len(self.sent), "acknowledged more than was sent"
                self.acked = max(self.acked, n)
            elif frame[0] == DATA:
                self.received += 1
                if self.received - self.told >= ACK_EVERY:
                    self.ack(conn)
                return frame[1:]
            else:
                sys.exit("unexpected frame %r" % frame)


def expect_echoes(session, conn, upto):
    """Reads echoes until frame `upto`'s: each must be the next number, once."""
    while len(session.echoes) < upto:
        payload = session.read_echo(conn)
        want = b"py-%d" % (len(session.echoes) + 1)
        assert payload == want, "wanted %r, got %r" % (want, payload)
        session.echoes.append(payload)


def main():
    tcp_addr, kcp_addr = sys.argv[1], sys.argv[2]
    s = Session()
    conn = Tcp(tcp_addr)
    conn.send(HELLO + b"\x00" + b"python")  # a new session, routing key "python"
    assert s.greet(conn) == 0
    for i in range(1, 41):
        s.send(conn, b"py-%d" % i)
        expect_echoes(s, conn, i)
    # Five more sent, one echo read: the others (and maybe some of the frames) are in flight
    # when the connection drops.
    for i in range(41, 46):
        s.send(conn, b"py-%d" % i)
    expect_echoes(s, conn, 41)
    conn.drop()
    print("dropped after %d echoes, %d frames sent" % (s.received, len(s.sent)), flush=True)
    # Sent while offline: kept for the resume.
    for i in range(46, 51):
        s.sent.append(b"py-%d" % i)

    conn = Kcp(kcp_addr)
    conn.send(HELLO + b"\x01" + struct.pack(">Q", s.received) + s.token)
    server_received = s.greet(conn)
    assert server_received <= len(s.sent), "the server received more than was sent"
    for payload in s.sent[server_received:]:
        conn.send(bytes([DATA]) + payload)
    print("resumed over kcp: the server had %d, sent again %d"
          % (server_received, len(s.sent) - server_received), flush=True)
    expect_echoes(s, conn, 50)
    for i in range(51, 61):
        s.send(conn, b"py-%d" % i)
    expect_echoes(s, conn, 60)
    s.ack(conn)
    conn.send(bytes([BYE]))
    while True:
        kind, frame = conn.recv()
        if kind == "close":
            print("close:", frame, flush=True)
            break
    print("echoes: %d, in order, once each" % len(s.echoes), flush=True)


if __name__ == "__main__":
    main()
