"""The rollout engine's own decode step (`steprl.rollout.decoder`) computes what HF's forward
computes: the same logits from the same cache, with LoRA adapters merged, with weights packed for
MKL, and again after the weights change. And the sampler draws from the right distribution."""
import copy

import pytest
import torch

from steprl.config import LoraConfig
from steprl.models.loading import apply_lora
from steprl.rollout import decoder as dec
from steprl.rollout.decoder import LlamaDecoder
from steprl.rollout.sampling import SamplingParams, generate, inverse_cdf_sample, left_pad, prefill

PROMPTS = ["Sam has 12 apples.", "7 plus", "Lily has 9257 stones. She gets 9 more."]


def lora_model(tiny, seed=0):
    torch.manual_seed(seed)
    model = apply_lora(copy.deepcopy(tiny[0]), LoraConfig(enabled=True, r=4, alpha=8, dropout=0.0,
                                                          target_modules=["q_proj", "v_proj", "up_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at zero: make the adapters change the output
                p.normal_(0, 0.2)
    return model.eval()


def step_logits_both_ways(model, tok, decoder, texts=PROMPTS):
    """Logits of three decode steps from our step and from HF's forward, each on its own cache."""
    prompts = [tok(t)["input_ids"] for t in texts]
    out = []
    for use_ours in (True, False):
        with torch.inference_mode():
            cache, logits, mask, pos, _ = prefill(model, prompts, tok.pad_token_id, 8)
            width, nxt, new, seen = mask.shape[1], pos[:, -1] + 1, logits.argmax(-1), []
            full = torch.cat([mask, torch.ones(len(prompts), 8, dtype=torch.long)], dim=1)
            for t in range(3):
                m = full[:, :width + t + 1]
                if use_ours:
                    logits = decoder.step(new, nxt, cache, m)
                else:
                    logits = model(input_ids=new[:, None], attention_mask=m, position_ids=nxt[:, None],
                                   past_key_values=cache, use_cache=True).logits[:, -1]
                seen.append(logits)
                nxt, new = nxt + 1, torch.tensor([5, 9, 17] * 4)[:len(prompts)]  # both sides read the same
        out.append(torch.stack(seen))
    return out


def test_decode_step_equals_hf_forward_under_lora(tiny):
    model, tok = lora_model(tiny), tiny[1]
    decoder = LlamaDecoder.for_model(model)
    assert decoder is not None
    ours, hf = step_logits_both_ways(model, tok, decoder)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    with model.disable_adapter():  # the reference policy: adapters off, a different decoder
        plain = LlamaDecoder.for_model(model)
        assert plain is not decoder
        ours, hf = step_logits_both_ways(model, tok, plain)
        torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)


def test_decoder_reads_the_model_weights_and_copies_only_merged_ones(tiny):
    """Without LoRA the decoder holds no copy of any weight; under LoRA only the adapted ones."""
    base = copy.deepcopy(tiny[0]).eval()
    decoder = LlamaDecoder.for_model(base)
    for ours, layer in zip(decoder.layers, base.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        for name, module in [("q", att.q_proj), ("k", att.k_proj), ("v", att.v_proj), ("o", att.o_proj),
                             ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)]:
            assert ours[name][0].data_ptr() == module.weight.data_ptr(), name
    model = lora_model(tiny)  # adapters on q, v, up
    adapted = LlamaDecoder.for_model(model)
    att = model.base_model.model.model.layers[0].self_attn
    assert adapted.layers[0]["o"][0].data_ptr() == att.o_proj.weight.data_ptr()
    assert adapted.layers[0]["q"][0].data_ptr() != att.q_proj.base_layer.weight.data_ptr()


def test_packed_weights_serve_their_batch_size_and_plain_ones_the_rest(tiny):
    """A batch of >= MIN_PACKED_ROWS rows packs every weight for MKL's packed GEMM at that size:
    the logits stay HF's; other sizes (rows that left the batch) go through F.linear, exactly."""
    if not dec.MKL_PACKED:
        pytest.skip("this torch has no MKL packed GEMM")
    model, tok = lora_model(tiny), tiny[1]
    texts = (PROMPTS * 3)[:dec.MIN_PACKED_ROWS + 1]
    decoder = LlamaDecoder.for_model(model)
    decoder.pack(len(texts))
    ours, hf = step_logits_both_ways(model, tok, decoder, texts)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    assert decoder.packed_rows == len(texts)
    assert len(decoder.packed) == 7 * len(decoder.layers) + isinstance(decoder.head, tuple)
    w = decoder.layers[0]["up"]
    x = torch.randn(len(texts), w[0].shape[1])
    torch.testing.assert_close(decoder.linear(x, w), torch.nn.functional.linear(x, *w), atol=1e-5, rtol=1e-5)
    assert torch.equal(decoder.linear(x[:3], w), torch.nn.functional.linear(x[:3], *w))  # not packed for 3
    small = LlamaDecoder(model)
    small.pack(3)  # below MIN_PACKED_ROWS: nothing packed
    assert small.packed_rows == 0 and not small.packed
    twin = copy.deepcopy(model)  # a copy of the model copies no decoder (packed tensors cannot be)
    assert LlamaDecoder.for_model(model) is decoder and dec.DECODERS.get(twin) is None
    decoder.pack(len(texts) + 2)  # generate's next batch has another size: packed again for it
    assert decoder.packed_rows == len(texts) + 2 and len(decoder.packed) == 7 * len(decoder.layers) + 1  # + the head


def test_decoder_follows_weight_updates_and_stays_out_of_training(tiny):
    model, tok = lora_model(tiny, seed=1), tiny[1]
    first = LlamaDecoder.for_model(model)
    assert LlamaDecoder.for_model(model) is first  # same weights: built once
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=0.05)
    ids, mask, pos = left_pad([tok(t)["input_ids"] for t in PROMPTS], tok.pad_token_id)
    model.train()
    assert LlamaDecoder.for_model(model) is None  # dropout would be live: HF's forward decodes
    model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.pow(2).mean().backward()
    opt.step()
    model.eval()
    second = LlamaDecoder.for_model(model)
    assert second is not first
    ours, hf = step_logits_both_ways(model, tok, second)
    torch.testing.assert_close(ours, hf, atol=1e-4, rtol=1e-4)
    stale, _ = step_logits_both_ways(model, tok, first)
    assert (stale - hf).abs().max() > 1e-3  # the update mattered: a stale decoder would be wrong


@pytest.mark.parametrize("copies", [1, 3])  # 3 rows: plain weights; 9 rows: packed for 9
def test_generate_uses_the_decoder_and_matches_hf_greedy(tiny, monkeypatch, copies):
    model, tok = lora_model(tiny, seed=2), tiny[1]
    calls = []
    real = LlamaDecoder.step
    monkeypatch.setattr(LlamaDecoder, "step", lambda self, *a: calls.append(1) or real(self, *a))
    prompts = [tok(t)["input_ids"] for t in PROMPTS * copies]
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=6, temperature=0.0))
    assert len(calls) >= 5
    packed = len(prompts) >= dec.MIN_PACKED_ROWS and dec.MKL_PACKED
    assert LlamaDecoder.for_model(model).packed_rows == (len(prompts) if packed else 0)
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    for row, got in zip(ref[:, ids.shape[1]:].tolist(), ours):
        assert row[:len(got)] == got


