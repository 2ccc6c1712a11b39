"""S²-Attn (loratune.decoder.s2_attn): the mask against a hand-built reference, full causal attention when the group
covers the sample, training with it (the loss falls) and evaluation without it, and the config refusals."""

from __future__ import annotations

import pytest
import torch
from decoder_families import load_pair, run_config
from torch.nn.attention.flex_attention import create_block_mask, create_mask, flex_attention

from loratune.decoder import decoder_from_hf
from loratune.decoder.attention import Boundaries
from loratune.decoder.s2_attn import S2Groups, attach, check_group, s2_attend
from loratune.errors import ConfigError


def _reference(lengths: tuple[int, ...], group: float, heads: int) -> torch.Tensor:
    """[H, N, N] built token by token from the method's description."""
    n = sum(lengths)
    ref = torch.zeros(heads, n, n, dtype=torch.bool)
    start = 0
    for length in lengths:
        size = max(1, int(length * group)) if group <= 1 else int(group)
        for h in range(heads):
            shifted = h >= heads // 2
            for i in range(length):
                for j in range(i + 1):
                    if length <= size:
                        same = True
                    elif not shifted:
                        same = i // size == j // size
                    else:  # groups [0, size/2), [size/2, 3 size/2), ...
                        half = size // 2
                        gi = 0 if i < half else (i - half) // size + 1
                        gj = 0 if j < half else (j - half) // size + 1
                        same = gi == gj
                    ref[h, start + i, start + j] = same
        start += length
    return ref


CASES = [((7, 5), 4, 4), ((9, 13), 0.25, 2), ((11, 3, 6), 4, 3), ((17,), 6, 4), ((10, 9), 0.5, 1)]


@pytest.mark.parametrize("lengths,group,heads", CASES)
def test_mask_equals_the_hand_built_reference(lengths, group, heads) -> None:
    b = Boundaries.from_lengths(lengths)
    s2 = S2Groups.build(b, group, heads)
    ref = _reference(lengths, group, heads)
    assert torch.equal(s2.dense_mask(None), ref)
    # the FlexAttention mask_mod gives the same mask; the window narrows it
    n = b.n_tokens
    assert torch.equal(create_mask(s2.mask_mod(None), 1, heads, n, n, device="cpu")[0], ref)
    i = torch.arange(n)
    assert torch.equal(s2.dense_mask(3), ref & ((i[:, None] - i[None, :]) < 3))
    assert torch.equal(create_mask(s2.mask_mod(3), 1, heads, n, n, device="cpu")[0], s2.dense_mask(3))


def test_shifted_heads_differ_and_connect_groups() -> None:
    s2 = S2Groups.build(Boundaries.from_lengths([8]), 4, 2)
    m = s2.dense_mask(None)
    assert m[0, 5].tolist() == [False] * 4 + [True, True, False, False]  # group [4, 8)
    assert m[1, 5].tolist() == [False, False, True, True, True, True, False, False]  # shifted group [2, 6)
    assert m[1, 1].tolist() == [True, True] + [False] * 6  # the first half group: nothing from the future


def test_flex_with_the_block_mask_equals_the_dense_path() -> None:
    torch.manual_seed(0)
    lengths, heads, kv = (70, 41, 33), 4, 2
    b = Boundaries.from_lengths(lengths)
    s2 = S2Groups.build(b, 0.25, heads)
    n = b.n_tokens
    q, k, v = torch.randn(n, heads, 8), torch.randn(n, kv, 8), torch.randn(n, kv, 8)
    dense = s2_attend(q, k, v, s2, scale=0.3)
    bm = create_block_mask(s2.mask_mod(None), None, heads, n, n, device="cpu")
    flex = flex_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), block_mask=bm, scale=0.3,
                          enable_gqa=True)[0].transpose(0, 1)
    torch.testing.assert_close(dense, flex, atol=1e-5, rtol=1e-5)


def _decoder(checkpoint, name: str = "qwen3"):
    dec = decoder_from_hf(load_pair(run_config(checkpoint(name)))[0], attention="sdpa")
    dec.add_adapters(4, 8, seed=0)
    with torch.no_grad():
        for layer in dec.adapted_layers().values():
            layer.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(1))
    return dec


