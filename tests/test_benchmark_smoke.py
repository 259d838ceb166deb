"""`benchmarks/run.py --quick --json` runs end to end (tiny model, batch 4 and 2x2, 4 tokens, a 2x2
GRPO step, 1 repeat; well under a minute) and its last line is the JSON contract of issue 5. This
checks the plumbing, never the speed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("gen_speedup_vs_hf", "grpo_step_speedup_vs_trl", "gen_roofline_fraction",
            "train_roofline_fraction", "peak_rss_gb")


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_benchmark_prints_json_contract():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "STEPRL_NO_PROGRESS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", "--skip-trl", "--skip-smollm2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    result = json.loads(lines[-1])
    assert isinstance(result, dict)
    for key in REQUIRED:
        assert key in result, key
    for key in ("gen_speedup_vs_hf", "gen_roofline_fraction", "train_roofline_fraction", "peak_rss_gb",
                "matmul_gflops"):
        assert positive(result[key]), (key, result[key])
    # TRL was skipped: null, with the reason
    assert result["grpo_step_speedup_vs_trl"] is None
    assert result["grpo_step_speedup_vs_trl_reason"]
    # raw numbers: tokens/s of ours and HF per model and batch, step seconds of ours per mode
    assert result["gen_tok_s"] and all(positive(v["ours"]) and positive(v["hf"]) for v in result["gen_tok_s"].values())
    # both generation shapes: distinct prompts, and P prompts x G copies (HF: num_return_sequences)
    assert {"tiny/b4", "tiny/b4/g2"} <= set(result["gen_tok_s"])
    assert positive(result["gen_speedup_vs_hf_grouped"])
    assert {"steprl/full", "steprl/lora"} <= set(result["grpo_step_seconds"])
    assert all(positive(v) for v in result["grpo_step_seconds"].values())
    assert all(positive(v) for v in result["peak_rss_gb_grpo"].values())
    for row in result["grpo"]:  # the training passes' and the whole step's fractions
        assert positive(row["roofline_fraction"]) and positive(row["step_roofline_fraction"]), row
    assert result["errors"] == []
