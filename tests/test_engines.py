"""The rollout seam: the `hf` engine (transformers' generate) and the `native` engine play the same
episodes through the same agent loop, and each one's log-probs are what a fresh forward gives."""
import copy

import pytest
import torch
from test_env_and_rollout import ScriptedEnv, logps_match

from steprl.config import RewardConfig
from steprl.envs.tool_env import make_envs
from steprl.rollout import HFEngine, NativeEngine, make_engine
from steprl.rollout.chat import tool_setup
from steprl.rollout.episodes import run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.training.passes import completion_logprobs

TURNS = [1, 3, 2, 3, 1, 2]


def play(engine, tok, problems, params, seed=0):
    return run_episodes(engine, tok, [ScriptedEnv(k) for k in TURNS], problems, params,
                        generator=torch.Generator().manual_seed(seed))


def test_greedy_multi_turn_episodes_are_the_same_on_both_engines(tiny):
    """Greedy: the hf engine (one generate per turn over each whole context) gives the native
    engine's episodes (one batch, continuous across turns) token for token, masks included."""
    model, tok, task = tiny
    problems = task.problems("train", len(TURNS))
    params = SamplingParams(max_new_tokens=10, temperature=0.0)
    native, hf = play(NativeEngine(model, tok), tok, problems, params), play(HFEngine(model, tok), tok, problems, params)
    assert [t.n_turns for t in hf] == TURNS
    for a, b in zip(native, hf):
        assert a.ids == b.ids and a.mask == b.mask and a.turn_index == b.turn_index
        assert max(abs(x - y) for x, y in zip(a.logps, b.logps)) < 1e-4


@pytest.mark.parametrize("engine", [NativeEngine, HFEngine])
@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_sampled_logprobs_equal_a_fresh_forward(tiny, engine, temperature, top_p):
    """Each sampled token's log-prob under softmax(logits / T) equals the training pass's to 1e-4
    (fp32); top-p only decides which tokens can be drawn."""
    model, tok, task = tiny
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_p=top_p)
    trajs = play(engine(model, tok), tok, task.problems("train", len(TURNS)), params, seed=5)
    with torch.no_grad():
        logp, _ = completion_logprobs(model, trajs, temperature=temperature)
    assert logps_match(logp, trajs) > 30


def test_hf_engine_episodes_repeat_with_the_seed(tiny):
    model, tok, task = tiny
    problems = task.problems("train", len(TURNS))
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    first, again = (play(HFEngine(model, tok), tok, problems, params, seed=9) for _ in range(2))
    other = play(HFEngine(model, tok), tok, problems, params, seed=10)
    assert [t.ids for t in first] == [t.ids for t in again]
    assert [t.ids for t in first] != [t.ids for t in other]


def test_turns_end_on_the_tasks_stop_strings_on_both_engines(tiny):
    """Real calc environments: a turn that writes </tool_call> or </answer> ends right there, on
    either engine, and the finish reasons agree."""
    model, tok, task = tiny
    model = copy.deepcopy(model)
    problems = task.problems("train", 8)
    tools, renderer, suffix = tool_setup(task, tok)
    params = SamplingParams(max_new_tokens=24, temperature=0.0)
    out = {}
    for engine in (NativeEngine(model, tok), HFEngine(model, tok)):
        envs = make_envs(task, tools, RewardConfig(), 3, len(problems), suffix)
        out[engine.name] = run_episodes(engine, tok, envs, problems, params, renderer)
    for a, b in zip(out["native"], out["hf"]):
        assert a.ids == b.ids and a.turn_texts == b.turn_texts and a.truncated == b.truncated
        for text in a.turn_texts:
            for stop in task.stop_strings:
                assert stop not in text or text.endswith(stop)


def test_make_engine_picks_by_model_and_device(tiny):
    from transformers import GPT2Config, GPT2LMHeadModel

    model, tok, _ = tiny
    assert make_engine("auto", model, tok, "cpu").name == "native"  # a Llama on the CPU
    assert make_engine("auto", model, tok, "cuda").name == "hf"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2)).eval()
    assert make_engine("auto", gpt2, tok, "cpu").name == "hf"  # not a Llama-family model
    with pytest.raises(ValueError, match="native runs on the CPU only"):
        make_engine("native", model, tok, "cuda")
    with pytest.raises(ValueError, match="unknown engine 'vllm'"):
        make_engine("vllm", model, tok, "cpu")


def test_hf_engine_runs_any_causal_lm(tiny):
    """A GPT-2 (no Llama decoder, learned positions) plays multi-turn episodes through the hf engine,
    and its sampled log-probs equal a fresh forward's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok, task = tiny
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)).eval()
    trajs = play(HFEngine(gpt2, tok), tok, task.problems("train", len(TURNS)),
                 SamplingParams(max_new_tokens=8, temperature=1.0))
    assert [t.n_turns for t in trajs] == TURNS
    with torch.no_grad():
        logp, _ = completion_logprobs(gpt2, trajs)
    assert logps_match(logp, trajs) > 0
