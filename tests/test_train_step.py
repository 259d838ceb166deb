"""The GRPO training step: micro-batches sorted by length change only which sequences share a
forward pass, never the loss; the reference pass runs only when the KL term counts; old log-probs
come from no extra forward pass when the step makes one update; TIS weights the loss by the
truncated ratio to the sampler."""
import copy
import random

import pytest
import torch

import steprl.recipes.grpo as grpo
from steprl.config import GRPOConfig, LoraConfig, RunConfig, TaskConfig
from steprl.recipes.grpo import minibatch_backward
from steprl.rollout.episodes import Trajectory
from steprl.tasks.base import Problem
from steprl.training import passes
from steprl.training.passes import batched_logprobs, by_length, completion_logprobs, right_aligned

PROBLEM = Problem("p", "1 + 1?", "2", {})


def random_trajectories(model, n=7, seed=0):
    """n trajectories of mixed prompt and completion lengths, observation tokens (mask 0) inside,
    and old / reference log-probs a little off the model's so that ratios move and some clip."""
    rng = random.Random(seed)
    vocab = model.config.vocab_size
    trajs = []
    for _ in range(n):
        prompt = [rng.randrange(4, vocab) for _ in range(rng.randint(3, 20))]
        k = rng.randint(2, 14)
        mask = [1] * k
        if k > 6:  # a tool result in the middle: context, never trained on
            mask[3:5] = [0, 0]
        trajs.append(Trajectory(PROBLEM, prompt, ids=[rng.randrange(4, vocab) for _ in range(k)], mask=mask))
    gen = torch.Generator().manual_seed(seed)
    width = max(len(t.ids) for t in trajs)
    with torch.no_grad():
        exact = torch.stack([torch.nn.functional.pad(completion_logprobs(model, [t])[0][0], (width - len(t.ids), 0))
                             for t in trajs])
    mask = right_aligned([t.mask for t in trajs], width)
    old = (exact + 0.3 * torch.randn(exact.shape, generator=gen)) * mask
    ref = (exact + 0.3 * torch.randn(exact.shape, generator=gen)) * mask
    adv = torch.randn(n, 1, generator=gen).expand(n, width) * mask
    return trajs, mask, adv, old, ref


def gradients(model, trajs, mask, adv, old, ref, g, micro_batch_size, own_old=False):
    """own_old: the ratio's old log-probs are each pass's own (TIS in a step of one update), `old`
    is then the sampler's."""
    model.zero_grad(set_to_none=True)
    g = copy.copy(g)
    g.kl_coef, g.micro_batch_size = 0.04, micro_batch_size
    order = list(range(len(trajs)))
    random.Random(1).shuffle(order)  # a shuffled minibatch, as grpo_step makes it
    total, stats = minibatch_backward(model, trajs, order, mask, adv, (None if own_old else old, old), ref, g)
    return total, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, len(stats)


@pytest.mark.parametrize("own_old", [False, True])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_sorted_micro_batches_give_the_full_batch_loss_and_gradients(tiny, loss_type, own_old):
    model = copy.deepcopy(tiny[0]).train()
    trajs, mask, adv, old, ref = random_trajectories(model)
    g = GRPOConfig(loss_type=loss_type, max_new_tokens=16, max_turns=1)
    loss_full, grad_full, n_full = gradients(model, trajs, mask, adv, old, ref, g, len(trajs), own_old)
    loss_micro, grad_micro, n_micro = gradients(model, trajs, mask, adv, old, ref, g, 2, own_old)
    assert (n_full, n_micro) == (1, 4)
    assert abs(loss_full - loss_micro) < 1e-5, (loss_full, loss_micro)
    assert grad_full.keys() == grad_micro.keys() and grad_full
    for name, gf in grad_full.items():
        assert torch.allclose(gf, grad_micro[name], atol=1e-5, rtol=1e-4), (name, (gf - grad_micro[name]).abs().max())


def test_by_length_groups_similar_lengths_and_keeps_every_index(tiny):
    trajs, *_ = random_trajectories(tiny[0], n=9)
    idx = [8, 0, 5, 3, 1, 7, 2, 6, 4]
    order = by_length(trajs, idx)
    assert sorted(order) == sorted(idx)
    lengths = [len(trajs[i].prompt_ids) + len(trajs[i].ids) for i in order]
    assert lengths == sorted(lengths)

    def padded(o):  # tokens a left-padded forward computes, micro-batches of 2
        return sum(len(o[lo:lo + 2]) * max(len(trajs[i].prompt_ids) + len(trajs[i].ids) for i in o[lo:lo + 2])
                   for lo in range(0, len(o), 2))
    assert padded(order) <= padded(idx)


