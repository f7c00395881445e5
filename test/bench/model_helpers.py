"""bench:model's helpers (bench/model/): what lets trials run in parallel workers and across runs and still report
the numbers one sequential run would. Run by test/bench/model-helpers.test.ts (python3 -m unittest).

- Meter.merge + in_trial_order: per-trial meters merged from workers in any order summarise exactly as one meter
  that saw the trials in index order (sums, maxima, per-trial lists lined up with dense's); a meter's JSON form
  (the worker states' format) summarises as the meter;
- merge_states refuses two states holding the same trial (runs merged without distinct --first-trial ranges) or
  runs of other parameters; runs of other configurations merge, each configuration compared with dense on its own
  trials (as a run of that configuration alone would report);
- tally.py sums result files as their trials would sum, and refuses a trial counted twice;
- the packed held-out corpus (pack.py's format, KVRECALL_HELDOUT_PACK) is the same bytes as the folder's;
- TorchHeld (the float64 reference on a torch device) measures what Held measures, when torch is installed.
"""

from __future__ import annotations

import json
import lzma
import os
import sys
import tempfile
import unittest
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "model"))

import heldout  # noqa: E402
from meter import Meter  # noqa: E402

LAYERS = 3


class FakeResult:
    def __init__(self, rng: np.random.Generator):
        self.stats = dict(tokens=1000.0, attended=float(rng.integers(10, 50)), estimated=float(rng.integers(0, 900)),
                          scanned=float(rng.integers(50, 400)), ms=float(rng.random()))


class FakeHeld:
    """Held's interface with random measurements (the meters' arithmetic is under test, not attention)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def append(self, li, k, v):
        pass

    def measure(self, li, q, out, selection):
        return tuple(self.rng.random(8) for _ in range(4))


def trial_meter(trial: int, label_seed: int) -> Meter:
    """One trial's meter, its numbers a function of (trial, label) only."""
    rng = np.random.default_rng([trial, label_seed])
    m = Meter(LAYERS)
    held = FakeHeld(rng)
    for _step in range(4):
        for li in range(LAYERS):
            r = FakeResult(rng)
            r.out, r.selection = None, [[0], [1]]
            m.observe(held, li, None, None, None, r, float(rng.random()) / 1e3)
    m.token_ms.extend(np.asarray(m.rtt_ms).reshape(-1, LAYERS).sum(axis=1).tolist())
    m.setup_ms.append(float(rng.random()))
    m.tf_argmax.append(rng.integers(0, 3, 6))
    m.kl.append(float(rng.random()))
    m.answers.append(b"%05d" % rng.integers(0, 3))
    m.keys.append(b"00001")
    m.trial_ids.append(trial)
    return m


def summary(label_seed: int, order, split, mine_reversed: bool = False) -> dict:
    """Trials `order` merged into per-worker meters (worker w takes order[split[w]:split[w+1]]), the workers merged
    (this configuration's in reverse worker order when mine_reversed)."""
    dense_w, mine_w = [], []
    for w in range(len(split) - 1):
        dw, mw = Meter(LAYERS), Meter(LAYERS)
        for t in order[split[w]:split[w + 1]]:
            dw.merge(trial_meter(t, 0)), mw.merge(trial_meter(t, label_seed))
        dense_w.append(dw), mine_w.append(mw)
    dense, mine = Meter(LAYERS), Meter(LAYERS)
    for m in dense_w:
        dense.merge(m)
    for m in (mine_w[::-1] if mine_reversed else mine_w):
        mine.merge(m)
    dense.in_trial_order(), mine.in_trial_order()
    return mine.summary(dense)


