// Seeded, deterministic synthetic attention workloads for one layer (all kv
// heads): keys and values in storage dtype, prefill query rows, decode query
// steps and planted needles. Random Gaussian keys are too easy and too unlike
// real ones (DESIGN.md, "Workloads"); this generator reproduces, each behind
// its own knob (WorkloadKnobs), the structure that real K/V/Q show.
//
// Geometry. Everything is emitted as an LLM server would push it: keys and
// queries already rotated by RoPE. A head's channels come in RoPE pairs
// (c, c + d/2) (the "rotate-half" layout of HF Llama); pair p turns by
// θ_p = base^(-2p/d) radians per position (base 500000 with Llama-3.1's
// frequency scaling by default, or 10000 unscaled). The pairs form bands,
// which is where real heads keep these things:
//   fast      p < d/4                 high frequencies: position (recency)
//   topic     even pairs of the rest  low frequencies: content shared by a span
//   feature   odd pairs of the rest   low frequencies: sparse features of a few
//                                      tokens (heavy hitters, needles); quiet otherwise
//   slow      the last o pairs        the slowest: outlier channels, sink direction
// Scores are logits, q·k/√d. Ordinary key noise has unit variance per channel
// on average over the fast and topic bands (a log-normal spectrum per pair);
// the knobs are stated in logits wherever possible. Boosts that must keep
// their share of attention as the context grows (the bulk's log-partition
// grows as ln(tokens)) default to L + c with L = ln(tokens).
//
// (a) Attention sinks. What: the first `sinks` tokens take a large share of
//     every query's mass. Why: real models park surplus attention on the
//     first tokens (StreamingLLM). How: sink keys get a component along the
//     queries' mean direction in the slow band (which barely turns, so it
//     holds at any distance), sized to score `sinkBoost` logits above an
//     ordinary key; sink values are small (a sink is a no-op). Knobs: sinks
//     (4), sinkBoost (L + 0.5).
// (b) Outlier key channels. What: the 2·outlierPairs channels of the slowest
//     pairs (d/2−o..d/2−1 and d−o..d−1) carry large fixed-sign values in
//     every key, with small variance. Why: real Llama keys show a few
//     massive, fixed-sign channels in RoPE's slow frequencies. Queries share
//     the signs: a large logit common to all keys (it drifts only as the
//     slow pairs turn, < 0.4 rad over 1M positions with Llama-3.1 scaling).
//     Knobs: outlierPairs (2), outlierScale (10: the channel mean in units
//     of an ordinary channel's std).
// (c) RoPE by position. What: keys are rotated at their position, decode
//     queries at tokens + step, prefill queries at their row's position.
//     Why: servers push post-RoPE K and Q; rotation makes post-RoPE keys of
//     nearby positions alike (a key's nearest keys are often positional,
//     not semantic, neighbours) and drives (f). Knobs: ropeBase (500000),
//     ropeScaling ('llama3' when base ≥ 100000, else 'none').
// (d) Queries out of distribution. What: every q head's mean has a shift in
//     the topic channels, weighted towards the channels where keys vary
//     least, plus its own slow-band and fast-band parts, so queries sit far
//     outside the key distribution (large per-channel z-scores, query–key
//     cosines unlike key–key cosines) and a key's nearest keys are not the
//     keys a query ranks highest. The shift also meets every key's content,
//     which favours some keys whatever the query (static heavy hitters, as
//     H2O observes). Why: RetrievalAttention measured Q and K as different
//     distributions, which is what defeats key-only ANN indexes. Knobs:
//     queryShift (logit std across keys that the shift produces against the
//     keys' noise, 0.4), queryNoise (logit std of a query's own per-step
//     noise, 0.4).
// (e) Clustered content. What: after the sinks the context is a sequence of
//     spans (geometric lengths, mean spanMean), each drawn from a pool of
//     `topics`; a key is its topic's centroid (topic channels) plus noise,
//     so keys cluster by topic and each cluster is contiguous in position.
//     A fraction `salient` of tokens (the same positions in every head, like
//     keywords) also carry a random feature of norm salientNorm in the
//     feature channels (where other keys have std 0.1). Queries target one
//     span at a time (topicBoost logits on its keys, some on the same topic
//     elsewhere) and `hitters` salient tokens in it through their features
//     (hitterBoost logits each): sharp, because a feature stands far out of
//     the quiet channels, so targeting it barely disturbs other keys. Values
//     carry a per-topic mean. Knobs: topics (64), spanMean (1024),
//     topicSpread (1.5: centroid std per topic channel in units of its noise
//     std), topicBoost (2), salient (1/256), salientNorm (4), hitters (3),
//     hitterBoost (L − 2).
// (f) Recency. What: decode queries favour recent tokens. Why: local
//     attention is the commonest head pattern. How: keys and queries share
//     a mean in the fast band, so q·k peaks at distance 0 and decays about
//     as recency·(1 − ln Δ / ln W) as the fast pairs' phases spread (RoPE's
//     long-term decay; W ≈ 1/θ of the slowest fast pair, ~1200 positions at
//     d=128), with RoPE's sidelobes beyond; a new target span is one of the
//     last 8 spans with probability recentTopic. The decode steps' own keys
//     are not part of the workload, so step s sees the context from
//     distance s + 1. Knobs: recency (bonus at distance 0 in logits, L − 2.5),
//     recentTopic (0.5).
// (g) Temporal locality. What: consecutive decode queries attend similar
//     tokens. How: each q head's own query noise follows AR(1) across steps
//     with coefficient `drift`; the group's target span persists with
//     probability topicStay and each heavy hitter with hitterStay. Decode
//     positions advance by one per step, so the fast pairs still turn, as in
//     a real model. Knobs: drift (0.95), topicStay (0.9), hitterStay (0.9).
// (h) Needles. What: `needles` keys (round-robin over kv heads, not sinks,
//     not salient, clear of the last 1024 tokens), each with a feature of
//     its own (norm needleNorm) that exactly one later decode query (one
//     step, one q head) targets; that query's weight on it is solved from an
//     exact scan so the needle scores needleBoost logits above every other
//     key: rank 1 by construction. No other query (decode or prefill)
//     contains that feature. Recorded as { head, qHead, position, step }.
//     Knobs: needleBoost (3), needleNorm (4).
// (i) Facts no prefill query asks about. What: a share `unasked` of the
//     spans (drawn per span) that no prefill query targets: a prefill row
//     whose span is one of them targets an asked span at or before it
//     instead (or nothing), so neither their topic run nor their salient
//     tokens are singled out by any prefill query; decode queries still
//     pick spans as before. Why: a question asks about what the document's
//     own reading did not dwell on, which is where attention-aware indexes
//     built from prefill queries fail (issue 15). Knob: unasked (0).
// (j) Query shift between prefill and decode. What: every q head's decode
//     queries carry one more shift in the topic channels, drawn like the
//     queries' own (d) and scaled to a logit std of `decodeShift` against
//     the keys' noise; prefill queries do not. Why: the answer's queries
//     are not the document's; an index that learned the prefill queries'
//     neighbourhoods meets decode queries off them. Knob: decodeShift (0).
//     Both off, the output is byte for byte what it was without them;
//     HARD_KNOBS turns both on (unasked 0.5, decodeShift 0.8).
//
// Prefill queries (per kv head, tokens/16 rows by default, the group's q
// heads in turn, ascending positions) are drawn like decode queries at their
// own position, target the span they sit in (60%) or an earlier one, and
// only salient tokens before them: attention-aware indexes can learn the
// key neighbourhoods that decode queries will want, except the needles.
//
// Speed and determinism. Keys and values are produced in chunks of 2048
// tokens in f32 and converted with the native `convert` (kv.ts); Gaussians
// come from an inverse-CDF table and every random stream is keyed by the seed
// and by what it draws, never by the order of work (random.ts), so a seed
// always gives the same bytes.
//
// Files: types.ts (the shapes below), knobs.ts (defaults, spec checks),
// random.ts, rope.ts, heads.ts (bands, per-head key/value/query structure),
// layout.ts (spans, salient tokens), plan.ts (a spec resolved for the
// stages), kv.ts (keys & values), queries.ts (decode drift, prefill),
// needles.ts, generate.ts (the stages in order). This file is the surface.
export { generateWorkload } from './generate.js';
export { broadKnobs, defaultKnobs, HARD_KNOBS } from './knobs.js';
export type { Needle, Workload, WorkloadKnobs, WorkloadSpec } from './types.js';
export type { RopeScaling } from './rope.js';
// What benchmarks reuse: the seeded streams (for baselines drawn like the
// workload) and the RoPE frequencies (to move generated keys to new positions).
export { fillNormals, hash32, Rng } from './random.js';
export { ropeFrequencies } from './rope.js';
