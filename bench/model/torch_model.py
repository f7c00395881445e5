"""kvrecall-code-13M on torch: the same interface as model.Model (prefill, decode_step, cfg, scale), for a machine
with a GPU, where the numpy prefill is the bench's largest cost (16K bytes: ~40 s on the 2-core VM).

- `HfModel`: the model loaded by transformers (LlamaForCausalLM, float32) with an attention function registered
  through kvrecall's transformers adapter (clients/python/kvrecall/hf.py: `register`, `use_attention`): at prefill
  it keeps each layer's post-RoPE Q, K, V (what the adapter pushes to kvrecall) and attends causally itself; at a
  decode step it hands the position's q, k, v to the bench's `attend` (a kvrecall session) and returns its answer.
  RoPE, norms and MLP are transformers' own, so its numbers differ from numpy's by float order and by RoPE's
  float32 angles (numpy computes them in float64): bench/model/check_backends.py measures by how much.
- `TorchModel`: numpy's arithmetic in torch (float64 RoPE angles, the same weights); the fallback when transformers
  is missing or fails its check.

Both run float32 with TF32 off (TF32 would round the matmuls' inputs to 10 bits).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, List, Optional

import numpy as np

from model import Config, Model, Prefill, model_dir

Attend = Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]
ATTN_NAME = "kvrecall-bench"


def _torch():
    import torch

    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch


def use_gpu_of_worker(wid: int) -> None:
    """On a machine with several GPUs, worker wid's model and reference go to GPU wid mod count ("cuda" is then
    that one); without torch or a GPU, nothing."""
    try:
        torch = _torch()
    except ImportError:
        return
    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        torch.cuda.set_device(wid % torch.cuda.device_count())


def release_cached(torch) -> None:
    """Hand the caching allocator's free blocks back after a prefill: its chunked scores leave GiBs reserved in each
    worker, and 8 workers sharing one device then run out of memory on later trials."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def default_device() -> str:
    return "cuda" if _torch().cuda.is_available() else "cpu"


