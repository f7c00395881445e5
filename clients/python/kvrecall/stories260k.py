"""Karpathy's stories260K (llama2.c "tinyllamas", a real Llama-architecture
model trained on TinyStories) for the transformers adapter's tests and demo.

The model folder holds `stories260K.bin` (a llama2.c version-0 fp32
checkpoint) and `tok512.bin` (a llama2.c tokenizer file); see its SOURCE.md.
`find_model_dir` finds it relative to the repository
(`<repo>/../shared/data/models/stories260K`) or by env KVRECALL_STORIES260K
or KVRECALL_MODELS_DIR; no absolute path.
Header: dim 64, hidden 172, 5 layers, 8 query heads, 4 kv heads (head_dim 8),
vocab 512, trained at 512 tokens; the classifier is tied to the embedding.

llama2.c rotates adjacent pairs (2i, 2i+1) of each head; transformers' Llama
rotates the two halves of a head (`rotate_half`). `load_weights` therefore
permutes the rows of wq and wk per head (the permutation transformers'
convert_llama_weights_to_hf applies to Meta checkpoints), so that the
converted model computes the same function.

`load_weights` and `Tokenizer` need numpy only; `build_model` imports torch
and transformers.
"""

from __future__ import annotations

import os
import struct
from typing import Dict, List, Optional, Tuple

import numpy as np

__all__ = ["UPSTREAM_GREEDY", "models_dir", "find_model_dir", "load_weights", "Tokenizer", "build_model", "numpy_greedy"]

MODEL_NAME = "stories260K"

# The first 40 greedy tokens from BOS that upstream's run.c prints for
# stories260K ("Once upon a time, there was a little girl named Lily. ...").
UPSTREAM_GREEDY = [403, 407, 261, 378, 432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337,
                   410, 408, 419, 292, 411, 322, 265, 282, 295, 433, 426, 385, 328, 432, 358, 394, 261, 370, 432, 352]

BOS = 1


def models_dir(anchor: Optional[str] = None) -> str:
    """The shared models folder: env KVRECALL_MODELS_DIR, else
    `<repository root>/../shared/data/models`, the repository root being
    three folders above `anchor` (default this file; a test file in
    clients/python/tests/ works too). The checkout's clone sits beside
    `shared/`, in CI as in the workplace, so nothing here is absolute."""
    env = os.environ.get("KVRECALL_MODELS_DIR")
    if env:
        return os.path.abspath(env)
    root = os.path.dirname(os.path.abspath(anchor or __file__))
    for _ in range(3):  # kvrecall/ (or tests/) -> python/ -> clients/ -> repository root
        root = os.path.dirname(root)
    return os.path.normpath(os.path.join(root, "..", "shared", "data", "models"))


def _is_model_dir(d: Optional[str]) -> bool:
    return bool(d) and os.path.isfile(os.path.join(d, "stories260K.bin")) and os.path.isfile(os.path.join(d, "tok512.bin"))


