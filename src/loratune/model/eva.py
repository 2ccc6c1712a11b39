"""EVA initialisation (`adapter.init: eva`; Paischer et al. 2024, "Explained Variance Adaptation"): each LoRA A
starts at the top r principal directions of the inputs its layer sees on the training data, B at zero (the model
is unchanged at step 0, the base untouched).

As peft's `initialize_lora_eva_weights` does it with `rho = 1` (every layer keeps rank r; no redistribution of
ranks between layers): forward passes without gradients over the first `EVA_SAMPLES` training samples, each
adapted layer's inputs collected at the positions that carry a label (peft's `use_label_mask`), centred, and
decomposed (an exact SVD here, where peft runs an incremental randomized PCA until the components stop
moving). The tests compare the directions with peft's on the same model and data.

Runs on either model code: loratune's decoder (its projections) and a peft model (its LoRA layers); the
inputs are read by forward hooks on those modules, removed afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from loratune.data.collate import segment_lengths
from loratune.data.sample import Sample
from loratune.errors import ModelError

log = logging.getLogger(__name__)

EVA_SAMPLES = 32  # training samples whose activations are decomposed
IGNORE = -100


def eva_directions(inputs: Tensor, rank: int) -> Tensor:
    """The top `rank` principal directions [rank, in] of the rows of `inputs` [n, in] (centred, fp32)."""
    x = inputs.to(torch.float32)
    x = x - x.mean(0, keepdim=True)
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return vh[:rank].contiguous()


def _layers(module: nn.Module) -> dict[str, tuple[nn.Module, Tensor, Tensor, int]]:
    """{name: (module to hook, lora_A weight, lora_B weight, rank)} of the adapted layers of either model code."""
    if hasattr(module, "adapted_layers"):  # loratune's decoder
        return {n: (m, m.lora_A, m.lora_B, m.rank) for n, m in module.adapted_layers().items()}
    from peft.tuners.lora import LoraLayer

    return {n: (m, m.lora_A["default"].weight, m.lora_B["default"].weight, m.r["default"])
            for n, m in module.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def _forward(module: nn.Module, sample: Sample, device: torch.device) -> None:
    ids = torch.tensor([sample.input_ids], device=device)
    positions = sample.position_ids
    if hasattr(module, "adapted_layers"):
        from loratune.decoder.attention import Boundaries

        lengths = segment_lengths(torch.tensor(positions)) if positions else [len(sample.input_ids)]
        module.hidden_states(ids.reshape(-1), Boundaries.from_lengths(lengths, device))
        return
    from loratune.train.loss import unwrap_model

    base = unwrap_model(module)
    kwargs = {"position_ids": torch.tensor([positions], device=device)} if positions else {}
    getattr(base, base.base_model_prefix)(input_ids=ids, use_cache=False, **kwargs)


def _adapters_off(module: nn.Module):
    if hasattr(module, "adapted_layers"):
        from loratune.decoder.lora import adapters_disabled

        return adapters_disabled(module)
    return module.disable_adapter()


@torch.no_grad()
def init_eva(module: nn.Module, samples: Sequence[Sample], max_samples: int = EVA_SAMPLES) -> int:
    """Set every adapted layer's A to its inputs' top principal directions and B to zero; returns the number of
    labelled positions used."""
    layers = _layers(module)
    if not layers:
        raise ModelError("adapter.init eva: the model has no LoRA layers")
    chosen = list(samples[:max_samples])
    masks = [torch.tensor(s.labels) != IGNORE for s in chosen]
    used = int(sum(m.sum() for m in masks))
    rank = max(r for *_, r in layers.values())
    if used < rank:
        raise ModelError(f"adapter.init eva needs at least {rank} labelled tokens in the first {len(chosen)} "
                         f"training samples, found {used}")
    seen: dict[str, list[Tensor]] = {name: [] for name in layers}
    mask: list[Tensor] = []

    def hook(name: str):
        def read(mod: nn.Module, args: tuple) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            seen[name].append(x[mask[0].to(x.device)].to("cpu", torch.float32))
        return read

    handles = [m.register_forward_pre_hook(hook(name)) for name, (m, *_) in layers.items()]
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    try:  # the decoder's layers run one by one (not grouped) with their adapters off; B is 0 anyway
        with _adapters_off(module):
            for sample, m in zip(chosen, masks):
                mask[:] = [m]
                _forward(module, sample, device)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    for name, (_, a, b, r) in layers.items():
        a.copy_(eva_directions(torch.cat(seen[name]), r).to(a.device, a.dtype))
        b.zero_()
    if hasattr(module, "track_adapters"):
        module.track_adapters()
    log.info("EVA: LoRA A of %d layers set from %d labelled tokens of %d samples", len(layers), used, len(chosen))
    return used
