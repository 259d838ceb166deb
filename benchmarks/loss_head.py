#!/usr/bin/env python
"""The training passes' loss head at SmolLM2's vocabulary: log-probs of the sampled tokens plus the
entropy, forward and backward, two ways on the same logits:

  * logsumexp: `token_logprobs` in its earlier form (z_token - logsumexp(z)) and
    `entropy_from_logits` (a softmax of its own);
  * log-softmax: `algos.logprobs_and_entropy`, one fused log-softmax for both.

    python benchmarks/loss_head.py [--rows 16] [--positions 65] [--repeats 5]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from steprl.algos import entropy_from_logits, logprobs_and_entropy


def by_logsumexp(z, tokens):
    picked = z.gather(-1, tokens[..., None]).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1), entropy_from_logits(z.detach())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--positions", type=int, default=65)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(0)
    logits = torch.randn(a.rows, a.positions, a.vocab) * 3
    tokens = torch.randint(0, a.vocab, (a.rows, a.positions))
    results, grads = {}, {}
    for r in range(a.repeats + 1):  # round 0 warms up; the order alternates
        for name, fn in ((("logsumexp", by_logsumexp), ("log-softmax", logprobs_and_entropy))[::1 if r % 2 else -1]):
            z = logits.clone().requires_grad_(True)
            start = time.perf_counter()
            logp, entropy = fn(z, tokens)
            logp.sum().backward()
            if r:
                results.setdefault(name, []).append(time.perf_counter() - start)
            grads[name] = (logp.detach(), entropy, z.grad)
    print(f"loss head, logits [{a.rows}, {a.positions}, {a.vocab}], forward + backward + entropy:")
    for name, ts in results.items():
        print(f"  {name:11s} median {statistics.median(ts) * 1e3:6.0f} ms ({', '.join(f'{t * 1e3:.0f}' for t in ts)})")
    diff = [float((x - y).abs().max()) for x, y in zip(grads["logsumexp"], grads["log-softmax"])]
    print(f"  largest difference (log-probs, entropy, gradient): {diff[0]:.1e}, {diff[1]:.1e}, {diff[2]:.1e}")


if __name__ == "__main__":
    main()
