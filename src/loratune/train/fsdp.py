"""train.strategy fsdp: loratune's decoder sharded over the processes by PyTorch's FSDP2.

FSDP2 (`torch.distributed.fsdp.fully_shard`) shards every parameter of a unit along dim 0 over the ranks
and all-gathers a unit's parameters just before it computes (forward, and again for the backward pass),
then frees them; gradients are reduce-scattered so each rank keeps the gradient of its own shard, and the
optimizer steps on the shards only. One unit per decoder block, then the decoder itself as the root (the
embedding, final norm and head). Sharded: the 4-bit base weights and their quantization constants
(`loratune.decoder.plain_nf4` turns bitsandbytes' `Params4bit` into plain tensors first: its quant_state
would not survive sharding), the norms, the adapters, their gradients and the optimizer's states.

How the pieces meet the loop, which is the same for every strategy:
- The runner does not call `Decoder.forward` (the fused loss reads the head weight itself), so the root's
  hooks would never run; `register_fsdp_forward_method` makes `Decoder.hidden_states` a forward of the root
  (PyTorch's public API for this): the root gathers the embedding, norm and head, and keeps them gathered
  (FSDP does not reshard the root after forward) until the backward pass ends.
- Gradients are summed, not averaged (`set_gradient_divide_factor(1.0)`, sum-only collectives, which gloo
  also runs): each rank divides its losses by the window's global token count, so the sum over the ranks
  is one process's gradient. The loop's own all-reduce steps aside (`World.sharded`).
- Every rank must run the same number of forward and backward passes (each unit's all-gather and
  reduce-scatter is a collective). A padding-free share may pack into fewer streams than another rank's, and
  a short last window may leave a rank nothing: such a rank runs idle passes (`ShardedRunner.idle_pass`,
  one token, loss x 0: zero gradients), and the window's last pass, on every rank, is the one that
  reduce-scatters (`accumulating`).
- The adapters' compute-dtype casts are not cached across passes (`AdapterCasts` keys copies by tensor
  identity; FSDP's gathered tensors come and go): each layer casts its own, per call.
- Activation checkpointing (train.gradient_checkpointing) wraps each block's call as on one GPU; FSDP
  gathers the block again for the recompute. train.fsdp_offload keeps the shards, their gradients and the
  optimizer states in host memory (`CPUOffloadPolicy`; the optimizer then steps on the CPU).

Checkpoints keep the one-process format (a PEFT adapter and the optimizer state by parameter index): the
full adapter and optimizer state are gathered to rank 0's host memory through
`torch.distributed.checkpoint.state_dict` (`get_*_state_dict(full_state_dict=True, cpu_offload=True)`) and
written as one process writes them; on resume every rank reads them and `set_*_state_dict` keeps its own
shards. LoRA state is small next to the base (a rank-16 adapter on every projection of a 70B model: ~0.2B
parameters, ~2.5 GB with AdamW's states), and the format makes a checkpoint resumable on any number of
processes and by either strategy.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from loratune.decoder.attention import Boundaries
from loratune.decoder.model import Decoder
from loratune.decoder.plain_nf4 import make_plain
from loratune.errors import ConfigError, ModelError
from loratune.train.distributed import World
from loratune.train.runner import DecoderRunner
from loratune.train.trainer_state import Tensors, inner_optimizer, saved_entries, state_dict_tensors

log = logging.getLogger("loratune.train")


def check_supported(implementation_is_decoder: bool, method: str, adapter_type: str = "lora",
                    compute_dtype: torch.dtype = torch.bfloat16) -> None:
    """What train.strategy fsdp trains (before anything loads)."""
    if compute_dtype == torch.float16:  # the loss scaler would judge overflow on each rank's shards alone
        raise ConfigError("train.strategy fsdp trains in bf16 or fp32 compute: fp16's loss scaler is not shared "
                          "between the shards yet; set quantization.compute_dtype=bf16 (or fp32), or use "
                          "train.strategy ddp")
    if adapter_type != "lora":
        raise ConfigError("train.strategy fsdp shards adapter training (adapter.type lora); full fine-tuning "
                          "(adapter.type none) is not supported under it yet: use train.strategy ddp")
    if not implementation_is_decoder:
        raise ConfigError("train.strategy fsdp shards loratune's decoder: this run resolved the transformers "
                          "(+ peft) model code; set model.implementation=decoder (or auto on a supported family), "
                          "or use train.strategy ddp")
    if method != "sft":
        raise ConfigError(f"train.strategy fsdp trains train.method sft; {method} is not tested under it yet: use "
                          "train.strategy ddp")


def fsdp_units(decoder: Decoder) -> list[nn.Module]:
    """The FSDP modules of a sharded decoder: its blocks, then the root."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in decoder.modules() if isinstance(m, FSDPModule)]


