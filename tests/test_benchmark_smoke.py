"""`benchmarks/run.py --quick --json` runs end to end (tiny model, batch 4 and 2x2, 4 tokens, a 2x2
GRPO step, 1 repeat, in bf16 and fp32 where bf16 is fast here, else fp32; well under a minute) and its
last line is the JSON contract of issue 5. This checks the plumbing, never the speed."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("precision", "fp32_matmul_gflops", "bf16_matmul_gflops", "gen_speedup_vs_hf", "grpo_step_speedup_vs_trl",
            "gen_roofline_fraction", "train_roofline_fraction", "grpo_step_seconds_bf16", "grpo_step_seconds_fp32",
            "grpo_step_bf16_speedup_vs_fp32", "peak_rss_gb")


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
                "matmul_gflops", "fp32_matmul_gflops", "bf16_matmul_gflops"):
        assert positive(result[key]), (key, result[key])
    # precisions: both where a bf16 matmul runs >= 1.5x fp32's here, else fp32; the headline is bf16 if it ran
    precisions = result["settings"]["precisions"]
    bf16_fast = result["bf16_matmul_gflops"] >= 1.5 * result["fp32_matmul_gflops"]
    assert precisions == (["bf16", "fp32"] if bf16_fast else ["fp32"])
    assert result["precision"] == ("bf16" if bf16_fast else "fp32")
    assert result["matmul_gflops"] == result[f"{result['precision']}_matmul_gflops"]
    assert set(result["by_precision"]) == set(precisions)
    assert result["by_precision"][result["precision"]]["gen_speedup_vs_hf"] == result["gen_speedup_vs_hf"]
    for p in ("fp32", "bf16"):  # our step's seconds per mode, null where that precision did not run
        seconds = result[f"grpo_step_seconds_{p}"]
        if p in precisions:
            assert set(seconds) == {"lora", "full"} and all(positive(v) for v in seconds.values()), (p, seconds)
        else:
            assert seconds is None, (p, seconds)
    if "bf16" in precisions:
        bf16, fp32 = result["grpo_step_seconds_bf16"], result["grpo_step_seconds_fp32"]
        assert result["grpo_step_bf16_speedup_vs_fp32"] == {m: fp32[m] / bf16[m] for m in ("lora", "full")}
    else:
        assert result["grpo_step_bf16_speedup_vs_fp32"] is None
    assert all(r["precision"] in precisions for r in result["generation"] + result["grpo"])
    # TRL was skipped: null, with the reason
    assert result["grpo_step_speedup_vs_trl"] is None
    assert result["grpo_step_speedup_vs_trl_reason"]
    # raw numbers: tokens/s of ours and HF per model and batch, step seconds of ours per mode
    assert result["gen_tok_s"] and all(positive(v["ours"]) and positive(v["hf"]) for v in result["gen_tok_s"].values())
    # both generation shapes: distinct prompts, and P prompts x G copies (HF: num_return_sequences), each precision
    for p in precisions:
        assert {f"tiny/b4/{p}", f"tiny/b4/g2/{p}"} <= set(result["gen_tok_s"])
        assert {f"steprl/full/{p}", f"steprl/lora/{p}"} <= set(result["grpo_step_seconds"])
    assert positive(result["gen_speedup_vs_hf_grouped"])
    assert all(positive(v) for v in result["grpo_step_seconds"].values())
    assert all(positive(v) for v in result["peak_rss_gb_grpo"].values())
    for row in result["grpo"]:  # the training passes' and the whole step's fractions
        assert positive(row["roofline_fraction"]) and positive(row["step_roofline_fraction"]), row
    assert result["errors"] == []
