"""Decode attention through kvrecall for Hugging Face transformers models
(Llama architecture and its relatives: any model whose attention layers call
the `AttentionInterface` with the cache-updated key/value states).

    from kvrecall import Client
    from kvrecall.hf import KvrecallAttention, register, use_attention

    attn = KvrecallAttention(Client("http://127.0.0.1:8700"), method="exact")
    register("kvrecall", attn)            # transformers >= 4.48
    use_attention(model, "kvrecall")      # or from_pretrained(..., attn_implementation="kvrecall")
    model.generate(input_ids, max_new_tokens=64, do_sample=False)
    attn.close()                          # deletes the sessions

What it does, per attention layer call `fn(module, query, key, value,
attention_mask, scaling=..., dropout=..., **kwargs)`:

- prefill (more than one query token): the new tokens' K and V (after RoPE,
  as the cache holds them) are pushed to one kvrecall session per batch row
  (`POST /v1/sessions/:sid/kv`), and attention is computed locally with
  transformers' SDPA function, as the model would have;
- decode (one query token): the query heads and the new token's K/V of
  every batch row go to kvrecall as one batch per layer (`transport`:
  "stream", the default, is one frame on a WebSocket kept open across
  steps and sequences, `GET /v1/stream`; "http" is one `POST /v1/attend`
  request); kvrecall appends each token and answers the attention over the
  row's whole context, which is returned instead of local attention. Each
  step names its token's `position`, so a step is never appended twice:
  when the stream's connection is lost, it reconnects once and resends.
  On the stream the batch goes stacked by default (kvrecall.hf_steps): q,
  k and v copied from the model's device straight into a shared-memory
  segment attached to the stream, out read from it -- where the server is
  on this host; else (the segment refused, `shm_refused` says why) as the
  byte batch, the same answers bit for bit. `stats["stacked"]` and
  `stats["batched"]` count the layer steps that went each way.

A new sequence starts (fresh sessions) when layer 0 sees a key with no past
(a DynamicCache after reset); with a StaticCache, call `reset()` before each
`generate`. Padded batches are supported: at prefill only the positions the
attention mask lets the last prompt token see are pushed (left padding drops
out), so kvrecall's context is what local attention would see.

K/V are stored by kvrecall as f16 or bf16 (`kv_dtype`; by default bf16 for
bfloat16 models, else f16). For a float32 model, `round_local=True` (the
default there) makes local prefill attention use the same rounded K/V that
kvrecall holds, so prefill and decode see one consistent cache.

This adapter still lets transformers keep its own cache (the K/V it hands
to the attention function); it replaces the attention computation, not the
cache's memory. Documents preloaded in kvrecall are not attached here: the
prompt's local prefill could not see them.

Prompt as a document (`prompt_as_document=True`): every retrieval method
attends a session's own tokens densely, so with the prompt pushed as the
session's own tokens a sparse budget changes nothing. In this mode the
prompt's K/V -- and its query rows (`q` on the kv route, which the
attention-aware index builds of `retrieval-attention` use) -- go to a
kvrecall *document* per batch row instead: created at the first prefill
call, filled layer by layer, sealed (indexes for `method` built at seal) at
the first decode step, and waited on until ready; then each row's session is
created attached to it with `method` and `session_options` (budget, sinks,
window, ef, chunk, span). Decode steps go to the session as before (attend
appends the new token), so decode attention over the prompt is what the
method selects: sinks + window + up to `budget` retrieved tokens per kv
head. Prefill itself stays local and dense. The documents are deleted with
the sessions (reset, close, the next sequence).

torch and transformers are imported only when this module is used.
"""

from __future__ import annotations

import uuid
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .client import Client, KvrecallError, model_shape
from .hf_steps import DecodeSteps
from .shm import SHM_DIR
from .stream import Stream

__all__ = ["KvrecallAttention", "register", "use_attention", "local_attention"]


def _torch():
    import torch

    return torch


def _sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def _storage_torch_dtype(kv_dtype: str):
    torch = _torch()
    return torch.bfloat16 if kv_dtype == "bf16" else torch.float16


