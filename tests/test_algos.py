"""Tests for steprl.algos: hand-computed values (arithmetic in the comments) and independent
plain-Python reference implementations on random inputs."""

import math
import random
import statistics

import pytest
import torch

from steprl.algos import (
    AdaptiveKLController,
    FixedKLController,
    aggregate_loss,
    bradley_terry_loss,
    clipped_surrogate,
    clipped_value_loss,
    discounted_returns,
    entropy_from_logits,
    gae,
    group_advantages,
    kl_penalty,
    logprobs_and_entropy,
    masked_mean,
    masked_whiten,
    token_logprobs,
    trajectory_returns,
    truncated_is_weight,
    turn_level_group_advantages,
)


def close(a, b, tol=1e-5):
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, atol=tol, rtol=tol), (a, b)


def close_lists(a, b, tol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert u == pytest.approx(v, abs=tol, rel=tol), (a, b)


# ---------------------------------------------------------------------------------------------
# group_advantages


def test_group_advantages_group_scale_by_hand():
    # rewards [1,0,0,1], groups [1,0] [0,1]: means 0.5, 0.5; centered [0.5,-0.5,-0.5,0.5]
    # std (Bessel) of [1,0]: sqrt((0.25+0.25)/1) = sqrt(0.5) = 0.70711; + 1e-4 = 0.70721
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 2)
    s = math.sqrt(0.5) + 1e-4
    close(a, [0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])  # ~[0.70701, -0.70701, -0.70701, 0.70701]


def test_group_advantages_all_scales_by_hand():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0])
    # groups [1,0] [1,1]: means 0.5, 1.0 -> centered [0.5, -0.5, 0, 0]
    close(group_advantages(r, 2, scale="none"), [0.5, -0.5, 0.0, 0.0])
    # group std: sqrt(0.5)=0.70711 and 0 -> [0.5/0.70721, -0.5/0.70721, 0/1e-4, 0/1e-4]
    s = math.sqrt(0.5) + 1e-4
    close(group_advantages(r, 2, scale="group"), [0.5 / s, -0.5 / s, 0.0, 0.0])
    # batch std: mean 0.75, squares of [0.25,-0.75,0.25,0.25] = 0.0625*3 + 0.5625 = 0.75, /3 = 0.25,
    # sqrt = 0.5 -> [0.5/0.5001, -0.5/0.5001, 0, 0]
    close(group_advantages(r, 2, scale="batch"), [0.5 / 0.5001, -0.5 / 0.5001, 0.0, 0.0])


def test_group_advantages_default_is_group_and_accepts_lists():
    r = [3.0, 1.0, 2.0, 2.0, 0.0, 4.0]
    close(group_advantages(r, 3), group_advantages(torch.tensor(r), 3, scale="group"))


def test_group_advantages_random_vs_python_reference():
    rng = random.Random(0)
    for G in (1, 2, 4, 8):
        rewards = [rng.choice([0.0, 1.0, rng.uniform(-2, 2)]) for _ in range(4 * G)]
        allstd = statistics.stdev(rewards)
        for scale in ("group", "batch", "none"):
            ref = []
            for g in range(0, len(rewards), G):
                grp = rewards[g:g + G]
                m = statistics.mean(grp)
                s = statistics.stdev(grp) if G > 1 else 0.0
                for x in grp:
                    if scale == "group":
                        ref.append((x - m) / (s + 1e-4))
                    elif scale == "batch":
                        ref.append((x - m) / (allstd + 1e-4))
                    else:
                        ref.append(x - m)
            close(group_advantages(torch.tensor(rewards), G, scale=scale), ref, tol=1e-4)


def test_group_advantages_group_size_one_and_equal_rewards_are_zero():
    for scale in ("group", "batch", "none"):
        a = group_advantages(torch.tensor([3.0, -1.0, 0.5]), 1, scale=scale)
        assert not torch.isnan(a).any()
        close(a, [0.0, 0.0, 0.0])
        close(group_advantages(torch.tensor([0.7, 0.7, 0.7, 0.7]), 4, scale=scale), [0.0] * 4)
    close(group_advantages(torch.tensor([5.0]), 1, scale="batch"), [0.0])  # N = 1: std 0, no NaN


