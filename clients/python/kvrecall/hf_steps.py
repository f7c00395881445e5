"""The transformers adapter's decode steps (kvrecall.hf), without torch:
one layer's step of every batch row, sent to kvrecall one of two ways.

- Stacked (the default on the stream): the batch as whole arrays through
  the stream's shared-memory segment (`Stream.attend_stacked`,
  kvrecall.stacked). The segment is attached when the stream opens, sized
  by `segment_bytes` for the batch (and attached anew, larger, when a
  bigger batch comes). The caller writes q, k and v straight into the
  segment's arrays (`fill`: from torch, one device-to-host copy for the
  three where they lie end to end in one dtype), and takes out as a view
  of the segment, valid until the stream's next request.
- The byte batch (`Stream.attend_batch`, or `Client.attend_batch` over
  HTTP): one step map per row. Used where the stacked form cannot go: the
  server refused the segment (another host, --shm-dir off, its caps; the
  reason in `shm_refused`) or `stacked=False`. A refused segment is asked
  for again at once when the batch grows past the size refused, else now
  and then (the stream's kvrecall.shm.AttachRetry): a refusal need not
  last, and a cap that frees brings the stacked form back.

Both send each row's `position`, so a step is never appended twice: when
the stream's connection is lost, a new one is opened and the step resent
once; a row that did go through the first time answers 409 "conflict", and
where the session holds its token already it is asked again without it.
A row whose step failed raises its error (KvrecallError).

Why stacked: on the H100 host a stacked batch of 32 cost 1.1-1.9x one
call's overhead, the byte batch 4-8x (bench/results/transport-python-spin-
h100.md, transport-python-shm-stacked-h100.md).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .client import Client
from .errors import STATUS_OF_CODE, KvrecallError
from .shm import SHM_DIR
from .stacked import Stacked
from .stream import Stream

__all__ = ["DecodeSteps", "stacked_bytes", "segment_bytes"]

_OUT_BYTES = {None: 4, "f32": 4, "f16": 2, "bf16": 2}
# A segment's size is a whole number of these (and a batch's rows are rounded up to a power of 2, at least 8).
_SEGMENT_UNIT = 1 << 16
# Batch forms (layer, sessions, shapes) whose segment arrays are kept; past it they are made again.
_FORMS = 4096


def _align(n: int) -> int:
    return (n + 3) & ~3


def stacked_bytes(n: int, q_shape: Sequence[int], q_dtype: Any, kv_shape: Sequence[int], kv_dtype: Any, out_dtype: Optional[str]) -> int:
    """The segment bytes a stacked batch of n rows takes, laid out as
    kvrecall.stacked's StackedPlan lays it: q, k, v, positions (each at a
    multiple of 4), then out's rows, then lse's at a multiple of 4."""
    q_bytes = n * math.prod(q_shape) * np.dtype(q_dtype).itemsize
    kv_bytes = n * math.prod(kv_shape) * np.dtype(kv_dtype).itemsize
    into = _align(q_bytes) + 2 * _align(kv_bytes) + 4 * n
    return _align(into + n * math.prod(q_shape) * _OUT_BYTES[out_dtype]) + 4 * n * int(q_shape[0])


def segment_bytes(n: int, q_shape: Sequence[int], q_dtype: Any, kv_shape: Sequence[int], kv_dtype: Any, out_dtype: Optional[str]) -> int:
    """The segment to attach for a batch of n rows: room for a batch of the
    next power of 2 rows (at least 8), in whole 64 KiB."""
    rows = max(8, 1 << max(0, n - 1).bit_length())
    need = stacked_bytes(rows, q_shape, q_dtype, kv_shape, kv_dtype, out_dtype)
    return -(-need // _SEGMENT_UNIT) * _SEGMENT_UNIT


def _joined(seg: Any, *arrays: np.ndarray) -> Optional[np.ndarray]:
    """One flat array over `arrays` where they lie end to end in the segment
    in one dtype (a caller fills them with one copy), else None."""
    if seg is None or any(a.dtype != arrays[0].dtype for a in arrays):
        return None
    base = seg.u8.ctypes.data
    at = end = arrays[0].ctypes.data - base
    for a in arrays:
        if a.ctypes.data - base != end:
            return None
        end += a.nbytes
    return seg.u8[at:end].view(arrays[0].dtype)


class DecodeSteps:
    """A running batch's decode steps, one layer at a time (see the module
    docstring). transport "stream" (one WebSocket kept until close()) or
    "http"; stacked: use the stacked form where it can go; shm_dir: the
    server's --shm-dir. `stream` is the open stream (None before the first
    step), `shm_refused` why it has no segment (None while it has one)."""

    def __init__(self, client: Client, transport: str = "stream", stacked: bool = True, shm_dir: str = SHM_DIR):
        if transport not in ("stream", "http"):
            raise ValueError('transport must be "stream" or "http"')
        self.client = client
        self.transport = transport
        self.stacked = stacked
        self.shm_dir = shm_dir
        self.stream: Optional[Stream] = None
        self.shm_refused: Optional[str] = None
        # Made once per form (stacked_inputs and the sizes cost ~25 us a call on the 2-core VM): the segment's
        # q, k, v and positions arrays by (layer, sessions, shapes), for the segment `_inputs_of`.
        self._sizes: Dict[Tuple[Any, ...], Tuple[int, int]] = {}
        self._inputs: Dict[Tuple[Any, ...], Tuple[Any, ...]] = {}
        self._inputs_of: Any = None

    # the stacked form ---------------------------------------------------------

    def attend_stacked(
        self,
        layer: int,
        sessions: Sequence[str],
        positions: Sequence[int],
        fill: Callable[..., None],
        q_shape: Tuple[int, int],
        q_dtype: Any,
        kv_shape: Tuple[int, int],
        kv_dtype: Any,
        out_dtype: Optional[str] = None,
        scale: Optional[float] = None,
    ) -> Optional[np.ndarray]:
        """The rows' step (each row's new token appended at its position):
        out [n, *q_shape] in out_dtype (bf16 as uint16 bits), a view of the
        segment valid until the stream's next request. `fill(q, k, v, kv,
        qkv)` writes the rows' q [n, *q_shape] (q_dtype: float32 or
        float16) and the new token's k and v [n, *kv_shape] (kv_dtype:
        float16 or float32) into the arrays it is given (called again for a
        resend); kv, where not None, is one flat array over k then v, and
        qkv one over q, k, v (they lie end to end in one dtype): one copy
        can fill them.
        None where the stacked form cannot carry the step (then nothing was
        sent: send the byte batch)."""
        if self.transport != "stream" or not self.stacked:
            return None
        n = len(sessions)
        shapes = (tuple(q_shape), q_dtype, tuple(kv_shape), kv_dtype, out_dtype)
        sizes = self._sizes.get((n, shapes))
        if sizes is None:
            if len(self._sizes) >= _FORMS:
                self._sizes.clear()
            sizes = self._sizes[(n, shapes)] = (stacked_bytes(n, *shapes), segment_bytes(n, *shapes))
        stream = self._with_segment(*sizes)
        if stream.shm is None or stream.shm.nbytes < sizes[0]:
            return None
        try:
            got, _ = self._send_stacked(stream, layer, sessions, positions, fill, shapes, scale)
        except ConnectionError:
            # The connection was lost: once more on a new one (in bytes if it has no segment: the same answers).
            self.close()
            stream = self._with_segment(*sizes)
            got, q = self._send_stacked(stream, layer, sessions, positions, fill, shapes, scale)
            got = self._asked_again(stream, layer, sessions, positions, got, q, out_dtype, scale)
        if got.errors:
            _, code, message = got.errors[0]
            raise KvrecallError(STATUS_OF_CODE.get(code, 500), code, message)
        return got.out

    def _send_stacked(self, stream: Stream, layer: int, sessions: Sequence[str], positions: Sequence[int], fill: Callable[..., None], shapes: Tuple[Any, ...], scale: Optional[float]) -> Tuple[Stacked, np.ndarray]:
        """The batch sent stacked (its arrays the segment's where it fits): its answer and q."""
        if stream.shm is not self._inputs_of:  # another segment (or none): its arrays are made anew
            self._inputs.clear()
            self._inputs_of = stream.shm
        key = (layer, tuple(sessions), shapes, scale)
        arrays = self._inputs.get(key)
        if arrays is None:
            if len(self._inputs) >= _FORMS:
                self._inputs.clear()
            q_shape, q_dtype, kv_shape, kv_dtype, out_dtype = shapes
            q, k, v, pos = stream.stacked_inputs(layer, sessions, q_shape, q_dtype, kv_shape, kv_dtype, positions=True, out_dtype=out_dtype, scale=scale)
            arrays = self._inputs[key] = (q, k, v, pos, _joined(stream.shm, k, v), _joined(stream.shm, q, k, v))
        q, k, v, pos, kv, qkv = arrays
        fill(q, k, v, kv, qkv)
        pos[:] = positions
        return stream.attend_stacked(layer, sessions, q, k, v, pos, out_dtype=shapes[4], scale=scale), q

    def _asked_again(self, stream: Stream, layer: int, sessions: Sequence[str], positions: Sequence[int], got: Stacked, q: np.ndarray, out_dtype: Optional[str], scale: Optional[float]) -> Stacked:
        """A resent batch's answer, its rows that went through the first time
        (409, the session holding their token) asked again without the token."""
        again = [i for i, code, _ in got.errors if code == "conflict" and self._appended(sessions[i], layer, positions[i])]
        if not again:
            return got
        out, lse = got.out.copy(), got.lse.copy()  # the next request writes over the segment
        redo = stream.attend_stacked(layer, [sessions[i] for i in again], q[again], out_dtype=out_dtype, scale=scale)  # q[again]: a copy
        out[again], lse[again] = redo.out, redo.lse
        errors = [e for e in got.errors if e[0] not in again] + [(again[j], code, message) for j, code, message in redo.errors]
        return Stacked(out, lse, sorted(errors), None)

    # the byte batch -----------------------------------------------------------

    def attend_batch(self, layer: int, steps: List[Dict[str, Any]]) -> list:
        """One layer's decode steps of every row as step maps (Client.attend_batch's),
        answered in order; raises the first failed step's error."""
        if self.transport == "http":
            results = self.client.attend_batch(layer, steps)
        else:
            try:
                results = self._open().attend_batch(layer, steps)
            except ConnectionError:
                self.close()
                results = self._open().attend_batch(layer, steps)
                for i, r in enumerate(results):
                    if isinstance(r, KvrecallError) and r.code == "conflict" and self._appended(steps[i]["session"], layer, steps[i]["position"]):
                        step = {key: steps[i][key] for key in ("session", "q", "scale", "q_dtype", "out_dtype") if key in steps[i]}
                        results[i] = self.stream.attend_batch(layer, [step])[0]  # type: ignore[union-attr]
        for r in results:
            if isinstance(r, KvrecallError):
                raise r
        return results

    # the stream ---------------------------------------------------------------

    def _appended(self, session: str, layer: int, position: int) -> bool:
        """Whether the session holds the step's token already (its position is the last)."""
        return self.client.get_session(session)["ownTokens"][layer] == position + 1

    def _open(self, shm: int = 0) -> Stream:
        """The stream, opened now (with a segment of `shm` bytes when not 0) if there is none."""
        if self.stream is None or self.stream.closed:
            self.stream = self.client.open_stream(shm=shm, shm_dir=self.shm_dir)
        return self.stream

    def _with_segment(self, need: int, size: int) -> Stream:
        """The stream, with a segment of at least `need` bytes attached (of
        `size`) where the server takes one: a refused size is not asked for
        at every step (Stream.want_shm)."""
        stream = self._open(size)
        if stream.shm is None or stream.shm.nbytes < need:
            stream.want_shm(size, self.shm_dir)
        has = stream.shm is not None and stream.shm.nbytes >= need
        self.shm_refused = None if has else stream.shm_refused
        return stream

    def close(self) -> None:
        self._inputs.clear()
        self._inputs_of = None
        if self.stream is not None:
            self.stream.close()
            self.stream = None
