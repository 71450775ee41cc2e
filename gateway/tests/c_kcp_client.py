"""A gateway client on a third-party KCP implementation: the C ikcp, through PyPI `kcp`.

Usage: c_kcp_client.py HOST:PORT

Performs the cookie handshake in plain UDP (see clustergo_client::kcp), then speaks standard
KCP in message mode with the conv the gateway chose: sends one length-prefixed frame, prints
its echo, sends a close frame and prints the gateway's answer. Exits non-zero on any failure.
"""

import os
import socket
import struct
import sys
import time

from kcp import KCP

MAGIC = b"\x00\x00\x00\x00cgk1"
REQUEST_LEN = 64
CLOSE_BIT = 1 << 31


def exchange(sock, request, want, deadline):
    """Sends `request` every 200 ms until a handshake datagram of type `want` arrives."""
    while time.monotonic() < deadline:
        sock.send(request)
        sock.settimeout(0.2)
        try:
            data = sock.recv(2048)
        except socket.timeout:
            continue
        if data.startswith(MAGIC) and len(data) > 8 and data[8] in want:
            return data
    sys.exit("no answer to the handshake")


def main():
    host, port = sys.argv[1].rsplit(":", 1)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, int(port)))
    deadline = time.monotonic() + 10
    nonce = struct.unpack("<Q", os.urandom(8))[0]
    hello = (MAGIC + b"\x01" + struct.pack("<Q", nonce)).ljust(REQUEST_LEN, b"\x00")
    cookie = exchange(sock, hello, (2,), deadline)
    echoed, conv, issued = struct.unpack_from("<QII", cookie, 9)
    assert echoed == nonce, "cookie for another hello"
    mac = cookie[9 + 16 : 9 + 32]
    connect = (MAGIC + b"\x03" + struct.pack("<QII", nonce, conv, issued) + mac).ljust(
        REQUEST_LEN, b"\x00"
    )
    answer = exchange(sock, connect, (4, 5), deadline)
    if answer[8] == 5:
        sys.exit("refused: " + answer[15:].decode(errors="replace"))
    assert struct.unpack_from("<I", answer, 9)[0] == conv
    print("conv:", conv, flush=True)

    kcp = KCP(conv_id=conv, no_delay=True, update_interval=10, resend_count=2,
              no_congestion_control=True, send_window_size=128, receive_window_size=128)

    @kcp.outbound_handler
    def send(_, data):
        sock.send(data)

    received = bytearray()

    def pump(until):
        """Updates KCP and feeds it datagrams until `until()` or the deadline."""
        sock.settimeout(0.01)
        while time.monotonic() < deadline:
            kcp.update()
            try:
                kcp.receive(sock.recv(2048))
            except socket.timeout:
                pass
            for chunk in kcp.get_all_received():
                received.extend(chunk)
            if until():
                return
        sys.exit("timed out; received so far: %r" % bytes(received))

    def frame():
        """The next length-prefixed frame from `received`, or None."""
        while len(received) >= 4:
            (length,) = struct.unpack_from(">I", received)
            if length == 0:  # a heartbeat
                del received[:4]
                continue
            if length & CLOSE_BIT:  # a close frame: its reason follows
                n = length & ~CLOSE_BIT
                if len(received) < 4 + n:
                    return None
                reason = bytes(received[4 : 4 + n])
                del received[: 4 + n]
                return ("close", reason.decode())
            if len(received) < 4 + length:
                return None
            data = bytes(received[4 : 4 + length])
            del received[: 4 + length]
            return ("data", data.decode())
        return None

    got = []

    def have_frame():
        f = frame()
        if f:
            got.append(f)
        return bool(got)

    payload = b"hello from ikcp"
    kcp.enqueue(struct.pack(">I", len(payload)) + payload)
    kcp.flush()
    pump(have_frame)
    kind, text = got.pop()
    assert kind == "data", (kind, text)
    print("echo:", text, flush=True)

    reason = b"done"
    kcp.enqueue(struct.pack(">I", CLOSE_BIT | len(reason)) + reason)
    kcp.flush()
    pump(have_frame)
    kind, text = got.pop()
    assert kind == "close", (kind, text)
    print("close:", text, flush=True)


if __name__ == "__main__":
    main()