def test_group_advantages_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.tensor([1.0, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.tensor([1.0, 0.0]), 0)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.tensor([1.0, 0.0]), 2, scale="std")


# ---------------------------------------------------------------------------------------------
# discounted returns, trajectory returns


def test_discounted_returns_by_hand():
    # gamma 0.5, r [1,0,2]: G2 = 2; G1 = 0 + 0.5*2 = 1; G0 = 1 + 0.5*1 = 1.5
    assert discounted_returns([1.0, 0.0, 2.0], 0.5) == pytest.approx([1.5, 1.0, 2.0])
    assert discounted_returns([], 0.9) == []
    assert discounted_returns([1.0, 1.0, 1.0], 1.0) == pytest.approx([3.0, 2.0, 1.0])


def test_discounted_returns_random_vs_definition():
    rng = random.Random(1)
    rs = [rng.uniform(-1, 1) for _ in range(12)]
    gamma = 0.93
    ref = [sum(gamma ** (k - t) * rs[k] for k in range(t, len(rs))) for t in range(len(rs))]
    assert discounted_returns(rs, gamma) == pytest.approx(ref)


def test_trajectory_returns_by_hand():
    # [1,0,2] gamma 0.5 -> 1 + 0 + 0.25*2 = 1.5; [] -> 0; [3] -> 3
    assert trajectory_returns([[1.0, 0.0, 2.0], [], [3.0]], 0.5) == pytest.approx([1.5, 0.0, 3.0])


# ---------------------------------------------------------------------------------------------
# GAE


def gae_reference(rewards, values, gamma, lam):
    adv, last = [0.0] * len(rewards), 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * values[t + 1] - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    return adv, [a + v for a, v in zip(adv, values)]


def test_gae_one_step_is_td_error():
    # T = 1: A = r + gamma V' - V = 1 + 0.9*2 - 0.5 = 2.3; R = A + V = 2.8
    a, ret = gae(torch.tensor([1.0]), torch.tensor([0.5, 2.0]), gamma=0.9, lam=0.95)
    close(a, [2.3])
    close(ret, [2.8])


def test_gae_two_steps_by_hand():
    # r [1,2], V [0.5,1,0] (terminal), gamma 0.9, lam 0.8
    # delta1 = 2 + 0.9*0 - 1 = 1; delta0 = 1 + 0.9*1 - 0.5 = 1.4
    # A1 = 1; A0 = 1.4 + 0.9*0.8*1 = 2.12; R = [2.12+0.5, 1+1] = [2.62, 2.0]
    a, ret = gae(torch.tensor([1.0, 2.0]), torch.tensor([0.5, 1.0, 0.0]), gamma=0.9, lam=0.8)
    close(a, [2.12, 1.0])
    close(ret, [2.62, 2.0])


def test_gae_random_vs_python_loop():
    rng = random.Random(2)
    for T in (1, 2, 7, 30):
        rs = [rng.uniform(-1, 1) for _ in range(T)]
        vs = [rng.uniform(-1, 1) for _ in range(T + 1)]
        for gamma, lam in ((0.99, 0.95), (1.0, 1.0), (0.5, 0.0)):
            ref_a, ref_r = gae_reference(rs, vs, gamma, lam)
            a, ret = gae(torch.tensor(rs), torch.tensor(vs), gamma, lam)
            close(a, ref_a)
            close(ret, ref_r)


def test_gae_limits_lambda_one_and_zero():
    rs, vs = [0.3, -0.2, 1.0], [0.1, 0.4, -0.3, 0.0]
    # lam = 1: returns = discounted return (terminal bootstrap 0)
    _, ret = gae(torch.tensor(rs), torch.tensor(vs), 0.9, 1.0)
    close(ret, discounted_returns(rs, 0.9))
    # lam = 0: advantages = one-step TD errors
    a, _ = gae(torch.tensor(rs), torch.tensor(vs), 0.9, 0.0)
    close(a, [rs[t] + 0.9 * vs[t + 1] - vs[t] for t in range(3)])