def _round(x, kv_dtype: str):
    """x as its storage dtype would hold it, back in x's dtype."""
    return x.to(_storage_torch_dtype(kv_dtype)).to(x.dtype)


def _wire_bits(x, kv_dtype: str) -> np.ndarray:
    """A torch tensor -> numpy array for the wire in the storage dtype:
    float16 values for f16, uint16 bit patterns for bf16."""
    torch = _torch()
    x = x.detach().to(_storage_torch_dtype(kv_dtype)).contiguous().cpu()
    if kv_dtype == "bf16":
        return x.view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def _visible(mask, b: int, row: int, cols: slice):
    """Which key columns query `row` of batch row `b` may see (bool numpy), from a 4-D
    mask: boolean (True = attend) or additive float (0 = attend, very negative = masked)."""
    torch = _torch()
    m = mask[b if mask.shape[0] > 1 else 0, 0, row, cols]
    if m.dtype == torch.bool:
        return m.cpu().numpy()
    return (m > torch.finfo(m.dtype).min / 2).cpu().numpy()


class KvrecallAttention:
    """A transformers attention function backed by kvrecall sessions.

    client None: local attention only (the same code path, nothing sent) --
    a baseline for comparisons.

    session_options: extra fields of `POST /v1/sessions` (budget, sinks,
    window, ef, chunk, span). prompt_as_document: push each prompt as a
    kvrecall document the session attaches (see the module docstring), so
    that sparse methods apply to it; with it, send_queries (default True)
    also sends the prompt's query rows, query_stride sets the document's
    `queryStride` (server default 4), document_methods adds methods to index
    at seal besides `method`, document_prefix names the documents and
    ready_timeout bounds the wait for a sealed document to be ready.

    transport: how decode steps travel, one batch of every row per layer and
    step: "stream" (default; one WebSocket, opened at the first decode step
    and kept until close()) or "http" (`POST /v1/attend`). stacked (default
    True; the stream only): the batch as whole arrays through a
    shared-memory segment the stream attaches in shm_dir (the server's
    --shm-dir), where the server takes one (on this host); False: always
    the byte batch (`attend_batch`), for comparison. half_wire (default
    True): when the model's dtype is the one kvrecall stores (f16 or bf16), q
    goes out and out comes back in it (`q_dtype`, `out_dtype`; stacked, a
    bf16 q goes as float32, exact), half the bytes of float32 each way with
    the same answer; False sends float32.

    stats: sequences, uploads (kv posts), attends, local (local attention
    calls), documents (created), stacked and batched (layer steps sent each
    way), and over all attends the sums of the server's stats `tokens`
    (context), `attended` and `scanned`, so that stats["attended"] /
    stats["context"] is the kept fraction. A stacked answer carries no
    per-step stats: its steps' attended and scanned are the sessions'
    sums, read by sync_stats() (kept_fraction and reset() call it).
    """

    def __init__(
        self,
        client: Optional[Client],
        method: str = "exact",
        kv_dtype: Optional[str] = None,
        round_local: Optional[bool] = None,
        session_options: Optional[Dict[str, Any]] = None,
        delete_sessions: bool = True,
        prompt_as_document: bool = False,
        send_queries: bool = True,
        query_stride: Optional[int] = None,
        document_methods: Optional[Sequence[str]] = None,
        document_prefix: str = "hf",
        ready_timeout: float = 600.0,
        transport: str = "stream",
        half_wire: bool = True,
        stacked: bool = True,
        shm_dir: str = SHM_DIR,
    ):
        if kv_dtype not in (None, "f16", "bf16"):
            raise ValueError('kv_dtype must be "f16", "bf16" or None')
        if transport not in ("stream", "http"):
            raise ValueError('transport must be "stream" or "http"')
        self.transport = transport
        self.half_wire = half_wire
        self.stacked = stacked
        self._steps = DecodeSteps(client, transport, stacked, shm_dir) if client is not None else None
        self.client = client
        self.method = method
        self.kv_dtype = kv_dtype
        self.round_local = round_local
        self.session_options = dict(session_options or {})
        self.delete_sessions = delete_sessions
        self.prompt_as_document = prompt_as_document
        self.send_queries = send_queries
        self.query_stride = query_stride
        self.document_methods = list(document_methods or [])
        self.document_prefix = document_prefix
        self.ready_timeout = ready_timeout
        self.sessions: List[str] = []
        self.documents: List[str] = []  # per row, in prompt_as_document mode ("" where the row had no prompt)
        self.stats = dict(_NEW_STATS)
        self._batch: Optional[int] = None
        self._model: Optional[Dict[str, Any]] = None
        self._attached = True  # False while the prompt's documents are still being filled
        self._cache_len: Dict[int, int] = {}  # per layer: positions consumed in the local cache
        self._tokens: Dict[int, List[int]] = {}  # per layer, per row: tokens the row's session holds as its own
        self._doc_tokens: Dict[int, List[int]] = {}  # per layer, per row: tokens of the row's document
        # Per session, the [attended, scanned] stats holds of it (sync_stats adds the rest of the server's sums).
        self._seen: Dict[str, List[float]] = {}
        self._unsynced = False  # stacked steps ran since the last sync_stats
        self._stage: Dict[Any, Any] = {}  # device buffers gathering q, k, v for one copy to the segment (_staged)

    # the attention function ------------------------------------------------

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        torch = _torch()
        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError("kvrecall attention needs module.layer_idx")
        if kwargs.get("sliding_window") is not None:
            raise NotImplementedError("kvrecall attention does not do sliding-window layers")
        batch, q_heads, q_len, head_dim = query.shape
        kv_dtype = self._kv_dtype(key)
        if scaling is None:
            scaling = head_dim**-0.5

        if layer == 0 and key.shape[2] == q_len:
            self._start(batch, module, q_heads, key.shape[1], head_dim, kv_dtype)
        if layer not in self._cache_len:
            raise RuntimeError(f"kvrecall attention: layer {layer} called before layer 0 started a sequence; call reset()")
        if batch != self._batch:
            raise RuntimeError(f"kvrecall attention: batch size changed from {self._batch} to {batch}; call reset()")
        at = self._cache_len[layer]
        if key.shape[2] < at + q_len:
            raise RuntimeError(
                f"kvrecall attention: layer {layer} holds {key.shape[2]} cached positions, expected at least {at + q_len}; "
                "the cache and the adapter are out of step (call reset() before each new sequence)"
            )

        if q_len > 1 or self.client is None:
            out = self._local(module, query, key, value, attention_mask, scaling, dropout, kv_dtype, **kwargs)
            if self.client is not None:
                self._push(layer, query, key, value, attention_mask, at, q_len, kv_dtype)
            self._cache_len[layer] = at + q_len
            return out

        # Decode: kvrecall answers.
        if not self._attached:
            self._attach()
        # A model in the dtype kvrecall stores sends q as it holds it and takes out in that dtype: half the
        # bytes each way, the same answer (the server rounds the f32 out to nearest even, as .to(dtype) would).
        half = self.half_wire and query.dtype == _storage_torch_dtype(kv_dtype)
        out = self._step_stacked(layer, query, key, value, at, scaling, kv_dtype, half)
        if out is None:
            out = self._step_batch(layer, query, key, value, at, scaling, kv_dtype, half)
        self.stats["attends"] += batch
        self._cache_len[layer] = at + 1
        return out.unsqueeze(1), None  # [batch, 1, qHeads, d], as sdpa_attention_forward returns

    def _step_stacked(self, layer, query, key, value, at, scaling, kv_dtype, half):
        """The step as one stacked batch (kvrecall.hf_steps): out [batch, qHeads, d]
        on the model's device, or None where the stacked form cannot go."""
        torch = _torch()
        store = _storage_torch_dtype(kv_dtype)
        _, q_heads, _, d = query.shape
        # bf16 goes as float32 (exact both ways; the server stores k and v as bf16 again).
        q_np = np.float16 if half and kv_dtype == "f16" else np.float32
        kv_np = np.float16 if kv_dtype == "f16" else np.float32

        def fill(q, k, v, kv, qkv):  # from the device straight into the segment
            qs, ks, vs = query[:, :, 0, :].detach(), key[:, :, at, :].detach().to(store), value[:, :, at, :].detach().to(store)
            if query.device.type == "cpu" or kv is None:
                for dst, src in ((q, qs), (k, ks), (v, vs)):
                    torch.from_numpy(dst).copy_(src)
            elif qkv is None:
                torch.from_numpy(q).copy_(qs)
                self._staged(kv, (ks, vs))
            else:
                self._staged(qkv, (qs, ks, vs))

        tokens = self._tokens[layer]
        outs = self._steps.attend_stacked(layer, self.sessions, tokens, fill, (q_heads, d), q_np, (key.shape[1], d), kv_np, kv_dtype if half else None, float(scaling))
        if outs is None:
            return None
        for b in range(len(tokens)):
            tokens[b] += 1
        # The server's `tokens` of each step: the row's own tokens, its token appended, and its document's.
        self.stats["context"] += sum(tokens) + sum(self._doc_tokens[layer])
        self.stats["stacked"] += 1
        self._unsynced = True
        return _torch_out(outs, query, copy=True)  # a copy: outs is the segment's, written over by the next request

    def _staged(self, dst: np.ndarray, parts) -> None:
        """parts (device tensors) into dst (a flat segment array lying over them end to end) with one
        device-to-host copy (a wait for the device each): gathered first in a device buffer, kept per size."""
        torch = _torch()
        out = torch.from_numpy(dst)
        key = (parts[0].device, out.dtype, out.numel())
        buf = self._stage.get(key)
        if buf is None:
            if len(self._stage) >= 16:
                self._stage.clear()
            buf = self._stage[key] = torch.empty(out.numel(), dtype=out.dtype, device=parts[0].device)
        at = 0
        for p in parts:
            buf[at : at + p.numel()].view(p.shape).copy_(p)
            at += p.numel()
        out.copy_(buf)

    def _step_batch(self, layer, query, key, value, at, scaling, kv_dtype, half):
        """The step as the byte batch, one step map per row: out [batch, qHeads, d] on the model's device."""
        q_all = _wire_bits(query[:, :, 0, :], kv_dtype) if half else query[:, :, 0, :].detach().float().cpu().numpy()  # [batch, qHeads, d]
        k_all = _wire_bits(key[:, :, at, :], kv_dtype)  # [batch, kvHeads, d]
        v_all = _wire_bits(value[:, :, at, :], kv_dtype)
        wire = {"q_dtype": kv_dtype, "out_dtype": kv_dtype} if half else {}
        steps = [
            {"session": self.sessions[b], "q": q_all[b], "k": k_all[b], "v": v_all[b], "scale": float(scaling), "position": self._tokens[layer][b], "dtype": kv_dtype, **wire}
            for b in range(query.shape[0])
        ]
        results = self._attend(layer, steps)
        for b, r in enumerate(results):
            self._tokens[layer][b] += 1
            seen = self._seen.setdefault(self.sessions[b], [0.0, 0.0])
            seen[0] += r.stats.get("attended", 0)
            seen[1] += r.stats.get("scanned", 0)
            self.stats["context"] += r.stats.get("tokens", 0)
            self.stats["attended"] += r.stats.get("attended", 0)
            self.stats["scanned"] += r.stats.get("scanned", 0)
        self.stats["batched"] += 1
        return _torch_out(np.stack([r.out for r in results]), query, copy=False)  # float32, float16, or bf16 as uint16 bits

    def _attend(self, layer: int, steps: List[Dict[str, Any]]) -> list:
        """One layer's decode steps of every row as step maps, answered in
        order (resent once on a lost stream); raises the first step's error."""
        return self._steps.attend_batch(layer, steps)

    @property
    def _stream(self) -> Optional[Stream]:
        return self._steps.stream if self._steps is not None else None

    @property
    def shm_refused(self) -> Optional[str]:
        """Why the stream has no shared-memory segment (None while it has one, or before the first step)."""
        return self._steps.shm_refused if self._steps is not None else None

    def sync_stats(self) -> None:
        """Adds to stats["attended"] and stats["scanned"] what the server
        counted for the sessions beyond what stats holds (the stacked steps',
        whose answers carry no per-step stats)."""
        if not self._unsynced or self.client is None:
            return
        for sid in self.sessions:
            st = self.client.get_session(sid).get("stats") or {}
            seen = self._seen.setdefault(sid, [0.0, 0.0])
            self.stats["attended"] += st.get("selected", 0) - seen[0]
            self.stats["scanned"] += st.get("scanned", 0) - seen[1]
            seen[:] = [st.get("selected", 0), st.get("scanned", 0)]
        self._unsynced = False

    # sessions --------------------------------------------------------------

    def reset(self) -> None:
        """Forget the current sequence (and delete its sessions and documents)."""
        try:
            self.sync_stats()
        except (KvrecallError, OSError):
            pass  # a session gone already: its steps stay uncounted
        self._drop_sessions()
        self._seen = {}
        self._unsynced = False
        self._batch = None
        self._model = None
        self._attached = True
        self._cache_len = {}
        self._tokens = {}
        self._doc_tokens = {}

    def close(self) -> None:
        """Deletes the sessions (and documents) and closes the stream."""
        self.reset()
        if self._steps is not None:
            self._steps.close()

    def __enter__(self) -> "KvrecallAttention":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def kept_fraction(self) -> Optional[float]:
        """Tokens attended / context tokens, over every attend so far (None before any)."""
        self.sync_stats()
        return self.stats["attended"] / self.stats["context"] if self.stats["context"] else None

    def _start(self, batch, module, q_heads, kv_heads, head_dim, kv_dtype) -> None:
        self.reset()
        layers = getattr(module.config, "num_hidden_layers", None)
        if layers is None:
            raise ValueError("kvrecall attention needs module.config.num_hidden_layers")
        self._batch = batch
        self._cache_len = {layer: 0 for layer in range(layers)}
        self._tokens = {layer: [0] * batch for layer in range(layers)}
        self._doc_tokens = {layer: [0] * batch for layer in range(layers)}
        self.stats["sequences"] += 1
        if self.client is None:
            return
        self._model = model = model_shape(layers, q_heads, kv_heads, head_dim, dtype=kv_dtype)
        if self.prompt_as_document:
            # The sessions come at the first decode step, once the documents are sealed.
            self._attached = False
            methods = list(dict.fromkeys([self.method, *self.document_methods]))
            tag = uuid.uuid4().hex[:12]
            for b in range(batch):
                doc = f"{self.document_prefix}-{tag}-{b}"
                self.client.create_document(doc, model, methods=methods, query_stride=self.query_stride)
                self.documents.append(doc)
                self.stats["documents"] += 1
            return
        for _ in range(batch):
            s = self.client.create_session(model, method=self.method, **self.session_options)
            self.sessions.append(s["id"])

    def _attach(self) -> None:
        """Seals each row's prompt document, waits until it is ready, and opens
        the row's session over it."""
        for b, doc in enumerate(self.documents):
            counts = {self._doc_tokens[layer][b] for layer in self._doc_tokens}
            if len(counts) != 1:
                raise RuntimeError(f"kvrecall attention: the layers of row {b}'s prompt hold different token counts {sorted(counts)}")
            if counts == {0}:  # nothing visible to push (an empty row): no document
                self.client.delete_document(doc)
                self.documents[b] = ""
                continue
            self.client.seal_document(doc)
            self.client.wait_document_ready(doc, self.ready_timeout)
        for doc in self.documents:
            s = self.client.create_session(self._model, documents=[doc] if doc else [], method=self.method, **self.session_options)
            self.sessions.append(s["id"])
        self._attached = True

    def _drop_sessions(self) -> None:
        if self.client is not None and self.delete_sessions:
            for sid in self.sessions:
                try:
                    self.client.delete_session(sid)
                except (KvrecallError, OSError):
                    pass
            for doc in self.documents:  # after the sessions that attach them
                if not doc:
                    continue
                try:
                    self.client.delete_document(doc)
                except (KvrecallError, OSError):
                    pass
        self.sessions = []
        self.documents = []

    # prefill ---------------------------------------------------------------

    def _push(self, layer, query, key, value, attention_mask, at, q_len, kv_dtype) -> None:
        """Sends the new positions' K/V of every row (those its last query may see):
        to the row's prompt document while it is being filled, else to its session."""
        to_document = not self._attached
        for b in range(key.shape[0]):
            k = key[b, :, at : at + q_len, :]
            v = value[b, :, at : at + q_len, :]
            q = query[b] if to_document and self.send_queries else None  # [qHeads, q_len, d]
            if attention_mask is not None and getattr(attention_mask, "ndim", 0) == 4:
                seen = _visible(attention_mask, b, attention_mask.shape[2] - 1, slice(at, at + q_len))
                if not seen.all():
                    idx = _torch().as_tensor(np.nonzero(seen)[0], device=k.device)
                    k, v = k.index_select(1, idx), v.index_select(1, idx)
                    if q is not None:
                        q = q.index_select(1, idx.to(q.device))
            if k.shape[1] == 0:
                continue
            k_wire, v_wire = _wire_bits(k, kv_dtype), _wire_bits(v, kv_dtype)
            if to_document:
                start = self._doc_tokens[layer][b]
                q_wire = None if q is None else q.detach().float().contiguous().cpu().numpy()
                self.client.upload_document_kv(self.documents[b], layer, start, k_wire, v_wire, q=q_wire, dtype=kv_dtype)
                self._doc_tokens[layer][b] = start + k.shape[1]
            else:
                start = self._tokens[layer][b]
                self.client.upload_session_kv(self.sessions[b], layer, start, k_wire, v_wire, dtype=kv_dtype)
                self._tokens[layer][b] = start + k.shape[1]
            self.stats["uploads"] += 1

    def _local(self, module, query, key, value, attention_mask, scaling, dropout, kv_dtype, **kwargs):
        self.stats["local"] += 1
        if self._round_local(key):
            key, value = _round(key, kv_dtype), _round(value, kv_dtype)
        return _sdpa()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    def _kv_dtype(self, key) -> str:
        if self.kv_dtype is not None:
            return self.kv_dtype
        return "bf16" if key.dtype == _torch().bfloat16 else "f16"

    def _round_local(self, key) -> bool:
        if self.round_local is not None:
            return self.round_local
        return key.dtype not in (_torch().float16, _torch().bfloat16)


