"""`steprl inspect`: print one sampled trajectory so the loss mask can be checked by eye.

Trained tokens (sampled by the policy, mask 1) are shown in green; prompt text is dim; tool and
template tokens (context only, mask 0) are on a grey background. With --no-color the trained
spans are wrapped in [[ ]] instead.
"""
from __future__ import annotations

import json
from pathlib import Path

GREEN, DIM, GREY, RESET = "\033[1;32m", "\033[2m", "\033[47;30m", "\033[0m"


def find_samples(path: str) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    candidates = [p / "samples.jsonl"] + sorted(p.glob("*/samples.jsonl"))
    for c in candidates:
        if c.is_file():
            return c
    raise FileNotFoundError(f"no samples.jsonl in '{path}' (give a samples.jsonl, a stage dir or a run dir)")


def render(sample: dict, color: bool = True) -> str:
    parts = []
    for seg in sample["segments"]:
        text = seg["text"]
        if seg["trained"]:
            parts.append(f"{GREEN}{text}{RESET}" if color else f"[[{text}]]")
        elif seg["role"] == "prompt":
            parts.append(f"{DIM}{text}{RESET}" if color else text)
        else:
            parts.append(f"{GREY}{text}{RESET}" if color else text)
    head = (f"step {sample.get('step')}  reward {sample.get('reward'):.2f}  "
            f"turn rewards {sample.get('turn_rewards')}  correct {sample.get('correct')}")
    legend = (f"{GREEN}trained{RESET}  {DIM}prompt{RESET}  {GREY}tool/template (not trained){RESET}"
              if color else "[[trained]]  everything else: context, not trained")
    return f"{head}\n{legend}\n\n{''.join(parts)}"


def main_inspect(path: str, index: int = -1, color: bool = True) -> int:
    lines = [l for l in find_samples(path).read_text().splitlines() if l.strip()]
    if not lines:
        raise ValueError(f"{path}: samples.jsonl is empty")
    print(render(json.loads(lines[index]), color))
    return 0
