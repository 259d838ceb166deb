"""MetricsLogger: one call per logged step writes every sink and runs the live doctor.

metrics.jsonl is the source of truth (the doctor, the report and resume all read it alone);
TensorBoard / wandb / trackio are views of it. The live doctor prints a finding the first time it
appears (or when its severity escalates), so a problem shows up while the run is still worth saving.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from tqdm import tqdm

from .doctor import SEVERITY_RANK, Finding, diagnose, read_jsonl


def _to_float(v):
    """A float from a Python/numpy/torch scalar; None for anything else (lists, big tensors)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)):
        return float(v)
    if hasattr(v, "item"):  # torch tensor or numpy scalar/array: only single values
        n = v.numel() if hasattr(v, "numel") else getattr(v, "size", 1)
        if n != 1:
            return None
        try:
            return float(v.item())
        except (TypeError, ValueError):
            return None
    return None


class MetricsLogger:
    def __init__(self, stage_dir, stage: str, report_to=("tensorboard",),
                 doctor_context: dict | None = None, live_doctor: bool = True, write: bool = True):
        self.dir = Path(stage_dir)
        # write=False (every rank but 0): the same history and doctor, so that auto-fix decides alike
        # on every rank, but no file, sink or print
        self.write = write
        if write:
            self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self.path = self.dir / "metrics.jsonl"
        self.doctor_path = self.dir / "doctor.jsonl"
        self.report_to = [report_to] if isinstance(report_to, str) else list(report_to or [])
        self.context = {"stage": stage, **(doctor_context or {})}
        self.live_doctor = live_doctor
        self.history: list[dict] = read_jsonl(self.path)  # resume: keep appending
        self._reported: dict[str, int] = {}  # code -> highest severity rank already reported
        for f in read_jsonl(self.doctor_path):
            self._note(f.get("code"), f.get("severity"))
        self._fh = None
        self._tb = None
        self._purge_step = None
        self._sinks: dict[str, object] = {}
        self._warned: set[str] = set()

    def _note(self, code, severity) -> bool:
        """Record a finding; True if it is new or more severe than what was already reported."""
        rank = SEVERITY_RANK.get(severity, 0)
        if code in self._reported and self._reported[code] >= rank:
            return False
        self._reported[code] = rank
        return True

    def truncate_after(self, step: int) -> None:
        """Resume from a checkpoint: drop logged entries with step >= `step` (the first step that
        will be re-run) from the history, metrics.jsonl, doctor.jsonl and TensorBoard."""
        self.history = [e for e in self.history if (e.get("step") or 0) < step]
        if not self.write:
            self._reported = {}
            for f in read_jsonl(self.doctor_path):
                if (f.get("step") or 0) < step:
                    self._note(f.get("code"), f.get("severity"))
            return
        self._rewrite(self.path, self.history)
        kept = [f for f in read_jsonl(self.doctor_path) if (f.get("step") or 0) < step]
        if self.doctor_path.exists():
            self._rewrite(self.doctor_path, kept)
        self._reported = {}
        for f in kept:
            self._note(f.get("code"), f.get("severity"))
        self._purge_step = step

    def _rewrite(self, path: Path, rows: list[dict]) -> None:
        if self._fh is not None and path == self.path:
            self._fh.close()
            self._fh = None
        tmp = path.with_name(path.name + ".tmp")  # a reader (another rank, the report) never sees half a file
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        os.replace(tmp, path)

    def log(self, metrics: dict, step: int) -> list[Finding]:
        entry = {"step": int(step)}
        for k, v in metrics.items():
            if k == "event" and isinstance(v, str):
                entry[k] = v
            elif k != "step" and (x := _to_float(v)) is not None:
                entry[k] = x
        if not self.write:
            self.history.append(entry)
            return self._doctor(entry) if self.live_doctor else []
        if self._fh is None:
            self._fh = open(self.path, "a", encoding="utf-8")
        self._fh.write(json.dumps(entry) + "\n")
        self._fh.flush()
        self.history.append(entry)
        scalars = {k: v for k, v in entry.items() if k not in ("step", "event") and math.isfinite(v)}
        for name in self.report_to:
            self._write_sink(name, scalars, int(step))
        return self._doctor(entry) if self.live_doctor else []

    def amend(self, extra: dict) -> None:
        """Add keys to the last logged step's entry, for what happened after it was written (auto-fix
        changing the reward): metrics.jsonl keeps one entry per step. The sinks are not told."""
        if not self.history:
            return
        self.history[-1].update(extra)
        if self.write:
            self._rewrite(self.path, self.history)

    def _doctor(self, entry: dict) -> list[Finding]:
        # Bound the cost on long runs: diagnose every log while short, then every ~1% of the
        # history, but always at once on an event or a non-finite value.
        n = len(self.history)
        urgent = "event" in entry or any(isinstance(v, float) and not math.isfinite(v)
                                         for v in entry.values())
        if not urgent and n > 200 and n % max(1, n // 100):
            return []
        new = [f for f in diagnose(self.history, self.context) if self._note(f.code, f.severity)]
        if new and self.write:
            with open(self.doctor_path, "a", encoding="utf-8") as fh:
                for f in new:
                    fh.write(json.dumps(f.to_dict()) + "\n")
            for f in new:
                tqdm.write(f"[doctor] {self.stage} {f.severity.upper()} {f.code} @ step {f.step}: "
                           f"{f.evidence} -> {f.advice}")
        return new

    def record(self, finding: Finding) -> None:
        """Write and print a finding made outside the rules (e.g. an auto-fix action)."""
        if not self.write:
            return
        with open(self.doctor_path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(finding.to_dict()) + "\n")
        tqdm.write(f"[doctor] {self.stage} {finding.severity.upper()} {finding.code} @ step {finding.step}: "
                   f"{finding.evidence} -> {finding.advice}")

    def _write_sink(self, name: str, scalars: dict, step: int) -> None:
        if name in ("none", "jsonl", ""):
            return
        if name == "tensorboard":
            if self._tb is None:
                from torch.utils.tensorboard import SummaryWriter
                self._tb = SummaryWriter(log_dir=str(self.dir / "tb"), purge_step=self._purge_step)
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            return
        sink = self._sinks.get(name)
        if sink is None and name not in self._warned:
            sink = self._open_sink(name)
        if sink is not None:
            try:
                sink.log(scalars, step=step)
            except TypeError:  # trackio versions without a step argument
                sink.log(scalars)

    def _open_sink(self, name: str):
        """Import wandb/trackio lazily; a missing package is one warning, never a crash."""
        if name not in ("wandb", "trackio"):
            self._warned.add(name)
            tqdm.write(f"[steprl] warning: unknown report_to '{name}' ignored "
                       "(use tensorboard, wandb or trackio)")
            return None
        try:
            mod = __import__(name)
            mod.init(project="steprl", name=self.stage, config=self.context)
        except Exception as e:  # not installed, or no login/network
            self._warned.add(name)
            tqdm.write(f"[steprl] warning: report_to '{name}' disabled ({type(e).__name__}: {e}); "
                       f"metrics still go to {self.path}" + (f" (pip install {name})"
                                                             if isinstance(e, ImportError) else ""))
            return None
        self._sinks[name] = mod
        return mod

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        for mod in self._sinks.values():
            try:
                mod.finish()
            except Exception:
                pass
        self._sinks = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
