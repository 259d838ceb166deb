"""The fast paths of the rollout engine stay exact (issue 5):

* rows that finish at different times leave the batch (the KV cache is compacted), and every row's
  tokens still equal HF `generate` on the full left-padded batch;
* identical prompts are prefilled once (prefix sharing) and still give HF's greedy tokens;
* sampled log-probs (temperature, top-k, top-p, seeded generator) equal a fresh forward's to 1e-4;
* stop strings end a row at the first token whose text completes one.
"""
import pytest
import torch

from steprl.models.tiny import tiny_llama
from steprl.rollout import sampling
from steprl.rollout.sampling import SamplingParams, StopChecker, generate, left_pad


class EosOnly:
    """A stop checker whose end tokens we choose, to make rows finish at different steps."""

    stop_strings = ()

    def __init__(self, eos_ids):
        self.eos_ids = set(eos_ids)

    def is_eos(self, token):
        return token in self.eos_ids

    def hits_stop_string(self, tokens):
        return False


@pytest.fixture(scope="module")
def lively(tiny):
    """The tiny model with its weights scaled up: greedy text that changes from token to token
    (the plain random model repeats one token), so rows can end at different steps."""
    _, tok, _ = tiny
    model = tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2, seed=1).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(6)
    return model, tok


def prompts_of(tok, texts):
    return [tok(t)["input_ids"] for t in texts]


TEXTS = ["Sam has 12 apples.", "7 plus", "Lily has 9257 stones. She gets 9 more.", "How many",
         "A farmer sells 5 cows", "2 + 2 ="]


def hf_greedy(model, tok, prompts, n, eos_ids):
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=sorted(eos_ids))
    return out[:, ids.shape[1]:].tolist()


def count_compactions(monkeypatch):
    calls = []
    real = sampling.SlotLayer.batch_select_indices

    def spy(self, indices):
        calls.append(len(indices))
        return real(self, indices)

    monkeypatch.setattr(sampling.SlotLayer, "batch_select_indices", spy)
    return calls


def fresh_logps(model, prompt, tokens, temperature=1.0):
    """Log-probs of `tokens` after `prompt` from one unpadded forward, no cache."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def test_rows_finishing_at_different_times_match_hf(lively, monkeypatch):
    model, tok = lively
    prompts = prompts_of(tok, TEXTS)
    free, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0),
                          stop=EosOnly([]))
    # end tokens taken from the rows' own greedy outputs at different depths
    eos = {free[0][2], free[2][5], free[4][8]}
    calls = count_compactions(monkeypatch)
    ours, _, finish = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0),
                               stop=EosOnly(eos))
    assert calls, "finished rows never left the batch"
    lengths = {len(t) for t, how in zip(ours, finish) if how == "eos"}
    assert len(lengths) >= 2, "rows should finish at different steps"
    for row, got, how, full in zip(hf_greedy(model, tok, prompts, 12, eos), ours, finish, free):
        assert row[: len(got)] == got
        assert got == full[: len(got)]  # the same tokens as without stops, cut at the end token
        if how == "eos":
            assert got[-1] in eos and not set(got[:-1]) & eos
        else:
            assert len(got) == 12 and not set(got) & eos


def test_duplicated_prompts_share_their_prefill_and_match_hf(lively, monkeypatch):
    model, tok = lively
    a, b, c = prompts_of(tok, TEXTS[:3])
    prompts = [a, b, a, c, b, a]  # duplicates, not consecutive
    stems, stem_of, suffixes, _ = sampling.shared_stems(prompts)
    assert len(stems) == 3 and stem_of[0] == stem_of[2] == stem_of[5] and stem_of[1] == stem_of[4]
    assert all(stems[k] + s == p for p, k, s in zip(prompts, stem_of.tolist(), suffixes))
    calls = count_compactions(monkeypatch)
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=10, temperature=0.0),
                          stop=EosOnly([tok.eos_token_id]))
    assert calls and calls[0] == len(prompts)  # the 3 prefilled rows were spread to 6
    for row, got in zip(hf_greedy(model, tok, prompts, 10, [tok.eos_token_id]), ours):
        assert row[: len(got)] == got
    assert ours[0] == ours[2] == ours[5] and ours[1] == ours[4]


def test_sampled_logprobs_equal_a_fresh_forward_with_shared_prefixes(tiny):
    model, tok, _ = tiny
    a, b = prompts_of(tok, TEXTS[:2])
    prompts = [a] * 4 + [b] * 4  # a GRPO batch: 2 prompts x G=4
    params = SamplingParams(max_new_tokens=12, temperature=0.8, top_k=50, top_p=0.9)
    # frequent-enough end tokens so rows finish at different steps and the batch gets compacted
    eos = set(range(40, 80))
    tokens, logps, finish = generate(model, tok, prompts, params, stop=EosOnly(eos),
                                     generator=torch.Generator().manual_seed(0))
    assert len({tuple(t) for t in tokens[:4]}) > 1, "the G samples of one prompt must be independent"
    for p, t, lp, how in zip(prompts, tokens, logps, finish):
        assert len(t) == len(lp) and (how == "eos") == (t[-1] in eos)
        torch.testing.assert_close(fresh_logps(model, p, t, 0.8), torch.tensor(lp), atol=1e-4, rtol=0)


def test_prompts_with_a_common_beginning_share_it(lively, monkeypatch):
    """Later turns of a GRPO group: the same prompt, then each row's own turns (the suffix)."""
    model, tok = lively
    base = tok(" ".join(TEXTS[:3]))["input_ids"]
    tails = prompts_of(tok, ["7 plus", "A farmer sells 5 cows and 2 pigs", "How many", "2 + 2 = 4. Then"])
    prompts = [base + t for t in tails] + prompts_of(tok, ["Sam has 12 apples."])  # + one unrelated row
    stems, stem_of, suffixes, _ = sampling.shared_stems(prompts)
    assert len(base) >= 16 and len(stems) == 2 and stems[stem_of[0]] == base
    calls = count_compactions(monkeypatch)
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=10, temperature=0.0),
                          stop=EosOnly([tok.eos_token_id]))
    assert calls and calls[0] == len(prompts)
    for row, got in zip(hf_greedy(model, tok, prompts, 10, [tok.eos_token_id]), ours):
        assert got and row[: len(got)] == got
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    tokens, logps, _ = generate(model, tok, prompts, params, stop=EosOnly(set(range(40, 80))),
                                generator=torch.Generator().manual_seed(3))
    for p, t, lp in zip(prompts, tokens, logps):
        torch.testing.assert_close(fresh_logps(model, p, t), torch.tensor(lp), atol=1e-4, rtol=0)


