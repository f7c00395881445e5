"""kvrecall's decode stream (`GET /v1/stream`): one WebSocket, one binary
msgpack frame per request, each answered by one frame with the request's
id, in order. Made by `Client.open_stream()`:

    with kv.open_stream() as s:
        r = s.attend(sid, layer, q, k=k_new, v=v_new, position=n)   # AttendResult
        rs = s.attend_batch(layer, [{"session": a, "q": qa}, {"session": b, "q": qb}])

The answers are the HTTP routes' (bit-identical out and lse). Tensors go
out as the arrays' bytes (msgpack bin) and come back copied once into
numpy. A request is synchronous: it sends one frame and reads until the
answer with its id (frames with other ids, such as an id-less error for a
garbage frame sent through `ws`, are skipped). A stream is for one thread
at a time; a timeout or a lost connection closes it (open another; with
`position`, a step whose answer was lost can be resent safely: a step that
did go through answers 409 "conflict" and changes nothing).
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Optional, Sequence

import msgpack

from .client import AttendResult, BatchResult, BatchResults, KvrecallError, attend_body, attend_result, batch_results, step_body
from .websocket import ConnectionClosed, HandshakeError, WebSocket, WebSocketError

__all__ = ["Stream"]


class Stream:
    """A decode stream. `ws` is the raw WebSocket (for tests of bad frames)."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._next_id = 1
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True)

    @classmethod
    def open(cls, url: str, headers: Dict[str, str], timeout: Optional[float]) -> "Stream":
        """Connects and upgrades; a refusal raises KvrecallError with the
        server's status (401 "unauthorized" without the right token)."""
        try:
            # Zero mask: no masked copy of every request frame (the payload is q, k and v as they are).
            ws = WebSocket.connect(url, headers=headers, timeout=timeout, zero_mask=True)
        except HandshakeError as e:
            code, message = _refusal(e)
            raise KvrecallError(e.status, code, message) from None
        return cls(ws)

    def attend(
        self,
        session: str,
        layer: int,
        q: Any,
        k: Any = None,
        v: Any = None,
        scale: Optional[float] = None,
        position: Optional[int] = None,
        returns: Optional[Sequence[str]] = None,
        dtype: Optional[str] = None,
        q_dtype: Optional[str] = None,
        out_dtype: Optional[str] = None,
    ) -> AttendResult:
        """As Client.attend; an error answer raises KvrecallError (the
        stream stays open)."""
        body = attend_body(q, k, v, scale=scale, position=position, returns=returns, dtype=dtype, q_dtype=q_dtype, out_dtype=out_dtype)
        body["session"] = str(session)
        body["layer"] = int(layer)
        frame = self._request(body)
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return attend_result(frame)

    def attend_batch(self, layer: int, steps: Sequence[Dict[str, Any]]) -> BatchResults:
        """As Client.attend_batch: per step an AttendResult or a KvrecallError
        instance (returned; the list's `ms` is the server's time for the
        batch); a batch that fails whole raises KvrecallError."""
        frame = self._request({"layer": int(layer), "steps": [step_body(s) for s in steps]})
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return batch_results(frame["results"], frame.get("stats"))

    @property
    def closed(self) -> bool:
        return self.ws.closed

    def close(self) -> None:
        """Closes the connection (a close frame, then the socket). Safe from
        another thread: a request waiting there raises ConnectionError. The
        server finishes steps already received and drops their answers; the
        sessions stay."""
        self.ws.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _request(self, body: Dict[str, Any]) -> Dict[str, Any]:
        with self._lock:
            id_ = self._next_id
            self._next_id += 1
            body["id"] = id_
            try:
                self.ws.send_binary(self._packer.pack(body))
                while True:
                    data = self.ws.recv()
                    if not isinstance(data, (bytes, bytearray)):
                        raise WebSocketError("a text frame on the stream")
                    frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
                    if isinstance(frame, dict) and frame.get("id") == id_:
                        return frame
                    # Another request's answer (or an id-less error for a bad frame): not ours.
            except ConnectionClosed as e:
                raise ConnectionError(f"kvrecall stream: {e}") from e
            except (WebSocketError, ValueError, msgpack.UnpackException) as e:
                self.ws.close(1002)
                raise ConnectionError(f"kvrecall stream: {e}") from e
            except BaseException:
                # Interrupted (a timeout, KeyboardInterrupt) mid-request: the
                # framing may be cut mid-frame, so the stream cannot go on.
                self.ws.close(1001)
                raise


def _refusal(e: HandshakeError) -> "tuple[str, str]":
    """The error code and message of a refused upgrade."""
    code = {400: "malformed", 401: "unauthorized", 404: "not_found"}.get(e.status, "refused")
    message = f"stream refused: {e.status} {e.reason}".rstrip()
    if e.body:
        try:
            err = msgpack.unpackb(e.body, raw=False).get("error", {})
            code, message = err.get("code", code), err.get("message", message)
        except Exception:
            pass
    return code, message
