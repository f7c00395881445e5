// A small hand-written SVG line chart for bench results: a few series of
// (x, y) points on linear or logarithmic axes, with ticks, grid, legend and
// optional dashed reference series. No dependencies; the output is plain
// SVG 1.1 text that browsers, GitHub and rsvg-convert all render.

export type Scale = 'linear' | 'log2' | 'log10';

export interface ChartPoint {
  x: number;
  y: number;
  /** Small text drawn next to the point. */
  label?: string;
}

export interface ChartSeries {
  name: string;
  points: ChartPoint[];
  /** Dashed line, no markers (reference curves). */
  dashed?: boolean;
  color?: string;
}

export interface ChartSpec {
  title: string;
  /** One or more lines ('\n'). */
  subtitle?: string;
  xLabel: string;
  yLabel: string;
  xScale: Scale;
  yScale: Scale;
  /** Tick label text (default: compact numbers). */
  xFormat?: (x: number) => string;
  yFormat?: (y: number) => string;
  /** Force the axis ranges (otherwise the data's, padded). */
  xDomain?: [number, number];
  yDomain?: [number, number];
  series: ChartSeries[];
  width?: number;
  height?: number;
}

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22', '#7f7f7f'];

export function escapeXml(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** 1536 → "1.5K", 1048576 → "1M", 0.25 → "0.25". */
export function compact(x: number): string {
  const a = Math.abs(x);
  if (a >= 2 ** 20 && Number.isInteger(x / 2 ** 20)) return `${x / 2 ** 20}M`;
  if (a >= 1024 && Number.isInteger(x / 1024)) return `${x / 1024}K`;
  if (a >= 1e6) return `${+(x / 1e6).toPrecision(3)}M`;
  if (a >= 1e4) return `${+(x / 1e3).toPrecision(3)}k`;
  if (a === 0) return '0';
  if (a < 0.01) return x.toExponential(0);
  return `${+x.toPrecision(3)}`;
}

function transform(s: Scale, v: number): number {
  return s === 'log2' ? Math.log2(v) : s === 'log10' ? Math.log10(v) : v;
}

/** Nice linear ticks over [lo, hi]. */
function linearTicks(lo: number, hi: number, want = 6): number[] {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / want;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => span / s <= want) ?? 10 * mag;
  const out: number[] = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) out.push(+t.toPrecision(12));
  return out;
}

/** Powers of the base inside [lo, hi] (thinned to at most ~8), plus 2·/5· steps for short log10 spans. */
function logTicks(s: Scale, lo: number, hi: number): number[] {
  const base = s === 'log2' ? 2 : 10;
  const a = Math.floor(Math.log(lo) / Math.log(base) + 1e-9), b = Math.ceil(Math.log(hi) / Math.log(base) - 1e-9);
  const every = Math.max(1, Math.ceil((b - a + 1) / 8));
  const out: number[] = [];
  for (let e = a; e <= b; e += every) {
    const t = base ** e;
    if (t >= lo * (1 - 1e-9) && t <= hi * (1 + 1e-9)) out.push(t);
    if (base === 10 && b - a <= 2)
      for (const m of [2, 5]) if (m * t >= lo && m * t <= hi) out.push(m * t);
  }
  return out.sort((x, y) => x - y);
}

function domain(values: number[], s: Scale, forced?: [number, number]): [number, number] {
  if (forced) return forced;
  const vs = values.filter((v) => Number.isFinite(v) && (s === 'linear' || v > 0));
  if (vs.length === 0) return s === 'linear' ? [0, 1] : [1, 10];
  let lo = Math.min(...vs), hi = Math.max(...vs);
  if (s === 'linear') {
    const pad = (hi - lo || Math.abs(hi) || 1) * 0.06;
    return [lo - pad, hi + pad];
  }
  if (lo === hi) {
    lo /= 2;
    hi *= 2;
  }
  const f = Math.pow(hi / lo, 0.06);
  return [lo / f, hi * f];
}