def test_inverse_cdf_sample_draws_the_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.2, 0.7], [0.0, 0.5, 0.5, 0.0]]).repeat_interleave(50_000, dim=0)
    gen = torch.Generator().manual_seed(0)
    tokens = inverse_cdf_sample(probs, gen)
    first, second = tokens[:50_000], tokens[50_000:]
    freq = torch.bincount(first, minlength=4) / 50_000
    # 4 standard errors of a frequency near 0.7 at n = 50k is 0.008
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.0, 0.2, 0.7]), atol=0.008, rtol=0)
    assert set(second.tolist()) == {1, 2}  # zero-probability tokens are never drawn
    assert abs(float((second == 1).float().mean()) - 0.5) < 0.01


def prefill_both_ways(model, prompts, pad_id, monkeypatch):
    """`prefill` with the decoder's packed passes and with HF's forward only; the packed passes
    must really run (counted)."""
    calls = []
    packed_extend = LlamaDecoder.extend

    def counted(self, seqs, cache):
        calls.append(len(seqs))
        return packed_extend(self, seqs, cache)
    monkeypatch.setattr(LlamaDecoder, "extend", counted)
    with torch.inference_mode():
        ours = prefill(model, prompts, pad_id, 4, LlamaDecoder.for_model(model))
        hf = prefill(model, prompts, pad_id, 4)
    return ours, hf, calls