@pytest.mark.parametrize("family,group", [("qwen3", 1.0), ("qwen3", 40), ("gemma2", 40), ("mistral", 1.0)])
def test_a_group_covering_the_sample_is_full_causal_attention(checkpoint, quiet, family, group) -> None:
    dec = _decoder(checkpoint, family).train()  # gemma2: soft-cap and sliding windows; mistral: a window
    lengths = (23, 9, 40)
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(2))
    full = dec(ids, Boundaries.from_lengths(lengths))
    attach(dec, group)
    s2 = dec(ids, Boundaries.from_lengths(lengths))
    torch.testing.assert_close(s2, full, atol=1e-6, rtol=0)
    dec.s2_group = 0.25  # a real split changes the training logits
    assert (dec(ids, Boundaries.from_lengths(lengths)) - full).abs().max() > 1e-3


def test_training_with_s2_lowers_the_loss_and_eval_attends_in_full(checkpoint, quiet) -> None:
    dec = _decoder(checkpoint)
    lengths = (48, 32)
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(3))
    b = Boundaries.from_lengths(lengths)
    labels = ids.clone()
    labels[torch.tensor([0, lengths[0]])] = -100  # the first token of each sample has no prediction
    targets = torch.cat([labels[1:], torch.tensor([-100])])

    def loss() -> torch.Tensor:
        return torch.nn.functional.cross_entropy(dec(ids, b).float(), targets, ignore_index=-100)

    attach(dec, 0.25)
    dec.train()
    opt = torch.optim.Adam([p for p in dec.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < losses[0] - 0.1, losses
    dec.eval()
    with torch.no_grad():
        with_option = dec(ids, b)
        dec.s2_group = None
        without = dec(ids, b)
    assert torch.equal(with_option, without)  # evaluation: full attention, the option changes nothing


def test_config_refusals(tiny_llama) -> None:
    from loratune.config import load_config
    from loratune.model.memory import load_model_config
    from loratune.model.resolve import decide

    for bad in ("0", "-0.5", "2.5", "1.5"):
        with pytest.raises(ConfigError, match="train.s2_attn_group"):
            load_config(None, [f"model.path={tiny_llama}", "train.s2_attn=true", f"train.s2_attn_group={bad}"])
    assert load_config(None, [f"model.path={tiny_llama}", "train.s2_attn_group=2048"]).train.s2_attn_group == 2048
    cfg = load_config(None, [f"model.path={tiny_llama}", "train.s2_attn=true", "model.implementation=transformers"])
    with pytest.raises(ConfigError, match="train.s2_attn .* needs loratune's decoder"):
        decide(cfg, "cpu", load_model_config(cfg))
    ok = load_config(None, [f"model.path={tiny_llama}", "train.s2_attn=true", "model.implementation=loratune"])
    r = decide(ok, "cpu", load_model_config(ok))
    assert r.implementation == "loratune"
    from loratune.kernels.graphs import graphs_wanted

    assert not graphs_wanted(ok, "cuda")  # S²-Attn runs eagerly
    with pytest.raises(ConfigError, match="s2_attn_group"):
        check_group(0.0)
    with pytest.raises(ConfigError, match="needs loratune's decoder"):
        attach(torch.nn.Linear(2, 2), 0.25)


def test_checkpointed_blocks_give_the_same_gradients_with_s2(checkpoint, quiet) -> None:
    lengths = (30, 19)
    ids = torch.randint(3, 97, (sum(lengths),), generator=torch.Generator().manual_seed(4))

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        dec = _decoder(checkpoint)
        dec.checkpointing = checkpointing
        attach(dec, 0.25)
        dec.train()(ids, Boundaries.from_lengths(lengths)).square().mean().backward()
        return {n: m.lora_A.grad for n, m in dec.adapted_layers().items()}

    plain, recomputed = grads(False), grads(True)
    assert plain.keys() == recomputed.keys()
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], atol=1e-6, rtol=1e-5)
