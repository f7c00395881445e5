"""kvrecall-code-13M in numpy: a byte-level Llama (see the model folder's SOURCE.md).

6 layers, hidden 512, 8 query heads / 2 kv heads (GQA 4:1), head_dim 64,
MLP 1024 (SwiGLU), RMSNorm (eps 1e-5), RoPE theta 1e6 in transformers'
rotate-half convention, no biases, untied embeddings, vocabulary = the 256
byte values (token id = byte). Weights are bf16 safetensors (two shards and
an index); bf16 is the upper 16 bits of an f32, so loading is a shift.

What a bench needs:
- `load_model()` -> `Model` (float32 weights).
- `Model.prefill(ids)` -> `Prefill`: logits [n, 256] and, per layer, Q
  [qHeads, n, 64] (post-RoPE, before the 1/sqrt(64) scaling), K and V
  [kvHeads, n, 64] (K post-RoPE), and the residual stream entering each layer.
  Causal attention runs per kv head in chunks of queries, so 32K tokens fit
  in a few GB.
- `Model.decode_step(byte, pos, attend)` runs one position layer by layer;
  `attend(layer, q, k, v)` ([qHeads, 64], [kvHeads, 64], [kvHeads, 64] of the
  current position) returns that layer's attention output [qHeads, 64], so a
  bench can substitute any approximation (or kvrecall's answer) per layer.
- The pieces `layer_qkv` and `layer_rest` (attention output -> o_proj,
  residual, MLP) for finer control.

The model folder: env KVRECALL_MODELS_DIR (the folder holding the model
folders) or `<repository root>/../shared/data/models`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

MODEL_NAME = "kvrecall-code-13M"
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": None}


def model_dir() -> Path:
    env = os.environ.get("KVRECALL_MODELS_DIR")
    base = Path(env) if env else Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "models"
    return (base / MODEL_NAME).resolve()


def read_safetensors(path: Path) -> Dict[str, np.ndarray]:
    """Every tensor of one safetensors file as float32 (bf16 widened exactly)."""
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    data = memoryview(raw)[8 + header_len:]
    out: Dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = info["dtype"]
        if dtype not in _DTYPES:
            raise ValueError(f"{path.name}: tensor {name} has dtype {dtype}; expected one of {sorted(_DTYPES)}")
        if dtype == "BF16":
            arr = (np.frombuffer(data[begin:end], dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(data[begin:end], dtype=np.dtype(_DTYPES[dtype]).newbyteorder("<")).astype(np.float32)
        out[name] = arr.reshape(info["shape"])
    return out


def read_checkpoint(folder: Path) -> Dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    tensors: Dict[str, np.ndarray] = {}
    for shard in shards:
        tensors.update(read_safetensors(folder / shard))
    return tensors


@dataclass
class Config:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    eps: float

    @staticmethod
    def from_json(d: dict) -> "Config":
        return Config(d["num_hidden_layers"], d["hidden_size"], d["num_attention_heads"], d["num_key_value_heads"],
                      d.get("head_dim", d["hidden_size"] // d["num_attention_heads"]), d["vocab_size"],
                      float(d["rope_theta"]), float(d["rms_norm_eps"]))


@dataclass
class Layer:
    attn_norm: np.ndarray  # [hidden]
    wq: np.ndarray  # [hidden, qHeads*64] (transposed: x @ wq)
    wk: np.ndarray  # [hidden, kvHeads*64]
    wv: np.ndarray  # [hidden, kvHeads*64]
    wo: np.ndarray  # [qHeads*64, hidden]
    mlp_norm: np.ndarray  # [hidden]
    w_gate_up: np.ndarray  # [hidden, 2*mlp]
    w_down: np.ndarray  # [mlp, hidden]


@dataclass
class Prefill:
    logits: np.ndarray  # [n, vocab] (empty [0, vocab] when not asked for)
    q: List[np.ndarray] = field(default_factory=list)  # per layer [qHeads, n, 64], post-RoPE, unscaled
    k: List[np.ndarray] = field(default_factory=list)  # per layer [kvHeads, n, 64], post-RoPE
    v: List[np.ndarray] = field(default_factory=list)  # per layer [kvHeads, n, 64]
    h_in: List[np.ndarray] = field(default_factory=list)  # per layer [n, hidden]: residual stream entering it


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(var + eps)) * w


def silu(x: np.ndarray) -> np.ndarray:
    return x / (1.0 + np.exp(-x))


def softmax_attend(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """Dense attention of queries q [g, 64] over keys/values [m, 64] (no mask)."""
    s = (q @ k.T) * scale
    s -= s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return p @ v


class Model:
    def __init__(self, folder: Optional[Path] = None):
        folder = Path(folder) if folder else model_dir()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"no config.json in {folder}; set KVRECALL_MODELS_DIR to the folder holding {MODEL_NAME}/")
        self.cfg = Config.from_json(json.loads((folder / "config.json").read_text()))
        t = read_checkpoint(folder)
        c = self.cfg
        self.embed = t["model.embed_tokens.weight"]  # [vocab, hidden]
        self.final_norm = t["model.norm.weight"]
        self.lm_head = np.ascontiguousarray(t["lm_head.weight"].T)  # [hidden, vocab]
        self.layers: List[Layer] = []
        for i in range(c.n_layers):
            p = f"model.layers.{i}."
            g, u = t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"]
            self.layers.append(Layer(
                t[p + "input_layernorm.weight"],
                np.ascontiguousarray(t[p + "self_attn.q_proj.weight"].T),
                np.ascontiguousarray(t[p + "self_attn.k_proj.weight"].T),
                np.ascontiguousarray(t[p + "self_attn.v_proj.weight"].T),
                np.ascontiguousarray(t[p + "self_attn.o_proj.weight"].T),
                t[p + "post_attention_layernorm.weight"],
                np.ascontiguousarray(np.concatenate([g, u], axis=0).T),
                np.ascontiguousarray(t[p + "mlp.down_proj.weight"].T),
            ))
        self.inv_freq = (1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim)))
        self.scale = 1.0 / np.sqrt(c.head_dim)

    # ---- pieces ----

    def rope(self, x: np.ndarray, pos: np.ndarray) -> np.ndarray:
        """x [heads, n, 64] at positions pos [n] -> rotated (rotate-half convention)."""
        ang = np.outer(pos.astype(np.float64), self.inv_freq)  # [n, 32]
        cos = np.cos(ang).astype(np.float32)
        sin = np.sin(ang).astype(np.float32)
        half = self.cfg.head_dim // 2
        x1, x2 = x[..., :half], x[..., half:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    def layer_qkv(self, li: int, h: np.ndarray, pos: np.ndarray):
        """Residual stream h [n, hidden] at positions pos -> Q [qHeads, n, 64], K, V [kvHeads, n, 64] (Q, K post-RoPE)."""
        c, L = self.cfg, self.layers[li]
        x = rms_norm(h, L.attn_norm, c.eps)
        n = h.shape[0]
        q = (x @ L.wq).reshape(n, c.n_heads, c.head_dim).transpose(1, 0, 2)
        k = (x @ L.wk).reshape(n, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        v = (x @ L.wv).reshape(n, c.n_kv_heads, c.head_dim).transpose(1, 0, 2)
        return self.rope(q, pos), self.rope(k, pos), np.ascontiguousarray(v)

    def layer_rest(self, li: int, h: np.ndarray, attn: np.ndarray) -> np.ndarray:
        """The layer after attention: h [n, hidden], attention output attn [qHeads, n, 64] -> next residual stream."""
        c, L = self.cfg, self.layers[li]
        n = h.shape[0]
        h = h + attn.transpose(1, 0, 2).reshape(n, c.n_heads * c.head_dim).astype(np.float32) @ L.wo
        x = rms_norm(h, L.mlp_norm, c.eps)
        gu = x @ L.w_gate_up
        m = gu.shape[1] // 2
        return h + (silu(gu[:, :m]) * gu[:, m:]) @ L.w_down

    def logits(self, h: np.ndarray) -> np.ndarray:
        return rms_norm(h, self.final_norm, self.cfg.eps) @ self.lm_head

    def causal_attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, chunk: int = 512) -> np.ndarray:
        """q [qHeads, n, 64], k, v [kvHeads, n, 64] -> [qHeads, n, 64]. Per kv head, the group's queries in
        chunks: one [group*chunk, keys] score matrix at a time (512 x 4 x 32K floats = 256 MB at 32K).
        The scores go into one buffer reused across chunks and heads, against K^T made contiguous once per
        head: a fresh 64-256 MB matrix per chunk (page faults) times a transposed slice cost about half of
        the prefill (8K bytes on the 2-core VM: QK^T 1.6 s -> 0.45 s per kv head and layer)."""
        c = self.cfg
        group = c.n_heads // c.n_kv_heads
        n, d = q.shape[1], q.shape[2]
        out = np.empty_like(q)
        width = min(chunk, n)
        buf = np.empty(group * width * n, np.float32)
        above = np.triu(np.ones((width, width), bool), 1)
        for kv in range(c.n_kv_heads):
            qs = q[kv * group:(kv + 1) * group] * np.float32(self.scale)
            kt = np.ascontiguousarray(k[kv].T)  # [64, n]
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                w = b - a
                s = buf[:group * w * b].reshape(group * w, b)
                np.matmul(np.ascontiguousarray(qs[:, a:b]).reshape(group * w, d), kt[:, :b], out=s)
                diag = s.reshape(group, w, b)[:, :, a:b]  # query a+i sees keys 0..a+i
                diag[:, above[:w, :w]] = -np.inf
                s -= s.max(axis=1, keepdims=True)
                np.exp(s, out=s)
                o = s @ v[kv, :b]
                o /= s.sum(axis=1, keepdims=True)
                out[kv * group:(kv + 1) * group, a:b] = o.reshape(group, w, d)
        return out

    # ---- whole passes ----

    def prefill(self, ids, keep_qkv: bool = True, keep_h: bool = False, logits: str = "all") -> Prefill:
        """Forward over bytes ids (float32). logits: 'all', 'last' or 'none'."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.arange(len(ids))
        h = self.embed[ids]
        res = Prefill(logits=np.zeros((0, self.cfg.vocab), np.float32))
        for li in range(self.cfg.n_layers):
            if keep_h:
                res.h_in.append(h)
            q, k, v = self.layer_qkv(li, h, pos)
            if keep_qkv:
                res.q.append(q), res.k.append(k), res.v.append(v)
            h = self.layer_rest(li, h, self.causal_attention(q, k, v))
        if logits == "all":
            res.logits = self.logits(h)
        elif logits == "last":
            res.logits = self.logits(h[-1:])
        return res

    def decode_step(self, byte: int, pos: int, attend: Callable[[int, np.ndarray, np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """One position, layer by layer: attend(layer, q [qHeads,64], k [kvHeads,64], v [kvHeads,64]) -> [qHeads,64].
        Returns the logits [vocab]."""
        h = self.embed[[byte]]
        p = np.array([pos])
        for li in range(self.cfg.n_layers):
            q, k, v = self.layer_qkv(li, h, p)
            o = attend(li, q[:, 0], k[:, 0], v[:, 0])
            h = self.layer_rest(li, h, o[:, None, :])
        return self.logits(h)[0]


class DenseCache:
    """A growing dense KV cache over a prefill's K/V, for greedy generation."""

    def __init__(self, model: Model, pre: Prefill, capacity: int):
        self.m = model
        n = pre.k[0].shape[1]
        self.n = n
        self.k, self.v = [], []
        for k, v in zip(pre.k, pre.v):
            kk = np.empty((k.shape[0], n + capacity, k.shape[2]), np.float32)
            vv = np.empty_like(kk)
            kk[:, :n], vv[:, :n] = k, v
            self.k.append(kk), self.v.append(vv)

    def attend(self, li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        # called once per layer per step; the position count advances after the last layer
        K, V = self.k[li], self.v[li]
        K[:, self.n], V[:, self.n] = k, v
        group = q.shape[0] // K.shape[0]
        out = np.empty_like(q)
        for kv in range(K.shape[0]):
            out[kv * group:(kv + 1) * group] = softmax_attend(q[kv * group:(kv + 1) * group], K[kv, :self.n + 1],
                                                              V[kv, :self.n + 1], self.m.scale)
        if li == len(self.k) - 1:
            self.n += 1
        return out


def greedy(model: Model, ids, n_new: int) -> bytes:
    """Prefill ids, then n_new greedy bytes with dense attention."""
    pre = model.prefill(ids, keep_qkv=True, logits="last")
    cache = DenseCache(model, pre, n_new)
    out = [int(np.argmax(pre.logits[-1]))]
    for _ in range(n_new - 1):
        lg = model.decode_step(out[-1], cache.n, cache.attend)
        out.append(int(np.argmax(lg)))
    return bytes(out)