@pytest.mark.parametrize("case", ["distinct", "one stem", "groups"])
def test_packed_prefill_equals_hf_forward(tiny, case, monkeypatch):
    """The packed passes (`LlamaDecoder.extend`: no padding, each token over its row's tokens and
    the stem's) leave the cache, logits, mask and positions of HF's padded passes: prompts with
    nothing in common (one pass), prompts after one common stem (stem, then the suffixes packed),
    and GRPO groups (a common beginning, each group's rest packed, then the rows' suffixes)."""
    model, tok = lora_model(tiny, seed=1), tiny[1]
    texts = {"distinct": ["Sam has 12 apples.", "7 plus", "Lily has 9257 stones. She gets 9 more."],
             "one stem": ["Sam has 12 apples. He finds 5 more. " + t for t in ("How many", "And", "How many now?")],
             "groups": [g for t in ("Tom has 3 pens. He buys 4.", "Ann has 9 cups, breaks 2 of them.", "5 minus")
                        for g in ["Answer each question with the calculator, then give the answer. " + t] * 2]}[case]
    prompts = [tok(t)["input_ids"] for t in texts]
    (cache, logits, mask, pos, shared), (hf_cache, hf_logits, hf_mask, hf_pos, hf_shared), calls = \
        prefill_both_ways(model, prompts, tok.pad_token_id, monkeypatch)
    assert calls == {"distinct": [3], "one stem": [1, 3], "groups": [1, 3]}[case]
    assert shared == hf_shared and torch.equal(mask, hf_mask) and torch.equal(pos, hf_pos)
    torch.testing.assert_close(logits, hf_logits, atol=1e-4, rtol=1e-4)
    seen = mask.bool()[:, None, :, None]  # padded columns hold zeros in ours, pad tokens' keys in HF's
    for ours_layer, hf_layer in zip(cache.layers, hf_cache.layers):
        for a, b in ((ours_layer.keys, hf_layer.keys), (ours_layer.values, hf_layer.values)):
            assert a.shape == b.shape and torch.isfinite(a).all()
            torch.testing.assert_close(a * seen, b * seen, atol=1e-5, rtol=1e-5)


def test_shared_stem_attention_equals_attention_over_every_rows_copy(tiny):
    """Rows with a common stem: decode steps that read the stem once (`shared`) give the logits
    of steps that read every row's copy, and `attend` equals the plain formula on random tensors."""
    model, tok = lora_model(tiny, seed=3), tiny[1]
    stem = tok("Sam has 12 apples. He finds 5 more. Then he sells 3.")["input_ids"]
    prompts = [stem + tok(t)["input_ids"] for t in (" How many", " And", " How many apples does Sam have?")] * 2
    decoder = LlamaDecoder.for_model(model)
    out = []
    for use_shared in (True, False):
        with torch.inference_mode():
            cache, logits, mask, pos, shared = prefill(model, prompts, tok.pad_token_id, 8)
            assert shared >= len(stem)
            width, nxt, new, seen = mask.shape[1], pos[:, -1] + 1, logits.argmax(-1), []
            full = torch.cat([mask, torch.ones(len(prompts), 8, dtype=torch.long)], dim=1)
            for t in range(3):
                seen.append(decoder.step(new, nxt, cache, full[:, :width + t + 1], shared if use_shared else 0))
                nxt, new = nxt + 1, torch.tensor([5, 9, 17, 5, 9, 17])
        out.append(torch.stack(seen))
    torch.testing.assert_close(out[0], out[1], atol=1e-5, rtol=1e-5)

    torch.manual_seed(0)
    q, k, v = torch.randn(5, 3, 2, 8), torch.randn(5, 3, 11, 8), torch.randn(5, 3, 11, 8)
    k[:, :, :4], v[:, :, :4] = k[:1, :, :4], v[:1, :, :4]  # a stem of 4 columns shared by all rows
    bias = torch.zeros(5, 1, 1, 11)
    bias[1, ..., 6] = float("-inf")  # a masked column after the stem
    plain = torch.softmax(q @ k.transpose(-1, -2) * 0.3 + bias, dim=-1) @ v
    assert dec.FUSED_ATTENTION is not None  # torch's fused kernel, with its log-normaliser, on this torch
    for attend in (dec.attend, dec.attend_matmul):
        torch.testing.assert_close(attend(q, k, v, bias, 0.3, shared=4), plain, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(attend(q, k, v, bias, 0.3), plain, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------- bf16

def teacher_forced_logps(model, prompts, outs, pad_id):
    """log p(token) of each generated token under `model`'s own forward over prompt + output."""
    rows = [p + o for p, o in zip(prompts, outs)]
    ids, mask, pos = left_pad(rows, pad_id)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask, position_ids=pos).logits.float(), -1)
    width = ids.shape[1]
    return [[float(logp[i, width - len(o) - 1 + j, t]) for j, t in enumerate(o)] for i, o in enumerate(outs)]