def test_gae_batched_rows_and_no_grad():
    r = torch.randn(3, 5)
    v = torch.randn(3, 6, requires_grad=True)
    a, ret = gae(r, v, 0.99, 0.95)
    assert not a.requires_grad and not ret.requires_grad
    for i in range(3):
        ai, ri = gae(r[i], v[i], 0.99, 0.95)
        close(a[i], ai)
        close(ret[i], ri)
    with pytest.raises(ValueError, match="T \\+ 1"):
        gae(torch.zeros(3), torch.zeros(3), 0.9, 0.9)


# ---------------------------------------------------------------------------------------------
# turn-level group advantages


TURNS = [[0.0, 1.0], [1.0, 0.0, 2.0], [1.0], [0.5, 0.5]]
# gamma 0.5 returns-to-go:
#   A [0,1]:   G1 = 1;           G0 = 0 + 0.5*1 = 0.5       -> [0.5, 1.0]
#   B [1,0,2]: G2 = 2; G1 = 0 + 0.5*2 = 1; G0 = 1 + 0.5 = 1.5 -> [1.5, 1.0, 2.0]
#   C [1]:     [1.0]
#   D [.5,.5]: G1 = 0.5;         G0 = 0.5 + 0.25 = 0.75     -> [0.75, 0.5]
TURNS_G = [[0.5, 1.0], [1.5, 1.0, 2.0], [1.0], [0.75, 0.5]]


def test_turn_level_none_by_hand():
    # group 1 (A, B): turn 0 peers [0.5, 1.5] mean 1.0; turn 1 peers [1, 1] mean 1.0;
    #   turn 2 only B -> fallback to the group's G0 mean 1.0: 2.0 - 1.0 = 1.0
    # group 2 (C, D): turn 0 peers [1.0, 0.75] mean 0.875; turn 1 only D -> G0 mean 0.875:
    #   0.5 - 0.875 = -0.375
    got = turn_level_group_advantages(TURNS, 2, 0.5, scale="none")
    close_lists(got, [[-0.5, 0.0], [0.5, 0.0, 1.0], [0.125], [-0.125, -0.375]])


def test_turn_level_group_by_hand():
    # group 1 std at turn 0: stdev([0.5, 1.5]) = sqrt(0.5) = 0.70711
    # group 1 std at turn 1: stdev([1, 1]) = 0 -> 0 / 1e-4 = 0
    # group 1 turn 2 (lone B) fallback std: all group-1 G [0.5, 1, 1.5, 1, 2], mean 1.2,
    #   squares .49 + .04 + .09 + .04 + .64 = 1.3, / 4 = 0.325, sqrt = 0.570088
    # group 2 std at turn 0: stdev([1.0, 0.75]) = sqrt(2 * 0.125^2) = 0.176777
    # group 2 turn 1 (lone D) fallback std: all group-2 G [1, 0.75, 0.5], mean 0.75,
    #   squares .0625 + 0 + .0625 = .125, / 2 = .0625, sqrt = 0.25
    s1, f1 = math.sqrt(0.5) + 1e-4, math.sqrt(0.325) + 1e-4
    s2, f2 = math.sqrt(2 * 0.125 ** 2) + 1e-4, 0.25 + 1e-4
    got = turn_level_group_advantages(TURNS, 2, 0.5, scale="group")
    close_lists(got, [[-0.5 / s1, 0.0], [0.5 / s1, 0.0, 1.0 / f1], [0.125 / s2], [-0.125 / s2, -0.375 / f2]])
    assert turn_level_group_advantages(TURNS, 2, 0.5) == got  # "group" is the default


def test_turn_level_batch_by_hand():
    # std of every G in the batch: stdev([0.5,1,1.5,1,2,1,0.75,0.5]) -> the "none" values divided by it
    sb = statistics.stdev([0.5, 1.0, 1.5, 1.0, 2.0, 1.0, 0.75, 0.5]) + 1e-4
    got = turn_level_group_advantages(TURNS, 2, 0.5, scale="batch")
    close_lists(got, [[-0.5 / sb, 0.0], [0.5 / sb, 0.0, 1.0 / sb], [0.125 / sb], [-0.125 / sb, -0.375 / sb]])


