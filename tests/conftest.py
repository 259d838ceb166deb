import os

import pytest

os.environ.setdefault("STEPRL_NO_PROGRESS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers (pytest -n 2)
    # the workers share the cores: more threads than cores in all makes torch's kernels spin and
    # wait on each other (several times slower); the processes the tests launch inherit it too
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // workers))


@pytest.fixture(scope="session")
def tiny():
    """A random tiny Llama and the embedded tokenizer, trained on a small calc corpus."""
    import torch

    from steprl.models.tiny import render_chatml, tiny_llama, train_tokenizer
    from steprl.tasks.calc import CalcTask

    task = CalcTask()
    texts = task.pretrain_corpus(400) + [render_chatml(m) for m in task.cold_start(100)]
    tok = train_tokenizer(texts, vocab_size=400)
    torch.manual_seed(0)
    model = tiny_llama(tok, hidden_size=64, num_layers=2, num_heads=2).eval()
    return model, tok, task


@pytest.fixture(scope="session")
def tiny_dir(tiny, tmp_path_factory):
    """The tiny fixture model saved as a checkpoint directory (a stage's starting point)."""
    model, tok, _ = tiny
    path = tmp_path_factory.mktemp("tiny_model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def toy_run(tmp_path_factory):
    """The demo's pipeline (pretrain -> SFT -> GRPO -> eval) at toy size, run once through the CLI."""
    from steprl.cli import main

    out = tmp_path_factory.mktemp("runs")
    assert main(["run", "configs/toy.yaml", f"output_dir={out}"]) == 0
    return out / "toy"
