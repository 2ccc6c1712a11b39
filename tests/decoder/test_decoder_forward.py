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
