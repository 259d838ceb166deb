"""LR schedules, against values computed by hand; the allocator setting of the RL recipes."""
import math
import os
import subprocess
import sys

import pytest

from steprl.training.common import cosine_lr, wsd_lr


def test_cosine_lr_by_hand():
    assert cosine_lr(0, 100, 10) == pytest.approx(0.1)
    assert cosine_lr(9, 100, 10) == pytest.approx(1.0)
    # halfway through the cosine part: 0.5 * (1 + cos(pi/2)) = 0.5, then lifted to min_ratio
    assert cosine_lr(55, 100, 10, min_ratio=0.1) == pytest.approx(0.1 + 0.9 * 0.5)
    assert cosine_lr(100, 100, 10, min_ratio=0.1) == pytest.approx(0.1)


def test_wsd_lr_by_hand():
    # 100 steps, warm-up 10, the last 20 decay linearly from 1 to 0.1
    assert wsd_lr(4, 100, 10, 0.2, 0.1) == pytest.approx(0.5)
    assert wsd_lr(10, 100, 10, 0.2, 0.1) == 1.0
    assert wsd_lr(79, 100, 10, 0.2, 0.1) == 1.0  # still stable
    assert wsd_lr(80, 100, 10, 0.2, 0.1) == pytest.approx(1.0)  # decay starts here
    assert wsd_lr(90, 100, 10, 0.2, 0.1) == pytest.approx(1.0 - 0.9 * 0.5)
    assert wsd_lr(99, 100, 10, 0.2, 0.1) == pytest.approx(1.0 - 0.9 * 19 / 20)
    assert not math.isclose(wsd_lr(50, 100, 10), cosine_lr(50, 100, 10))



KEPT = """
import torch
from steprl.memory import keep_freed_memory, own_mappings

def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096

if KEEP:
    assert keep_freed_memory()
if UNDO:
    assert keep_freed_memory(False)
with own_mappings() if OWN else open("/dev/null"):
    x = torch.ones(1 << 24)  # 64 MB: above glibc's mmap threshold
before = resident()
del x
print(before - resident())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_keep_freed_memory_keeps_a_large_freed_tensor_resident():
    """By default glibc gives a freed 64 MB block back to the OS at once (the next pass page-faults
    it again); after keep_freed_memory() it stays in the heap for reuse, unless it was allocated
    inside own_mappings(), or keep_freed_memory(False) restored glibc's behaviour (SFT does)."""
    released = {}
    for keep, own, undo in ((False, False, False), (True, False, False), (True, True, False), (True, False, True)):
        code = f"KEEP, OWN, UNDO = {keep}, {own}, {undo}" + KEPT
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        released[keep, own, undo] = int(out.stdout.strip())
    assert released[False, False, False] > 60e6 and released[True, False, False] < 4e6, released
    assert released[True, True, False] > 60e6 and released[True, False, True] > 60e6, released


SFT_MODE = """
import sys
from steprl import memory
from steprl.cli import main
out, model, keep = sys.argv[1:4]
assert main(["run", "configs/toy.yaml", "name=t", "stages=[sft]", "eval_after=[]", "report_to=[]", "output_dir=" + out,
             "model.name_or_path=" + model, "sft.n_examples=8", "sft.epochs=1", "sft.keep_freed_memory=" + keep]) == 0
print(memory._keeping)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("keep", ["true", "false"])
def test_sft_runs_under_the_malloc_setting_its_config_names(tiny_dir, tmp_path, keep):
    """`sft.keep_freed_memory`: the RL stages' setting (true) or glibc's default (false, the default)."""
    out = subprocess.run([sys.executable, "-c", SFT_MODE, str(tmp_path), str(tiny_dir), keep],
                         capture_output=True, text=True, env={**os.environ, "STEPRL_NO_PROGRESS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(keep == "true")