def turn_level_reference(turn_rewards, G, gamma, scale):
    rets = []
    for rs in turn_rewards:
        rets.append([sum(gamma ** (k - t) * rs[k] for k in range(t, len(rs))) for t in range(len(rs))])
    flat = [x for g in rets for x in g]
    sb = statistics.stdev(flat) if len(flat) > 1 else 0.0
    out = []
    for start in range(0, len(rets), G):
        grp = rets[start:start + G]
        g0 = [g[0] if g else 0.0 for g in grp]
        for g in grp:
            row = []
            for t, x in enumerate(g):
                peers = [h[t] for h in grp if len(h) > t]
                if len(peers) > 1:
                    m, s = statistics.mean(peers), statistics.stdev(peers)
                else:
                    everything = [y for h in grp for y in h]
                    m = statistics.mean(g0)
                    s = statistics.stdev(everything) if len(everything) > 1 else 0.0
                if G == 1:
                    row.append(0.0)
                elif scale == "group":
                    row.append((x - m) / (s + 1e-4))
                elif scale == "batch":
                    row.append((x - m) / (sb + 1e-4))
                else:
                    row.append(x - m)
            out.append(row)
    return out


def test_turn_level_random_vs_python_reference():
    rng = random.Random(3)
    for G in (1, 2, 4):
        trajs = [[rng.choice([0.0, 0.1, 1.0]) for _ in range(rng.randint(1, 5))] for _ in range(3 * G)]
        for scale in ("group", "batch", "none"):
            got = turn_level_group_advantages(trajs, G, 0.9, scale=scale)
            close_lists(got, turn_level_reference(trajs, G, 0.9, scale), tol=1e-4)


def test_turn_level_single_turn_matches_group_advantages():
    rewards = [1.0, 0.0, 0.5, 0.0, 0.0, 1.0]
    for scale in ("group", "batch", "none"):
        got = turn_level_group_advantages([[r] for r in rewards], 3, 0.9, scale=scale)
        close([x[0] for x in got], group_advantages(torch.tensor(rewards), 3, scale=scale), tol=1e-4)


def test_turn_level_sparse_final_reward_gamma_one_equals_trajectory_credit():
    # same lengths, reward only at the end, gamma 1: every G_t = R, so each turn gets the episode's advantage
    trajs = [[0.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]
    got = turn_level_group_advantages(trajs, 4, 1.0)
    traj_adv = group_advantages(torch.tensor(trajectory_returns(trajs, 1.0)), 4)
    for row, a in zip(got, traj_adv.tolist()):
        assert row == pytest.approx([a] * 3, abs=1e-5)


def test_turn_level_edge_cases():
    assert turn_level_group_advantages([[1.0, 2.0], [0.0]], 1, 0.9) == [[0.0, 0.0], [0.0]]
    assert turn_level_group_advantages([[1.0, 1.0], [1.0, 1.0]], 2, 0.9) == [[0.0, 0.0], [0.0, 0.0]]
    assert turn_level_group_advantages([[], [1.0]], 2, 0.9, scale="none") == [[], [0.5]]  # G0 of [] counts 0
    # lone later turn whose group G0s are equal: the fallback std spans all returns, no 1/1e-4 blow-up
    # A [1] -> G [1]; B [2, -1] gamma 1 -> G [1, -1]; B turn 1: (-1 - 1) / stdev([1, 1, -1]) = -2 / 1.154701
    got = turn_level_group_advantages([[1.0], [2.0, -1.0]], 2, 1.0)
    close_lists(got, [[0.0], [0.0, -2.0 / (1.154701 + 1e-4)]])
    with pytest.raises(ValueError, match="multiple of group_size"):
        turn_level_group_advantages([[1.0], [0.0], [1.0]], 2, 0.9)
    with pytest.raises(ValueError, match="scale"):
        turn_level_group_advantages([[1.0], [0.0]], 2, 0.9, scale="bad")


# ---------------------------------------------------------------------------------------------
# masked helpers


def test_masked_mean_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_mean(x, m), 1.5)  # (1 + 2) / 2
    close(masked_mean(x, m, dim=1), [1.5, 0.0])  # empty row -> 0, not NaN
    close(masked_mean(x, m.bool(), dim=0), [1.0, 2.0, 0.0])
    close(masked_mean(x, torch.zeros(2, 3)), 0.0)


