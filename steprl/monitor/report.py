"""`steprl report RUN_DIR`: one self-contained HTML page (inline CSS, no JS, no network) with PNG
plots beside it, so a run can be looked at in any browser, attached to an issue or copied off a
cluster. It shows what the course says to monitor: reward, KL against its healthy band, accuracy,
entropy, lengths, tool use, losses; the doctor's findings on the curves and in a table; the eval
table; and sampled trajectories with trained tokens highlighted, because curves alone hide
reward hacking and garbled formats.
"""
from __future__ import annotations

import html
import json
import re
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg via savefig

from .doctor import SEVERITY_RANK, Finding, diagnose, load_context, read_jsonl, stage_dirs

# name, title, metric keys (first solid, others dashed/markers), options
PLOTS = [
    ("reward", "Reward (band: reward_std)", ["reward"], {"band": "reward_std"}),
    ("kl", "KL to reference (green: healthy 0.01-0.1)", ["kl"], {"log": True, "healthy": (0.01, 0.1)}),
    ("accuracy", "Accuracy", ["accuracy", "eval/accuracy"], {}),
    ("entropy", "Entropy", ["entropy"], {}),
    ("length", "Completion length", ["completions/mean_length", "completions/min_length",
                                     "completions/max_length"], {}),
    ("tools", "Tool use", ["tools/call_frequency", "tools/failure_frequency", "tools/calls_beyond_needed"], {}),
    ("loss", "Loss", ["loss", "eval/loss"], {"no_rl": True}),
]
# which plots a finding is drawn on (nan/oom: all of them)
CODE_PLOTS = {"kl_explosion": {"kl"}, "kl_too_low": {"kl"}, "reward_stagnation": {"reward"},
              "reward_collapse": {"reward"}, "zero_variance_groups": {"reward"},
              "quality_drop": {"accuracy", "length", "reward"}, "entropy_collapse": {"entropy"},
              "loss_not_decreasing": {"loss"}, "overfitting": {"loss", "accuracy"},
              "tool_use_collapse": {"tools"}, "turn_limit": {"tools"}, "calls_beyond_needed": {"tools"}}
