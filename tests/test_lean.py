"""The leaner training passes (`steprl.models.lean`) compute HF's log-probs and gradients, and save
neither repeated keys and values nor more than two of the MLP's four intermediate tensors."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from steprl.config import LoraConfig
from steprl.models.lean import GROUPED, grouped_attention, lean_training
from steprl.models.loading import apply_lora
from steprl.training.passes import Beginning, completion_logprobs
from steprl.rollout.episodes import Trajectory
from steprl.tasks.base import Problem

HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 4, 2, 8, 48


def gqa_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=HEADS * HEAD_DIM, num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=INTERMEDIATE, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).train()


def trajectories(seed=0):
    """Three prompts that share a 6-token beginning, two episodes each, completions of 3-9 tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(4, 97, (n,), generator=g).tolist()  # noqa: E731
    beginning, trajs = ids(6), []
    for length in (4, 7, 5):
        prompt = beginning + ids(length)
        for k in (3, 9):
            trajs.append(Trajectory(Problem("p", "", "", {}), prompt, ids=ids(k), mask=[1] * k))
    return trajs


class Attention(torch.nn.Module):
    num_key_value_groups = HEADS // KV_HEADS


@pytest.mark.parametrize("length,width,padded", [(5, 5, False), (3, 11, False), (6, 6, True), (4, 10, True)])
def test_grouped_attention_equals_hf_sdpa(length, width, padded):
    """No mask (causal as HF's SDPA path reads it, also over more columns than queries) and a
    causal mask with padding."""
    torch.manual_seed(0)
    q = torch.randn(3, HEADS, length, HEAD_DIM, requires_grad=True)
    k, v = (torch.randn(3, KV_HEADS, width, HEAD_DIM, requires_grad=True) for _ in range(2))
    mask = None
    if padded:  # row 1 left-padded by 2 columns, causal
        mask = torch.ones(3, 1, length, width, dtype=torch.bool).tril(width - length)
        mask[1, :, :, :2] = False
    ours, none = grouped_attention(Attention(), q, k, v, mask, scaling=0.3)
    hf, _ = sdpa_attention_forward(Attention(), q, k, v, mask, scaling=0.3)
    assert none is None and ours.shape == hf.shape == (3, length, HEADS, HEAD_DIM)
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-5)
    weights = torch.randn(hf.shape)
    grads = [torch.autograd.grad((out * weights).sum(), (q, k, v)) for out in (ours, hf)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def loss_and_grads(model, trajs, micro_batches=1):
    """The log-probs of a GRPO-like pass (shared prompts, a shared beginning across micro-batches)
    and the gradients of a loss on them and their entropy."""
    model.zero_grad(set_to_none=True)
    size = len(trajs) // micro_batches
    beginning = Beginning(model, trajs, micro_batches)
    logps = []
    for lo in range(0, len(trajs), size):
        logp, entropy = completion_logprobs(model, trajs[lo:lo + size], with_entropy=True, beginning=beginning.of())
        weights = torch.linspace(-1, 1, logp.numel()).view(logp.shape)
        ((logp * weights).sum() + 0.1 * entropy.sum()).backward()
        logps.append(logp.detach())
    beginning.backward()
    return logps, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


def with_adapters(model, target):
    torch.manual_seed(1)  # the same adapters for both models
    model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0, target_modules=target))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # B starts at zero: make the adapters count
            p.data.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("lora", [None, ["q_proj", "v_proj", "down_proj"], ["q_proj", "up_proj"]])
@pytest.mark.parametrize("micro_batches", [1, 3])
def test_lean_training_passes_equal_hf(lora, micro_batches):
    """Full fine-tuning (the MLP tail's weight gradient), LoRA on down_proj (the MLP falls back to
    HF's forward there) and LoRA elsewhere (the tail with a frozen weight), in one pass and in
    micro-batches that share the beginning."""
    base = gqa_llama()
    lean = lean_training(copy.deepcopy(base))
    assert lean.config._attn_implementation == GROUPED and base.config._attn_implementation == "sdpa"
    if lora:
        base, lean = (with_adapters(m, lora) for m in (base, lean))
    trajs = trajectories()
    (want, want_grads), (got, got_grads) = (loss_and_grads(m, trajs, micro_batches) for m in (base, lean))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name, g in want_grads.items():
        torch.testing.assert_close(got_grads[name], g, atol=1e-5, rtol=1e-4, msg=name)


def saved_shapes(model, trajs):
    """Shapes of the activations autograd saves for one training pass (parameters left out)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            shapes[ptr] = tuple(t.shape)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        completion_logprobs(model, trajs, with_entropy=True)
    return list(shapes.values())


def test_lean_training_saves_no_repeated_keys_and_half_the_mlp():
    base = gqa_llama()
    lean = lean_training(copy.deepcopy(base))
    trajs = trajectories()
    hf, ours = saved_shapes(base, trajs), saved_shapes(lean, trajs)
    per_head = [s for s in hf if len(s) == 4 and s[1] == HEADS and s[-1] == HEAD_DIM]
    assert len(per_head) > 0 and not [s for s in ours if len(s) == 4 and s[1] == HEADS and s[-1] == HEAD_DIM]
    mlp = lambda shapes: [s for s in shapes if s[-1] == INTERMEDIATE]  # noqa: E731
    assert len(mlp(hf)) > 0 and len(mlp(ours)) == len(mlp(hf)) // 2


def test_lean_training_leaves_inference_and_other_models_alone():
    model = gqa_llama().eval()
    lean = lean_training(copy.deepcopy(model))
    ids = torch.randint(4, 97, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(lean(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        greedy = [m.generate(input_ids=ids, max_new_tokens=5, do_sample=False, pad_token_id=0) for m in (model, lean)]
    assert torch.equal(*greedy)
    gelu = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                        intermediate_size=32, hidden_act="gelu"))
    assert lean_training(gelu).config._attn_implementation == "sdpa"