def find_model_dir(explicit: Optional[str] = None, anchor: Optional[str] = None) -> Optional[str]:
    """The stories260K folder: `explicit`, else env KVRECALL_STORIES260K, else
    `models_dir(anchor)/stories260K` (env KVRECALL_MODELS_DIR, else the
    repository's `../shared/data/models`); None when none of them holds
    stories260K.bin and tok512.bin."""
    for d in (explicit, os.environ.get("KVRECALL_STORIES260K"), os.path.join(models_dir(anchor), MODEL_NAME)):
        if _is_model_dir(d):
            return d
    return None


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a q/k projection from interleaved-pair RoPE order to rotate_half order."""
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(0, 2, 1, 3).reshape(rows, cols)


def load_weights(model_dir: str) -> Tuple[Dict[str, int], Dict[str, np.ndarray]]:
    """(header, state dict in transformers' LlamaForCausalLM names, float32 numpy)."""
    with open(os.path.join(model_dir, "stories260K.bin"), "rb") as f:
        raw = f.read()
    dim, hidden, layers, heads, kv_heads, vocab, seq_len = struct.unpack("<7i", raw[:28])
    shared = vocab > 0
    vocab = abs(vocab)
    hd = dim // heads
    data = np.frombuffer(raw, dtype="<f4", offset=28)
    at = 0

    def take(*shape: int) -> np.ndarray:
        nonlocal at
        n = int(np.prod(shape))
        out = data[at : at + n].reshape(shape).astype(np.float32)
        at += n
        return out

    tok = take(vocab, dim)
    rms_att = take(layers, dim)
    wq = take(layers, heads * hd, dim)
    wk = take(layers, kv_heads * hd, dim)
    wv = take(layers, kv_heads * hd, dim)
    wo = take(layers, dim, heads * hd)
    rms_ffn = take(layers, dim)
    w1 = take(layers, hidden, dim)
    w2 = take(layers, dim, hidden)
    w3 = take(layers, hidden, dim)
    rms_final = take(dim)
    take(seq_len, hd // 2)  # freq_cis_real (recomputed by transformers)
    take(seq_len, hd // 2)  # freq_cis_imag
    classifier = tok if shared else take(vocab, dim)
    if at != data.size:
        raise ValueError(f"stories260K.bin: {data.size - at} floats left over; not a llama2.c v0 checkpoint of this shape")
    sd: Dict[str, np.ndarray] = {"model.embed_tokens.weight": tok, "model.norm.weight": rms_final, "lm_head.weight": classifier}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = rms_att[i]
        sd[p + "self_attn.q_proj.weight"] = _permute(wq[i], heads)
        sd[p + "self_attn.k_proj.weight"] = _permute(wk[i], kv_heads)
        sd[p + "self_attn.v_proj.weight"] = wv[i]
        sd[p + "self_attn.o_proj.weight"] = wo[i]
        sd[p + "post_attention_layernorm.weight"] = rms_ffn[i]
        sd[p + "mlp.gate_proj.weight"] = w1[i]
        sd[p + "mlp.down_proj.weight"] = w2[i]
        sd[p + "mlp.up_proj.weight"] = w3[i]
    header = dict(dim=dim, hidden_dim=hidden, n_layers=layers, n_heads=heads, n_kv_heads=kv_heads, vocab_size=vocab, seq_len=seq_len, shared_classifier=int(shared))
    return header, sd


def build_model(model_dir: str, device: str = "cpu", attn_implementation: str = "sdpa"):
    """A float32 transformers LlamaForCausalLM holding stories260K, in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    h, sd = load_weights(model_dir)
    config = LlamaConfig(
        vocab_size=h["vocab_size"],
        hidden_size=h["dim"],
        intermediate_size=h["hidden_dim"],
        num_hidden_layers=h["n_layers"],
        num_attention_heads=h["n_heads"],
        num_key_value_heads=h["n_kv_heads"],
        max_position_embeddings=h["seq_len"],  # the trained context (512), not the GGUF's 2048
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        hidden_act="silu",
        tie_word_embeddings=bool(h["shared_classifier"]),
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=BOS,
        eos_token_id=None,  # decode exactly the tokens asked for
        pad_token_id=0,
        attn_implementation=attn_implementation,
    )
    model = LlamaForCausalLM(config)
    state = {k: torch.from_numpy(v.copy()) for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"stories260K: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.to(device=device, dtype=torch.float32).eval()


class Tokenizer:
    """llama2.c's tokenizer (tok512.bin): SentencePiece-style BPE by merge score,
    a dummy-prefix space, byte fallback (byte b is token b + 3)."""

    def __init__(self, model_dir: str, vocab_size: int = 512):
        with open(os.path.join(model_dir, "tok512.bin"), "rb") as f:
            raw = f.read()
        at = 4  # max_token_length
        self.vocab: List[bytes] = []
        self.scores: List[float] = []
        for _ in range(vocab_size):
            score, n = struct.unpack_from("<fi", raw, at)
            at += 8
            self.vocab.append(raw[at : at + n])
            self.scores.append(score)
            at += n
        self.ids = {}
        for i, piece in enumerate(self.vocab):
            self.ids.setdefault(piece, i)

    def encode(self, text: str, bos: bool = True) -> List[int]:
        tokens: List[int] = [BOS] if bos else []
        if not text:
            return tokens
        ids = [self.ids[b" "]]  # the dummy prefix
        for ch in text:
            piece = ch.encode("utf-8")
            if piece in self.ids:
                ids.append(self.ids[piece])
            else:
                ids.extend(b + 3 for b in piece)
        while True:
            best, best_score, best_id = -1, -1e10, -1
            for i in range(len(ids) - 1):
                merged = self.ids.get(self.vocab[ids[i]] + self.vocab[ids[i + 1]])
                if merged is not None and self.scores[merged] > best_score:
                    best, best_score, best_id = i, self.scores[merged], merged
            if best < 0:
                break
            ids[best : best + 2] = [best_id]
        return tokens + ids

    def decode(self, ids: List[int], prev: int = BOS) -> str:
        out = bytearray()
        for t in ids:
            piece = self.vocab[t]
            if prev == BOS and piece.startswith(b" "):
                piece = piece[1:]
            if len(piece) == 6 and piece.startswith(b"<0x") and piece.endswith(b">"):
                piece = bytes([int(piece[3:5], 16)])
            out += piece
            prev = t
        return out.decode("utf-8", errors="replace")


def numpy_greedy(model_dir: str, prompt: List[int], steps: int) -> List[int]:
    """Greedy decoding with a plain numpy forward in transformers' conventions
    (rotate_half RoPE over the converted weights): checks the conversion
    without torch."""
    h, sd = load_weights(model_dir)
    heads, kv_heads, layers = h["n_heads"], h["n_kv_heads"], h["n_layers"]
    hd = h["dim"] // heads
    inv = 1.0 / (10000.0 ** (np.arange(0, hd, 2, dtype=np.float64) / hd))

    def rms(x, w):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w

    def rope(x, pos):  # x [heads, t, hd]
        f = np.outer(pos, inv)
        cos, sin = np.cos(np.concatenate([f, f], -1)), np.sin(np.concatenate([f, f], -1))
        rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
        return x * cos + rot * sin

    ids = list(prompt)
    for _ in range(steps):
        t = len(ids)
        pos = np.arange(t)
        x = sd["model.embed_tokens.weight"][ids].astype(np.float64)
        for i in range(layers):
            p = f"model.layers.{i}."
            a = rms(x, sd[p + "input_layernorm.weight"])
            q = rope((a @ sd[p + "self_attn.q_proj.weight"].T).reshape(t, heads, hd).transpose(1, 0, 2), pos)
            k = rope((a @ sd[p + "self_attn.k_proj.weight"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2), pos)
            v = (a @ sd[p + "self_attn.v_proj.weight"].T).reshape(t, kv_heads, hd).transpose(1, 0, 2)
            k, v = np.repeat(k, heads // kv_heads, 0), np.repeat(v, heads // kv_heads, 0)
            s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + np.triu(np.full((t, t), -np.inf), 1)
            s = np.exp(s - s.max(-1, keepdims=True))
            o = (s / s.sum(-1, keepdims=True)) @ v
            x = x + o.transpose(1, 0, 2).reshape(t, heads * hd) @ sd[p + "self_attn.o_proj.weight"].T
            m = rms(x, sd[p + "post_attention_layernorm.weight"])
            g = m @ sd[p + "mlp.gate_proj.weight"].T
            x = x + ((g / (1 + np.exp(-g))) * (m @ sd[p + "mlp.up_proj.weight"].T)) @ sd[p + "mlp.down_proj.weight"].T
        logits = rms(x[-1], sd["model.norm.weight"]) @ sd["lm_head.weight"].T
        ids.append(int(np.argmax(logits)))
    return ids[len(prompt) :]
