"""Activation checkpointing recomputes exactly what the forward pass computed: every attention mask a layer reads
is built before the first block runs (`attention.prepare`), never first inside a checkpointed block.

The H200 failure this guards against: a block whose forward pass and recomputation took different routes saved
different tensors (FlexAttention's block-mask tensors before q in the forward, q first in the recompute), and
torch.utils.checkpoint refused the backward pass. FlexAttention has no backward pass on CPU, so here the masks'
timing is checked on every route (flex forward only), and the gradients of checkpointed SDPA routes (dense mask,
padded rows, windows, soft-cap) against the same decoder without checkpointing, in fp32, bf16 and fp16."""

from __future__ import annotations

import pytest
import torch
from decoder_families import load_pair, run_config

from loratune.decoder import decoder_from_hf
from loratune.decoder.attention import FLEX_MIN_TOKENS, Boundaries, prepare, route

# dense stream mask (2 S L^2 > N^2) and padded rows (many short samples), each not of one length
ROUTES = {"dense": (23, 9, 4), "rows": (5, 3, 6, 4, 2, 5, 3, 4)}


def _base(folder, dtype: torch.dtype):
    return load_pair(run_config(folder))[0].to(dtype)


def _decoder(hf, attention: str = "sdpa", checkpointing: bool = False):
    dec = decoder_from_hf(hf, attention=attention, checkpointing=checkpointing)
    dec.add_adapters(4, 8, seed=0)
    with torch.no_grad():
        for layer in dec.adapted_layers().values():
            layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return dec.train()


def _masks_seen(dec) -> list[frozenset]:
    """Record the boundaries' derived masks each time a block starts (forward and recompute)."""
    seen: list[frozenset] = []
    for block in dec.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append(frozenset(args[3]._derived)))
    return seen


@pytest.mark.parametrize("layout", list(ROUTES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_checkpointed_blocks_recompute_on_masks_built_before_them(checkpoint, quiet, layout, dtype):
    lengths = ROUTES[layout]
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(2))
    hf = _base(checkpoint("gemma2"), dtype)  # sliding and global layers, attention soft-cap

    def grads(checkpointing: bool) -> tuple[dict[str, torch.Tensor], list[frozenset], Boundaries]:
        dec = _decoder(hf, checkpointing=checkpointing)
        seen = _masks_seen(dec)
        b = Boundaries.from_lengths(lengths)  # fresh: nothing cached from another pass
        dec(ids, b).float().square().mean().backward()
        return {n: m.lora_A.grad.float() for n, m in dec.adapted_layers().items()}, seen, b

    plain, _, _ = grads(False)
    got, seen, b = grads(True)
    assert len(seen) == 2 * hf.config.num_hidden_layers  # each block ran in the forward pass and once more in the backward pass
    assert len(set(seen)) == 1 and seen[0] == frozenset(b._derived)  # every mask there before block 0
    want_key = "rows" if layout == "rows" else "dense"
    assert any(isinstance(k, tuple) and k[0] == want_key for k in seen[0]), seen[0]
    tol = 1e-6 if dtype == torch.float32 else 0.0  # the same operations on the same inputs: the same numbers
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        assert (got[name] - g).abs().max() <= tol * g.abs().max(), name


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_flex_block_masks_are_built_before_the_first_block(checkpoint, quiet, family):
    """The FlexAttention route: the block mask of each window exists before block 0 (forward only on CPU)."""
    lengths = (70, 50, 30)
    assert sum(lengths) >= FLEX_MIN_TOKENS
    dec = _decoder(_base(checkpoint(family), torch.float32), attention="flex", checkpointing=True)
    seen = _masks_seen(dec)
    b = Boundaries.from_lengths(lengths)
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        dec(ids, b)
    windows = set(dec.config.windows)
    assert len(set(seen)) == 1
    assert {k[1] for k in seen[0] if isinstance(k, tuple) and k[0] == "flex"} == windows
    assert not any(isinstance(k, tuple) and k[0] in ("dense", "rows") for k in seen[0])  # only what flex reads


def test_prepare_builds_what_each_route_reads() -> None:
    dense, rows = Boundaries.from_lengths(ROUTES["dense"]), Boundaries.from_lengths(ROUTES["rows"])
    equal, device = Boundaries.from_lengths([6, 6]), Boundaries.on_device(torch.tensor([0, 1, 2, 0, 1, 0, 1, 2, 3]))
    long = Boundaries.from_lengths([100, 60])
    assert [route(b, None, None, "sdpa") for b in (dense, rows, equal, device)] == ["sdpa", "sdpa", "rows", "sdpa"]
    assert route(long, None, None, "flex") == "flex" and route(dense, None, None, "flex") == "sdpa"
    assert route(device, None, None, "flash") in ("flex", "sdpa")  # flash needs host lengths
    prepare(dense, [None, 4, 4], None, "sdpa")
    assert set(dense._derived) == {("dense", None), ("dense", 4)}
    prepare(rows, [None], 5.0, "sdpa")
    assert set(rows._derived) == {"rows", ("rows", None)}
    prepare(equal, [None], None, "sdpa")
    assert not equal._derived  # SDPA's own causal kernel: no mask
    prepare(long, [None, 8], None, "flex")
    assert set(long._derived) == {("flex", None), ("flex", 8)}


def test_the_recompute_runs_with_the_forward_passes_thread_count(checkpoint, quiet):
    """On CUDA the recompute runs on autograd's own thread, whose intra-op thread count (which compiled
    FlexAttention's guards read) may differ from the caller's; here the count changes between the passes."""
    dec = _decoder(_base(checkpoint("llama"), torch.float32), checkpointing=True)
    counts: list[int] = []
    for block in dec.layers:
        block.register_forward_pre_hook(lambda m, args: counts.append(torch.get_num_threads()))
    lengths = ROUTES["dense"]
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        loss = dec(ids, Boundaries.from_lengths(lengths)).square().mean()
        torch.set_num_threads(2)
        loss.backward()
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert counts == [1] * (2 * len(dec.layers)) and after == 2  # recomputed with 1; the caller's 2 restored