export function lineChart(spec: ChartSpec): string {
  const W = spec.width ?? 760, H = spec.height ?? 460;
  const legendW = 190;
  const subtitle = spec.subtitle ? spec.subtitle.split('\n') : [];
  const m = { left: 72, right: legendW + 20, top: 46 + 16 * subtitle.length, bottom: 56 };
  const pw = W - m.left - m.right, ph = H - m.top - m.bottom;
  const all = spec.series.flatMap((s) => s.points);
  const [x0, x1] = domain(all.map((p) => p.x), spec.xScale, spec.xDomain);
  const [y0, y1] = domain(all.map((p) => p.y), spec.yScale, spec.yDomain);
  const tx0 = transform(spec.xScale, x0), tx1 = transform(spec.xScale, x1);
  const ty0 = transform(spec.yScale, y0), ty1 = transform(spec.yScale, y1);
  const X = (x: number) => m.left + ((transform(spec.xScale, x) - tx0) / (tx1 - tx0 || 1)) * pw;
  const Y = (y: number) => m.top + ph - ((transform(spec.yScale, y) - ty0) / (ty1 - ty0 || 1)) * ph;
  const fx = spec.xFormat ?? compact, fy = spec.yFormat ?? compact;
  const f = (v: number) => v.toFixed(1);
  const out: string[] = [];
  out.push(
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="Helvetica, Arial, sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="#ffffff"/>`,
    `<text x="${m.left}" y="24" font-size="16" font-weight="bold" fill="#222">${escapeXml(spec.title)}</text>`,
  );
  subtitle.forEach((line, i) => out.push(`<text x="${m.left}" y="${44 + 16 * i}" font-size="12" fill="#555">${escapeXml(line)}</text>`));

  // Grid and ticks.
  const xt = spec.xScale === 'linear' ? linearTicks(x0, x1) : logTicks(spec.xScale, x0, x1);
  const yt = spec.yScale === 'linear' ? linearTicks(y0, y1) : logTicks(spec.yScale, y0, y1);
  out.push('<g stroke="#e4e4e4" stroke-width="1">');
  for (const t of xt) out.push(`<line x1="${f(X(t))}" y1="${m.top}" x2="${f(X(t))}" y2="${m.top + ph}"/>`);
  for (const t of yt) out.push(`<line x1="${m.left}" y1="${f(Y(t))}" x2="${m.left + pw}" y2="${f(Y(t))}"/>`);
  out.push('</g>');
  out.push(`<rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}" fill="none" stroke="#888"/>`);
  out.push('<g fill="#333">');
  for (const t of xt) out.push(`<text x="${f(X(t))}" y="${m.top + ph + 18}" text-anchor="middle">${escapeXml(fx(t))}</text>`);
  for (const t of yt) out.push(`<text x="${m.left - 8}" y="${f(Y(t) + 4)}" text-anchor="end">${escapeXml(fy(t))}</text>`);
  out.push('</g>');
  out.push(`<text x="${f(m.left + pw / 2)}" y="${H - 14}" text-anchor="middle" fill="#222">${escapeXml(spec.xLabel)}</text>`);
  out.push(
    `<text transform="translate(18 ${f(m.top + ph / 2)}) rotate(-90)" text-anchor="middle" fill="#222">${escapeXml(spec.yLabel)}</text>`,
  );

  // Series, clipped to the plot area.
  out.push(`<clipPath id="plot"><rect x="${m.left}" y="${m.top}" width="${pw}" height="${ph}"/></clipPath>`);
  out.push('<g clip-path="url(#plot)">');
  const colors = spec.series.map((s, i) => s.color ?? PALETTE[i % PALETTE.length]);
  spec.series.forEach((s, i) => {
    const pts = s.points.filter((p) => Number.isFinite(p.x) && Number.isFinite(p.y) && (spec.xScale === 'linear' || p.x > 0) && (spec.yScale === 'linear' || p.y > 0));
    if (pts.length === 0) return;
    const c = colors[i];
    if (pts.length > 1)
      out.push(
        `<polyline fill="none" stroke="${c}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''} points="${pts.map((p) => `${f(X(p.x))},${f(Y(p.y))}`).join(' ')}"/>`,
      );
    if (!s.dashed)
      for (const p of pts) {
        out.push(`<circle cx="${f(X(p.x))}" cy="${f(Y(p.y))}" r="4" fill="${c}" stroke="#fff" stroke-width="1"/>`);
        if (p.label) out.push(`<text x="${f(X(p.x) + 6)}" y="${f(Y(p.y) - 6)}" font-size="10" fill="${c}">${escapeXml(p.label)}</text>`);
      }
  });
  out.push('</g>');

  // Legend.
  const lx = m.left + pw + 16;
  spec.series.forEach((s, i) => {
    const ly = m.top + 8 + i * 20;
    const c = colors[i];
    out.push(`<line x1="${lx}" y1="${ly}" x2="${lx + 24}" y2="${ly}" stroke="${c}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/>`);
    if (!s.dashed) out.push(`<circle cx="${lx + 12}" cy="${ly}" r="4" fill="${c}"/>`);
    out.push(`<text x="${lx + 30}" y="${ly + 4}" fill="#222">${escapeXml(s.name)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}
