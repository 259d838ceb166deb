"""Overlay the report's curves of several runs (one colour per run), to compare an ablation or a
hyper-parameter change at a glance. Same plots as the report, same self-contained HTML + PNGs."""
from __future__ import annotations

from pathlib import Path

from .doctor import STAGE_ORDER, read_jsonl, stage_dirs
from .report import PLOTS, _fname, draw, esc, load_summary, new_axes, page, plot_applies, save


def _names(run_dirs: list[Path]) -> list[str]:
    names, seen = [], {}
    for d in run_dirs:
        n = d.resolve().name
        seen[n] = seen.get(n, 0) + 1
        names.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return names


def write_compare(run_dirs, out_dir=None) -> Path:
    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise SystemExit("steprl compare: give at least one run directory")
    names = _names(run_dirs)
    out_dir = Path(out_dir) if out_dir else run_dirs[0].resolve().parent / _fname("compare_" + "_".join(names))
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("compare_*.png"):
        old.unlink()
    runs = {n: {sd.name: read_jsonl(sd / "metrics.jsonl") for sd in stage_dirs(d)}
            for n, d in zip(names, run_dirs)}
    rank = {s: i for i, s in enumerate(STAGE_ORDER)}
    stages = sorted({s for r in runs.values() for s in r}, key=lambda s: (rank.get(s, len(rank)), s))

    # eval table: one row per run, one column per stage
    summaries = {n: {st.get("name"): st for st in load_summary(d).get("stages", []) if isinstance(st, dict)}
                 for n, d in zip(names, run_dirs)}
    cols = sorted({s for sm in summaries.values() for s in sm if s}, key=lambda s: (rank.get(s, len(rank)), s))
    body = [f"<h1>steprl compare: {esc(', '.join(names))}</h1>"]
    if cols:
        def cell(sm, c):
            acc = ((sm.get(c) or {}).get("eval") or {}).get("accuracy")
            return f"{acc:.3f}" if isinstance(acc, (int, float)) else "-"
        body.append("<h2>Eval accuracy</h2><table><tr><th>run</th>"
                    + "".join(f"<th>{esc(c)}</th>" for c in cols) + "</tr>"
                    + "".join(f"<tr><td>{esc(n)}</td>" + "".join(f"<td>{cell(summaries[n], c)}</td>" for c in cols)
                              + "</tr>" for n in names) + "</table>")
    for stage in stages:
        imgs = []
        for spec in PLOTS:
            have = [(i, n) for i, n in enumerate(names)
                    if stage in runs[n] and plot_applies(spec, runs[n][stage])]
            if not have:
                continue
            fig, ax = new_axes(spec)
            for i, n in have:
                draw(ax, runs[n][stage], spec, color=f"C{i % 10}", label=f"{n} ")
            path = out_dir / f"compare_{_fname(stage)}_{spec[0]}.png"
            save(fig, ax, path)
            imgs.append(f'<img src="{esc(path.name)}" alt="{esc(path.stem)}">')
        if imgs:
            body.append(f"<h2>Stage {esc(stage)}</h2><div class=\"plots\">{''.join(imgs)}</div>")
    out = out_dir / "compare.html"
    out.write_text(page("steprl compare", "\n".join(body)), encoding="utf-8")
    return out