def test_masked_whiten_by_hand():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    m = torch.tensor([1.0, 1.0, 1.0, 0.0])
    # masked mean 2, Bessel var ((1)^2 + 0 + 1^2) / 2 = 1 -> [-1, 0, 1] / sqrt(1 + 1e-8)
    w = masked_whiten(x, m)
    close(w[:3], [-1.0, 0.0, 1.0])
    close(masked_whiten(x, m, shift_mean=False)[:3], [1.0, 2.0, 3.0])  # mean 2 added back
    single = masked_whiten(x, torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert not torch.isnan(single).any()
    close(single[1], 0.0)


def test_masked_whiten_random_vs_reference():
    x = torch.randn(4, 6)
    m = (torch.rand(4, 6) > 0.4).float()
    vals = x[m.bool()].tolist()
    mu, sd = statistics.mean(vals), statistics.stdev(vals)
    close(masked_whiten(x, m)[m.bool()], [(v - mu) / math.sqrt(sd ** 2 + 1e-8) for v in vals], tol=1e-4)


# ---------------------------------------------------------------------------------------------
# kl_penalty


def test_kl_penalty_by_hand():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    close(kl_penalty(logp, ref, "k1"), [math.log(2)])  # ln 0.5 - ln 0.25 = ln 2 = 0.693147
    close(kl_penalty(logp, ref, "k2"), [0.5 * math.log(2) ** 2])  # 0.5 * 0.480453 = 0.240227
    # k3: d = ref - logp = -ln 2; exp(d) - d - 1 = 0.5 + 0.693147 - 1 = 0.193147
    close(kl_penalty(logp, ref, "k3"), [0.193147])


def test_kl_penalty_random_vs_math_and_properties():
    logp, ref = -torch.rand(3, 5) * 4, -torch.rand(3, 5) * 4
    for kind, f in (
        ("k1", lambda a, b: a - b),
        ("k2", lambda a, b: 0.5 * (a - b) ** 2),
        ("k3", lambda a, b: math.exp(b - a) - (b - a) - 1),
    ):
        out = kl_penalty(logp, ref, kind)
        assert out.shape == (3, 5)
        ref_vals = [[f(a, b) for a, b in zip(ra, rb)] for ra, rb in zip(logp.tolist(), ref.tolist())]
        close(out, ref_vals)
        close(kl_penalty(logp, logp, kind), torch.zeros(3, 5))
    assert (kl_penalty(logp, ref, "k2") >= 0).all() and (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_unbiased_monte_carlo():
    # sample from p, average k1 and k3 -> true KL(p || q)
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.2, 0.5, 0.3])
    true_kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p.tolist(), q.tolist()))
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    for kind in ("k1", "k3"):
        est = kl_penalty(p.log()[x], q.log()[x], kind).mean().item()
        assert est == pytest.approx(true_kl, abs=0.01)


# ---------------------------------------------------------------------------------------------
# Bradley-Terry


def test_bradley_terry_by_hand():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    # diffs [1, -1]: -logsigmoid(1) = ln(1 + e^-1) = 0.313262; -logsigmoid(-1) = ln(1 + e) = 1.313262
    close(bradley_terry_loss(chosen, rejected), (0.313262 + 1.313262) / 2)
    # margin 0.5: diffs [0.5, -1.5]: ln(1 + e^-0.5) = 0.474077; ln(1 + e^1.5) = 1.701413
    close(bradley_terry_loss(chosen, rejected, margin=torch.tensor([0.5, 0.5])), (0.474077 + 1.701413) / 2)
    close(bradley_terry_loss(chosen, rejected, margin=0.5), (0.474077 + 1.701413) / 2)
    close(bradley_terry_loss(torch.zeros(3), torch.zeros(3)), math.log(2))  # equal scores: ln 2


def test_bradley_terry_random_and_gradient():
    c = torch.randn(6, requires_grad=True)
    r = torch.randn(6)
    m = torch.rand(6)
    loss = bradley_terry_loss(c, r, m)
    ref = statistics.mean(math.log(1 + math.exp(-(a - b - k))) for a, b, k in zip(c.tolist(), r.tolist(), m.tolist()))
    close(loss, ref)
    loss.backward()
    assert (c.grad < 0).all()  # raising the chosen score always lowers the loss


