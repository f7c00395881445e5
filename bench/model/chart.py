"""A chart of a bench:model result (bench/results/model-<tag>.json -> .svg, plain SVG, no plotting library): per
length, each configuration's attention output error per layer (bars; the issue's 0.05 target dashed) and, beside
the legend, its next-byte agreement with dense and pass keys.

    python3 bench/model/chart.py bench/results/model-vm-32k.json [more.json ...]    # writes <same name>.svg
"""

from __future__ import annotations

import json
import sys
from html import escape
from pathlib import Path

COLORS = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f"]
TARGET = 0.05


def chart(res: dict) -> str:
    lengths = res["lengths"]
    W, panel_h, top, left = 760, 230, 40, 56
    H = top + len(lengths) * (panel_h + 50) + 10
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
           f'<text x="{left}" y="20" font-size="14">kvrecall-code-13M through kvrecall: attention output error per '
           f'layer ({escape(str(res["machine"].get("gpu") or res["machine"]["cpu"]))})</text>']
    for pi, r in enumerate(lengths):
        configs = [c for c in r["configs"] if c["label"] != "exact"]
        layers = len(configs[0]["layers"]) if configs else 0
        y0 = top + pi * (panel_h + 50)
        plot_w, plot_h = 430, panel_h - 30
        ymax = max([TARGET * 1.6] + [x["err"] for c in configs for x in c["layers"]]) * 1.1
        sy = lambda v: y0 + 20 + plot_h - plot_h * v / ymax  # noqa: E731
        out.append(f'<text x="{left}" y="{y0 + 12}" font-size="12">{r["length"]} bytes, {r["trials"]} trials, '
                   f'{100 * (configs[0]["exact_share"] if configs else 0):.1f}% exact</text>')
        for t in range(5):
            v = ymax * t / 4
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#ddd"/>'
                       f'<text x="{left - 6}" y="{sy(v) + 4:.1f}" text-anchor="end">{v:.3f}</text>')
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{sy(TARGET):.1f}" y2="{sy(TARGET):.1f}" '
                   f'stroke="#c00" stroke-dasharray="4 3"/>')
        group = plot_w / max(1, layers)
        bw = (group - 8) / max(1, len(configs))
        for li in range(layers):
            gx = left + li * group + 4
            out.append(f'<text x="{gx + (group - 8) / 2:.1f}" y="{sy(0) + 14:.1f}" text-anchor="middle">L{li}</text>')
            for ci, c in enumerate(configs):
                v = c["layers"][li]["err"]
                out.append(f'<rect x="{gx + ci * bw:.1f}" y="{sy(v):.1f}" width="{bw - 1:.1f}" height="{sy(0) - sy(v):.1f}" '
                           f'fill="{COLORS[ci % len(COLORS)]}"><title>{escape(c["label"])} L{li}: {v:.4f}</title></rect>')
        lx = left + plot_w + 20
        out.append(f'<text x="{lx}" y="{y0 + 30}">method: agreement, pass keys (dense {r["configs"][0]["pass_key"]["hits"]}/'
                   f'{r["trials"]})</text>')
        for ci, c in enumerate(configs):
            y = y0 + 48 + ci * 17
            pk = c["pass_key"]
            lost = f' ({pk["lost_vs_dense"]} lost)' if pk["lost_vs_dense"] else ""
            out.append(f'<rect x="{lx}" y="{y - 9}" width="10" height="10" fill="{COLORS[ci % len(COLORS)]}"/>'
                       f'<text x="{lx + 15}" y="{y}">{escape(c["label"])}: {c["agreement"]:.3f}, '
                       f'{pk["hits"]}/{pk["trials"]}{lost}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for name in sys.argv[1:]:
        path = Path(name)
        svg = path.with_suffix(".svg")
        svg.write_text(chart(json.loads(path.read_text())))
        print(f"wrote {svg}")


if __name__ == "__main__":
    main()
