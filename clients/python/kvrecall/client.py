"""A client for kvrecall's v1 wire protocol (msgpack over HTTP).

Only numpy and msgpack are needed; HTTP is the client's own HTTP/1.1 on a
plain socket (https: http.client), one keep-alive connection per thread
(kvrecall.transport).

    from kvrecall import Client, model_shape

    kv = Client("http://127.0.0.1:8700")
    model = model_shape(layers=32, q_heads=32, kv_heads=8, head_dim=128, dtype="f16")
    kv.create_document("manual", model)
    for layer in range(32):
        kv.upload_document_kv("manual", layer, 0, k[layer], v[layer])   # [8, n, 128] float16
    kv.seal_document("manual")
    sid = kv.create_session(model, documents=["manual"], method="exact")["id"]
    r = kv.attend(sid, layer=0, q=q, k=k_new, v=v_new)   # q [32, 128]; k_new, v_new [8, 128]
    r.out   # float32 [32, 128]
    r.lse   # float32 [32]

A model that holds q and its attention output in 16 bits sends q as it is
and may take out in the model's dtype (half the bytes each way):

    r = kv.attend(sid, layer=0, q=q16, out_dtype="f16")   # q16 float16 [32, 128]
    r.out   # float16 [32, 128]: the f32 answer rounded to nearest even

Decode steps have three transports with bit-identical answers: `attend` (one
HTTP request per step), `attend_batch` (one HTTP request for one layer of
many sessions) and `open_stream()` (a WebSocket: one frame per attend or
batch, no per-request HTTP).
"""

from __future__ import annotations

import ssl
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import msgpack
import numpy as np

from .errors import STATUS_OF_CODE, KvrecallError  # noqa: F401 (re-exported)
from .transport import HTTPTransport
from .wire import attend_fields, batch_parts, check_kv, http_attend_parts, is_half, optional_fields, q_wire_dtype
from .tensors import _NUMPY_OF_WIRE, decode_tensor, from_bf16_bits, tensor, to_bf16_bits  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    from .stream import Stream

__all__ = [
    "Client",
    "KvrecallError",
    "AttendResult",
    "BatchResult",
    "model_shape",
    "tensor",
    "decode_tensor",
    "to_bf16_bits",
    "from_bf16_bits",
]

def model_shape(
    layers: int,
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: str = "f16",
    block_size: Optional[int] = None,
) -> Dict[str, Any]:
    """The `model` object of the protocol from Python-style names."""
    m: Dict[str, Any] = {"layers": layers, "qHeads": q_heads, "kvHeads": kv_heads, "headDim": head_dim, "dtype": dtype}
    if block_size is not None:
        m["blockSize"] = block_size
    return m


@dataclass
class AttendResult:
    out: np.ndarray  # float32 [qHeads, headDim]; with out_dtype "f16" float16, "bf16" uint16 bit patterns
    lse: np.ndarray  # float32 [qHeads]
    stats: Dict[str, Any] = field(default_factory=dict)
    selection: Optional[List[np.ndarray]] = None  # per kv head, int32 context positions
    kv: Optional[Dict[str, List[np.ndarray]]] = None  # {"k": [...], "v": [...]} per kv head, [m, headDim]


# One step's answer in a batch: its result, or its error (not raised).
BatchResult = Union[AttendResult, KvrecallError]


def attend_body(
    q: Any,
    k: Any = None,
    v: Any = None,
    scale: Optional[float] = None,
    position: Optional[int] = None,
    returns: Optional[Sequence[str]] = None,
    dtype: Optional[str] = None,
    q_dtype: Optional[str] = None,
    out_dtype: Optional[str] = None,
) -> Dict[str, Any]:
    """An attend's wire fields (all but layer and session) as a dict,
    tensors as msgpack bin of the arrays' bytes: the plain form of what
    kvrecall.wire packs in parts (its tests' reference)."""
    check_kv(k, v, position)
    body: Dict[str, Any] = {"q": tensor(q, q_wire_dtype(q, q_dtype))}
    if k is not None:
        body["k"] = tensor(k, dtype)
        body["v"] = tensor(v, dtype)
    body.update(optional_fields(scale, position, returns, out_dtype))
    return body


def step_body(step: Dict[str, Any]) -> Dict[str, Any]:
    """A batch step {session, q, k?, v?, scale?, position?, returns?, dtype?,
    q_dtype?, out_dtype?} as its wire fields."""
    if not isinstance(step, dict) or "session" not in step:
        raise TypeError("a batch step is a dict with a session id and q")
    fields = dict(step)
    session = fields.pop("session")
    if "return" in fields:
        fields["returns"] = fields.pop("return")
    return {"session": str(session), **attend_body(**fields)}