# ---------------------------------------------------------------------------------------------
# clipped surrogate


def test_clipped_surrogate_by_hand_both_sides():
    rho = torch.tensor([1.5, 0.5, 1.1, 1.5, 0.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0])
    logp = rho.log().requires_grad_(True)
    loss = clipped_surrogate(logp, torch.zeros(5), adv, 0.2)
    # A>0, rho 1.5: min(1.5, 1.2) = 1.2 (clipped)   -> -1.2
    # A>0, rho 0.5: min(0.5, 0.8) = 0.5 (unclipped) -> -0.5
    # A>0, rho 1.1: inside the range                -> -1.1
    # A<0, rho 1.5: min(-1.5, -1.2) = -1.5 (unclipped) -> 1.5
    # A<0, rho 0.5: min(-0.5, -0.8) = -0.8 (clipped)   -> 0.8
    close(loss, [-1.2, -0.5, -1.1, 1.5, 0.8])
    loss.sum().backward()
    # d(-rho A)/d logp = -rho A where unclipped; 0 where clipped
    close(logp.grad, [0.0, -0.5, -1.1, 1.5, 0.0])


def test_clipped_surrogate_clip_higher():
    rho = torch.tensor([1.5, 1.25, 0.5, 0.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0])
    logp = rho.log()
    # eps_low 0.2, eps_high 0.28: range [0.8, 1.28]
    # rho 1.5 A 1 -> min(1.5, 1.28) -> -1.28; rho 1.25 A 1 -> inside -> -1.25
    # rho 0.5 A 1 -> min(0.5, 0.8) -> -0.5;   rho 0.5 A -1 -> min(-0.5, -0.8) -> 0.8
    close(clipped_surrogate(logp, torch.zeros(4), adv, 0.2, clip_eps_high=0.28), [-1.28, -1.25, -0.5, 0.8])
    # default symmetric: rho 1.25 A 1 -> min(1.25, 1.2) -> -1.2
    close(clipped_surrogate(logp, torch.zeros(4), adv, 0.2), [-1.2, -1.2, -0.5, 0.8])


def test_clipped_surrogate_broadcast_and_random_reference():
    logp, old = -torch.rand(3, 4) * 2, -torch.rand(3, 4) * 2
    adv = torch.randn(3)
    out = clipped_surrogate(logp, old, adv, 0.2)
    assert out.shape == (3, 4)
    close(out, clipped_surrogate(logp, old, adv[:, None].expand(3, 4), 0.2))
    for i in range(3):
        for t in range(4):
            rho = math.exp(logp[i, t].item() - old[i, t].item())
            a = adv[i].item()
            ref = -min(rho * a, min(max(rho, 0.8), 1.2) * a)
            assert out[i, t].item() == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_clipped_surrogate_on_policy_gradient_is_policy_gradient():
    # rho = 1 everywhere: loss = -A and d loss / d logp = -A
    logp = torch.randn(5, requires_grad=True)
    adv = torch.randn(5)
    loss = clipped_surrogate(logp, logp.detach(), adv, 0.2)
    close(loss, -adv)
    loss.sum().backward()
    close(logp.grad, -adv)


# ---------------------------------------------------------------------------------------------
# aggregate_loss


def test_aggregate_loss_by_hand_uneven_mask():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0]])
    close(aggregate_loss(loss, mask, "grpo"), 3.75)  # ((1+2+3+4)/4 + 5/1) / 2 = (2.5 + 5) / 2
    close(aggregate_loss(loss, mask, "dapo"), 3.0)  # (10 + 5) / 5 tokens
    close(aggregate_loss(loss, mask, "dr_grpo"), 1.875)  # 15 / (2 sequences * 4)
    close(aggregate_loss(loss, mask, "dr_grpo", max_len=10), 0.75)  # 15 / (2 * 10)
    close(aggregate_loss(loss, mask.bool(), "dapo"), 3.0)
    with pytest.raises(ValueError, match="kind"):
        aggregate_loss(loss, mask, "mean")