_NEW_STATS = {"sequences": 0, "uploads": 0, "attends": 0, "local": 0, "documents": 0, "stacked": 0, "batched": 0, "context": 0, "attended": 0.0, "scanned": 0.0}


def _torch_out(outs: np.ndarray, query, copy: bool):
    """out [batch, qHeads, d] (float32, float16, or bf16 as uint16 bits) as a tensor of query's dtype and device."""
    torch = _torch()
    out = torch.from_numpy(outs.view(np.int16)).view(torch.bfloat16) if outs.dtype == np.uint16 else torch.from_numpy(outs)
    return out.to(device=query.device, dtype=query.dtype, copy=copy)


def local_attention(kv_dtype: str = "f16", round_local: Optional[bool] = None) -> KvrecallAttention:
    """The adapter without a server: local SDPA on the same code path (a baseline)."""
    return KvrecallAttention(None, kv_dtype=kv_dtype, round_local=round_local)


def register(name: str, fn: Any) -> None:
    """Registers `fn` as attention implementation `name`, with SDPA's mask builder."""
    try:
        from transformers import AttentionInterface

        AttentionInterface.register(name, fn)
    except ImportError:  # transformers 4.48-4.49: a plain dict
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        ALL_ATTENTION_FUNCTIONS[name] = fn
    try:
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return  # before masking_utils, models build a 4-D mask for any non-SDPA implementation
    # Without a mask builder registered, create_causal_mask returns None for a
    # custom implementation, and prefill would not be causal.
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def use_attention(model: Any, name: str) -> None:
    """Switches a loaded model to attention implementation `name` (registered first)."""
    setter = getattr(model, "set_attn_implementation", None)
    if setter is not None:
        try:
            setter(name)
        except Exception:  # older validation rejects custom names: fall back to the config
            pass
    model.config._attn_implementation = name