def shard_decoder(decoder: Decoder, world: World, offload: bool = False) -> int:
    """Shard `decoder` in place over the process group (one unit per block, the decoder as the root); returns
    the number of 4-bit weights turned into plain tensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard, register_fsdp_forward_method

    if any(p.requires_grad and getattr(p, "quant_state", None) is None and not _is_adapter(n)
           for n, p in decoder.named_parameters()):
        raise ModelError("train.strategy fsdp shards adapter training (adapter.type lora); a trained base "
                         "(adapter.type none) is not supported under it yet")
    plain = sum(make_plain(m) for m in decoder.linear_layers().values())
    for layer in decoder.adapted_layers().values():
        layer.casts = None  # per-call casts: FSDP's gathered tensors are new each pass (module docstring)
    device = decoder.embed.weight.device
    mesh = init_device_mesh(device.type, (world.size,))
    policy = CPUOffloadPolicy(pin_memory=device.type == "cuda") if offload else OffloadPolicy()
    for block in decoder.layers:
        fully_shard(block, mesh=mesh, offload_policy=policy)
    fully_shard(decoder, mesh=mesh, offload_policy=policy)
    register_fsdp_forward_method(decoder, "hidden_states")  # the runner's entry point drives the root's hooks
    # FSDP warns that the root returns a view (the final norm's output), against in-place ops on it: the loss
    # and the idle pass only read it
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPDecoder\) returned a view tensor")
    for unit in fsdp_units(decoder):
        unit.set_gradient_divide_factor(1.0)  # summed: the losses are divided by the global count already
        unit.set_force_sum_reduction_for_comms(True)  # plain sums (gloo has no pre-multiplied sum)
    log.info("fsdp: %d blocks and the root sharded over %d processes (%d 4-bit weights as plain tensors%s)",
             len(decoder.layers), world.size, plain, ", shards offloaded to host memory" if offload else "")
    return plain


def _is_adapter(name: str) -> bool:
    return name.endswith((".lora_A", ".lora_B"))


class ShardedRunner(DecoderRunner):
    """The decoder runner of a sharded decoder: gradient sync on the window's last pass, idle passes."""

    def __init__(self, decoder: Decoder, device: torch.device) -> None:
        super().__init__(decoder, device, None)  # no CUDA graphs: FSDP's collectives run between the kernels

    @contextlib.contextmanager
    def accumulating(self, last: bool) -> Iterator[None]:
        """Reduce-scatter the gradients on the window's last pass only (the others accumulate unsharded)."""
        self.module.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.module.set_requires_gradient_sync(True)

    def idle_pass(self) -> None:
        """A pass that changes nothing: one token through every unit (and back, when gradients are on), so this
        rank joins the collectives of a pass another rank runs on real data."""
        ids = torch.zeros(1, dtype=torch.long, device=self.device)
        hidden = self.module.hidden_states(ids, Boundaries.from_lengths([1], self.device))
        if torch.is_grad_enabled():
            (hidden * 0).sum().backward()