def test_aggregate_loss_empty_sequences_no_nan():
    loss = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(aggregate_loss(loss, mask, "grpo"), 0.75)  # ((1+2)/2 + 0) / 2
    close(aggregate_loss(loss, mask, "dapo"), 1.5)  # 3 / 2
    close(aggregate_loss(loss, mask, "dr_grpo"), 0.375)  # 3 / 8
    for kind in ("grpo", "dapo", "dr_grpo"):
        out = aggregate_loss(loss, torch.zeros(2, 4), kind)
        close(out, 0.0)
        out.backward()
        assert not torch.isnan(loss.grad).any()
        loss.grad = None


def test_aggregate_loss_random_vs_reference():
    loss = torch.randn(4, 7)
    mask = (torch.rand(4, 7) > 0.5).float()
    mask[0] = 0.0
    L, M = loss.tolist(), mask.tolist()
    seq = [sum(l * m for l, m in zip(lr, mr)) / sum(mr) if sum(mr) else 0.0 for lr, mr in zip(L, M)]
    total = sum(l * m for lr, mr in zip(L, M) for l, m in zip(lr, mr))
    close(aggregate_loss(loss, mask, "grpo"), sum(seq) / 4)
    close(aggregate_loss(loss, mask, "dapo"), total / sum(map(sum, M)))
    close(aggregate_loss(loss, mask, "dr_grpo"), total / (4 * 7))


# ---------------------------------------------------------------------------------------------
# value loss


def test_clipped_value_loss_by_hand():
    v = torch.tensor([1.0, 1.0, 0.5])
    v_old = torch.tensor([0.5, 0.5, 0.5])
    ret = torch.tensor([0.0, 2.0, 0.0])
    # eps 0.2 -> clipped V = 0.7, 0.7, 0.5
    # 1: max((1-0)^2, (0.7-0)^2) = max(1, 0.49) = 1      -> 0.5
    # 2: max((1-2)^2, (0.7-2)^2) = max(1, 1.69) = 1.69   -> 0.845
    # 3: V = V_old: (0.5-0)^2 = 0.25                     -> 0.125
    close(clipped_value_loss(v, v_old, ret, 0.2), [0.5, 0.845, 0.125])


def test_clipped_value_loss_random_vs_reference():
    v, v_old, ret = torch.randn(10), torch.randn(10), torch.randn(10)
    out = clipped_value_loss(v, v_old, ret, 0.3)
    for i in range(10):
        a, b, r = v[i].item(), v_old[i].item(), ret[i].item()
        vc = min(max(a, b - 0.3), b + 0.3)
        assert out[i].item() == pytest.approx(0.5 * max((a - r) ** 2, (vc - r) ** 2), rel=1e-5, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# entropy, token log-probs


def test_entropy_by_hand_and_stable():
    close(entropy_from_logits(torch.zeros(4)), math.log(4))  # uniform over 4: ln 4 = 1.386294
    # p = [0.25, 0.75]: -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.346574 + 0.215762 = 0.562335
    close(entropy_from_logits(torch.tensor([0.0, math.log(3)])), 0.562335)
    close(entropy_from_logits(torch.tensor([1000.0, 1000.0])), math.log(2))  # no overflow
    close(entropy_from_logits(torch.tensor([1000.0, 0.0])), 0.0)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, dict(rel=1e-10)),
                                        # fp32: H = logsumexp(z) - sum p z subtracts terms of order 1,
                                        # so a near-zero entropy is only known to ~1e-7 absolute
                                        (torch.float32, dict(rel=1e-5, abs=1e-6))])
def test_entropy_random_vs_reference(dtype, tol):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(4, 3, 5, generator=gen, dtype=torch.float64) * 3).to(dtype)
    out = entropy_from_logits(logits)
    assert out.shape == (4, 3)
    for i in range(4):
        for t in range(3):
            z = logits[i, t].tolist()
            e = [math.exp(x) for x in z]
            p = [x / sum(e) for x in e]
            assert out[i, t].item() == pytest.approx(-sum(q * math.log(q) for q in p), **tol)