def grouped_trajectories(vocab, n_prompts=3, group=4, seed=0, system=0):
    """GRPO-shaped trajectories: `group` episodes per prompt, prompts and completions of mixed
    lengths; every prompt begins with the same `system` tokens."""
    rng = random.Random(seed)
    head = [rng.randrange(4, vocab) for _ in range(system)]
    trajs = []
    for _ in range(n_prompts):
        prompt = head + [rng.randrange(4, vocab) for _ in range(rng.randint(6, 20))]
        for _ in range(group):
            k = rng.randint(1, 12)
            trajs.append(Trajectory(PROBLEM, list(prompt), ids=[rng.randrange(4, vocab) for _ in range(k)], mask=[1] * k))
    return trajs


@pytest.mark.parametrize("use_lora,system", [(False, 0), (True, 0), (False, 12), (True, 12)])
def test_shared_prompt_pass_equals_one_sequence_at_a_time(tiny, use_lora, system):
    """Episodes that share a prompt compute it once, and prompts that share a beginning compute
    that once (`completion_logits`): the log-probs and the gradient of any loss on them equal
    those of separate unpadded passes, one episode each."""
    from steprl.models.loading import apply_lora

    torch.manual_seed(0)
    model = copy.deepcopy(tiny[0]).train()
    if use_lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        for n, p in model.named_parameters():  # LoRA B starts at zero: make the adapters count
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    trajs = grouped_trajectories(tiny[0].config.vocab_size, system=system)
    width = max(len(t.ids) for t in trajs)
    weights = torch.randn(len(trajs), width, generator=torch.Generator().manual_seed(1))
    mask = right_aligned([t.mask for t in trajs], width)

    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: calls.append(kw["input_ids"].shape) or real_forward(*a, **kw)
    model.zero_grad(set_to_none=True)
    shared, _ = completion_logprobs(model, trajs)
    (shared * weights * mask).sum().backward()
    grads_shared = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    if system:  # the common beginning once, then the 3 prompts' rests, then the 12 episodes
        assert [c[0] for c in calls] == [1, 3, len(trajs)] and calls[0][1] == system, calls
    else:  # the 3 prompts once, then the 12 episodes
        assert [c[0] for c in calls] == [3, len(trajs)], calls
    model.forward = real_forward

    model.zero_grad(set_to_none=True)
    single = torch.stack([torch.nn.functional.pad(completion_logprobs(model, [t])[0][0], (width - len(t.ids), 0))
                          for t in trajs])
    (single * weights * mask).sum().backward()
    assert torch.allclose(shared * mask, single * mask, atol=1e-5), (shared - single).abs().max()
    assert grads_shared and grads_shared.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, g in grads_shared.items():
        assert torch.allclose(g, dict(model.named_parameters())[name].grad, atol=1e-5, rtol=1e-4), name