SEV_COLOR = {"info": "#1f77b4", "warning": "#ff7f0e", "critical": "#d62728"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1250px;color:#222;padding:0 1em}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4}.muted{color:#777}.plots{display:flex;flex-wrap:wrap;gap:8px}
.plots img{width:600px;max-width:100%;border:1px solid #eee}
.sev{padding:1px 6px;border-radius:3px;color:#fff;font-size:.85em}
.sev.info{background:#1f77b4}.sev.warning{background:#ff7f0e}.sev.critical{background:#d62728}
.traj{border:1px solid #ddd;border-radius:4px;margin:.8em 0;padding:.4em .6em}
.traj pre{white-space:pre-wrap;word-break:break-word;margin:.3em 0;font-size:.88em;line-height:1.45}
.prompt{color:#666}.trained{background:#c8f7c5}.call{font-weight:bold;outline:1px solid #2a7;border-radius:2px}
.tool{display:block;background:#eee;border-left:3px solid #999;padding:2px 6px;margin:3px 0;color:#333}
.lbl{display:inline-block;font-size:.75em;background:#999;color:#fff;border-radius:2px;padding:0 4px;margin-right:4px}
.ok{color:#2a7}.bad{color:#d62728}
"""


def esc(x) -> str:
    return html.escape(str(x), quote=True)


def page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def series(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    pts = []
    for e in history:
        v = e.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
            pts.append((e.get("step", 0), float(v)))
    return np.array([p[0] for p in pts], dtype=float), np.array([p[1] for p in pts], dtype=float)


def plot_applies(spec, history: list[dict]) -> bool:
    name, _, keys, opts = spec
    if opts.get("no_rl") and any("reward" in e for e in history):
        return False  # RL surrogate loss says little; the reward plot covers it
    return any(len(series(history, k)[0]) for k in keys)


def draw(ax, history: list[dict], spec, color=None, label: str = "") -> None:
    """Draw one history's curves for `spec`; with `color` (compare mode) keys differ by style."""
    name, title, keys, opts = spec
    for i, key in enumerate(keys):
        x, y = series(history, key)
        if not len(x):
            continue
        if opts.get("log"):
            y = np.maximum(y, 1e-6)
        sparse = key.startswith("eval/") or len(x) < 4
        style = dict(marker="o", ms=4) if sparse else {}
        c = color or f"C{i}"
        ax.plot(x, y, ls="-" if i == 0 else "--", color=c, lw=1.5,
                label=f"{label}{key}" if label or len(keys) > 1 else None, **style)
        if i == 0 and opts.get("band"):
            bx, by = series(history, opts["band"])
            common = np.intersect1d(x, bx)
            if len(common):
                m = np.array([y[x == s][0] for s in common])
                sd = np.array([by[bx == s][0] for s in common])
                ax.fill_between(common, m - sd, m + sd, color=c, alpha=0.15, lw=0)


def new_axes(spec):
    name, title, keys, opts = spec
    fig = Figure(figsize=(6, 3.2), dpi=100)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step", fontsize=9)
    ax.grid(alpha=0.3)
    if opts.get("log"):
        ax.set_yscale("log")
    if opts.get("healthy"):
        ax.axhspan(*opts["healthy"], color="green", alpha=0.12, lw=0)
    return fig, ax


def save(fig, ax, path: Path) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")


def stage_findings(stage_dir: Path, history: list[dict]) -> list[tuple[Finding, str]]:
    """Live findings (doctor.jsonl) merged with a fresh post-hoc diagnosis: one per code, the
    most severe; on a tie the live one, which says when the run first noticed."""
    found = []
    for d in read_jsonl(stage_dir / "doctor.jsonl"):
        try:
            found.append((Finding(**{k: d.get(k) for k in ("code", "severity", "step", "evidence",
                                                            "advice", "fix")}), "live"))
        except TypeError:
            continue
    found += [(f, "post-hoc") for f in diagnose(history, load_context(stage_dir), final=True)]
    best: dict[str, tuple[Finding, str]] = {}
    for f, src in found:
        old = best.get(f.code)
        if old is None or SEVERITY_RANK.get(f.severity, 0) > SEVERITY_RANK.get(old[0].severity, 0):
            best[f.code] = (f, src)
    return sorted(best.values(), key=lambda p: (-SEVERITY_RANK.get(p[0].severity, 0), p[0].step or 0))


def _fname(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def stage_plots(out_dir: Path, prefix: str, stage: str, history, findings) -> list[Path]:
    pngs = []
    for spec in PLOTS:
        if not plot_applies(spec, history):
            continue
        fig, ax = new_axes(spec)
        draw(ax, history, spec)
        for f, _ in findings:
            if f.code in CODE_PLOTS and spec[0] not in CODE_PLOTS[f.code]:
                continue
            ax.axvline(f.step or 0, color=SEV_COLOR.get(f.severity, "#777"), ls=":", lw=1.5)
            ax.annotate(f.code, (f.step or 0, 1), xycoords=("data", "axes fraction"), fontsize=7,
                        color=SEV_COLOR.get(f.severity, "#777"), rotation=90, va="top", ha="right")
        path = out_dir / f"{prefix}_{_fname(stage)}_{spec[0]}.png"
        save(fig, ax, path)
        pngs.append(path)
    return pngs


def render_sample(s: dict) -> str:
    """A trajectory: trained tokens green, tool results in a grey labelled block, tool calls bold."""
    segs = s.get("segments") or [{"text": s.get("prompt", ""), "role": "prompt", "trained": False},
                                 {"text": s.get("text", ""), "role": "assistant", "trained": False}]
    parts = []
    for seg in segs:
        if not isinstance(seg, dict):
            continue
        text, role = esc(seg.get("text", "")), seg.get("role", "assistant")
        if role == "tool":
            parts.append(f'<span class="tool"><span class="lbl">tool</span>{text}</span>')
            continue
        text = re.sub(r"&lt;tool_call&gt;.*?(&lt;/tool_call&gt;|$)",
                      lambda m: f'<span class="call">{m.group(0)}</span>', text, flags=re.S)
        cls = "prompt" if role == "prompt" else ("trained" if seg.get("trained") else "")
        parts.append(f'<span class="{cls}">{text}</span>' if cls else text)
    correct = s.get("correct")
    mark = "" if correct is None else (' <span class="ok">correct</span>' if correct
                                       else ' <span class="bad">wrong</span>')
    turns = s.get("turn_rewards")
    meta = (f"step {esc(s.get('step', '?'))} · reward {esc(s.get('reward', '?'))}{mark}"
            + (f" · turn rewards {esc(turns)}" if turns else ""))
    return f'<div class="traj"><div class="muted">{meta}</div><pre>{"".join(parts)}</pre></div>'


def pick_samples(path: Path, first: int = 2, last: int = 3) -> list[dict]:
    """A few trajectories from the first and the last sampled step, to show what changed."""
    rows = read_jsonl(path)
    if not rows:
        return []
    steps = [r.get("step", 0) for r in rows]
    lo, hi = min(steps), max(steps)
    early = [r for r in rows if r.get("step", 0) == lo][:first]
    late = [r for r in rows if r.get("step", 0) == hi][:last] if hi != lo else []
    return early + late


def _summary_table(summary: dict) -> str:
    rows = []
    for st in summary.get("stages", []) if isinstance(summary, dict) else []:
        ev = st.get("eval") or {}
        acc = ev.get("accuracy")
        rows.append(f"<tr><td>{esc(st.get('name', '?'))}</td><td>{esc(_secs(st.get('wall_seconds')))}</td>"
                    f"<td>{esc(f'{acc:.3f}' if isinstance(acc, (int, float)) else '-')}</td>"
                    f"<td>{esc(ev.get('n', '-'))}</td></tr>")
    if not rows:
        return ""
    total = summary.get("wall_seconds")
    return ("<h2>Stages and evaluation</h2><table><tr><th>stage</th><th>wall time</th>"
            "<th>eval accuracy</th><th>n</th></tr>" + "".join(rows) + "</table>"
            + (f"<p class=\"muted\">total wall time {esc(_secs(total))}</p>" if total is not None else ""))


def _secs(x) -> str:
    return f"{x:.1f} s" if isinstance(x, (int, float)) else "-"


def load_summary(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}


def write_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SystemExit(f"steprl report: {run_dir} is not a directory")
    for old in run_dir.glob("report_*.png"):
        old.unlink()
    body = [f"<h1>steprl run: {esc(run_dir.resolve().name)}</h1>",
            _summary_table(load_summary(run_dir))]
    all_findings, sections = [], []
    for sd in stage_dirs(run_dir):
        history = read_jsonl(sd / "metrics.jsonl")
        findings = stage_findings(sd, history)
        all_findings += [(sd.name, f, src) for f, src in findings]
        pngs = stage_plots(run_dir, "report", sd.name, history, findings)
        imgs = "".join(f'<img src="{esc(p.name)}" alt="{esc(p.stem)}">' for p in pngs)
        samples = pick_samples(sd / "samples.jsonl")
        sec = [f"<h2>Stage {esc(sd.name)}</h2><p class=\"muted\">{len(history)} logged steps</p>",
               f'<div class="plots">{imgs}</div>' if imgs else "<p class=\"muted\">no plottable metrics</p>"]
        if samples:
            sec.append("<h3>Sampled trajectories</h3><p class=\"muted\"><span class=\"trained\">green</span>"
                       " = trained tokens, <span class=\"tool\" style=\"display:inline\">grey</span> = tool "
                       "output (context, not trained), <span class=\"call\">bold</span> = tool call</p>")
            sec += [render_sample(s) for s in samples]
        sections.append("".join(sec))
    if all_findings:
        rows = "".join(
            f"<tr><td>{esc(st)}</td><td><span class=\"sev {esc(f.severity)}\">{esc(f.severity)}</span></td>"
            f"<td>{esc(f.code)}</td><td>{esc(f.step)}</td><td>{esc(f.evidence)}</td>"
            f"<td>{esc(f.advice)}</td><td class=\"muted\">{src}</td></tr>" for st, f, src in all_findings)
        body.append("<h2>Doctor findings</h2><table><tr><th>stage</th><th>severity</th><th>code</th>"
                    "<th>step</th><th>evidence</th><th>advice</th><th>source</th></tr>" + rows + "</table>")
    else:
        body.append("<h2>Doctor findings</h2><p>No problems found.</p>")
    body += sections
    cfg = run_dir / "config.yaml"
    if cfg.is_file():
        body.append(f"<h2>Config</h2><details><summary>config.yaml</summary><pre>{esc(cfg.read_text())}"
                    "</pre></details>")
    out = run_dir / "report.html"
    out.write_text(page(f"steprl report: {run_dir.name}", "\n".join(body)), encoding="utf-8")
    return out


def main_report(run_dir) -> int:
    print(write_report(run_dir))
    return 0
