// bench:decode's charts: latency per token vs context length (with the
// H100 reference lines) and attention recall vs scanned fraction.
import { lineChart, type ChartSeries } from '../svg-chart.js';
import type { Options } from './options.js';
import type { ContextResult } from './results.js';
import { fmtTokens } from './util.js';

export function charts(o: Options, results: ContextResult[]): { latency: string; recall: string } {
  const s = o.shape;
  const shapeText = `${o.preset}: ${s.layers} layers, ${s.qHeads}q/${s.kvHeads}kv, d=${s.headDim}; ${o.mode}`;
  const latencySeries: ChartSeries[] = o.methods.map((name) => ({
    name,
    points: results.flatMap((r) => {
      const m = r.methods.find((x) => x.method === name);
      return m && Number.isFinite(m.latency.p50Ms) ? [{ x: r.tokens, y: m.latency.p50Ms }] : [];
    }),
  }));
  const xs = results.map((r) => r.tokens);
  if (results.some((r) => r.baselines.gpuDenseMs !== undefined))
    latencySeries.push({ name: 'H100 dense, HBM', dashed: true, color: '#555555', points: results.map((r) => ({ x: r.tokens, y: r.baselines.gpuDenseMs ?? NaN })) });
  latencySeries.push({ name: 'H100 streamed, PCIe', dashed: true, color: '#aaaaaa', points: results.map((r) => ({ x: r.tokens, y: r.baselines.gpuStreamMs })) });
  const latency = lineChart({
    title: 'Decode latency per token vs context length',
    subtitle: `${shapeText}; p50 over steps of the sum over layers, RPC included\ndashed: DESIGN.md's H100 references (dense in HBM; streamed from pinned host memory)`,
    xLabel: 'context tokens',
    yLabel: 'ms per token (log)',
    xScale: 'log2',
    yScale: 'log10',
    xDomain: xs.length > 1 ? [Math.min(...xs) / 1.25, Math.max(...xs) * 1.25] : undefined,
    series: latencySeries,
  });
  const recallSeries: ChartSeries[] = o.methods.map((name) => ({
    name,
    points: results.flatMap((r) => {
      const m = r.methods.find((x) => x.method === name);
      if (!m || !Number.isFinite(m.fidelity.recallMean) || !Number.isFinite(m.scannedFraction)) return [];
      return [{ x: Math.max(m.scannedFraction, 1e-4), y: m.fidelity.recallMean, ...(name !== 'exact' && { label: fmtTokens(r.tokens) }) }];
    }),
  }));
  const recall = lineChart({
    title: 'Attention recall vs scanned fraction',
    subtitle: `${shapeText}; mean over steps and sampled heads; one point per context length`,
    xLabel: 'scanned fraction of the context (stats.scanned / stats.tokens, log)',
    yLabel: 'attention recall (mass kept)',
    xScale: 'log10',
    yScale: 'linear',
    yDomain: [0, 1.05],
    xFormat: (x) => (x >= 0.01 ? `${+(x * 100).toPrecision(3)}%` : `${+(x * 100).toPrecision(2)}%`),
    series: recallSeries,
  });
  return { latency, recall };
}
