"""Shared fixtures: tiny random models of several families, built offline once per test session.

Each model is written to a temporary folder exactly like a hub checkpoint and loaded back through
`from_pretrained`, the path real models take. No test touches the network.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from loratune.model.tiny import FAMILIES, build_tiny  # noqa: E402

FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """demo:// models built by tests go to a temporary cache, never the user's."""
    os.environ["LORATUNE_CACHE"] = str(tmp_path_factory.mktemp("loratune-cache"))


@pytest.fixture
def one_thread():
    """One CPU thread for the test, put back after: the tiny models' many small products run much faster without
    thread hand-offs on a busy machine, and bit-identical comparisons with subprocesses (OMP_NUM_THREADS=1) need
    equal thread counts. The test folders that need it take it autouse (their conftest's `_one_thread`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def exact_cuda_matmuls():
    """CUDA float32 products without TF32 for the test (GPU tests that compare fp32 numbers at 1e-5)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{family: folder} of tiny random models (Llama, Qwen2, Mistral, Gemma shapes)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {fam: build_tiny(fam, root / fam, size="test", seed=0) for fam in FAMILY_NAMES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]