class MeterMerge(unittest.TestCase):
    def test_workers_in_any_order_summarise_as_one_sequential_meter(self):
        seq = summary(7, [0, 1, 2, 3, 4, 5], [0, 6])
        par = summary(7, [4, 1, 5, 0, 3, 2], [0, 2, 3, 6])
        self.assertEqual(seq["pass_key"], par["pass_key"])
        for key in ("err", "oracle_err", "recall", "exact_share", "estimated_share", "scanned_share", "agreement", "kl"):
            self.assertAlmostEqual(seq[key], par[key], places=12, msg=key)
        for a, b in zip(seq["layers"], par["layers"]):
            for key in a:
                self.assertAlmostEqual(a[key], b[key], places=12, msg=key)
        for key, val in seq["latency"].items():
            self.assertAlmostEqual(val, par["latency"][key], places=12, msg=key)
        self.assertEqual(seq["agreement_steps"], 36)

    def test_a_meter_survives_its_json_form(self):
        # Worker states travel as JSON (numpy-free) between the GPU machine and this one.
        import json

        dense, mine = trial_meter(0, 0), trial_meter(0, 3)
        for t in (1, 2):
            dense.merge(trial_meter(t, 0)), mine.merge(trial_meter(t, 3))
        back = Meter.from_plain(json.loads(json.dumps(mine.to_plain())))
        dense_back = Meter.from_plain(json.loads(json.dumps(dense.to_plain())))
        self.assertEqual(json.dumps(mine.summary(dense)), json.dumps(back.summary(dense_back)))

    def test_answers_line_up_with_dense_by_trial(self):
        # The same trials as dense's (label 0), merged in another worker order: without in_trial_order one worker's
        # answers would be compared with another's.
        s = summary(0, [5, 3, 1, 0, 2, 4], [0, 3, 6], mine_reversed=True)
        self.assertEqual(s["pass_key"]["same_as_dense"], 6)
        self.assertEqual(s["agreement"], 1.0)


class MergeStates(unittest.TestCase):
    def test_the_same_trial_twice_is_refused(self):
        import run  # noqa: F401 -- imports numpy and msgpack-free modules only up to main()

        def state(ids):
            local = Meter(LAYERS)
            local.trial_ids.extend(ids)
            return dict(lengths={2048: dict(local=local, meters={}, trial_s=[1.0] * len(ids), loads=[], timing={})})

        with self.assertRaises(SystemExit):
            run.merge_states([state([0, 1]), state([1, 2])])
        self.assertIn(2048, run.merge_states([state([0, 1]), state([2, 3])])["lengths"])


    def test_runs_of_other_configurations_merge(self):
        # Run A: dense and "wave" on trials 0-3; run B: dense and "ivf" alone on trials 4-6. Merged, ivf is compared
        # with dense on 4-6 only, exactly as run B alone reports it, and wave as run A alone.
        import run
        from trials import Config

        def state(ids, label, seed, run_start):
            meters = {"exact": Meter(LAYERS), label: Meter(LAYERS)}
            local = Meter(LAYERS)
            for t in ids:
                meters["exact"].merge(trial_meter(t, 0)), meters[label].merge(trial_meter(t, seed))
                local.merge(trial_meter(t, 0))
            ls = dict(local=local, meters=meters, trial_s=[1.0] * len(ids), loads=[0.0] * len(ids),
                      timing=dict(decode_s={"exact": 1.0, label: 1.0}), span=[run_start, run_start + 10])
            return dict(lengths={2048: ls}, args=dict(budget=0.024, run_start=run_start),
                        configs=[Config("exact", "exact", None), Config(label, label, None)])

        alone = {label: state(ids, label, seed, 0.0)["lengths"][2048]["meters"]
                 for label, ids, seed in (("wave", [0, 1, 2, 3], 5), ("ivf", [4, 5, 6], 9))}
        merged = run.merge_states([state([0, 1, 2, 3], "wave", 5, 0.0), state([4, 5, 6], "ivf", 9, 100.0)])["lengths"][2048]
        self.assertEqual(merged["meters"]["exact"].trial_ids, list(range(7)))
        for label, m in alone.items():
            want = json.dumps(m[label].summary(m["exact"]), sort_keys=True)
            self.assertEqual(json.dumps(merged["meters"][label].summary(merged["meters"]["exact"]), sort_keys=True), want)
        self.assertEqual(merged["span"][1] - merged["span"][0], 20)  # two runs of 10 s each, 100 s apart
        other = state([7], "ivf", 9, 200.0)
        other["args"]["budget"] = 0.05
        with self.assertRaises(SystemExit):
            run.merge_states([state([0], "wave", 5, 0.0), other])