def attend_result(r: Dict[str, Any]) -> AttendResult:
    """An attend answer off the wire: arrays copied out of it once."""
    result = AttendResult(out=decode_tensor(r["out"]), lse=decode_tensor(r["lse"]), stats=r.get("stats", {}))
    if r.get("selection") is not None:
        result.selection = [decode_tensor(t) for t in r["selection"]]
    if r.get("kv") is not None:
        result.kv = {"k": [decode_tensor(t) for t in r["kv"]["k"]], "v": [decode_tensor(t) for t in r["kv"]["v"]]}
    return result


class BatchResults(list):
    """A batch's results in order (a list), and `ms`: the server's time for
    the whole batch (its answer's stats), None if it did not say. When every
    step answered out, lse and stats alone, in one dtype and shape, the
    results' arrays are rows of one array per field (the caller's, writable;
    each row its own step's)."""

    ms: Optional[float] = None


def batch_results(results: List[Dict[str, Any]], stats: Any = None) -> "BatchResults":
    out = BatchResults(_stacked(results) or (KvrecallError.from_wire(r["error"]) if "error" in r else attend_result(r) for r in results))
    if isinstance(stats, dict) and isinstance(stats.get("ms"), (int, float)):
        out.ms = float(stats["ms"])
    return out


def _stacked(results: List[Dict[str, Any]]) -> Optional[List[AttendResult]]:
    """The common batch answer decoded with one copy and a few numpy calls
    per field, not per step (decode_tensor's three per tensor were 120 of a
    32-step batch's ~190 us of decoding on the 2-core VM; this is 40); None
    when any step differs from the first in form (an error, selection or
    kv, another dtype or shape), and each step is decoded alone."""
    if not results or not isinstance(results[0], dict) or "out" not in results[0] or "lse" not in results[0]:
        return None
    first_out, first_lse = results[0]["out"], results[0]["lse"]
    out_bytes, lse_bytes = _nbytes(first_out), _nbytes(first_lse)
    if out_bytes is None or lse_bytes is None:
        return None
    outs, lses = [], []
    for r in results:
        if not isinstance(r, dict) or len(r) != 3 or "stats" not in r:
            return None
        o, l = r.get("out"), r.get("lse")
        if not isinstance(o, dict) or not isinstance(l, dict):
            return None
        if o.get("dtype") != first_out["dtype"] or o.get("shape") != first_out["shape"] or l.get("dtype") != first_lse["dtype"] or l.get("shape") != first_lse["shape"]:
            return None
        if not isinstance(o.get("data"), bytes) or not isinstance(l.get("data"), bytes):
            return None  # JSON's base64, or anything else: decode_tensor's checks
        if len(o["data"]) != out_bytes or len(l["data"]) != lse_bytes:
            return None  # decode_tensor refuses it (joined, a short step and a long one would shift the rows)
        outs.append(o["data"])
        lses.append(l["data"])
    out = _rows(outs, first_out)
    lse = _rows(lses, first_lse)
    return [AttendResult(out=out[i], lse=lse[i], stats=r["stats"]) for i, r in enumerate(results)]


def _nbytes(t: Any) -> Optional[int]:
    """The bytes a wire tensor's dtype and shape call for; None when they are not a known dtype and a list of sizes."""
    if not isinstance(t, dict):
        return None
    dt, shape = _NUMPY_OF_WIRE.get(t.get("dtype")), t.get("shape")  # type: ignore[arg-type]
    if dt is None or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        return None
    n = dt.itemsize
    for d in shape:
        n *= d
    return n


def _rows(datas: List[bytes], t: Dict[str, Any]) -> np.ndarray:
    """[len(datas), *shape] from the steps' bytes joined into one writable buffer."""
    dt = _NUMPY_OF_WIRE.get(t["dtype"])
    if dt is None:
        raise ValueError(f"unknown wire dtype {t['dtype']!r}")
    a = np.frombuffer(bytearray().join(datas), dtype=dt).reshape([len(datas), *t["shape"]])
    return a if dt.isnative else a.astype(dt.newbyteorder("="))


# --- the client ------------------------------------------------------------