class ShardedState:
    """Checkpoint I/O of a sharded decoder and its optimizer, in the one-process format (module docstring)."""

    def __init__(self, decoder: Decoder, optimizer: torch.optim.Optimizer, world: World) -> None:
        self.decoder, self.optimizer, self.world = decoder, inner_optimizer(optimizer), world
        self._optimizer_state: tuple[Tensors, dict] | None = None

    def _options(self, **kw: bool):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def _order(self) -> list[str]:
        """The optimizer's parameters by name, in the order of its state's indices."""
        names = {id(p): n for n, p in self.decoder.named_parameters()}
        return [names[id(p)] for g in self.optimizer.param_groups for p in g["params"]]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """All ranks: gather the full adapter and optimizer state to rank 0, which inside holds the full adapter
        on its layers (what the one-process writers read) and `optimizer_state()`; the shards come back after."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        opts = self._options(cpu_offload=True, ignore_frozen_params=True)
        weights = get_model_state_dict(self.decoder, options=opts)
        full_optim = get_optimizer_state_dict(self.decoder, self.optimizer, options=opts)
        swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
        if self.world.main:
            order = self._order()
            live = self.optimizer.state_dict()  # the groups' settings and index lists, as one process has them
            state = {i: full_optim["state"][n] for i, n in enumerate(order) if n in full_optim["state"]}
            self._optimizer_state = state_dict_tensors({"state": state, "param_groups": live["param_groups"]},
                                                       type(self.optimizer).__name__)
            trained = {n for n, p in self.decoder.named_parameters() if p.requires_grad}
            for name, full in weights.items():
                if name not in trained:  # buffers come along (rope tables, 4-bit lookup tables): not written
                    continue
                owner, leaf = name.rsplit(".", 1)
                module = self.decoder.get_submodule(owner)
                swapped.append((module, leaf, getattr(module, leaf)))
                setattr(module, leaf, nn.Parameter(full, requires_grad=True))
        try:
            yield
        finally:
            for module, leaf, shard in swapped:
                setattr(module, leaf, shard)
            self._optimizer_state = None

    def optimizer_state(self) -> tuple[Tensors, dict]:
        """Rank 0 inside `gathered()`: the full optimizer state as `trainer_state.optimizer_state` gives it."""
        if self._optimizer_state is None:
            raise RuntimeError("the sharded optimizer state is read inside ShardedState.gathered() on rank 0")
        return self._optimizer_state

    def load_weights(self, folder: Path) -> None:
        """All ranks: the adapter saved in `folder` into this rank's shards, exactly."""
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        from loratune.decoder.peft_io import WEIGHTS_FILE
        from loratune.decoder.keys import PEFT_PREFIX

        path = folder / WEIGHTS_FILE
        if not path.is_file():
            raise ModelError(f"{path} does not exist (loratune reads adapters saved as safetensors)")
        saved = load_file(str(path))
        full = {}
        for name in self.decoder.adapted_layers():
            for x in "AB":
                key = f"{PEFT_PREFIX}{self.decoder.hf_name(name)}.lora_{x}.weight"
                if key not in saved:
                    raise ModelError(f"{path} holds no {key}: it is not this run's adapter")
                full[f"{name}.lora_{x}"] = saved[key]
        if len(full) != len(saved):
            extra = sorted(set(saved) - {f"{PEFT_PREFIX}{self.decoder.hf_name(k.rsplit('.', 1)[0])}."
                                          f"{k.rsplit('.', 1)[1]}.weight" for k in full})
            raise ModelError(f"{path} holds weights this run's adapter lacks: {extra[:3]}")
        set_model_state_dict(self.decoder, full, options=self._options(strict=False))

    def load_optimizer(self, tensors: Tensors, meta: dict) -> None:
        """All ranks: the optimizer state saved by index (`trainer_state.optimizer_state`) into this rank's
        shards of it."""
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        if meta["class"] != type(self.optimizer).__name__:
            raise ModelError(f"the checkpoint's optimizer is {meta['class']}, this run's is "
                             f"{type(self.optimizer).__name__}")
        order = self._order()
        entries = saved_entries(tensors, meta)
        if len(order) != sum(len(g["params"]) for g in meta["param_groups"]):
            raise ModelError("the saved optimizer state has a different number of parameters than this model's: "
                             "was the adapter or LoRA+ setting changed?")
        groups = [{**g, "params": [order[i] for i in g["params"]]} for g in meta["param_groups"]]
        for g in groups:
            if "betas" in g:
                g["betas"] = tuple(g["betas"])
        state = {"state": {order[i]: e for i, e in entries.items()}, "param_groups": groups}
        set_optimizer_state_dict(self.decoder, self.optimizer, state, options=self._options())