def test_entropy_gradient_matches_direct_formula():
    logits = (torch.randn(3, 7) * 4).requires_grad_(True)
    (g1,) = torch.autograd.grad(entropy_from_logits(logits).sum(), logits)
    p = torch.softmax(logits, -1)
    (g2,) = torch.autograd.grad(-(p * p.log()).sum(), logits)
    close(g1, g2)


def test_token_logprobs_by_hand_and_reference():
    # logits [0, ln 3] -> p = [0.25, 0.75]; token 1 -> ln 0.75 = -0.287682
    close(token_logprobs(torch.tensor([[[0.0, math.log(3)]]]), torch.tensor([[1]])), [[math.log(0.75)]])
    logits = (torch.randn(3, 4, 11) * 5).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 4))
    out = token_logprobs(logits, tokens)
    assert out.shape == (3, 4)
    ref = torch.log_softmax(logits, -1).gather(-1, tokens[..., None]).squeeze(-1)
    close(out, ref)
    (g1,) = torch.autograd.grad(out.sum(), logits)
    (g2,) = torch.autograd.grad(ref.sum(), logits)
    close(g1, g2)
    with torch.no_grad():  # the row-by-row path
        close(token_logprobs(logits, tokens), ref)
    # large logits: no overflow; fp32 resolution at 1000 is ~6e-5
    close(token_logprobs(torch.tensor([[1000.0, 1000.0]]), torch.tensor([0])), [math.log(0.5)], tol=2e-4)


def test_logprobs_and_entropy_by_hand_and_gradient_formula():
    # logits [0, ln 3] -> p = [0.25, 0.75]: log p(1) = ln 0.75 = -0.287682, H = 0.562335
    logp, ent = logprobs_and_entropy(torch.tensor([[[0.0, math.log(3)]]]), torch.tensor([[1]]))
    close(logp, [[math.log(0.75)]])
    close(ent, [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    logits = (torch.randn(3, 4, 11) * 5).requires_grad_(True)
    tokens = torch.randint(0, 11, (3, 4))
    logp, ent = logprobs_and_entropy(logits, tokens)
    assert logp.shape == ent.shape == (3, 4) and not ent.requires_grad
    close(ent, entropy_from_logits(logits.detach()))
    # d log p_t / d z_j = 1[j = t] - p_j, written out rather than through another autograd graph
    (grad,) = torch.autograd.grad(logp.sum(), logits)
    p = torch.exp(logits.detach() - logits.detach().max(-1, keepdim=True).values)
    p = p / p.sum(-1, keepdim=True)
    close(grad, torch.nn.functional.one_hot(tokens, 11).float() - p)
    assert logprobs_and_entropy(logits, tokens, with_entropy=False)[1] is None
    logp, ent = logprobs_and_entropy(torch.tensor([[1000.0, 1000.0]]), torch.tensor([0]))  # no overflow
    close(logp, [math.log(0.5)], tol=2e-4)
    close(ent, [math.log(2)], tol=2e-4)


# ---------------------------------------------------------------------------------------------
# KL controllers


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    c.update(10.0, 256)
    assert c.value == 0.05


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # KL 9: 9/6 - 1 = 0.5 -> clipped 0.2; mult = 1 + 0.2*256/10000 = 1.00512
    c.update(9.0, 256)
    assert c.value == pytest.approx(0.1 * 1.00512)
    # KL 6.6: 6.6/6 - 1 = 0.1; mult = 1 + 0.1*256/10000 = 1.00256
    c.update(6.6, 256)
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256)
    # KL 0: 0/6 - 1 = -1 -> clipped -0.2; mult = 1 - 0.2*1000/10000 = 0.98
    c.update(0.0, 1000)
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256 * 0.98)
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


def test_truncated_is_weight_by_hand():
    """w = min(exp(old - sampler), cap), no gradient."""
    old = torch.tensor([0.0, -1.0, -2.0, -0.1], requires_grad=True)
    sampler = torch.tensor([0.0, -2.0, -0.5, -3.0])
    w = truncated_is_weight(old, sampler, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([1.0, 2.0, math.exp(-1.5), 2.0]))
    assert not w.requires_grad
    assert truncated_is_weight(old, sampler, cap=5.0)[1].item() == pytest.approx(math.e)
