"""Memory-efficient optimizers for full fine-tuning and freeze-tuning, each from its maintained package.

- `galore_adamw` (galore-torch, Zhao et al. 2024): the gradient of each projected 2-D weight is projected onto
  its top-r singular directions (recomputed every `optim_update_proj_gap` steps), Adam's moments live in that
  r-dimensional space, and the update is projected back and scaled by `optim_scale`.
- `apollo_adamw` (apollo-torch, Zhu et al. 2024): Adam's moments of a random rank-r projection only give a
  per-channel (or per-tensor) scale for the raw gradient: SGD-like memory, AdamW-like steps.
- `adam_mini` (adam-mini, Zhang et al. 2024): one second-moment value per attention head / output neuron
  instead of per weight.
- `badam` (badam, Luo et al. 2024): block coordinate descent: only one decoder layer trains at a time (Adam
  on an fp32 copy of it), the next one after `badam_switch_every` steps; the rest of the model is frozen.

Checkpoints stay tensors + JSON (`loratune.train.trainer_state`): the GaLore/APOLLO projector objects the
packages keep in the optimizer state are written as `projector.*` entries (their matrix, APOLLO's seed) and
rebuilt on load; BAdam's state is its active block's Adam moments under the model's parameter indices, with
the step count and the active block in the group settings, so a resumed run switches blocks on the same
steps. The classes below only subclass the packages' optimizers; nothing in the packages is changed.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from loratune.config import TrainConfig
from loratune.errors import ConfigError

log = logging.getLogger("loratune.train")

MEMORY_EFFICIENT = ("galore_adamw", "apollo_adamw", "adam_mini", "badam")
PACKAGES = {"galore_adamw": "galore-torch", "apollo_adamw": "apollo-torch", "adam_mini": "adam-mini",
            "badam": "badam"}
_PROJ = "projector."


def _missing(optimizer: str, e: ImportError) -> ConfigError:
    return ConfigError(f"train.optimizer {optimizer} needs the {PACKAGES[optimizer]} package ({e}): "
                       "pip install 'loratune[optim]'")


def projected(name: str, p: nn.Parameter, modules: list[str]) -> bool:
    """Whether GaLore/APOLLO project this parameter: a 2-D weight inside a module named in `modules` (a
    dot-separated part of its name, e.g. `self_attn`, `mlp` or `q_proj`)."""
    return p.ndim == 2 and any(m in name.split(".")[:-1] for m in modules)


def _groups(model: nn.Module, cfg: TrainConfig, scale: float, extra: dict[str, Any]) -> list[dict]:
    """Projected weights in one group (with the projection settings), the rest as plain AdamW's groups."""
    low, decay, no_decay, names = [], [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if projected(name, p, cfg.optim_modules):
            low.append(p)
            names.append(name)
        elif p.ndim < 2 or "norm" in name.lower() or name.endswith(".bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    if not low:
        raise ConfigError(f"train.optimizer {cfg.optimizer}: no trainable 2-D weight lies in a module named in "
                          f"train.optim_modules {cfg.optim_modules}; name the attention/MLP modules of this model")
    small = [(n, tuple(p.shape)) for n, p in zip(names, low) if min(p.shape) <= cfg.optim_rank]
    if small:
        raise ConfigError(f"train.optim_rank {cfg.optim_rank} is not below the smaller side of {small[0][0]} "
                          f"{small[0][1]} ({len(small)} such weights): a rank-r projection would not save anything "
                          "there; lower train.optim_rank")
    log.info("%s: %d weights projected to rank %d (%s, ...)", cfg.optimizer, len(low), cfg.optim_rank, names[0])
    groups = [{"params": low, "weight_decay": cfg.weight_decay, "name": "projected", "rank": cfg.optim_rank,
               "update_proj_gap": cfg.optim_update_proj_gap, "scale": scale, "proj_type": "std", **extra},
              {"params": decay, "weight_decay": cfg.weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


class _ProjectorState:
    """Mixin for the packages' GaLore/APOLLO AdamW: their per-parameter projector objects as plain entries
    (`projector.ortho_matrix`, `projector.seed`, ...) in `state_dict`, rebuilt by `load_state_dict`."""

    def state_dict(self) -> dict:
        sd = super().state_dict()  # type: ignore[misc]
        state = {}
        for idx, entry in sd["state"].items():
            entry = dict(entry)
            proj = entry.pop("projector", None)
            if proj is not None:
                entry[_PROJ + "ortho_matrix"] = proj.ortho_matrix
                # its memory layout too: an SVD's factors are column-major slices, and a matmul with a
                # contiguous copy rounds differently (a resumed run would drift by 1e-8 from the first step)
                entry[_PROJ + "strides"] = list(proj.ortho_matrix.stride())
                for key in ("seed", "svd_count"):  # APOLLO's random projector draws its next matrix from seed
                    if hasattr(proj, key):
                        entry[_PROJ + key] = getattr(proj, key)
            state[idx] = entry
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)  # type: ignore[misc]
        for group in self.param_groups:  # type: ignore[attr-defined]
            for p in group["params"]:
                entry = self.state.get(p)  # type: ignore[attr-defined]
                if not entry or _PROJ + "ortho_matrix" not in entry:
                    continue
                saved = {k[len(_PROJ):]: entry.pop(k) for k in [k for k in entry if k.startswith(_PROJ)]}
                matrix = saved.pop("ortho_matrix")
                saved["ortho_matrix"] = torch.empty_strided(matrix.shape, tuple(saved.pop("strides")),
                                                            dtype=matrix.dtype, device=matrix.device).copy_(matrix)
                proj = self._projector(group, entry)
                for key, value in saved.items():
                    setattr(proj, key, value)
                entry["projector"] = proj

    def _projector(self, group: dict, entry: dict) -> Any:
        raise NotImplementedError


def _galore(model: nn.Module, cfg: TrainConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    try:
        from galore_torch import GaLoreAdamW
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError as e:
        raise _missing(cfg.optimizer, e) from None

    class GaLore(_ProjectorState, GaLoreAdamW):
        def _projector(self, group: dict, entry: dict) -> Any:
            return GaLoreProjector(group["rank"], update_proj_gap=group["update_proj_gap"], scale=group["scale"],
                                   proj_type=group["proj_type"])

    scale = 0.25 if cfg.optim_scale == "auto" else cfg.optim_scale
    return GaLore(_groups(model, cfg, scale, {}), lr=cfg.lr, betas=betas, no_deprecation_warning=True)


def _apollo(model: nn.Module, cfg: TrainConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    try:
        from apollo_torch import APOLLOAdamW
    except ImportError as e:
        raise _missing(cfg.optimizer, e) from None

    class Apollo(_ProjectorState, APOLLOAdamW):
        def _projector(self, group: dict, entry: dict) -> Any:
            return self._initialize_projector(group, entry)

    scale = 1.0 if cfg.optim_scale == "auto" else cfg.optim_scale
    extra = {"proj": "random", "scale_type": cfg.apollo_scale_type}
    return Apollo(_groups(model, cfg, scale, extra), lr=cfg.lr, betas=betas)


def _adam_mini(model: nn.Module, cfg: TrainConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    try:
        from adam_mini import Adam_mini
    except ImportError as e:
        raise _missing(cfg.optimizer, e) from None
    mc = getattr(model, "config", None)
    hidden, heads = getattr(mc, "hidden_size", None), getattr(mc, "num_attention_heads", None)
    if not hidden or not heads:
        raise ConfigError("train.optimizer adam_mini needs the model's hidden_size and num_attention_heads "
                          "(its config.json); this model has none")
    head_dim = getattr(mc, "head_dim", None) or hidden // heads
    if head_dim * heads != hidden:
        raise ConfigError(f"train.optimizer adam_mini: this model's attention is {heads} heads x {head_dim} = "
                          f"{heads * head_dim}, not its hidden size {hidden}; adam-mini 1.1.1 partitions q/k by "
                          "hidden_size^2 / heads and would cut across heads. Use another optimizer")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = Adam_mini(named, lr=cfg.lr, betas=betas, eps=1e-8, weight_decay=cfg.weight_decay, dim=hidden,
                    n_heads=heads, n_kv_heads=getattr(mc, "num_key_value_heads", None) or heads, verbose=False)
    # adam-mini 1.1.1 takes the visible GPU count for the process count and all-gathers over it: one process
    # on a host with several GPUs would call torch.distributed uninitialised. Its public setting, set right:
    opt.world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    return opt


def _badam(model: nn.Module, cfg: TrainConfig, betas: tuple[float, float]) -> torch.optim.Optimizer:
    try:
        from badam import BlockOptimizer
    except ImportError as e:
        raise _missing(cfg.optimizer, e) from None

    class BAdam(BlockOptimizer):
        """BAdam's BlockOptimizer whose state is indexed by the model's parameters (module docstring)."""

        def __init__(self, named: list[tuple[str, nn.Parameter]]) -> None:
            base = torch.optim.AdamW([p for _, p in named], lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay,
                                     foreach=False)
            with warnings.catch_warnings():  # its advice to load fp16/bf16 weights; fp32 is what CPU runs
                warnings.simplefilter("ignore")
                super().__init__(base, named, switch_block_every=cfg.badam_switch_every,
                                 switch_mode=cfg.badam_switch_mode, verbose=0)
            del self.state_dict  # the package points it at the base optimizer's; ours is below

        def switch_trainable_params(self, verbose: int | None = 0) -> None:
            """The package's switch, said in loratune's log instead of its prints."""
            super().switch_trainable_params(verbose=0)
            log.info("badam: from step %d the decoder layer %s trains", getattr(self, "global_step", 0) + 1,
                     " ".join(self.active_param_prefixs))

        def active_block(self) -> int:
            """The index (in `block_prefix_list`) of the block training now."""
            step = -1 if self.switch_mode == "descending" else 1
            return (self.current_block_idx - step) % self.block_num  # it already points at the next block

        def state_dict(self) -> dict:
            index = {id(hp): i for i, hp in self.param_idx2hp.items()}
            state = {index[id(hp)]: dict(s) for hp, s in self.base_optimizer.state.items() if id(hp) in index}
            groups = []
            for g in self.param_groups:
                groups.append({**{k: v for k, v in g.items() if k != "params"},
                               "params": list(range(len(g["params"]))),
                               "badam_step": self.global_step, "badam_block": self.active_block()})
            return {"state": state, "param_groups": groups}

        def load_state_dict(self, state_dict: dict) -> None:
            group = state_dict["param_groups"][0]
            block, step = int(group["badam_block"]), int(group["badam_step"])
            if (block, step) != (self.active_block(), self.global_step):  # not accelerate's round trip at start
                self.current_block_idx, self.global_step = block, step
                self.switch_trainable_params()  # fp32 copies of the (restored) weights of that block
            for i, entry in state_dict["state"].items():
                hp = self.param_idx2hp[int(i)]
                self.base_optimizer.state[hp] = {
                    k: (v.to(hp.device, copy=True) if isinstance(v, torch.Tensor) else v) for k, v in entry.items()}

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = BAdam(named)
    if opt.block_num < 2:
        raise ConfigError(f"train.optimizer badam found {opt.block_num} decoder layer block(s) among the trained "
                          "parameters (names with `layers.N.`); it needs at least 2")
    return opt


BUILDERS = {"galore_adamw": _galore, "apollo_adamw": _apollo, "adam_mini": _adam_mini, "badam": _badam}


def build_memory_efficient(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` (one of MEMORY_EFFICIENT) over `model`'s trainable parameters."""
    return BUILDERS[cfg.optimizer](model, cfg, (0.9, cfg.adam_beta2))


def check_memory_efficient(optimizer: str, adapter_type: str, strategy: str) -> list[tuple[bool, str]]:
    """Combinations these optimizers refuse (config validation)."""
    if optimizer not in MEMORY_EFFICIENT:
        return []
    return [
        (adapter_type == "lora", f"train.optimizer {optimizer} is for full fine-tuning (adapter.type none"
                                 f"{'' if optimizer == 'badam' else ' or freeze'}); LoRA adapters are low-rank "
                                 "already: use adamw or paged_adamw_32bit with adapter.type lora"),
        (optimizer == "badam" and adapter_type == "freeze",
         "train.optimizer badam chooses the trained layer itself (one block at a time): use adapter.type none, "
         "not freeze"),
        (strategy == "fsdp", f"train.optimizer {optimizer} does not run under train.strategy fsdp"),
    ]
