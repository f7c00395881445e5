"""A socket read that polls before it sleeps (`Stream.spin_us`).

A decode client waits for each answer about as long as the server's step
takes (a fraction of a millisecond to a few). A thread blocked in recv()
sleeps, and its core may drop into an idle state; when the answer lands the
kernel must wake it, which on a quiet host costs tens of microseconds, a
large share of a call's transport overhead. Polling the socket without
blocking (MSG_DONTWAIT) for a while first reads the answer as it lands, at
the price of one core busy for the wait. A wait longer than the window
sleeps as before, so a slow call does not keep the core spinning.
"""

from __future__ import annotations

import socket
import time


def spin_recv_into(sock: socket.socket, buf: bytearray, spin_s: float) -> int:
    """sock.recv_into(buf), first polled for up to spin_s seconds. Only for
    a plain socket in blocking mode (the kernel's timeouts, socket_io.kernel_timeouts):
    with Python's own timeout, a recv polls (select) before it reads, flags
    or not; over TLS, recv_into takes no flags. Anything else reads at once."""
    if spin_s > 0 and sock.gettimeout() is None and not hasattr(sock, "cipher"):
        end = time.perf_counter() + spin_s
        while True:
            try:
                return sock.recv_into(buf, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                if time.perf_counter() >= end:
                    break
    return sock.recv_into(buf)
