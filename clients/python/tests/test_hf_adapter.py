"""The transformers adapter (kvrecall.hf) on a tiny random Llama: greedy
generation with kvrecall answering every decode step's attention gives the
same tokens as without it.

Needs torch, transformers (>= 4.48) and a running server (env KVRECALL_URL);
skipped otherwise. Env: KVRECALL_HF_DEVICE (default cuda when available),
KVRECALL_TEST_SEED.

How "without kvrecall" is defined: kvrecall stores K/V as f16 or bf16. For a
float32 model the baseline is the same model whose attention sees its K/V
rounded to f16 (`local_attention()`, the adapter's own local path), which is
what the adapter's prefill sees too; the two runs then differ only by float32
summation order, and the tokens must be identical. For a bfloat16/float16
model the K/V are exact in storage and the baseline is plain SDPA; the two
runs differ by the rounding of attention outputs to the model dtype, so that
case is checked teacher-forced with a tolerance on the logits.

Decode steps go stacked through the stream's shared-memory segment by
default (kvrecall.hf_steps); `stacked=False` sends the byte batch. The two
give bit-identical logits and the same tokens (float32, bfloat16 and, on
CUDA, float16); where the segment is refused (a directory that is not
there; a server started here with --shm-dir off) the adapter sends the byte
batch, and a connection lost mid-decode is reopened and the step resent
without appending a token twice.
"""

import os
import sys
import unittest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import serve  # noqa: E402

try:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
except ImportError:  # the client works without them; this test does not
    torch = None

URL = os.environ.get("KVRECALL_URL")
TOKEN = os.environ.get("KVRECALL_TOKEN") or None
SEED = int(os.environ.get("KVRECALL_TEST_SEED", "1234"))

PROMPT, NEW = 24, 20


