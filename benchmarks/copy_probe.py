"""Copy probes of a calculator model: does it copy the numbers it must copy?

    python benchmarks/copy_probe.py runs/demo/pretrain/checkpoint runs/demo/sft [more ...] [--leads ...]

Two copies carry the calculator task, and RL can only reward them once they happen:
- into the call: greedy continuation of `question + lead` (prose, no chat) must start with the
  problem's exact expression ("(582 + 48) - 12"), one column per lead. A pretrained model that
  fails writes well-formed calls with wrong numbers.
- out of the tool: after the whole conversation up to the calculator's result, in the task's chat
  format, the model must answer `<answer>RESULT</answer>` ("read-back"). Only a cold-started model
  knows the protocol; one that fails calls the tool right and answers with other digits.
Each score is the fraction of 100 held-out problems that pass (docs/experiments.md, "Attention
heads" and "Pretraining length").
"""
from __future__ import annotations

import argparse

import torch

from steprl.models.loading import load_policy
from steprl.rollout.chat import tool_setup
from steprl.tasks.calc import CalcTask

LEADS = (" We compute", ' The expression is "')  # the default prose framing, and the one a call's quote follows


def greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[str]:
    width = max(len(p) for p in prompts)  # left-padded, so that completions start together
    ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    return tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


def copy_rate(model, tokenizer, problems, lead: str) -> float:
    prompts = [tokenizer(p.question + lead, add_special_tokens=False)["input_ids"] for p in problems]
    texts = greedy(model, tokenizer, prompts, max_new_tokens=40)
    return sum(t.strip().startswith(p.meta["expression"]) for t, p in zip(texts, problems)) / len(problems)


def read_back_rate(model, tokenizer, task, problems) -> float:
    _, renderer, _ = tool_setup(task, tokenizer)
    prompts = [renderer.prompt_ids(task.solution_messages(p)[:-1]) for p in problems]  # up to the tool's result
    texts = greedy(model, tokenizer, prompts, max_new_tokens=16)
    return sum(t.strip().startswith(f"<answer>{p.answer}</answer>") for t, p in zip(texts, problems)) / len(problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="model or adapter directories, or stage directories")
    ap.add_argument("--leads", nargs="+", default=list(LEADS))
    ap.add_argument("--n", type=int, default=100, help="held-out problems")
    args = ap.parse_args()
    task = CalcTask(1, 3, varied=True)
    problems = task.problems("test", args.n)
    print("| checkpoint | " + " | ".join(repr(lead) for lead in args.leads) + " | read-back |")
    print("|---|" + "---:|" * (len(args.leads) + 1))
    for path in args.checkpoints:
        model, tokenizer = load_policy(path)  # adapters merged into their base
        rates = [copy_rate(model, tokenizer, problems, lead) for lead in args.leads]
        rates.append(read_back_rate(model, tokenizer, task, problems))
        print(f"| {path} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
