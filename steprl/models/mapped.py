"""A frozen reference model whose weights stay in the checkpoint file instead of the heap.

Full fine-tuning with a KL term keeps four model-sized things resident: the policy, its frozen
reference, the gradients and AdamW's two moments (5 x 0.54 GB for SmolLM2-135M in fp32). The
reference is bit for bit the checkpoint the stage started from, so it can be read through a
private memory map of that file: its pages then belong to the page cache, and after each reference
pass `release_reference` drops them from the process (`madvise(MADV_DONTNEED)`), so that they are
not resident during the backward, which is where the step's memory peaks. The next reference pass
maps them back from the cache (minor page faults, no disk read while the cache holds the file).
"""
from __future__ import annotations

import copy
import json
import mmap
import struct
from pathlib import Path

import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class MappedFile:
    """The tensors of one .safetensors file as views into a private (copy-on-write) memory map.

    The format: an 8-byte little-endian header length N, N bytes of JSON giving each tensor's
    dtype, shape and [begin, end) byte range in the data that follows the header."""

    def __init__(self, path: Path):
        with open(path, "rb") as f:
            self.map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        (n,) = struct.unpack("<Q", self.map[:8])
        self.header = {k: v for k, v in json.loads(self.map[8:8 + n]).items() if k != "__metadata__"}
        self.data_start = 8 + n
        self.address = torch.frombuffer(self.map, dtype=torch.uint8, count=1).data_ptr()

    def tensor(self, name: str) -> torch.Tensor | None:
        meta = self.header.get(name)
        if meta is None or meta["dtype"] not in DTYPES:
            return None
        dtype = DTYPES[meta["dtype"]]
        begin, end = meta["data_offsets"]
        if (self.data_start + begin) % dtype.itemsize:
            return None
        flat = torch.frombuffer(self.map, dtype=dtype, count=(end - begin) // dtype.itemsize,
                                offset=self.data_start + begin)
        return flat.view(meta["shape"])

    def span(self, tensor: torch.Tensor) -> tuple[MappedFile, int, int] | None:
        """(self, start, end): the bytes of `tensor` in this map, if it is a view into it."""
        start = tensor.data_ptr() - self.address
        end = start + tensor.numel() * tensor.element_size()
        return (self, start, end) if 0 <= start and end <= len(self.map) else None

    def release(self, start: int = 0, end: int | None = None) -> None:
        """Drop the pages of bytes [start, end) from the resident set (rounded out to whole pages:
        the pages are clean copies of the file, so dropping a neighbour's only costs a re-read)."""
        if not hasattr(mmap, "MADV_DONTNEED"):  # no madvise here: the pages stay until the OS needs them
            return
        end = len(self.map) if end is None else end
        start -= start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)


def checkpoint_files(directory: str | Path) -> list[Path]:
    d = Path(directory)
    index = d / "model.safetensors.index.json"
    if index.is_file():
        return [d / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    return [d / "model.safetensors"] if (d / "model.safetensors").is_file() else []


def frozen_reference(model: torch.nn.Module, directory: str | Path) -> torch.nn.Module:
    """A frozen copy of `model` (eval mode, no gradients) for the KL term.

    When every parameter of `model` equals, bit for bit, the tensor of the same name in
    `directory`'s safetensors file(s), the copy's parameters are views into a memory map of those
    files (see the module docstring) and take no heap; otherwise (weights merged from an adapter,
    changed since loading, another dtype) it is a plain deep copy."""
    files = [MappedFile(p) for p in checkpoint_files(directory)]
    views = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in views:
            continue  # a tied weight: the copy ties it too
        view = next((t for f in files if (t := f.tensor(name)) is not None), None)
        if view is None or view.dtype != param.dtype or view.shape != param.shape or not torch.equal(view, param):
            return copy.deepcopy(model).eval().requires_grad_(False)
        views[id(param)] = torch.nn.Parameter(view, requires_grad=False)
    ref = copy.deepcopy(model, memo=dict(views)).eval().requires_grad_(False)
    ref.mapped_files = files
    for module in ref.modules():  # give each module's pages back as soon as its forward is done
        spans = [span for p in module.parameters(recurse=False) for f in files if (span := f.span(p)) is not None]
        if spans:
            module.register_forward_hook(release_after(spans))
    release_reference(ref)  # the comparison above read every page in
    return ref


def release_after(spans):
    """A forward hook that drops the pages of `spans` ((file, start, end) byte ranges) after the
    module ran: during a reference pass, at most one module's weights are resident at a time
    (with the heap at its high-water mark from the previous backward, that is the difference)."""
    def hook(module, args, output):
        for f, start, end in spans:
            f.release(start, end)
    return hook


def release_reference(ref: torch.nn.Module | None) -> None:
    """Drop a mapped reference's pages from the resident set (no-op for a plain copy)."""
    for f in getattr(ref, "mapped_files", ()):
        f.release()
