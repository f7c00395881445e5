"""kvrecall's decode stream (`GET /v1/stream`): one WebSocket, one binary
msgpack frame per request, each answered by one frame with the request's
id, in order. Made by `Client.open_stream()`:

    with kv.open_stream() as s:
        r = s.attend(sid, layer, q, k=k_new, v=v_new, position=n)   # AttendResult
        rs = s.attend_batch(layer, [{"session": a, "q": qa}, {"session": b, "q": qb}])
        out, lse = s.attend_stacked(layer, [a, b], q, k, v, positions)   # q [2, qHeads, d]: kvrecall.stacked
        s.upload_document_kv(doc, layer, start, k, v)           # as Client.upload_document_kv
        s.upload_document(doc, chunks, window=2)                # several uploads in flight (a preload)

    with kv.open_stream(shm=64 << 20) as s:    # on the server's host: tensors through shared memory
        s.shm is not None                       # attached (else s.shm_refused says why; bytes as above)

The answers are the HTTP routes' (bit-identical out and lse). Tensors go
out as the arrays' bytes (msgpack bin, written from the arrays to the
socket where they are contiguous and of the wire dtype) and come back
copied once, from the connection's receive buffer into the arrays
returned: those are the caller's to keep (kvrecall.wire). A request is synchronous: it sends one frame and reads until the
answer with its id (frames with other ids, such as an id-less error for a
garbage frame sent through `ws`, are skipped). A stream is for one thread
at a time; a timeout or a lost connection closes it (open another; with
`position`, a step whose answer was lost can be resent safely: a step that
did go through answers 409 "conflict" and changes nothing).

With a shared-memory segment attached (`Client.open_stream(shm=...)`,
kvrecall.shm), batches and uploads put their tensors in it and batches
have their answers written into it (single attends too with
`shm_attend = True`): a frame carries no tensor bytes. The results are the
same arrays, copied out of the segment (views of it with `shm_views`). Where the server refuses the segment (another host, --shm-dir
off, its caps) or a request does not fit it, the tensors go as bytes; a
refused attach is tried again now and then by later batches and stacked
calls (kvrecall.shm.AttachRetry), so a refusal that passes (the server's
total cap freed as other streams close) does not keep the stream on bytes.
"""

from __future__ import annotations

import ssl
import struct
import threading
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

import msgpack
import numpy as np

from .client import AttendResult, BatchResult, BatchResults, KvrecallError, _kv_body, attend_result, batch_results
from .lean import Layout, Plan, plan_key
from . import shm as _shm
from . import shm_plan as _shm_plan
from . import stacked as _stacked
from .tensors import pack_parts
from .wire import attend_fields, attend_parts, batch_parts
from .websocket import ConnectionClosed, HandshakeError, WebSocket, WebSocketError

__all__ = ["Stream"]

# Request forms (session, layer, shapes, ...) whose frames a stream keeps (kvrecall.lean).
_PLANS = 4096


