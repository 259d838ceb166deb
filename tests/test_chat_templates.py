"""Real models' chat templates: tools rendered by a template that takes them (Qwen-style), described in
the system prompt where it does not (SmolLM2's ChatML), prefix stability checked at start, and the
source's Qwen3 recipe run end to end at toy size on a tiny random Qwen3."""
import copy
import json

import pytest
import torch

from steprl.config import RewardConfig
from steprl.envs.tool_env import make_envs, with_system_suffix
from steprl.rollout import HFEngine
from steprl.rollout.chat import ChatRenderer, tool_setup
from steprl.rollout.episodes import run_episodes
from steprl.rollout.sampling import SamplingParams
from steprl.tasks import get_task

# Qwen's tool format: the schemas inside <tools></tools> in the system turn, tool results as a user
# turn of <tool_response> blocks.
QWEN_STYLE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# A template that rewrites history: past assistant turns lose their text before "</think>" (as
# Qwen3's does with past reasoning), so a conversation extended by a turn renders differently.
REWRITING_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- set content = message.content %}"
    "{%- if message.role == 'assistant' and not loop.last %}{%- set content = '[earlier turn]' %}{%- endif %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.fixture(scope="module")
def qwen_style(tiny, tmp_path_factory):
    """A tiny random Qwen3 (q/k norms: not a model the native decoder knows) with the embedded
    tokenizer under a Qwen-style, tool-capable template, saved as a local Hugging Face directory."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _, tok, _ = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = QWEN_STYLE_TEMPLATE
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    path = tmp_path_factory.mktemp("qwen3") / "tiny-qwen3"
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok, path


def test_a_tool_capable_template_renders_the_schemas_and_tool_responses(qwen_style):
    _, tok, _ = qwen_style
    task = get_task("calc")
    tools, renderer, suffix = tool_setup(task, tok)
    assert renderer.tools_schema and suffix == " " + task.answer_format  # the template carries the tools
    env = make_envs(task, tools, RewardConfig(), 3, 1, suffix)[0]
    prompt = tok.decode(renderer.prompt_ids(env.reset(task.problems("train", 1)[0])))
    assert "<tools>" in prompt and '"name": "calculator"' in prompt and prompt.endswith("<|im_start|>assistant\n")
    obs = tok.decode(renderer.observation_ids([{"role": "tool", "content": "17"}], finished_with_eos=True))
    assert obs == "\n<|im_start|>user\n<tool_response>\n17\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_smollm2s_template_gets_the_tools_in_its_system_prompt_and_is_prefix_stable():
    from steprl.models import hub

    try:
        path = hub.resolve_model_path("smollm2")
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 not available: {err}")
    from steprl.models.loading import load_tokenizer

    tok = load_tokenizer(path)
    task = get_task("gsm8k")
    tools, renderer, suffix = tool_setup(task, tok)  # runs the prefix check
    assert renderer.tools_schema is None and "You can call these tools" in suffix and '"calculator"' in suffix
    assert task.answer_format in suffix


def test_a_template_that_rewrites_earlier_turns_is_refused_in_one_line(tiny):
    _, tok, _ = tiny
    tok = copy.deepcopy(tok)
    tok.chat_template = REWRITING_TEMPLATE
    with pytest.raises(ValueError, match="is not prefix-stable") as err:
        tool_setup(get_task("calc"), tok)
    assert "\n" not in str(err.value)
    ChatRenderer(tok)  # building it alone is fine: the check is explicit


def test_sft_trains_on_the_prompt_rollouts_show(qwen_style):
    """SFT's conversations begin with exactly the ids a rollout's prompt has: the same tools and
    the same system suffix."""
    _, tok, _ = qwen_style
    task = get_task("gsm8k")
    tools, renderer, suffix = tool_setup(task, tok)
    conversation = task.cold_start(1)[0]
    ids, mask = renderer.conversation_ids(with_system_suffix(conversation, suffix))
    env = make_envs(task, tools, RewardConfig(), 6, 1, suffix)[0]
    problem = task.problems("train", 1)[0]
    prompt = renderer.prompt_ids(env.reset(problem))
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt) and sum(mask) > 0


def test_multi_turn_episodes_on_a_qwen3_through_the_hf_engine(qwen_style):
    model, tok, _ = qwen_style
    task = get_task("calc")
    tools, renderer, suffix = tool_setup(task, tok)
    problems = task.problems("train", 4)
    envs = make_envs(task, tools, RewardConfig(), 3, len(problems), suffix)
    trajs = run_episodes(HFEngine(model, tok), tok, envs, problems, SamplingParams(max_new_tokens=12), renderer,
                         torch.Generator().manual_seed(0))
    assert all(t.done and t.n_turns >= 1 for t in trajs)


def test_the_sources_qwen3_recipe_runs_at_toy_size(qwen_style, tmp_path):
    """configs/gsm8k_qwen3.yaml as written (LoRA r16/alpha 32 on q,k,v,o, SFT lr 5e-5 with warm-up
    0.1 and weight decay 0.01, GRPO lr 1e-5, 4 generations, kl 0.05, temperature 0.8, the combined
    reward), on the CPU, sized down, with the tiny Qwen3 and its tool-capable template."""
    from steprl.cli import main
    from steprl.config import load_config
    from steprl.runtime import resolve_precision

    cfg = load_config("configs/gsm8k_qwen3.yaml")
    assert (cfg.model.name_or_path, cfg.runtime.device, cfg.runtime.precision) == ("Qwen/Qwen3-0.6B", "cuda", "bf16")
    assert cfg.grpo.num_generations == 4 and cfg.grpo.kl_coef == 0.05 and cfg.grpo.temperature == 0.8
    assert [f["name"] for f in cfg.grpo.reward.functions] == ["accuracy", "length_over_target", "step_bonus"]
    _, _, path = qwen_style
    precision = "bf16" if resolve_precision("auto", torch.device("cpu")) == "bf16" else "fp32"  # bf16 where fast
    overrides = [f"model.name_or_path={path}", "runtime.device=cpu", f"runtime.precision={precision}",
                 f"output_dir={tmp_path}", "sft.n_examples=8", "sft.epochs=1", "sft.batch_size=4",
                 "grpo.steps=2", "grpo.prompts_per_step=2", "grpo.max_new_tokens=12", "grpo.max_turns=2",
                 "grpo.minibatch_size=8", "grpo.micro_batch_size=4", "eval.limit=4", "eval.max_new_tokens=12",
                 "eval.max_turns=2"]
    assert main(["run", "configs/gsm8k_qwen3.yaml", *overrides]) == 0
    run = tmp_path / "gsm8k_qwen3"
    summary = json.loads((run / "summary.json").read_text())
    assert [s["name"] for s in summary["stages"]] == ["sft", "grpo"]
    assert all(s["eval"]["n"] == 4 for s in summary["stages"])
    rows = [json.loads(line) for line in (run / "grpo/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all("reward" in r for r in rows)
    assert (run / "grpo/checkpoint/adapter_config.json").is_file()
