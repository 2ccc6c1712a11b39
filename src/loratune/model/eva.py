"""EVA initialisation (`adapter.init: eva`; Paischer et al. 2024, "Explained Variance Adaptation"): each LoRA A
starts at the top r principal directions of the inputs its layer sees on the training data, B at zero (the model
is unchanged at step 0, the base untouched).

As peft's `initialize_lora_eva_weights` does it: forward passes without gradients over the first `EVA_SAMPLES`
training samples, each adapted layer's inputs collected at the positions that carry a label (peft's `use_label_mask`), centred, and
decomposed (an exact SVD here, where peft runs an incremental randomized PCA until the components stop
moving; peft's `tau`, the stopping threshold of that iteration, has no counterpart). With rho > 1 the ranks
are redistributed between layers by explained variance (`eva_rank_distribution`, peft's `EvaConfig.rho` rule;
alpha scaled with the rank as peft's `adjust_scaling_factors`; a layer left at rank 0 loses its adapter), and the
saved adapter_config.json says so in `rank_pattern` / `alpha_pattern`. The tests compare the directions and the
ranks with peft's on the same model and data.

Runs on either model code: loratune's decoder (its projections) and a peft model (its LoRA layers); the
inputs are read by forward hooks on those modules, removed afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence

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


def explained_variance_ratios(inputs: Tensor) -> Tensor:
    """The share of the total variance of the rows of `inputs` [n, in] along each principal direction, largest
    first (the squared singular values of the centred rows over their sum: sklearn's and peft's
    `explained_variance_ratio_`)."""
    x = inputs.to(torch.float32)
    s = torch.linalg.svdvals(x - x.mean(0, keepdim=True))
    return s.square() / s.square().sum()


def eva_rank_distribution(ratios: Mapping[str, Tensor], ranks: Mapping[str, int], rho: float) -> dict[str, int]:
    """EVA's ranks per layer (peft's rule for `EvaConfig.rho`): each layer offers its first round(r * rho)
    explained-variance ratios, the sum of the layers' ranks r is the budget, and the budget goes to the largest
    ratios of all layers together; a layer's new rank is how many of its ratios were chosen (0 to round(r * rho);
    rho 1 keeps every rank). Ties go to the layer listed first."""
    if rho < 1:
        raise ValueError(f"EVA rho must be >= 1, got {rho}")
    budget = sum(ranks.values())
    pool = [(float(v), i, name) for i, (name, r) in enumerate(ranks.items()) for v in ratios[name][:round(r * rho)]]
    pool.sort(key=lambda t: (-t[0], t[1]))
    chosen = Counter(name for *_, name in pool[:budget])
    return {name: chosen.get(name, 0) for name in ranks}


def _layers(module: nn.Module) -> dict[str, tuple[nn.Module, Tensor, Tensor, int]]:
    """{name: (module to hook, lora_A weight, lora_B weight, rank)} of the adapted layers of either model code."""
    if hasattr(module, "adapted_layers"):  # loratune's decoder
        return {n: (m, m.lora_A, m.lora_B, m.rank) for n, m in module.adapted_layers().items()}
    from peft.tuners.lora import LoraLayer

    return {n: (m, m.lora_A["default"].weight, m.lora_B["default"].weight, m.r["default"])
            for n, m in module.named_modules() if isinstance(m, LoraLayer) and "default" in m.lora_A}


def _resize(module: nn.Module, name: str, rank: int, new_rank: int) -> tuple[Tensor | None, Tensor | None]:
    """Give layer `name` a fresh adapter of `new_rank` (alpha scaled by new_rank / rank, so alpha / r stays, as
    peft's `adjust_scaling_factors`), or none at rank 0; returns its new (A, B) weights."""
    if hasattr(module, "adapted_layers"):  # loratune's decoder: the saved adapter_config.json gets rank_pattern
        layer = module.adapted_layers()[name]
        if new_rank == 0:
            layer.remove_adapter()
            return None, None
        layer.add_adapter(new_rank, layer.alpha * new_rank / rank, layer.dropout, layer.rslora, layer.casts)
        return layer.lora_A, layer.lora_B
    layer = module.get_submodule(name)
    config = module.peft_config["default"]
    hf = name.removeprefix("base_model.model.")
    if new_rank == 0:  # as peft's EVA: the layer goes back to its base module, out of target_modules
        parent, _, leaf = name.rpartition(".")
        setattr(module.get_submodule(parent), leaf, layer.get_base_layer())
        config.target_modules = {t for t in _peft_targets(module) if t != hf}
        return None, None
    alpha = layer.lora_alpha["default"] * new_rank / rank
    layer.update_layer(adapter_name="default", r=new_rank, lora_alpha=alpha, config=config)
    layer.lora_A["default"].to(torch.float32)
    layer.lora_B["default"].to(torch.float32)
    config.rank_pattern = {**config.rank_pattern, hf: new_rank}
    config.alpha_pattern = {**config.alpha_pattern, hf: alpha}
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


def _peft_targets(module: nn.Module) -> set[str]:
    """The full names (in the base model) of a peft model's LoRA layers."""
    from peft.tuners.lora import LoraLayer

    return {n.removeprefix("base_model.model.") for n, m in module.named_modules() if isinstance(m, LoraLayer)}


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
def init_eva(module: nn.Module, samples: Sequence[Sample], max_samples: int = EVA_SAMPLES, rho: float = 1.0) -> int:
    """Set every adapted layer's A to its inputs' top principal directions and B to zero, after redistributing the
    ranks by explained variance when rho > 1 (`eva_rank_distribution`); returns the number of labelled positions
    used."""
    layers = _layers(module)
    if not layers:
        raise ModelError("adapter.init eva: the model has no LoRA layers")
    chosen = list(samples[:max_samples])
    masks = [torch.tensor(s.labels) != IGNORE for s in chosen]
    used = int(sum(m.sum() for m in masks))
    rank = max(round(r * rho) for *_, r in layers.values())
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
    inputs = {name: torch.cat(xs) for name, xs in seen.items()}
    ranks = {name: r for name, (*_, r) in layers.items()}
    if rho != 1:
        ranks = eva_rank_distribution({n: explained_variance_ratios(x) for n, x in inputs.items()}, ranks, rho)
    for name, (_, a, b, r) in layers.items():
        if ranks[name] != r:
            a, b = _resize(module, name, r, ranks[name])
        if ranks[name]:
            a.copy_(eva_directions(inputs[name], ranks[name]).to(a.device, a.dtype))
            b.zero_()
    if hasattr(module, "track_adapters"):
        module.track_adapters()
    log.info("EVA: LoRA A of %d layers set from %d labelled tokens of %d samples", len(layers), used, len(chosen))
    return used