@pytest.mark.parametrize("use_lora", [False, True])
def test_micro_batches_share_the_beginning_and_give_the_one_pass_gradients(tiny, use_lora):
    """Micro-batches of a minibatch whose prompts share a system prompt run it once (`Beginning`):
    its keys and values collect every micro-batch's gradient, and one backward through it gives the
    parameters the gradient of a single pass over all sequences. The reference pass shares it too."""
    from steprl.models.loading import apply_lora

    torch.manual_seed(0)
    model = copy.deepcopy(tiny[0]).train()
    if use_lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.data.normal_(0, 0.1)
    trajs = grouped_trajectories(tiny[0].config.vocab_size, n_prompts=3, group=2, system=20)
    width = max(len(t.ids) for t in trajs)
    mask = right_aligned([t.mask for t in trajs], width)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        exact = batched_logprobs(model, trajs, batch_size=len(trajs))
    old = (exact + 0.3 * torch.randn(exact.shape, generator=gen)) * mask
    ref = (exact + 0.3 * torch.randn(exact.shape, generator=gen)) * mask
    adv = torch.randn(len(trajs), 1, generator=gen).expand(len(trajs), width) * mask
    g = GRPOConfig(max_new_tokens=16, max_turns=1)

    calls = []
    real_forward = model.forward
    model.forward = lambda *a, **kw: calls.append(kw["input_ids"].shape) or real_forward(*a, **kw)
    loss_micro, grad_micro, n_micro = gradients(model, trajs, mask, adv, old, ref, g, 2)
    model.forward = real_forward
    # the system prompt once before the micro-batches, and once after them for its backward
    assert n_micro == 3 and calls[0] == calls[-1] == (1, 20)
    assert sum(1 for c in calls if c[1] == 20) == 2
    loss_full, grad_full, _ = gradients(model, trajs, mask, adv, old, ref, g, len(trajs))
    assert abs(loss_full - loss_micro) < 1e-5, (loss_full, loss_micro)
    assert grad_full.keys() == grad_micro.keys() and grad_full
    for name, gf in grad_full.items():
        assert torch.allclose(gf, grad_micro[name], atol=1e-5, rtol=1e-4), (name, (gf - grad_micro[name]).abs().max())
    with torch.no_grad():
        assert torch.allclose(batched_logprobs(model, trajs, batch_size=2) * mask, exact * mask, atol=1e-5)


def test_by_length_keeps_a_prompts_episodes_together(tiny):
    trajs = grouped_trajectories(tiny[0].config.vocab_size, n_prompts=4, group=3, seed=2)
    idx = list(range(len(trajs)))
    random.Random(0).shuffle(idx)
    order = by_length(trajs, idx)
    assert sorted(order) == sorted(idx)
    prompts = [tuple(trajs[i].prompt_ids) for i in order]
    assert all(len(set(prompts[k:k + 3])) == 1 for k in range(0, len(order), 3))


def test_reference_pass_in_sorted_batches_equals_one_sequence_at_a_time(tiny):
    model = tiny[0]
    trajs, mask, *_ = random_trajectories(model)
    batched = batched_logprobs(model, trajs, batch_size=3)
    single = batched_logprobs(model, trajs, batch_size=1)  # no padding at all
    assert torch.allclose(batched * mask, single * mask, atol=1e-5)


