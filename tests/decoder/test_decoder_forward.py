"""Our decoder's logits equal transformers' for every owned family, packed or not, on every attention path.

The HF model is the numerical reference: loaded by loratune's `load_base` in fp32 with eager attention, each
sample run alone. Our decoder shares its tensors (`decoder_from_hf`) and runs the samples laid end to end
as one stream with their boundaries. Tolerance 1e-5 on logits of order 1 (measured: below 1e-6).
"""

from __future__ import annotations

import pytest
import torch
from decoder_families import (
    LENGTHS,
    NAMES,
    hf_logits,
    load_pair,
    run_config,
    sample_ids,
)

from loratune.decoder import Boundaries

TOL = 1e-5


@pytest.mark.parametrize("name", NAMES)
def test_packed_logits_match_hf_each_sample_alone(name, checkpoint, quiet):
    hf, dec = load_pair(run_config(checkpoint(name)))
    ids = sample_ids()
    with torch.no_grad():
        ref = hf_logits(hf, ids)
        packed = dec(torch.cat(ids), Boundaries.from_lengths(LENGTHS))
        alone = torch.cat([dec(i) for i in ids])
    assert ref.abs().max() > 0.5  # a model whose logits are not all near zero
    assert packed.shape == ref.shape == (sum(LENGTHS), 97)
    assert (packed - ref).abs().max().item() < TOL
    assert (alone - ref).abs().max().item() < TOL
    assert (packed - alone).abs().max().item() < TOL  # packing changes nothing but the order of the arithmetic


@pytest.mark.parametrize("name", ["llama", "gemma2"])
def test_equal_length_batch_reads_as_samples(name, checkpoint, quiet):
    """A [B, T] batch without boundaries is B samples of T tokens: logits [B, T, V], each row as HF alone."""
    hf, dec = load_pair(run_config(checkpoint(name)))
    ids = torch.stack(sample_ids((9, 9)))
    with torch.no_grad():
        ours = dec(ids)
        ref = hf(input_ids=ids).logits
    assert ours.shape == ref.shape == (2, 9, 97)
    assert (ours - ref).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["qwen2", "gemma2", "phi3"])
def test_flex_attention_equals_the_sdpa_reference(name, checkpoint, quiet):
    """FlexAttention's block mask (windows, Gemma 2's soft-cap as a score mod) gives the reference's logits;
    off CUDA it runs unfused, which is what makes this check possible on the CPU."""
    _, dec = load_pair(run_config(checkpoint(name)))
    ids = torch.cat(sample_ids())
    b = Boundaries.from_lengths(LENGTHS)
    with torch.no_grad():
        ref = dec(ids, b)
        dec.attention = "flex"
        flex = dec(ids, Boundaries.from_lengths(LENGTHS))
    assert (flex - ref).abs().max().item() < 1e-5


def test_positions_read_from_position_ids(checkpoint, quiet):
    """Boundaries found from packed position ids (restarts at 0) equal the ones built from the lengths."""
    _, dec = load_pair(run_config(checkpoint("mistral")))
    pos = torch.cat([torch.arange(n) for n in LENGTHS])
    b = Boundaries.from_position_ids(pos[None])
    assert b.lengths == LENGTHS and b.cu_seqlens.tolist() == [0, 7, 19, 22] and b.max_seqlen == 12
    ids = torch.cat(sample_ids())
    with torch.no_grad():
        assert torch.equal(dec(ids, b), dec(ids, Boundaries.from_lengths(LENGTHS)))


def test_no_attention_across_samples(checkpoint, quiet):
    """Changing every token of the first sample leaves the logits of the samples after it exactly as they were."""
    _, dec = load_pair(run_config(checkpoint("llama")))
    ids = sample_ids()
    other = [torch.flip(ids[0], [0]) % 90 + 5, *ids[1:]]
    b = Boundaries.from_lengths(LENGTHS)
    with torch.no_grad():
        x, y = dec(torch.cat(ids), b), dec(torch.cat(other), b)
    n0 = LENGTHS[0]
    assert not torch.allclose(x[:n0], y[:n0])
    assert torch.equal(x[n0:], y[n0:])


def _fake_flash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p=0.0, softmax_scale=None, causal=False,
                       window_size=(-1, -1), softcap=0.0, deterministic=False):
    """flash-attn's documented semantics, written out per sample: query i sees keys in
    [i - window_size[0], i + window_size[1]] (causal: not past i), scores soft-capped after the scale."""
    assert torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max()) and dropout_p == 0.0
    outs = []
    for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1)
        ks = ks.repeat_interleave(qs.shape[0] // ks.shape[0], 0)
        vs = vs.repeat_interleave(qs.shape[0] // vs.shape[0], 0)
        w = qs @ ks.transpose(1, 2) * softmax_scale
        if softcap:
            w = softcap * torch.tanh(w / softcap)
        i = torch.arange(e - s)
        ok = torch.ones(e - s, e - s, dtype=torch.bool)
        if causal:
            ok &= i[None, :] <= i[:, None]
        if window_size[0] >= 0:
            ok &= i[None, :] >= i[:, None] - window_size[0]
        outs.append((w.masked_fill(~ok, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (4, None), (3, 5.0)])
def test_flash_call_maps_windows_and_softcap_as_flash_attn_defines_them(window, softcap, monkeypatch):
    """The flash backend's call (cu_seqlens, max_seqlen, window_size=(w-1, w-1), softcap) computes the reference's
    attention under flash-attn's documented semantics (a stand-in module here: flash-attn needs a CUDA GPU)."""
    import sys
    import types

    from loratune.decoder.attention import attend

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=_fake_flash_varlen))
    g = torch.Generator().manual_seed(0)
    n = sum(LENGTHS)
    q, k, v = torch.randn(n, 4, 16, generator=g), torch.randn(n, 2, 16, generator=g), torch.randn(n, 2, 16, generator=g)
    b = Boundaries.from_lengths(LENGTHS)
    kw = {"scale": 0.25, "window": window, "softcap": softcap}
    ref = attend(q, k, v, b, backend="sdpa", **kw)
    assert (attend(q, k, v, b, backend="flash", **kw) - ref).abs().max().item() < 1e-6
