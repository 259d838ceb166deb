"""Copy probe of a pretrained calculator model: does it copy the question's numbers in prose?

    python benchmarks/copy_probe.py runs/demo/pretrain/checkpoint [more checkpoints ...] [--leads ...]

For each of 100 held-out problems, greedy continuation of `question + lead` must start with the
problem's exact expression ("(582 + 48) - 12"). The score is the fraction that does, per lead.
Cold-start SFT and GRPO can only teach the calculator's format on top of this skill: a model that
does not copy writes well-formed calls with wrong numbers (docs/experiments.md, "Attention heads").
"""
from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from steprl.tasks.calc import CalcTask

LEADS = (" We compute", ' The expression is "')  # the default prose framing, and the one a call's quote follows


@torch.no_grad()
def copy_rate(model, tokenizer, problems, lead: str, max_new_tokens: int = 40) -> float:
    tokenizer.padding_side = "left"  # completions start together
    batch = tokenizer([p.question + lead for p in problems], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    return sum(t.strip().startswith(p.meta["expression"]) for t, p in zip(texts, problems)) / len(problems)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoints", nargs="+", help="Hugging Face model directories")
    ap.add_argument("--leads", nargs="+", default=list(LEADS))
    ap.add_argument("--n", type=int, default=100, help="held-out problems")
    args = ap.parse_args()
    problems = CalcTask(1, 3, varied=True).problems("test", args.n)
    print("| checkpoint | " + " | ".join(repr(lead) for lead in args.leads) + " |")
    print("|---|" + "---:|" * len(args.leads))
    for path in args.checkpoints:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        rates = [copy_rate(model, tokenizer, problems, lead) for lead in args.leads]
        print(f"| {path} | " + " | ".join(f"{r:.2f}" for r in rates) + " |", flush=True)


if __name__ == "__main__":
    main()