def causal_attention(q, k, v, scale: float, chunk: int = 2048):
    """q [qHeads, n, d], k, v [kvHeads, n, d] (torch, float32) -> [qHeads, n, d]: per kv head the group's queries in
    chunks of `chunk` (a [group*chunk, keys] score matrix at a time, as model.causal_attention: bounded memory when
    several bench workers share one device)."""
    torch = _torch()
    qh, n, d = q.shape
    kvh = k.shape[0]
    group = qh // kvh
    out = torch.empty_like(q)
    for h in range(kvh):
        qs = q[h * group:(h + 1) * group] * scale
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            s = torch.matmul(qs[:, a:b], k[h, :b].T)  # [group, w, b]
            mask = torch.arange(b, device=q.device)[None, :] > torch.arange(a, b, device=q.device)[:, None]
            s.masked_fill_(mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            out[h * group:(h + 1) * group, a:b] = torch.matmul(p, v[h, :b])
    return out


class TorchModel:
    """model.Model's arithmetic in torch on `device` (see the module docstring)."""

    backend = "torch"

    def __init__(self, folder: Optional[Path] = None, device: Optional[str] = None):
        torch = _torch()
        self.device = device or default_device()
        base = Model(folder)
        self.cfg: Config = base.cfg
        self.scale = float(base.scale)
        self.inv_freq = base.inv_freq  # float64, as numpy
        t = lambda a: torch.from_numpy(np.ascontiguousarray(a, np.float32)).to(self.device)  # noqa: E731
        self.embed, self.final_norm, self.lm_head = t(base.embed), t(base.final_norm), t(base.lm_head)
        self.layers = [{f: t(getattr(L, f)) for f in ("attn_norm", "wq", "wk", "wv", "wo", "mlp_norm", "w_gate_up", "w_down")}
                       for L in base.layers]
        self.name = f"kvrecall-code-13M (bench/model/torch_model.py TorchModel, torch {torch.__version__} float32 on {self.device})"

    def _rms(self, x, w):
        torch = _torch()
        return x * torch.rsqrt(torch.mean(x * x, dim=-1, keepdim=True) + self.cfg.eps) * w

    def _rope(self, x, pos: np.ndarray):
        torch = _torch()
        ang = np.outer(pos.astype(np.float64), self.inv_freq)
        cos = torch.from_numpy(np.cos(ang).astype(np.float32)).to(self.device)
        sin = torch.from_numpy(np.sin(ang).astype(np.float32)).to(self.device)
        half = self.cfg.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def _qkv(self, li: int, h, pos: np.ndarray):
        c, L = self.cfg, self.layers[li]
        x = self._rms(h, L["attn_norm"])
        n = h.shape[0]
        q = (x @ L["wq"]).reshape(n, c.n_heads, c.head_dim).transpose(0, 1)
        k = (x @ L["wk"]).reshape(n, c.n_kv_heads, c.head_dim).transpose(0, 1)
        v = (x @ L["wv"]).reshape(n, c.n_kv_heads, c.head_dim).transpose(0, 1).contiguous()
        return self._rope(q, pos).contiguous(), self._rope(k, pos).contiguous(), v

    def _rest(self, li: int, h, attn):
        torch = _torch()
        c, L = self.cfg, self.layers[li]
        n = h.shape[0]
        h = h + attn.transpose(0, 1).reshape(n, c.n_heads * c.head_dim) @ L["wo"]
        gu = self._rms(h, L["mlp_norm"]) @ L["w_gate_up"]
        m = gu.shape[1] // 2
        return h + (torch.nn.functional.silu(gu[:, :m]) * gu[:, m:]) @ L["w_down"]

    def prefill(self, ids, keep_qkv: bool = True, keep_h: bool = False, logits: str = "all") -> Prefill:
        torch = _torch()
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.arange(len(ids))
        res = Prefill(logits=np.zeros((0, self.cfg.vocab), np.float32))
        with torch.no_grad():
            h = self.embed[torch.from_numpy(ids).to(self.device)]
            for li in range(self.cfg.n_layers):
                if keep_h:
                    res.h_in.append(h.cpu().numpy())
                q, k, v = self._qkv(li, h, pos)
                if keep_qkv:
                    res.q.append(q.cpu().numpy()), res.k.append(k.cpu().numpy()), res.v.append(v.cpu().numpy())
                h = self._rest(li, h, causal_attention(q, k, v, self.scale))
            if logits != "none":
                hh = h if logits == "all" else h[-1:]
                res.logits = (self._rms(hh, self.final_norm) @ self.lm_head).cpu().numpy()
        release_cached(torch)
        return res

    def decode_step(self, byte: int, pos: int, attend: Attend) -> np.ndarray:
        torch = _torch()
        p = np.array([pos])
        with torch.no_grad():
            h = self.embed[[byte]]
            for li in range(self.cfg.n_layers):
                q, k, v = self._qkv(li, h, p)
                o = attend(li, q[:, 0].cpu().numpy(), k[:, 0].cpu().numpy(), v[:, 0].cpu().numpy())
                h = self._rest(li, h, torch.from_numpy(np.ascontiguousarray(o, np.float32)).to(self.device)[:, None, :])
            return (self._rms(h, self.final_norm) @ self.lm_head)[0].cpu().numpy()


class HfModel:
    """kvrecall-code-13M through transformers and kvrecall's adapter helpers (see the module docstring)."""

    backend = "transformers"

    def __init__(self, folder: Optional[Path] = None, device: Optional[str] = None):
        torch = _torch()
        import transformers
        from transformers import AutoModelForCausalLM

        from kvrecall.hf import register, use_attention

        folder = Path(folder) if folder else model_dir()
        self.device = device or default_device()
        self.cfg = Config.from_json(json.loads((folder / "config.json").read_text()))
        self.scale = 1.0 / float(np.sqrt(self.cfg.head_dim))
        # No dtype argument (torch_dtype in 4.x, dtype in 5.x, whose default follows the config: bf16): widened after
        # loading instead, which is exact from bf16.
        self.hf = AutoModelForCausalLM.from_pretrained(str(folder)).to(device=self.device, dtype=torch.float32).eval()
        register(ATTN_NAME, self._attention)
        use_attention(self.hf, ATTN_NAME)
        self._mode = ""
        self._keep: Optional[List[tuple]] = None
        self._attend: Optional[Attend] = None
        self.name = (f"kvrecall-code-13M (transformers {transformers.__version__} LlamaForCausalLM through kvrecall.hf's "
                     f"attention registration, torch {torch.__version__} float32 on {self.device})")

    def _attention(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        """transformers' attention interface: query [1, qHeads, n, d] post-RoPE, key/value [1, kvHeads, n, d]
        (use_cache=False: this call's tokens only) -> ([1, n, qHeads, d], None)."""
        torch = _torch()
        li = int(module.layer_idx)
        q, k, v = query[0], key[0], value[0]
        if self._mode == "decode":
            o = self._attend(li, q[:, 0].float().cpu().numpy(), k[:, 0].float().cpu().numpy(), v[:, 0].float().cpu().numpy())
            out = torch.from_numpy(np.ascontiguousarray(o, np.float32)).to(query.device)[:, None, :]
        else:
            if self._keep is not None:
                self._keep.append((q.cpu().numpy(), k.cpu().numpy(), v.contiguous().cpu().numpy()))
            out = causal_attention(q.contiguous(), k.contiguous(), v.contiguous(), self.scale)
        return out.transpose(0, 1)[None].contiguous(), None

    def prefill(self, ids, keep_qkv: bool = True, keep_h: bool = False, logits: str = "all") -> Prefill:
        torch = _torch()
        if keep_h:
            raise NotImplementedError("HfModel does not keep the residual stream; use Model or TorchModel")
        ids_t = torch.as_tensor(np.asarray(ids, np.int64), device=self.device)[None]
        pos = torch.arange(ids_t.shape[1], device=self.device)[None]
        self._mode, self._keep = "prefill", [] if keep_qkv else None
        try:
            with torch.no_grad():
                h = self.hf.model(input_ids=ids_t, position_ids=pos, use_cache=False).last_hidden_state[0]
                lg = None if logits == "none" else self.hf.lm_head(h if logits == "all" else h[-1:])
        finally:
            kept, self._mode, self._keep = self._keep, "", None
            release_cached(torch)
        res = Prefill(logits=np.zeros((0, self.cfg.vocab), np.float32) if lg is None else lg.float().cpu().numpy())
        for q, k, v in kept or []:
            res.q.append(q), res.k.append(k), res.v.append(v)
        return res

    def decode_step(self, byte: int, pos: int, attend: Attend) -> np.ndarray:
        torch = _torch()
        self._mode, self._attend = "decode", attend
        try:
            with torch.no_grad():
                out = self.hf(input_ids=torch.tensor([[byte]], device=self.device),
                              position_ids=torch.tensor([[pos]], device=self.device), use_cache=False)
        finally:
            self._mode, self._attend = "", None
        return out.logits[0, -1].float().cpu().numpy()


def load(backend: str = "auto", folder: Optional[Path] = None, log: Callable[[str], None] = print):
    """The model for `backend`: numpy, torch, transformers, or auto (transformers on a GPU when it loads, else
    torch on a GPU, else numpy)."""
    if backend == "numpy":
        return Model(folder)
    if backend == "auto":
        try:
            if not _torch().cuda.is_available():
                return Model(folder)
        except ImportError:
            return Model(folder)
        for cls in (HfModel, TorchModel):
            try:
                t0 = time.perf_counter()
                m = cls(folder)
                log(f"model: {m.name} ({time.perf_counter() - t0:.1f} s)")
                return m
            except Exception as e:  # transformers absent or too old: the next backend
                log(f"model: {cls.__name__} unavailable ({type(e).__name__}: {e})")
        return Model(folder)
    return {"torch": TorchModel, "transformers": HfModel}[backend](folder)


def model_name(m) -> str:
    return getattr(m, "name", "kvrecall-code-13M (bench/model/model.py, numpy float32)")