def test_a_grpo_batch_prefills_its_system_prompt_once_and_reads_it_once(lively, monkeypatch):
    """GRPO's first turn: P prompts that begin with one system prompt, G copies of each. The common
    beginning is prefilled once, each prompt's rest once, and decode steps read the beginning's
    keys and values from one row (`shared`). Tokens still equal HF's, log-probs a fresh forward's."""
    model, tok = lively
    system = tok(" ".join(TEXTS[:4]))["input_ids"]
    prompts = [system + q for q in prompts_of(tok, [" 7 plus 5", " A farmer sells 5 cows", " How many"]) for _ in range(3)]
    stems, _, _, _ = sampling.shared_stems(prompts)
    assert len(stems) == 3
    lengths = []
    forward = type(model).forward

    def counted(self, *args, **kwargs):
        lengths.append(kwargs["input_ids"].shape)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(type(model), "forward", counted)
    with torch.inference_mode():
        shared = sampling.prefill(model, prompts, tok.pad_token_id, 4)[-1]
    assert shared == len(system)  # the system prompt and nothing after it is common to all
    assert [s[0] for s in lengths] == [1, 3, 9] and lengths[0][1] == len(system)  # once, per prompt, per row
    monkeypatch.setattr(type(model), "forward", forward)
    seen = []
    attend = sampling.LlamaDecoder.step

    def spy(self, tokens, positions, cache, mask, shared=0):
        seen.append(shared)
        return attend(self, tokens, positions, cache, mask, shared)
    monkeypatch.setattr(sampling.LlamaDecoder, "step", spy)
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=10, temperature=0.0),
                          stop=EosOnly([tok.eos_token_id]))
    assert seen and set(seen) == {len(system)}
    for row, got in zip(hf_greedy(model, tok, prompts, 10, [tok.eos_token_id]), ours):
        assert got and row[: len(got)] == got
    tokens, logps, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=10, temperature=1.0),
                                stop=EosOnly(set(range(40, 80))), generator=torch.Generator().manual_seed(5))
    for p, t, lp in zip(prompts, tokens, logps):
        torch.testing.assert_close(fresh_logps(model, p, t), torch.tensor(lp), atol=1e-4, rtol=0)


def test_stop_strings_end_rows_at_the_first_completion(lively):
    model, tok = lively
    prompts = prompts_of(tok, TEXTS)
    free, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0),
                          stop=EosOnly([]))
    # a stop string that row 0's greedy text completes at its 4th token
    text = tok.decode(free[0][:4])
    stop_string = text[-2:] if len(text) >= 2 else text
    checker = StopChecker(tok, (stop_string,))
    checker.eos_ids = set()  # only the stop string ends a row here
    ours, _, finish = generate(model, tok, prompts, SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                   stop_strings=(stop_string,)), stop=checker)
    assert finish[0] == "stop"
    for got, how, full in zip(ours, finish, free):
        assert got == full[: len(got)]
        ends = [k for k in range(1, len(full) + 1) if tok.decode(full[:k]).endswith(stop_string)]
        if how == "stop":
            assert len(got) == ends[0]
        else:
            assert not ends and len(got) == 12