class Client:
    """Speaks kvrecall's v1 protocol. One keep-alive connection per thread."""

    def __init__(self, url: str = "http://127.0.0.1:8700", token: Optional[str] = None, timeout: float = 120.0, ssl_context: Optional[ssl.SSLContext] = None):
        """url: http:// or https:// (a path after the port is a prefix for every route).
        ssl_context: for https, the TLS settings of every connection, the
        stream's included (e.g. ssl.create_default_context(cafile=...) to
        trust a private CA); default: the system's trusted CAs, the
        certificate checked against the url's host."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise ValueError(f"url must be http:// or https://, got {url!r}")
        self._https = parsed.scheme == "https"
        self._host = parsed.hostname or "127.0.0.1"
        self._port = parsed.port or (443 if self._https else 80)
        self._prefix = parsed.path.rstrip("/")
        self._timeout = timeout
        self._ssl_context = ssl_context
        self._http = HTTPTransport(self._host, self._port, self._https, self._prefix, timeout, token, ssl_context)
        self._attend_paths: Dict[str, str] = {}

    # service

    def health(self) -> Dict[str, Any]:
        """`{ok, version, backend, threads, documents, resident, sessions, recovered, memory: {used, budget}, gpu}`.
        `gpu`: the device attends use, `{backend: "cuda", device, memory, pool, wave?}`; or, on the host,
        `{available, device?, error?, memory, built}`: `device` is a device's name, `error` why none answered."""
        return self._call("GET", "/v1/health")

    def metrics(self) -> str:
        return self._call("GET", "/metrics", raw=True).decode()

    # documents

    def create_document(
        self,
        doc: str,
        model: Dict[str, Any],
        methods: Optional[Sequence[str]] = None,
        query_stride: Optional[int] = None,
        tokens: Optional[int] = None,
        cluster_size: Optional[int] = None,
    ) -> Dict[str, Any]:
        """tokens: the tokens per layer the document will hold: its host
        memory is reserved now, whole (503 "over_budget" if it does not fit),
        and never regrown while it is uploaded. cluster_size: tokens per
        cluster of the wave index (`clusterSize`; the server's default when
        absent)."""
        body: Dict[str, Any] = {"model": model}
        if methods is not None:
            body["methods"] = list(methods)
        if query_stride is not None:
            body["queryStride"] = query_stride
        if tokens is not None:
            body["tokens"] = int(tokens)
        if cluster_size is not None:
            body["clusterSize"] = int(cluster_size)
        return self._call("PUT", f"/v1/documents/{_quote(doc)}", body)

    def upload_document_kv(self, doc: str, layer: int, start: int, k: Any, v: Any, q: Any = None, dtype: Optional[str] = None) -> Dict[str, Any]:
        """k, v: [kvHeads, n, headDim]; q (optional prefill queries): [qHeads, n, headDim]."""
        return self._call("POST", f"/v1/documents/{_quote(doc)}/kv", _kv_body(layer, start, k, v, q, dtype))

    def seal_document(self, doc: str) -> Dict[str, Any]:
        return self._call("POST", f"/v1/documents/{_quote(doc)}/seal", {})

    def get_document(self, doc: str) -> Dict[str, Any]:
        return self._call("GET", f"/v1/documents/{_quote(doc)}")

    def list_documents(self) -> List[Dict[str, Any]]:
        return self._call("GET", "/v1/documents")["documents"]

    def delete_document(self, doc: str, created_at: Optional[str] = None) -> Dict[str, Any]:
        """With `created_at`, only the document created then: one made again under the id since is left
        alone, and the server answers 412 (KvrecallError "precondition_failed")."""
        only = "" if created_at is None else f"?createdAt={_quote(created_at)}"
        return self._call("DELETE", f"/v1/documents/{_quote(doc)}{only}")

    def wait_document_ready(self, doc: str, timeout: float = 600.0) -> Dict[str, Any]:
        """Polls `GET /v1/documents/:doc` until the document is ready; returns it.

        Raises KvrecallError 409 "conflict" if it is `incomplete` (the server
        restarted during its preload), TimeoutError after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        delay = 0.01
        while True:
            info = self.get_document(doc)
            status = info.get("status")
            if status == "ready":
                return info
            if status == "incomplete":
                raise KvrecallError(409, "conflict", f"document {doc} is incomplete; PUT it again to restart its preload")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"document {doc} is not ready after {timeout} s (phase {info.get('phase')})")
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(0.5, delay * 2)

    def push_document(
        self,
        doc: str,
        model: Dict[str, Any],
        k: Sequence[Any],
        v: Sequence[Any],
        q: Optional[Sequence[Any]] = None,
        methods: Optional[Sequence[str]] = None,
        query_stride: Optional[int] = None,
        chunk: int = 4096,
        dtype: Optional[str] = None,
        timeout: float = 600.0,
        window: int = 2,
    ) -> Dict[str, Any]:
        """A whole document in one call: create, upload every layer in chunks
        of `chunk` tokens, seal, wait until ready; returns the ready document.

        k[layer], v[layer]: [kvHeads, n, headDim]; q[layer] (optional prefill
        queries, for the attention-aware index builds): [qHeads, n, headDim].
        `methods` are indexed at seal. On an error the document is deleted
        (unless the id names another by then: its createdAt differs).
        The uploads go over a stream (`GET /v1/stream`), `window` of them
        sent ahead of their answers (Stream.upload_document).
        """
        if len(k) != model["layers"] or len(v) != model["layers"] or (q is not None and len(q) != model["layers"]):
            raise ValueError(f"k, v (and q) need one array per layer ({model['layers']})")
        made = self.create_document(doc, model, methods=methods, query_stride=query_stride, tokens=int(np.shape(k[0])[1]) if model["layers"] > 0 else None)

        def chunks() -> Iterator[Tuple[int, int, Any, Any, Any]]:
            step = max(1, chunk)
            for layer in range(model["layers"]):
                n = int(np.shape(k[layer])[1])
                for start in range(0, n, step):
                    end = min(n, start + step)
                    yield layer, start, k[layer][:, start:end], v[layer][:, start:end], None if q is None else q[layer][:, start:end]

        try:
            with self.open_stream() as s:
                s.upload_document(doc, chunks(), window=window, dtype=dtype)
            self.seal_document(doc)
            return self.wait_document_ready(doc, timeout)
        except BaseException:
            try:
                # Only the document this call made: ours deleted and the id made again by another client
                # meanwhile (whose uploads then failed ours) is not ours to delete. The server checks
                # createdAt and deletes in one step (412 for another's).
                self.delete_document(doc, created_at=made["createdAt"])
            except (KvrecallError, OSError):
                pass
            raise

    # sessions

    def create_session(
        self,
        model: Dict[str, Any],
        documents: Optional[Iterable[str]] = None,
        method: Optional[str] = None,
        budget: Optional[float] = None,
        sinks: Optional[int] = None,
        window: Optional[int] = None,
        layers: Optional[Sequence[Dict[str, Any]]] = None,
        **extra: Any,
    ) -> Dict[str, Any]:
        """`budget` is tokens or a fraction (< 1) of the context; `layers`, a per-layer policy: one map per model
        layer, each with an optional `budget` and `estimate` overriding the session's in that layer. Other
        parameters (ef, chunk, span, estimate; retrieval-attention's codeWalk, codeScan, codeShare, scanShare, and
        scanKeep, the code scan's PQ first pass, a share in (0, 1] of the keys kept for the 4-bit codes) pass through as
        keywords."""
        body: Dict[str, Any] = {"model": model}
        if documents is not None:
            body["documents"] = list(documents)
        if layers is not None:
            body["layers"] = [dict(entry) for entry in layers]
        for key, value in (("method", method), ("budget", budget), ("sinks", sinks), ("window", window), *extra.items()):
            if value is not None:
                body[key] = value
        return self._call("POST", "/v1/sessions", body)

    def upload_session_kv(self, sid: str, layer: int, start: int, k: Any, v: Any, q: Any = None, dtype: Optional[str] = None) -> Dict[str, Any]:
        """The session's own tokens; `start` counts from the session's first own token."""
        return self._call("POST", f"/v1/sessions/{_quote(sid)}/kv", _kv_body(layer, start, k, v, q, dtype))

    def attend(
        self,
        sid: str,
        layer: int,
        q: Any,
        k: Any = None,
        v: Any = None,
        scale: Optional[float] = None,
        returns: Optional[Sequence[str]] = None,
        dtype: Optional[str] = None,
        position: Optional[int] = None,
        q_dtype: Optional[str] = None,
        out_dtype: Optional[str] = None,
    ) -> AttendResult:
        """One decode step of one layer.

        q: [qHeads, headDim] (sent as f32 unless already float16).
        k, v: the current token, [kvHeads, headDim]; appended before attending.
        dtype: wire dtype for k and v (default: from the arrays).
        q_dtype: wire dtype for q: "f32", "f16" or "bf16" (float values are
        rounded to nearest even; uint16 bit patterns pass as they are).
        out_dtype: "f32" (the default) or the model's dtype: out comes back
        as the f32 answer rounded to nearest even, float16 for "f16", uint16
        bf16 bit patterns for "bf16"; any other is refused (422).
        returns: subset of ("out", "kv", "selection"); default ("out",).
        position: with k and v, the appended token's index among the
        session's own tokens (0 = the first after its documents); a repeat
        or a skip is refused with 409 "conflict" and changes nothing, so a
        step whose answer was lost can be sent again safely.
        """
        fields = attend_fields(q, k, v, scale, position, returns, dtype, q_dtype, out_dtype)
        layer = int(layer)
        path = self._attend_paths.get(sid)
        if path is None:
            if len(self._attend_paths) >= 1024:  # a server's sessions come and go
                self._attend_paths.clear()
            path = self._attend_paths[sid] = f"/v1/sessions/{_quote(sid)}/attend"
        # The body from the arrays to the socket, the answer decoded in the receive buffer (kvrecall.transport).
        return attend_result(self._http.call_parts("POST", path, lambda packer: http_attend_parts(packer, layer, fields)))

    def attend_batch(self, layer: int, steps: Sequence[Dict[str, Any]]) -> "BatchResults":
        """One layer of many sessions in one request (`POST /v1/attend`).

        steps: dicts {"session": id, "q": ..., and optionally "k", "v",
        "scale", "position", "returns", "dtype", "q_dtype", "out_dtype"} --
        attend's arguments.
        Returns one entry per step, in order (a list whose `ms` is the
        server's time for the whole batch): an AttendResult, or for a step
        that failed alone (unknown session, wrong shape, wrong position...)
        a KvrecallError instance, returned, not raised; a failed step changes
        nothing. A request that fails whole (no steps, a bad layer, 401)
        raises KvrecallError.
        """
        layer = int(layer)
        answer = self._http.call_parts("POST", "/v1/attend", lambda packer: batch_parts(packer, None, layer, steps))
        return batch_results(answer["results"], answer.get("stats"))

    def open_stream(self, timeout: Optional[float] = None, shm: int = 0, shm_dir: str = "/dev/shm", shm_views: bool = False, spin_us: int = 0) -> "Stream":
        """A WebSocket stream for decode steps (`GET /v1/stream`, the bearer
        token on the upgrade): `attend` and `attend_batch` as here, answered
        bit-identically, over one connection with no per-request HTTP. Use it
        as a context manager or close() it. timeout: seconds per socket
        operation (default: the client's). A refused upgrade raises
        KvrecallError (401 without the right token). shm: bytes of a
        shared-memory segment to attach (made in shm_dir, the server's
        --shm-dir: on the server's own host), through which tensors then go
        (kvrecall.shm); where it is refused the stream sends bytes and
        `stream.shm_refused` says why. shm_views: a batch's out and lse are
        views of the segment, valid until the stream's next request (else
        the caller's own copies). spin_us: each wait for an answer polls the
        socket for up to this many microseconds before it sleeps (one core
        busy meanwhile; kvrecall.spin): for a decode loop on a host with a
        core to spare, where waking a sleeping thread is a large share of a
        call's overhead. 0 (the default): sleep at once."""
        from .stream import Stream

        url = f"{'https' if self._https else 'http'}://{self._host}:{self._port}{self._prefix}/v1/stream"
        auth = self._http.headers.get("authorization")
        stream = Stream.open(url, {"authorization": auth} if auth else {}, self._timeout if timeout is None else timeout, self._ssl_context)
        stream.ws.spin = max(0, spin_us or 0) / 1e6
        if shm:
            stream.attach_shm(shm, shm_dir)
            stream.shm_views = shm_views
        return stream

    def get_session(self, sid: str) -> Dict[str, Any]:
        return self._call("GET", f"/v1/sessions/{_quote(sid)}")

    def delete_session(self, sid: str) -> Dict[str, Any]:
        return self._call("DELETE", f"/v1/sessions/{_quote(sid)}")

    # transport

    def close(self) -> None:
        """Closes this thread's connection (a later call opens another)."""
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _call(self, method: str, path: str, body: Any = None, raw: bool = False) -> Any:
        return self._http.call(method, path, body, raw)


def _quote(id_: str) -> str:
    return urllib.parse.quote(str(id_), safe="")


def _kv_body(layer: int, start: int, k: Any, v: Any, q: Any, dtype: Optional[str], view: bool = False) -> Dict[str, Any]:
    """view: tensor data as views of the arrays (sent before they may change: Stream.upload_document)."""
    body: Dict[str, Any] = {"layer": int(layer), "start": int(start), "k": tensor(k, dtype, view), "v": tensor(v, dtype, view)}
    if q is not None:
        body["q"] = tensor(q, None if is_half(q) else "f32", view)
    return body