@pytest.mark.parametrize("texts", [PROMPTS, ["Sam has 12 apples. " + t for t in PROMPTS * 4]])  # 12 rows: a shared stem
def test_bf16_decoding_is_as_close_to_fp32_as_hf_in_bf16(tiny, texts):
    """The bf16 engine (bf16 weights, KV cache and activations, fp32 logits) against the fp32
    forward of the same tokens: its log-prob error is bf16 rounding, no larger than that of HF's
    own forward with the model in bf16; and it is not zero (bf16 really ran)."""
    model, tok = lora_model(tiny, seed=3), tiny[1]
    model = model.merge_and_unload().eval()  # HF's bf16 copy then computes exactly what ours merges
    prompts = [tok(t)["input_ids"] for t in texts]
    outs, logps, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=8, temperature=0.0),
                              dtype=torch.bfloat16)
    assert LlamaDecoder.for_model(model, torch.bfloat16).layers[0]["q"][0].dtype == torch.bfloat16
    fp32 = teacher_forced_logps(model, prompts, outs, tok.pad_token_id)
    hf_bf16 = teacher_forced_logps(copy.deepcopy(model).to(torch.bfloat16), prompts, outs, tok.pad_token_id)
    ours_err = max(abs(a - b) for r, f in zip(logps, fp32) for a, b in zip(r, f))
    hf_err = max(abs(a - b) for r, f in zip(hf_bf16, fp32) for a, b in zip(r, f))
    assert 0 < ours_err <= 2 * hf_err + 1e-3, (ours_err, hf_err)


def test_bf16_greedy_agrees_with_hf_bf16_generate(tiny):
    """Greedy bf16 decoding against HF `generate` with the model in bf16: the arithmetic differs
    (fused norms, packed GEMM, fp32 logits), so near-ties can break either way: at least 90% of the
    tokens agree position by position (96 of 96 when written)."""
    model, tok = lora_model(tiny, seed=4).merge_and_unload().eval(), tiny[1]
    prompts = [tok(t)["input_ids"] for t in PROMPTS * 4]
    ours, _, _ = generate(model, tok, prompts, SamplingParams(max_new_tokens=8, temperature=0.0), dtype=torch.bfloat16)
    ids, mask, _ = left_pad(prompts, tok.pad_token_id)
    with torch.no_grad():
        ref = copy.deepcopy(model).to(torch.bfloat16).generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)[:, ids.shape[1]:].tolist()
    agree = sum(a == b for got, row in zip(ours, ref) for a, b in zip(got, row))
    assert agree >= 0.9 * sum(len(g) for g in ours)


def test_bf16_weights_are_packed_once_for_any_rows(tiny):
    """bf16 packs every weight in oneDNN's layout once; a packed linear is bit-identical to
    F.linear in bf16 at any number of rows."""
    if not dec.ONEDNN_PACKED:
        pytest.skip("this torch or CPU has no oneDNN packed bf16 linear")
    decoder = LlamaDecoder(lora_model(tiny), torch.bfloat16)
    decoder.pack(9)
    assert decoder.packed_rows is None and len(decoder.packed) == 7 * len(decoder.layers) + 1
    w = decoder.layers[1]["gate"]
    for rows in (1, 9, 40):
        x = torch.randn(rows, w[0].shape[1]).to(torch.bfloat16)
        assert torch.equal(decoder.linear(x, w), torch.nn.functional.linear(x, *w))