@pytest.mark.parametrize("kl_coef", [0.0, 0.04])
def test_grpo_step_forward_passes(tiny, monkeypatch, kl_coef):
    """num_iterations 1: the only policy forward passes after the rollout are the training
    micro-batches (old log-probs are the sampling ones); the reference pass only when kl_coef > 0."""
    from steprl.rollout import native
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState

    model, tok, task = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    cfg = RunConfig(task=TaskConfig(name="calc"))
    g = cfg.grpo
    g.prompts_per_step, g.num_generations, g.max_new_tokens, g.max_turns = 2, 2, 4, 1
    g.minibatch_size, g.micro_batch_size, g.num_iterations, g.kl_coef = 4, 2, 1, kl_coef
    g.lora = LoraConfig(enabled=False)
    release_memory = kl_coef > 0  # one case each way
    calls = {"completion_logprobs": 0, "reference_logprobs": 0, "release_free_memory": 0}
    monkeypatch.setattr(native, "release_free_memory", lambda: calls.update(release_free_memory=1 + calls["release_free_memory"]))
    real_clp, real_ref = grpo.completion_logprobs, grpo.reference_logprobs

    def counted_clp(*a, **kw):
        calls["completion_logprobs"] += 1
        return real_clp(*a, **kw)

    def counted_ref(*a, **kw):
        calls["reference_logprobs"] += 1
        return real_ref(*a, **kw)

    monkeypatch.setattr(grpo, "completion_logprobs", counted_clp)
    monkeypatch.setattr(passes, "completion_logprobs", counted_clp)
    monkeypatch.setattr(grpo, "reference_logprobs", counted_ref)
    ref_model = copy.deepcopy(model).eval().requires_grad_(False) if kl_coef > 0 else None
    tools, renderer, suffix = tool_setup(task, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    policy = Policy(model, tok, ref_model, "", params, optimizer, None)
    state = RLState(g, policy, Runtime(torch.device("cpu"), "fp32"), native.NativeEngine(model, tok, release_memory),
                    task, tools, renderer, suffix, task.problems("train", 10, seed=0),
                    generator=torch.Generator().manual_seed(0), rng=random.Random(0))
    metrics, trajs = grpo.grpo_step(state)
    assert len(trajs) == 4 and "loss" in metrics
    assert calls["reference_logprobs"] == (1 if kl_coef > 0 else 0)
    assert calls["release_free_memory"] == (1 if release_memory else 0)  # before the rollout, when asked
    # 2 training micro-batches (+ the reference: no activations to keep, so its 4 sequences go in one pass)
    assert calls["completion_logprobs"] == 2 + (1 if kl_coef > 0 else 0)


def test_an_adapter_checkpoint_loads_merged_and_trainable(tiny, tmp_path):
    """A LoRA stage saves an adapter; the next stage loads it merged into its base. That model must
    equal the adapter's forward and train like a full checkpoint (PEFT leaves the base frozen), or
    full fine-tuning after LoRA SFT would have no parameters to optimise."""
    from steprl.models.loading import apply_lora, load_policy, save_checkpoint

    model, tok, _ = tiny
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    save_checkpoint(model, tok, base_dir)
    peft_model = apply_lora(copy.deepcopy(model), LoraConfig(enabled=True, r=4, alpha=8))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    save_checkpoint(peft_model, tok, adapter_dir, base_path=str(base_dir))
    plain, _ = load_policy(str(base_dir))
    merged, _ = load_policy(str(adapter_dir))
    assert all(p.requires_grad for p in plain.parameters())
    assert all(p.requires_grad for p in merged.parameters())
    ids = torch.tensor([[5, 9, 12, 7, 30]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, peft_model.eval()(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, plain(ids).logits, atol=1e-3)


def test_beginning_recomputed_for_its_backward_replays_dropout(tiny):
    """The beginning's graph is built again at `backward()`: with dropout live (LoRA dropout, train
    mode) it must draw the same masks, so the gradient is the one a kept graph would give."""
    from steprl.models.loading import apply_lora
    from steprl.training.passes import Beginning

    torch.manual_seed(0)
    model = apply_lora(copy.deepcopy(tiny[0]), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.5,
                                                          target_modules=["k_proj", "v_proj"])).train()
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.data.normal_(0, 0.1)
    trajs = grouped_trajectories(tiny[0].config.vocab_size, n_prompts=2, group=2, system=20)

    def loss_on(kv):
        gen = torch.Generator().manual_seed(3)
        return sum((x * torch.randn(x.shape, generator=gen)).sum() for pair in kv for x in pair)

    torch.manual_seed(5)
    kept = model(input_ids=torch.tensor([trajs[0].prompt_ids[:20]]), use_cache=True, logits_to_keep=1)
    loss_on([(layer.keys, layer.values) for layer in kept.past_key_values.layers]).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    beginning = Beginning(model, trajs, micro_batches=2)
    assert beginning.ids == trajs[0].prompt_ids[:20]
    loss_on(beginning.kv).backward()  # the micro-batches' part: gradients on the leaves only
    assert all(p.grad is None for p in model.parameters())
    torch.manual_seed(6)  # the random state moved on meanwhile
    beginning.backward()
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and want
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_a_step_after_the_oom_ladder_reads_one_set_of_settings(tiny, monkeypatch):
    """Auto-fix halves num_generations and max_new_tokens in the live settings: the rollout samples
    with the new values, and the advantages group by the same G (not the config's), and dr_grpo's
    normaliser uses the same max_new_tokens, so that no group's baseline mixes two prompts."""
    from steprl.monitor.autofix import AutoFixer
    from steprl.rollout import NativeEngine
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState, live_settings

    model, tok, task = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
    cfg = RunConfig(task=TaskConfig(name="calc"))
    cfg.grpo = GRPOConfig(prompts_per_step=2, num_generations=4, max_new_tokens=32, max_turns=2, minibatch_size=8,
                          micro_batch_size=1, kl_coef=0.0, loss_type="dr_grpo", lora=LoraConfig(enabled=False))
    g = live_settings(cfg.grpo)
    fixer = AutoFixer(model, g)
    assert "num_generations 4 -> 2" in fixer.shrink_for_oom(1).evidence
    assert "max_new_tokens 32 -> 16" in fixer.shrink_for_oom(2).evidence
    assert cfg.grpo.num_generations == 4  # the run's config as written is untouched
    seen = {"group_size": [], "max_len": []}
    real_adv, real_agg = grpo.group_advantages, grpo.aggregate_loss
    monkeypatch.setattr(grpo, "group_advantages", lambda r, n, *a: seen["group_size"].append(n) or real_adv(r, n, *a))
    monkeypatch.setattr(grpo, "aggregate_loss",
                        lambda *a, max_len=None: seen["max_len"].append(max_len) or real_agg(*a, max_len=max_len))
    tools, renderer, suffix = tool_setup(task, tok)
    params = [p for p in model.parameters() if p.requires_grad]
    policy = Policy(model, tok, None, "", params, torch.optim.AdamW(params, lr=1e-4), None)
    state = RLState(g, policy, Runtime(torch.device("cpu"), "fp32"), NativeEngine(model, tok), task, tools, renderer,
                    suffix, task.problems("train", 10), generator=torch.Generator().manual_seed(0))
    metrics, trajs = grpo.grpo_step(state)
    assert len(trajs) == 2 * 2 and trajs[0].problem == trajs[1].problem != trajs[2].problem
    per_turn = [t.turn_index.count(k) for t in trajs for k in range(t.n_turns)]
    assert max(per_turn) <= 16 < 32  # sampled with the live max_new_tokens
    assert seen["group_size"] == [2] and set(seen["max_len"]) == {16 * 2}


@pytest.mark.parametrize("use_lora", [False, True])
def test_sft_loss_equals_the_full_vocabulary_loss_and_its_gradient(tiny, use_lora):
    """SFT projects onto the vocabulary only where a label is; loss and gradients equal HF's
    causal-LM loss over the full logits (right padding, masked prompts)."""
    from steprl.models.loading import apply_lora
    from steprl.recipes.sft import collate, sft_loss

    model = copy.deepcopy(tiny[0]).train()
    if use_lora:
        model = apply_lora(model, LoraConfig(enabled=True, r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    rng, vocab = random.Random(0), model.config.vocab_size
    examples = []
    for n in (9, 17, 12):
        ids = [rng.randrange(4, vocab) for _ in range(n)]
        examples.append((ids, [0] * (n // 2) + [1] * (n - n // 2)))
    ids, attn, labels = collate(examples, pad_id=0)
    params = [p for p in model.parameters() if p.requires_grad]
    ours = sft_loss(model, ids, attn, labels)
    ours_grad = torch.autograd.grad(ours, params)
    theirs = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    theirs_grad = torch.autograd.grad(theirs, params)
    assert abs(ours.item() - theirs.item()) < 1e-5
    for a, b in zip(ours_grad, theirs_grad):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_grpo_logs_the_gap_between_sampler_and_training_pass(tiny):
    """logp_gap = mean |logp_train - logp_sampler| before the first update. Sampling and training
    in fp32 compute one policy (the gap is float rounding); a bf16 sampler under an fp32 training
    pass differs by bf16 rounding, small but measured."""
    from steprl.rollout import NativeEngine
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState

    gaps = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, tok, task = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
        g = GRPOConfig(prompts_per_step=2, num_generations=2, max_new_tokens=8, max_turns=1, minibatch_size=2,
                       micro_batch_size=1, kl_coef=0.0, lora=LoraConfig(enabled=False), learning_rate=1e-2)
        tools, renderer, suffix = tool_setup(task, tok)
        params = [p for p in model.parameters() if p.requires_grad]
        policy = Policy(model, tok, None, "", params, torch.optim.AdamW(params, lr=1e-2), None)
        state = RLState(g, policy, Runtime(torch.device("cpu"), "fp32"), NativeEngine(model, tok, dtype=dtype), task,
                        tools, renderer, suffix, task.problems("train", 10), generator=torch.Generator().manual_seed(0))
        metrics, _ = grpo.grpo_step(state)
        gaps[dtype] = (metrics["logp_gap"], metrics["logp_gap_max"])
    assert gaps[torch.float32][1] < 1e-4  # one policy: only float rounding
    assert 1e-4 < gaps[torch.bfloat16][0] < 0.05 and gaps[torch.bfloat16][1] > gaps[torch.float32][1]


def test_tis_loss_by_hand_and_bounded_where_the_sampler_is_far_off(tiny):
    """Under TIS a step's only update has rho = 1 (old = the pass's own log-probs), so each token's
    policy loss is -w A with w = min(exp(logp - sampler_logp), cap), and its gradient -w A grad logp.
    Without TIS, a token the sampler thought 5 nats less likely than the trainer does (with A < 0)
    weighs e^5 in the gradient; with TIS at most cap."""
    model = copy.deepcopy(tiny[0]).train()
    trajs, mask, adv, _, _ = random_trajectories(model, n=4)
    width = mask.shape[1]
    with torch.no_grad():
        own = batched_logprobs(model, trajs, len(trajs))
    sampler = own + 0.4 * torch.randn(own.shape, generator=torch.Generator().manual_seed(3)) * mask
    sampler[0, -1] = own[0, -1] - 5.0  # the sampler's far-off token
    adv = adv.abs() * -1  # every advantage negative: the side PPO's clip leaves open
    g = GRPOConfig(loss_type="dapo", max_new_tokens=16, max_turns=1, kl_coef=0.0, importance_sampling_cap=2.0)
    cols = slice(0, width)
    model.zero_grad(set_to_none=True)
    loss, stats = grpo.policy_loss(model, trajs, cols, mask, adv, (None, sampler), None, g, 1.0)
    w = torch.exp(own - sampler).clamp(max=2.0)
    assert w[0, -1] == 2.0 and (w * mask).min() < 1.0  # capped, and below 1 elsewhere
    by_hand = (-w * adv * mask).sum() / mask.sum()
    assert abs(loss.item() - by_hand.item()) < 1e-5
    # the gradient: -w A grad logp, from an independent pass
    loss.backward()
    tis = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    logp, _ = completion_logprobs(model, trajs)
    ((-w * adv * logp * mask).sum() / mask.sum()).backward()
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(tis[n], p.grad, atol=1e-6, rtol=1e-4)
    # without TIS the far-off token's ratio is e^5 and the loss follows it; with TIS it stays bounded
    g.importance_sampling_correction = False
    model.zero_grad(set_to_none=True)
    plain, _ = grpo.policy_loss(model, trajs, cols, mask, adv, (sampler, sampler), None, g, 1.0)
    r = torch.exp(own - sampler)
    plain_by_hand = (-torch.min(r * adv, r.clamp(0.8, 1.2) * adv) * mask).sum() / mask.sum()
    assert abs(plain.item() - plain_by_hand.item()) < 1e-4 * plain_by_hand.item()
    assert plain.item() > 3 * loss.item() > 0
    assert loss.item() <= 2.0 * (-adv * mask).sum().item() / mask.sum().item() + 1e-6


def test_tis_with_several_updates_takes_old_logprobs_from_one_more_pass(tiny, monkeypatch):
    """num_iterations 2: TIS needs the old log-probs before the first update, from one no-grad pass
    (without TIS, or with one update, there is none)."""
    from steprl.rollout import native
    from steprl.rollout.chat import tool_setup
    from steprl.runtime import Runtime
    from steprl.training.policy import Policy
    from steprl.training.rl import RLState

    counts = {}
    for tis in (True, False):
        model, tok, task = copy.deepcopy(tiny[0]), tiny[1], tiny[2]
        g = GRPOConfig(prompts_per_step=2, num_generations=2, max_new_tokens=4, max_turns=1, minibatch_size=4,
                       micro_batch_size=2, num_iterations=2, kl_coef=0.0, lora=LoraConfig(enabled=False),
                       importance_sampling_correction=tis)
        calls = []
        real = grpo.batched_logprobs
        monkeypatch.setattr(grpo, "batched_logprobs", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        tools, renderer, suffix = tool_setup(task, tok)
        params = [p for p in model.parameters() if p.requires_grad]
        policy = Policy(model, tok, None, "", params, torch.optim.AdamW(params, lr=1e-3), None)
        state = RLState(g, policy, Runtime(torch.device("cpu"), "fp32"), native.NativeEngine(model, tok), task,
                        tools, renderer, suffix, task.problems("train", 10, seed=0),
                        generator=torch.Generator().manual_seed(0), rng=random.Random(0))
        metrics, _ = grpo.grpo_step(state)
        counts[tis] = len(calls)
        assert metrics["logp_gap_max"] < 1e-4  # fp32 sampler and trainer: one policy
    assert counts == {True: 1, False: 0}