@unittest.skipIf(torch is None, "torch and transformers are not installed")
@unittest.skipUnless(URL, "set KVRECALL_URL to a running kvrecall server")
class HfAdapter(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        from kvrecall import Client
        from kvrecall.hf import KvrecallAttention, local_attention, register

        cls.device = os.environ.get("KVRECALL_HF_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
        cls.client = Client(URL, token=TOKEN)
        cls.tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 must mean float32
        cls.remote = KvrecallAttention(cls.client, method="exact")
        cls.bytes = KvrecallAttention(cls.client, method="exact", stacked=False)
        cls.local = local_attention()
        register("kvrecall_test", cls.remote)
        register("kvrecall_test_bytes", cls.bytes)
        register("kvrecall_test_local", cls.local)
        register("sdpa_test", _plain_sdpa)

    @classmethod
    def tearDownClass(cls):
        torch.backends.cuda.matmul.allow_tf32 = cls.tf32
        cls.remote.close()
        cls.bytes.close()
        cls.client.close()

    def setUp(self):
        for adapter in (self.remote, self.bytes, self.local):
            adapter.reset()
            adapter.stats = dict.fromkeys(adapter.stats, 0)

    def tearDown(self):
        self.remote.reset()
        self.bytes.reset()
        self.local.reset()

    def build(self, dtype):
        config = LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA: 2 query heads per kv head
            max_position_embeddings=256,
            initializer_range=0.2,  # sharp attention, so that its answer matters
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=None,  # generate exactly NEW tokens
            pad_token_id=0,
            attn_implementation="sdpa",
        )
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(device=self.device, dtype=dtype).eval()
        return model

    def prompt(self, n, batch=1, seed=0):
        g = torch.Generator().manual_seed(SEED + seed)
        return torch.randint(3, 256, (batch, n), generator=g).to(self.device)

    def generate(self, model, impl, ids, mask=None):
        from kvrecall.hf import use_attention

        use_attention(model, impl)
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids) if mask is None else mask,
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, ids.shape[1] :].cpu()

    def forced_logits(self, model, impl, ids, tokens):
        """Logits of each step, feeding `tokens` (teacher forcing) after the prompt."""
        from kvrecall.hf import use_attention

        use_attention(model, impl)
        logits = []
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True)
            past = out.past_key_values
            logits.append(out.logits[:, -1].float().cpu())
            for i in range(tokens.shape[1] - 1):
                out = model(input_ids=tokens[:, i : i + 1].to(self.device), past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits.append(out.logits[:, -1].float().cpu())
        return torch.stack(logits, dim=1)  # [batch, steps, vocab]

    def test_float32_greedy_tokens_identical(self):
        model = self.build(torch.float32)
        ids = self.prompt(PROMPT)
        want = self.generate(model, "kvrecall_test_local", ids)
        got = self.generate(model, "kvrecall_test", ids)
        layers = model.config.num_hidden_layers
        # Every decode step of every layer went to kvrecall, and its session
        # holds the prompt plus every generated token but the last.
        self.assertEqual(self.remote.stats["attends"], (NEW - 1) * layers)
        info = self.client.get_session(self.remote.sessions[0])
        self.assertEqual(info["ownTokens"], [PROMPT + NEW - 1] * layers)
        self.assertEqual(info["method"], "exact")
        self.assertEqual(got.tolist(), want.tolist())
        # Not a vacuous pass: the tokens are not all one token.
        self.assertGreater(len(set(want[0].tolist())), 1)

        # Teacher-forced, the logits agree to float32 rounding.
        a = self.forced_logits(model, "kvrecall_test_local", ids, want)
        b = self.forced_logits(model, "kvrecall_test", ids, want)
        self.assertLess((a - b).abs().max().item(), 1e-3 * max(1.0, a.abs().max().item()))

    def test_float32_left_padded_batch(self):
        model = self.build(torch.float32)
        long_, short = self.prompt(PROMPT, seed=1), self.prompt(PROMPT - 9, seed=2)
        ids = torch.zeros((2, PROMPT), dtype=torch.long, device=self.device)
        mask = torch.zeros_like(ids)
        ids[0], mask[0] = long_[0], 1
        ids[1, 9:], mask[1, 9:] = short[0], 1
        want = self.generate(model, "kvrecall_test_local", ids, mask)
        got = self.generate(model, "kvrecall_test", ids, mask)
        self.assertEqual(got.tolist(), want.tolist())
        # The padded row's session holds only its real tokens.
        own = [self.client.get_session(sid)["ownTokens"][0] for sid in self.remote.sessions]
        self.assertEqual(own, [PROMPT + NEW - 1, PROMPT - 9 + NEW - 1])
        # Each row alone gives the same tokens as in the padded batch.
        self.remote.reset()
        alone = self.generate(model, "kvrecall_test", short)
        self.assertEqual(alone[0].tolist(), got[1].tolist())

    def test_half_dtypes_teacher_forced(self):
        dtypes = [torch.bfloat16] + ([torch.float16] if self.device.startswith("cuda") else [])
        for dtype in dtypes:
            with self.subTest(dtype=str(dtype)):
                model = self.build(dtype)
                ids = self.prompt(PROMPT, seed=3)
                want = self.generate(model, "sdpa_test", ids)
                a = self.forced_logits(model, "sdpa_test", ids, want)
                self.remote.reset()
                b = self.forced_logits(model, "kvrecall_test", ids, want)
                self.assertGreater(self.remote.stats["attends"], 0)
                diff = (a - b).abs().max().item()
                self.assertLess(diff, 0.05 * a.abs().max().item(), f"{dtype}: logits differ by {diff}")
                # The greedy choice agrees wherever it is not a near tie.
                top2 = a.topk(2, dim=-1).values
                clear = (top2[..., 0] - top2[..., 1]) > 4 * diff
                self.assertTrue(bool((a.argmax(-1) == b.argmax(-1))[clear].all()), f"{dtype}: a clear greedy choice changed")
                self.assertGreater(int(clear.sum()), 0)

    def test_half_wire_gives_the_f32_wire_answers(self):
        """A 16-bit model's decode steps travel as 16-bit q and out (half the
        bytes) and the logits are bit-identical to the float32 wire's: the
        server's rounding of out is the one .to(dtype) does. The byte batch's
        steps carry q_dtype and out_dtype; the stacked batch's likewise
        (its bf16 q as float32, exact)."""
        from kvrecall.hf import KvrecallAttention, register

        dtypes = [torch.bfloat16] + ([torch.float16] if self.device.startswith("cuda") else [])
        wide = {stacked: KvrecallAttention(self.client, method="exact", half_wire=False, stacked=stacked) for stacked in (False, True)}
        for stacked, adapter in wide.items():
            register(f"kvrecall_test_f32_wire_{stacked}", adapter)
        sent = []
        attend = self.bytes._attend
        self.bytes._attend = lambda layer, steps: (sent.extend(steps), attend(layer, steps))[1]
        try:
            for dtype in dtypes:
                for stacked, half in ((False, self.bytes), (True, self.remote)):
                    with self.subTest(dtype=str(dtype), stacked=stacked):
                        model = self.build(dtype)
                        ids = self.prompt(PROMPT, seed=4)
                        want = self.generate(model, "sdpa_test", ids)
                        half.reset()
                        wide[stacked].reset()
                        sent.clear()
                        a = self.forced_logits(model, f"kvrecall_test_f32_wire_{stacked}", ids, want)
                        b = self.forced_logits(model, "kvrecall_test_bytes" if half is self.bytes else "kvrecall_test", ids, want)
                        if not stacked:
                            kv_dtype = "bf16" if dtype == torch.bfloat16 else "f16"
                            self.assertGreater(len(sent), 0)
                            self.assertTrue(all(s.get("out_dtype") == kv_dtype and s.get("q_dtype") == kv_dtype for s in sent))
                        for adapter in (half, wide[stacked]):
                            self.assertEqual((adapter.stats["stacked"] > 0, adapter.stats["batched"] > 0), (stacked, not stacked))
                        self.assertTrue(torch.equal(a, b), f"{dtype}: logits differ by {(a - b).abs().max().item()}")
        finally:
            self.bytes._attend = attend
            for adapter in wide.values():
                adapter.close()

    def test_stacked_by_default_bit_identical_to_byte_batch(self):
        """By default every decode step goes stacked through the stream's
        segment; the byte batch (stacked=False) gives the same tokens and
        bit-identical logits, and the same stats (context, attended: the
        stacked steps' read from the sessions)."""
        dtypes = [torch.float32, torch.bfloat16] + ([torch.float16] if self.device.startswith("cuda") else [])
        for dtype in dtypes:
            with self.subTest(dtype=str(dtype)):
                model = self.build(dtype)
                layers = model.config.num_hidden_layers
                ids = self.prompt(PROMPT, batch=3, seed=5)
                counts = []
                tokens = []
                for adapter, impl in ((self.remote, "kvrecall_test"), (self.bytes, "kvrecall_test_bytes")):
                    adapter.reset()
                    adapter.stats = dict.fromkeys(adapter.stats, 0)
                    tokens.append(self.generate(model, impl, ids))
                    counts.append((adapter.stats["stacked"], adapter.stats["batched"]))
                self.assertEqual(counts, [((NEW - 1) * layers, 0), (0, (NEW - 1) * layers)])
                self.assertIsNone(self.remote.shm_refused)
                self.assertIsNotNone(self.remote._stream.shm)
                self.assertEqual(tokens[0].tolist(), tokens[1].tolist())
                self.assertGreater(len(set(tokens[0].flatten().tolist())), 1)
                a = self.forced_logits(model, "kvrecall_test", ids, tokens[0])
                b = self.forced_logits(model, "kvrecall_test_bytes", ids, tokens[0])
                self.assertTrue(torch.equal(a, b), f"{dtype}: logits differ by {(a - b).abs().max().item()}")
                self.assertEqual(self.remote.kept_fraction, self.bytes.kept_fraction)
                for key in ("attends", "context", "attended", "scanned"):
                    self.assertEqual(self.remote.stats[key], self.bytes.stats[key], key)
                self.assertEqual(self.remote.kept_fraction, 1.0)  # exact: the whole context

    def test_stacked_falls_back_to_the_byte_batch_where_the_segment_is_refused(self):
        from kvrecall import Client
        from kvrecall.hf import KvrecallAttention, register

        model = self.build(torch.float32)
        ids = self.prompt(PROMPT, batch=2, seed=6)
        want = self.generate(model, "kvrecall_test_bytes", ids)
        cases = [("no such directory", self.client, {"shm_dir": "/nonexistent-kvrecall-dir"}, "cannot make a shared-memory file")]
        server = None if serve.available() else serve.Server(extra=["--shm-dir", "off"])
        if server:
            cases.append(("--shm-dir off", Client(server.url), {}, "shared memory is off"))
        try:
            for why, client, opts, refused in cases:
                with self.subTest(why):
                    adapter = KvrecallAttention(client, method="exact", **opts)
                    register("kvrecall_test_refused", adapter)
                    try:
                        got = self.generate(model, "kvrecall_test_refused", ids)
                        self.assertEqual(got.tolist(), want.tolist())
                        self.assertEqual((adapter.stats["stacked"], adapter.stats["batched"]), (0, (NEW - 1) * model.config.num_hidden_layers))
                        self.assertRegex(adapter.shm_refused, refused)
                    finally:
                        adapter.close()
        finally:
            if server:
                cases[-1][1].close()
                server.stop()
        if not server:
            self.skipTest(f"--shm-dir off not tried: {serve.available()}")

    def test_stacked_lost_connection_resends_without_appending_twice(self):
        """The stream's connection lost mid-decode, after a stacked step went
        through (its answer lost) and before one was sent: the step is resent
        on a new connection, rows already appended asked again without their
        token; the logits are bit-identical to a run without the losses."""
        model = self.build(torch.float32)
        layers = model.config.num_hidden_layers
        ids = self.prompt(PROMPT, batch=2, seed=7)
        tokens = self.generate(model, "kvrecall_test", ids)
        want = self.forced_logits(model, "kvrecall_test", ids, tokens)
        steps = self.remote._steps
        send = steps._send_stacked
        calls, streams = [0], []

        def lossy(stream, *args):
            calls[0] += 1
            streams.append(stream)
            if calls[0] == 7:  # lost before it is sent
                stream.ws.sock.shutdown(2)
            got = send(stream, *args)
            if calls[0] == 12:  # went through; its answer lost
                stream.ws.sock.shutdown(2)
                raise ConnectionError("answer lost")
            return got

        steps._send_stacked = lossy
        try:
            got = self.forced_logits(model, "kvrecall_test", ids, tokens)
        finally:
            del steps._send_stacked
        # Each loss resent its step once, on a new stream.
        self.assertEqual(calls[0], (NEW - 1) * layers + 2)
        self.assertEqual(len({id(s) for s in streams}), 3)
        self.assertTrue(torch.equal(got, want), f"logits differ by {(got - want).abs().max().item()}")
        for sid in self.remote.sessions:
            self.assertEqual(self.client.get_session(sid)["ownTokens"], [PROMPT + NEW - 1] * layers)
        self.assertEqual(self.remote.stats["batched"], 0)


def _plain_sdpa(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


if __name__ == "__main__":
    unittest.main()