class Stream:
    """A decode stream. `ws` is the raw WebSocket (for tests of bad frames)."""

    def __init__(self, ws: WebSocket):
        self.ws = ws
        self._next_id = 1
        self._pings = 0
        self._lock = threading.Lock()
        self._packer = msgpack.Packer(use_bin_type=True)
        # The common decode step's frames made once per form (kvrecall.lean): over a plain socket, zero-masked.
        self._lean = ws.zero_mask and ws._can_sendmsg
        self._plans: Dict[Tuple[Any, ...], Plan] = {}
        # The shared-memory segment attached (attach_shm), why one was refused, and when that attach is tried again.
        self.shm: Optional[_shm.Segment] = None
        self.shm_refused: Optional[str] = None
        self._shm_again = _shm.AttachRetry()
        self._shm_plans: Dict[Tuple[Any, ...], _shm_plan.BatchPlan] = {}
        self._shm_attend_plans: Dict[Tuple[Any, ...], _shm_plan.AttendPlan] = {}
        self._stacked_plans: Dict[Tuple[Any, ...], _stacked.StackedPlan] = {}
        # A single attend through the segment too (else the lean byte form, which costs less on the 2-core VM);
        # a planned batch's out and lse as views of the segment, valid until the stream's next request.
        self.shm_attend = False
        self.shm_views = False

    @classmethod
    def open(cls, url: str, headers: Dict[str, str], timeout: Optional[float], ssl_context: Optional[ssl.SSLContext] = None) -> "Stream":
        """Connects and upgrades (https: TLS with `ssl_context`, default the
        system's); a refusal raises KvrecallError with the server's status
        (401 "unauthorized" without the right token)."""
        try:
            # Zero mask: no masked copy of every request frame (the payload is q, k and v as they are).
            ws = WebSocket.connect(url, headers=headers, timeout=timeout, ssl_context=ssl_context, zero_mask=True)
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
        stream stays open). The request goes from the arrays to the socket
        (no joined copy); out and lse are the caller's own arrays, copied
        once out of the receive buffer (with a segment: of the segment)."""
        if self.shm is not None and self.shm_attend:
            if returns is None and dtype is None and q_dtype is None and scale is None:
                planned = self._attend_planned(self.shm, session, layer, q, k, v, position, out_dtype)
                if planned is not None:
                    return planned
            seg = self.shm
            kwargs = dict(q=q, k=k, v=v, scale=scale, position=position, returns=returns, dtype=dtype, q_dtype=q_dtype, out_dtype=out_dtype)
            shared = [False]

            def make(id_: int) -> List[Any]:
                # Written into the segment under the stream's lock: the request before has been answered.
                body = _shm.attend_body(seg, session, layer, kwargs)
                if body is None:  # does not fit: as bytes
                    return attend_parts(self._packer, id_, str(session), int(layer), attend_fields(**kwargs))
                shared[0] = True
                return [self._packer.pack({"id": id_, **body})]

            frame = self._call(make)
            if "error" in frame:
                raise KvrecallError.from_wire(frame["error"])
            return _shm.attend_result(seg, frame) if shared[0] else attend_result(frame)
        if self._lean and returns is None and dtype is None and q_dtype is None:
            key = plan_key(session, layer, q, k, v, scale, position, out_dtype)
            if key is not None:
                return self._attend_lean(key, session, layer, q, k, v, scale, position, out_dtype)
        fields = attend_fields(q, k, v, scale, position, returns, dtype, q_dtype, out_dtype)
        frame = self._call(lambda id_: attend_parts(self._packer, id_, str(session), int(layer), fields))
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return attend_result(frame)

    def attend_batch(self, layer: int, steps: Sequence[Dict[str, Any]]) -> BatchResults:
        """As Client.attend_batch: per step an AttendResult or a KvrecallError
        instance (returned; the list's `ms` is the server's time for the
        batch); a batch that fails whole raises KvrecallError."""
        if self._shm_again.nbytes:
            self._shm_retry()
        seg, shared = self.shm, [False]
        if seg is not None:
            planned = self._batch_planned(seg, layer, steps)
            if planned is not None:
                return planned

        def make(id_: int) -> List[Any]:
            body = _shm.batch_body(seg, layer, steps) if seg is not None else None
            if body is None:
                return batch_parts(self._packer, id_, int(layer), steps)
            shared[0] = True
            return [self._packer.pack({"id": id_, **body})]

        frame = self._call(make)
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        if shared[0]:
            return _shm.batch_results(seg, frame)  # type: ignore[arg-type]
        return batch_results(frame["results"], frame.get("stats"))

    def attend_stacked(
        self,
        layer: int,
        sessions: Sequence[str],
        q: Any,
        k: Any = None,
        v: Any = None,
        positions: Any = None,
        out_dtype: Optional[str] = None,
        out: Any = None,
        lse: Any = None,
        scale: Optional[float] = None,
    ) -> "_stacked.Stacked":
        """One layer's step of a running batch as whole arrays (kvrecall.stacked):
        q [n, qHeads, d], k and v [n, kvHeads, d] (or None), positions n
        integers (or None), one session per row. Returns a Stacked: out [n,
        qHeads, d] and lse [n, qHeads] (views of the segment, valid until the
        stream's next request, unless `out` and `lse` are given: copied into
        those), `errors` the failed steps' (index, code, message) (their
        rows NaN), `ms` the server's; `scale` every row's (the server's
        default, 1/sqrt(d), when None). Bad arrays raise ValueError/TypeError
        before anything is sent; a batch that fails whole, KvrecallError."""
        key, pos = _stacked.stacked_key(layer, sessions, q, k, v, positions, out_dtype, out, lse, scale)
        if self._shm_again.nbytes:
            self._shm_retry()
        seg = self.shm
        if seg is None:
            return _stacked.by_steps(self, layer, key[1], q, k, v, pos, out_dtype, out, lse, key[-1])
        with self._lock:
            plan = _planned(self._stacked_plans, key, lambda: _stacked.StackedPlan(seg, *key))
            if not plan.fits:
                plan = None
            else:
                plan.write(q, k, v, pos)
                id_ = self._plan_id(plan)
                ws = self.ws

                def exchange() -> Any:
                    ws.send_binary_parts([plan.frame])
                    while True:
                        data = ws.recv_view()
                        if isinstance(data, str):
                            raise WebSocketError("a text frame on the stream")
                        got = plan.read(data, id_)
                        if got is not None:
                            return got

                got = self._io(exchange)
        if plan is None:  # does not fit the segment: as steps, in bytes
            return _stacked.by_steps(self, layer, key[1], q, k, v, pos, out_dtype, out, lse, key[-1])
        return _stacked.answer(plan, got, out, lse)

    def stacked_inputs(self, layer: int, sessions: Sequence[str], q_shape: Sequence[int], q_dtype: Any = np.float32, kv_shape: Optional[Sequence[int]] = None, kv_dtype: Any = np.float16, positions: bool = False, out_dtype: Optional[str] = None, scale: Optional[float] = None) -> Tuple[Any, Any, Any, Any]:
        """The segment's own arrays for attend_stacked's q [n, *q_shape], k and
        v [n, *kv_shape] (None without kv_shape) and positions (int32 [n], or
        None), for a caller that writes its batch there: passed back as they
        are, attend_stacked copies none of them. Valid until the stream's
        next request (every request writes its tensors from the segment's
        start). Without a segment, or where the batch does not fit it,
        fresh arrays (sent as bytes)."""
        n = len(sessions)
        q = np.empty((n,) + tuple(q_shape), q_dtype)
        k = v = np.empty((n,) + tuple(kv_shape), kv_dtype) if kv_shape is not None else None
        if k is not None:
            v = np.empty_like(k)
        pos = np.zeros(n, np.int32) if positions else None
        key, _ = _stacked.stacked_key(layer, sessions, q, k, v, pos, out_dtype, None, None, scale)
        if self._shm_again.nbytes:
            self._shm_retry()
        seg = self.shm
        if seg is None:
            return q, k, v, pos
        with self._lock:
            plan = _planned(self._stacked_plans, key, lambda: _stacked.StackedPlan(seg, *key))
        if not plan.fits:
            return q, k, v, pos
        return plan.q, plan.k if k is not None else None, plan.v if k is not None else None, plan.pos if positions else None

    def _attend_planned(self, seg: "_shm.Segment", session: str, layer: int, q: Any, k: Any, v: Any, position: Any, out_dtype: Any) -> Optional[AttendResult]:
        """attend's common form through the segment (kvrecall.shm_plan), or None."""
        key = _shm_plan.attend_key(session, layer, q, k, v, position, out_dtype)
        if key is None:
            return None
        with self._lock:
            plan = _planned(self._shm_attend_plans, key, lambda: _shm_plan.AttendPlan(seg, *key))
            if not plan.fits:
                return None
            plan.write(seg, q, k, v, position)
            id_ = self._plan_id(plan)
            frame = self._io(lambda: self._exchange(id_, [plan.frame]))
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return plan.result(seg, frame, self.shm_views) or _shm.attend_result(seg, frame)

    def _batch_planned(self, seg: "_shm.Segment", layer: int, steps: Sequence[Dict[str, Any]]) -> Optional[BatchResults]:
        """attend_batch's common form through the segment (kvrecall.shm_plan), or None."""
        got = _shm_plan.batch_key(layer, steps)
        if got is None:
            return None
        key, positions = got
        with self._lock:
            plan = _planned(self._shm_plans, key, lambda: _shm_plan.BatchPlan(seg, *key))
            if not plan.fits or not plan.write(seg, steps, positions):
                return None
            id_ = self._plan_id(plan)
            frame = self._io(lambda: self._exchange(id_, [plan.frame]))
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return plan.results(seg, frame, self.shm_views) or _shm.batch_results(seg, frame)

    def _plan_id(self, plan: Any) -> int:
        """The next id, written into a segment plan's frame (a uint32 there)."""
        id_ = self._next_id if self._next_id <= 0xFFFFFFFF else 1
        self._next_id = id_ + 1
        _shm_plan.U32.pack_into(plan.frame, plan.id_at, id_)
        return id_

    def attach_shm(self, nbytes: int, directory: str = _shm.SHM_DIR) -> bool:
        """Makes a segment of `nbytes` in `directory` (the server's
        --shm-dir), attaches it, and unlinks its file once the server has
        mapped it: True. False when the file cannot be made here or the
        server refuses it (`shm_refused` says why); the stream then goes on
        with bytes (and the segment it had, if any), and a later batch or
        stacked call tries the same attach again, now and then
        (kvrecall.shm.AttachRetry), until one of at least that size is
        attached: a refusal need not last. A second attach replaces the
        first."""
        try:
            seg = _shm.Segment(nbytes, directory)
        except OSError as e:
            self.shm_refused = f"cannot make a shared-memory file in {directory}: {e}"
            self._shm_again.refused(nbytes, directory, self._next_id)
            return False
        try:
            frame = self._call(lambda id_: [self._packer.pack({"id": id_, "shm": {"name": seg.name, "bytes": seg.nbytes}})])
        except BaseException:
            seg.close()
            raise
        seg.unlink()  # mapped by both: the file's name is no longer needed
        if "error" in frame:
            seg.close()
            self.shm_refused = str(frame["error"].get("message", "refused")) if isinstance(frame["error"], dict) else "refused"
            self._shm_again.refused(nbytes, directory, self._next_id)
            return False
        self._shm_again.attached(seg.nbytes)
        old, self.shm, self.shm_refused = self.shm, seg, None
        self._shm_plans.clear()  # laid out for the old segment's size
        self._shm_attend_plans.clear()
        self._stacked_plans.clear()
        if old is not None:
            old.close()
        return True

    def want_shm(self, nbytes: int, directory: str = _shm.SHM_DIR) -> bool:
        """A segment of at least `nbytes`: True when one is attached. Else
        one of `nbytes` is attached now (replacing a smaller one), unless an
        attach at least as large was refused on this stream and its wait
        (AttachRetry) is not over: then False, and nothing is sent. So a
        caller whose batch grows past the size refused tries at once (it
        wants a larger segment anyway), and one asking again for the same
        size does not try at every call."""
        if self.shm is not None and self.shm.nbytes >= nbytes:
            return True
        again = self._shm_again
        if again.nbytes >= nbytes and not again.due(self._next_id, self.shm.nbytes if self.shm is not None else 0):
            return False
        return self.attach_shm(nbytes, directory)

    def _shm_retry(self) -> None:
        """The refused attach tried again where its wait is over (kvrecall.shm.AttachRetry)."""
        again = self._shm_again
        if not self.ws.closed and again.due(self._next_id, self.shm.nbytes if self.shm is not None else 0):
            self.attach_shm(again.nbytes, again.directory)

    def upload_document_kv(self, doc: str, layer: int, start: int, k: Any, v: Any, q: Any = None, dtype: Optional[str] = None) -> Dict[str, Any]:
        """As Client.upload_document_kv, over the stream: {layer, tokens, stats}."""
        return self.upload_document(doc, [(layer, start, k, v, q)], dtype=dtype)[0]

    def upload_document(
        self,
        doc: str,
        chunks: Iterable[Tuple[int, int, Any, Any, Any]],
        window: int = 2,
        dtype: Optional[str] = None,
        answered: Optional[Callable[[Dict[str, Any]], None]] = None,
    ) -> List[Dict[str, Any]]:
        """Uploads (layer, start, k, v, q or None) in order, `window` sent
        ahead of their answers: the server reads the next one while it
        stores this one (a preload at the socket's speed rather than one
        round trip per chunk). Returns the answers in order, each passed to
        `answered` as it comes. The first error answer raises KvrecallError
        once the uploads already sent are answered: those sent behind the
        failed one may have gone in (it changed nothing), later chunks are
        not sent, and the stream stays open."""
        answers: List[Dict[str, Any]] = []
        pending: Deque[int] = deque()
        failed: Optional[KvrecallError] = None

        def settle_one() -> None:
            nonlocal failed
            frame = self._await(pending.popleft())
            if "error" in frame:
                failed = failed or KvrecallError.from_wire(frame["error"])
                return
            answer = {"layer": frame["layer"], "tokens": frame["tokens"], "stats": frame.get("stats")}
            answers.append(answer)
            if answered is not None:
                answered(answer)

        with self._lock:
            for i, (layer, start, k, v, q) in enumerate(chunks):
                if failed is not None:
                    break
                # A chunk that cannot be packed is the caller's error: the stream goes on (its answers are skipped).
                body = _kv_body(layer, start, k, v, q, dtype, view=True)
                body["document"] = str(doc)
                # Slot i % window is free: the chunk `window` back has been answered.
                if self.shm is not None:
                    _shm.upload_body(self.shm, i % max(1, window), max(1, window), body)
                # The tensors go from the arrays to the socket (no joined copy), before this returns.
                self._io(lambda: pending.append(self._send(body)))
                if len(pending) >= max(1, window):
                    self._io(settle_one)
            while pending:
                self._io(settle_one)
        if failed is not None:
            raise failed
        return answers

    def ping(self) -> None:
        """A WebSocket ping, returned from on its pong: the bare round trip
        on this stream, no request handled (what a step's overhead compares
        with: kvrecall.bench_transport)."""
        with self._lock:
            self._pings = (self._pings + 1) & 0xFFFFFFFF
            payload = struct.pack("!I", self._pings)
            self._io(lambda: self.ws.ping_round_trip(payload))

    @property
    def closed(self) -> bool:
        return self.ws.closed

    def close(self) -> None:
        """Closes the connection (a close frame, then the socket). Safe from
        another thread: a request waiting there raises ConnectionError. The
        server finishes steps already received and drops their answers; the
        sessions stay."""
        self.ws.close()
        if self.shm is not None:
            self.shm.close()

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _io(self, fn: Callable[[], Any]) -> Any:
        """Runs one exchange on the socket. A lost connection or a protocol
        error raises ConnectionError; an interruption (a timeout,
        KeyboardInterrupt) mid-exchange may cut the framing mid-frame, so the
        stream closes and it propagates."""
        try:
            return fn()
        except ConnectionClosed as e:
            raise ConnectionError(f"kvrecall stream: {e}") from e
        except (WebSocketError, ValueError, msgpack.UnpackException) as e:
            self.ws.close(1002)
            raise ConnectionError(f"kvrecall stream: {e}") from e
        except BaseException:
            self.ws.close(1001)
            raise

    def _attend_lean(self, key: Tuple[Any, ...], session: str, layer: int, q: Any, k: Any, v: Any, scale: Any, position: Any, out_dtype: Any) -> AttendResult:
        """Stream.attend's common case (kvrecall.lean): the same request but
        for the widths of id and position, the same answer."""
        with self._lock:
            plan = _planned(self._plans, key, lambda: Plan(self._packer, session, layer, q, k, v, scale, position, out_dtype))
            id_ = self._next_id if self._next_id <= 0xFFFFFFFF else 1  # the plan's uint32
            self._next_id = id_ + 1
            ws = self.ws

            def exchange() -> Any:
                ws.send_framed(plan.parts(id_, q, k, v, scale, position), plan.nbytes)
                data = ws.recv_view()
                if isinstance(data, str):
                    raise WebSocketError("a text frame on the stream")
                # The answer's id: {"id": id, ...} with id packed in the fewest bytes (as msgpack does).
                t = data[4] if len(data) > 9 and data[:4] == b"\x84\xa2id" else 0xFF
                id_end = 5 if t < 0x80 else 6 if t == 0xCC else 7 if t == 0xCD else 9 if t == 0xCE else 0
                if not id_end or (t if id_end == 5 else int.from_bytes(data[5:id_end], "big")) != id_:
                    return self._await(id_, data)
                # The layout by the id's width (the server pads the keys to align out's data after it).
                lay = plan.answers[id_end]
                r = lay.read(data, id_end) if lay else None
                if r is not None:
                    return r
                frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
                if lay is None:  # learned once (False: not of a form this reads)
                    plan.answers[id_end] = Layout.learn(data, id_end, frame) or False
                return frame

            got = self._io(exchange)
        if isinstance(got, AttendResult):
            return got
        frame = got
        if "error" in frame:
            raise KvrecallError.from_wire(frame["error"])
        return attend_result(frame)

    def _send(self, body: Dict[str, Any]) -> int:
        """Sends one request frame, its large binary fields written as they are; its id."""
        id_ = self._next_id
        self._next_id += 1
        body["id"] = id_
        self.ws.send_binary_parts(pack_parts(body, self._packer))
        return id_

    def _call(self, make: Callable[[int], List[Any]]) -> Dict[str, Any]:
        """One request: its parts made for its id, sent, its answer read. A
        request that cannot be packed (the caller's bad array) raises before
        anything is sent; the stream goes on."""
        with self._lock:
            id_ = self._next_id
            self._next_id += 1
            parts = make(id_)
            return self._io(lambda: self._exchange(id_, parts))

    def _exchange(self, id_: int, parts: List[Any]) -> Dict[str, Any]:
        self.ws.send_binary_parts(parts)
        return self._await(id_)

    def _await(self, id_: int, data: Any = None) -> Dict[str, Any]:
        """Reads frames (from `data`, a frame read already) until the answer
        with this id (decoded where it lies in the receive buffer; msgpack
        copies out what it returns)."""
        while True:
            if data is None:
                data = self.ws.recv_view()
            if isinstance(data, str):
                raise WebSocketError("a text frame on the stream")
            frame = msgpack.unpackb(data, raw=False, strict_map_key=False)
            data = None
            if isinstance(frame, dict) and frame.get("id") == id_:
                return frame
            # An error without an id answers a frame the server could not
            # decode; answers come in order and this is the oldest awaited
            # request, so it is ours (else it would wait forever).
            if isinstance(frame, dict) and "id" not in frame and "error" in frame:
                return frame
            # Another request's answer: not ours.


def _planned(plans: Dict[Tuple[Any, ...], Any], key: Tuple[Any, ...], make: Callable[[], Any]) -> Any:
    """The plan of `key` in `plans`, made now if new (a caller cycling through many forms: start over)."""
    plan = plans.get(key)
    if plan is None:
        if len(plans) >= _PLANS:
            plans.clear()
        plan = plans[key] = make()
    return plan


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
