"""kvdecode.Held on a torch device, still float64: the bench's reference attention and top-k oracle for every
(step, layer, configuration) cost ~4 ms per call in numpy at 16K (a trial of 7 configurations: ~6 s of 2-core VM
time); on a GPU a call is a few kernel launches. Same interface and the same answers (float64 throughout; the
oracle's top-k by torch.topk, which may order exact ties differently from numpy's argpartition)."""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np


class TorchHeld:
    def __init__(self, model, trial, extra: int, device: str = "cuda"):
        import torch

        self.torch, self.device = torch, device
        self.scale = float(model.scale)
        self.group = model.cfg.n_heads // model.cfg.n_kv_heads
        cap = trial.n_doc + extra
        self.k, self.v = [], []
        for k16, v16 in zip(trial.k16, trial.v16):
            K = torch.zeros((k16.shape[0], cap, k16.shape[2]), dtype=torch.float64, device=device)
            V = torch.zeros_like(K)
            K[:, :trial.n_doc] = torch.from_numpy(k16).to(device).double()
            V[:, :trial.n_doc] = torch.from_numpy(v16).to(device).double()
            self.k.append(K), self.v.append(V)
        self.n = [trial.n_doc] * len(self.k)

    def _t(self, x: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(x)).to(self.device)

    def append(self, li: int, k: np.ndarray, v: np.ndarray) -> None:
        n = self.n[li]
        self.k[li][:, n] = self._t(np.asarray(k, np.float32).astype(np.float16)).double()
        self.v[li][:, n] = self._t(np.asarray(v, np.float32).astype(np.float16)).double()
        self.n[li] = n + 1

    def _probs(self, li: int, q: np.ndarray):
        """Per kv head g: probabilities [G, n] of its query heads and the reference output [G, d], float64."""
        n, G = self.n[li], self.group
        qt = self._t(np.asarray(q, np.float64)).reshape(-1, G, q.shape[1])  # [kvHeads, G, d]
        s = self.torch.matmul(qt, self.k[li][:, :n].transpose(1, 2)) * self.scale  # [kvHeads, G, n]
        p = self.torch.softmax(s, dim=-1)
        return p, self.torch.matmul(p, self.v[li][:, :n])

    def reference(self, li: int, q: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        p, o = self._probs(li, q)
        return o.reshape(-1, o.shape[-1]).cpu().numpy(), p.reshape(-1, p.shape[-1]).cpu().numpy()

    def dense_attend(self, li: int, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        self.append(li, k, v)
        _, o = self._probs(li, q)
        return o.reshape(-1, o.shape[-1]).float().cpu().numpy()

    def measure(self, li: int, q: np.ndarray, out: np.ndarray, selection: Sequence[Sequence[int]]) -> Tuple[np.ndarray, ...]:
        """As kvdecode.Held.measure: per query head (error, oracle error, recall, oracle recall)."""
        torch = self.torch
        n = self.n[li]
        p, o_ref = self._probs(li, q)  # [kvHeads, G, n], [kvHeads, G, d]
        ref = torch.linalg.norm(o_ref, dim=-1)
        o = self._t(np.asarray(out, np.float64)).reshape(o_ref.shape)
        rows = []
        for g, sel in enumerate(selection):
            ids = self._t(np.asarray(sel, np.int64))
            recall = p[g][:, ids].sum(dim=1)
            m = int(min(max(len(sel), 1), n))
            top = torch.topk(p[g].mean(dim=0), m).indices
            sub = p[g][:, top]
            mass = sub.sum(dim=1)
            o_or = torch.matmul(sub / mass[:, None], self.v[li][g, top])
            rows.append(torch.stack([torch.linalg.norm(o[g] - o_ref[g], dim=-1) / ref[g],
                                     torch.linalg.norm(o_or - o_ref[g], dim=-1) / ref[g], recall, mass]))
        err, err_or, rec, rec_or = torch.cat(rows, dim=1).cpu().numpy()
        return err, err_or, rec, rec_or