class Tally(unittest.TestCase):
    def test_sums_as_the_trials_and_refuses_a_trial_twice(self):
        import tally

        def result(ids, hits, dense_hits, agreement, steps, err):
            params = {k: 1 for k in tally.SAME}
            cfg = lambda label, h, a, e: dict(label=label, pass_key=dict(hits=h, trials=len(ids), lost_vs_dense=0),  # noqa: E731
                                              agreement=a, agreement_steps=steps, exact_share=0.02,
                                              layers=[dict(err=x) for x in e])
            return dict(machine=dict(cpu="cpu", cores=2), params=params, lengths=[dict(
                length=2048, trial_ids=ids, configs=[cfg("exact", dense_hits, 1.0, [0.0, 0.0]), cfg("m", hits, agreement, err)])])

        with tempfile.TemporaryDirectory() as d:
            tally.RESULTS = Path(d)
            (Path(d) / "a.json").write_text(json.dumps(result([0, 1, 2], 2, 3, 0.9, 30, [0.01, 0.04])))
            (Path(d) / "b.json").write_text(json.dumps(result([3], 1, 0, 0.5, 10, [0.05, 0.10])))
            t = tally.tally(2048, [("a.json", None), ("b.json", ["m"])])
            (c,) = t["configs"]
            self.assertEqual((c["trials"], c["pass_key"]["hits"], c["pass_key"]["dense_hits"]), (4, 3, 3))
            self.assertAlmostEqual(c["agreement"], (0.9 * 30 + 0.5 * 10) / 40, places=12)
            self.assertAlmostEqual(c["layers_err"][1], (3 * 0.04 + 0.10) / 4, places=12)
            self.assertFalse(c["meets"]["layer_err"])  # layer 1: 0.055 over trials, though a.json alone has 0.04
            self.assertAlmostEqual(c["key_gap_points"], 0.0)
            (Path(d) / "c.json").write_text(json.dumps(result([2, 9], 1, 1, 1.0, 20, [0.0, 0.0])))
            with self.assertRaises(SystemExit):
                tally.tally(2048, [("a.json", None), ("c.json", None)])


class PackedCorpus(unittest.TestCase):
    def test_packed_bytes_are_the_folders(self):
        with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as pack:
            rng = np.random.default_rng(3)
            for i in range(12):
                sub = Path(src) / f"pkg{i % 3}"
                sub.mkdir(exist_ok=True)
                (sub / f"m{i}.py").write_bytes(bytes(rng.integers(32, 127, 600 + 100 * i).astype(np.uint8)))
            old = {k: os.environ.get(k) for k in ("KVRECALL_HELDOUT_DIR", "KVRECALL_HELDOUT_PACK")}
            try:
                os.environ.pop("KVRECALL_HELDOUT_PACK", None)
                os.environ["KVRECALL_HELDOUT_DIR"] = src
                direct = heldout.corpus(5)
                (Path(pack) / heldout.packed_name(5)).write_bytes(lzma.compress(direct))
                os.environ["KVRECALL_HELDOUT_PACK"] = pack
                self.assertEqual(heldout.corpus(5), direct)
                with self.assertRaises(FileNotFoundError):
                    heldout.corpus(6)  # not packed: an error, never another corpus
            finally:
                for k, v in old.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            self.assertEqual(len(direct.split(heldout.SEPARATOR)), 12)


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@unittest.skipUnless(_torch_available(), "torch not installed")
class TorchReference(unittest.TestCase):
    def test_torch_held_measures_what_held_measures(self):
        import kvdecode
        from torch_held import TorchHeld

        class Cfg:
            n_heads, n_kv_heads, head_dim = 8, 2, 16

        class M:
            cfg, scale = Cfg, 0.25

        rng = np.random.default_rng(11)
        n = 300
        trial = kvdecode.Trial(b"", b"", 0, n, [rng.standard_normal((2, n, 16)).astype(np.float16) for _ in range(2)],
                               [rng.standard_normal((2, n, 16)).astype(np.float16) for _ in range(2)], [])
        a, b = kvdecode.Held(M, trial, 4), TorchHeld(M, trial, 4, device="cpu")
        for li in range(2):
            k, v = rng.standard_normal((2, 16)).astype(np.float32), rng.standard_normal((2, 16)).astype(np.float32)
            a.append(li, k, v), b.append(li, k, v)
            q = 2 * rng.standard_normal((8, 16))
            out = a.reference(li, q)[0] + 0.05 * rng.standard_normal((8, 16))
            sel = [rng.choice(n + 1, 40, replace=False) for _ in range(2)]
            for x, y in zip(a.measure(li, q, out, sel), b.measure(li, q, out, sel)):
                np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(a.dense_attend(li, q, k, v), b.dense_attend(li, q, k, v), rtol=1e-5, atol=1e-6)


if __name__ == "__main__":
    unittest.main()
