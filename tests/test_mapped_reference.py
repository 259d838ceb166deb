"""The full fine-tuning reference read through a memory map of its checkpoint (models/mapped.py):
same outputs as a copy, no heap, pages given back after each module."""
import copy
import re

import torch

from steprl.models.loading import load_policy
from steprl.models.mapped import frozen_reference, release_reference


def mapped_rss_kb(address: int) -> int:
    """Resident kB of the mapping that contains `address` (from /proc/self/smaps)."""
    inside = False
    for line in open("/proc/self/smaps"):
        m = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if m:
            inside = int(m.group(1), 16) <= address < int(m.group(2), 16)
        elif inside and line.startswith("Rss:"):
            return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def saved(tiny, tmp_path, model=None):
    model, tok = model or tiny[0], tiny[1]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return load_policy(str(tmp_path))[0]


def test_reference_is_views_into_the_file_with_the_same_outputs(tiny, tmp_path):
    model = saved(tiny, tmp_path)
    ref = frozen_reference(model, tmp_path)
    (mapped,) = ref.mapped_files
    params = dict(ref.named_parameters())
    assert all(mapped.span(p) is not None for p in params.values())
    assert not any(p.requires_grad for p in params.values()) and not ref.training
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied in the copy as in the model
    ids = torch.randint(0, model.config.vocab_size, (3, 17))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, model(ids).logits)
    # the policy trains; the reference must not move with it
    before = ref.model.layers[0].mlp.up_proj.weight.clone()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.add_(1.0)
    assert torch.equal(ref.model.layers[0].mlp.up_proj.weight, before)


def test_reference_pages_leave_the_resident_set(tiny, tmp_path):
    from steprl.models.tiny import tiny_llama

    # modules of 256 KB-1 MB, so that they span many pages (the session's tiny model fits in a few)
    ref = frozen_reference(saved(tiny, tmp_path, tiny_llama(tiny[1], hidden_size=256, num_layers=4)), tmp_path)
    (mapped,) = ref.mapped_files
    size_kb = len(mapped.map) // 1024
    assert mapped_rss_kb(mapped.address) == 0  # the bit-for-bit check read it all, then gave it back
    with torch.no_grad():
        total = sum(float(p.sum()) for p in ref.parameters())
    assert mapped_rss_kb(mapped.address) >= 0.9 * size_kb
    release_reference(ref)
    assert mapped_rss_kb(mapped.address) == 0
    with torch.no_grad():  # each module gives its pages back after its forward
        ref(torch.randint(0, 50, (2, 9)))
    # what is left are neighbours the kernel mapped along with a fault (fault-around, <= 64 KB each)
    assert mapped_rss_kb(mapped.address) < 0.15 * size_kb
    assert sum(float(p.sum()) for p in ref.parameters()) == total  # re-read from the file, unchanged


def test_weights_that_differ_from_the_file_get_a_plain_copy(tiny, tmp_path):
    model = saved(tiny, tmp_path)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)  # e.g. an adapter merged in, or weights changed since loading
    ref = frozen_reference(model, tmp_path)
    assert not hasattr(ref, "mapped_files")
    assert torch.equal(ref.model.norm.weight, model.model.norm.weight)
    assert ref.model.norm.weight.data_ptr() != model.model.norm.weight.data_ptr()
    no_file = frozen_reference(copy.deepcopy(model), tmp_path / "missing")
    assert not hasattr(no_file, "mapped_files") and not no_file.training
