"""The trainable model exactly as `loratune train` runs it, built from the run's decisions (`Resolved`).

    loratune's decoder (resolved.implementation "loratune"):
        load the base in the configured precision -> take its tensors into `loratune.decoder.Decoder`
        (Params4bit included, no copy; the transformers module tree is dropped) -> LoRA adapters
    transformers + peft (the fallback, and `build_model`, which benchmarks/bench_train.py calls):
        load the base -> activation checkpointing -> peft adapters (or full fine-tuning), each through the
        libraries' public API and run as they ship: SDPA (or the configured) attention, peft's LoRA forwards,
        no forward replaced, nothing registered with transformers, no attribute of ours on their modules

Either way the result is a `TrainModel`: the module whose parameters train, and the few facts the run needs
beside them (how to write and read back its adapter, which modules carry adapters, the base's end-of-sequence
ids for sample answers). Nothing is attached to the model instance itself.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from loratune.config import Config
from loratune.errors import LoratuneError
from loratune.model.adapters import attach_adapters, count_parameters, is_peft, weight_precision
from loratune.model.load import enable_checkpointing, load_base, load_tokenizer
from loratune.model.new_tokens import resize_for_tokens, trained_modules
from loratune.model.lora_init import InitialAdapter, convert_saved, init_decoder, init_peft, unconverted
from loratune.model.resolve import Resolved

log = logging.getLogger(__name__)


@dataclass
class TrainModel:
    """The model a run trains. `module`: loratune's `Decoder`, or the peft (or plain, full fine-tuning)
    transformers model; `base_name`: what the adapter config records as its base (`base_model_name_or_path`);
    `generation_config`: the base's generation config (its end-of-sequence ids), None if it has none;
    `context_length`: the longest sequence generation may reach (as `loratune.infer.load.engine_for` reads it)."""

    module: nn.Module
    resolved: Resolved
    base_name: str | None
    generation_config: Any | None
    context_length: int = 4096
    initial: InitialAdapter | None = None  # PiSSA/OLoRA's initial adapter: what is saved is converted against it


    @property
    def decoder(self) -> bool:
        return self.resolved.decoder

    def save(self, folder: Path) -> None:
        """The adapter in PEFT format (a full fine-tune: the whole model, safetensors) into `folder`."""
        if self.decoder:
            from loratune.decoder.peft_io import save_adapter

            save_adapter(self.module, folder, base_model_name_or_path=self.base_name)
        else:
            self.module.save_pretrained(folder, safe_serialization=True)
        if self.initial is not None:  # PiSSA/OLoRA: the plain LoRA adapter of the same change on the original base
            convert_saved(Path(folder), self.initial)

    def load_weights(self, folder: Path) -> None:
        """The trainable weights saved in `folder` back into this model's own tensors, exactly (resume)."""
        if self.initial is not None:
            with unconverted(Path(folder), self.initial) as own:
                self._load_weights(own)
            return
        self._load_weights(folder)

    def _load_weights(self, folder: Path) -> None:
        if self.decoder:
            from loratune.decoder.peft_io import copy_adapter_weights

            copy_adapter_weights(self.module, folder)
            return
        load_hf_weights(self.module, folder)

    def adapted_modules(self) -> list[str]:
        """The adapter config's target_modules: leaf names where they pick exactly the adapted modules, else full
        names (empty for a full fine-tune)."""
        if self.decoder:
            from loratune.decoder.peft_io import target_modules

            targets = target_modules(self.module, [self.module.hf_name(n) for n in self.module.adapted_layers()])
            return [targets] if isinstance(targets, str) else sorted(targets)
        configs = getattr(self.module, "peft_config", None) or {}
        targets = next(iter(configs.values())).target_modules if configs else []
        return [targets] if isinstance(targets, str) else sorted(targets or [])


def load_hf_weights(model: nn.Module, folder: Path) -> None:
    """Load the trainable weights saved in `folder` into a peft (or full) transformers model, exactly."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if is_peft(model):
        result = set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        if result.unexpected_keys:
            raise LoratuneError(f"{folder}: the adapter does not fit this model (unexpected weights such as "
                                f"{result.unexpected_keys[0]}); was adapter.* changed?")
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if unexpected or any(k in trainable for k in missing if k not in _tied(model)):
        raise LoratuneError(f"{folder}: the saved weights do not fit this model")


def _tied(model: nn.Module) -> set[str]:
    """Names of weights saved once under another name (e.g. a tied output head)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and emb is not None and head.weight is emb.weight:
        return {n for n, p in model.named_parameters(remove_duplicate=False) if p is head.weight}
    return set()


def build_model(cfg: Config) -> nn.Module:
    """The transformers + peft model as the libraries ship it: base + checkpointing + adapters, on the GPU when
    there is one."""
    model = load_base(cfg)
    adapter = cfg.adapter
    if cfg.model.add_tokens or cfg.model.add_special_tokens:  # grown to the tokenizer, trained (new_tokens.py)
        resize_for_tokens(model, len(load_tokenizer(cfg.model)[0]))
        if adapter.type == "lora":
            adapter = dataclasses.replace(adapter, modules_to_save=list(dict.fromkeys(
                adapter.modules_to_save + trained_modules(model))))
    enable_checkpointing(model, cfg)
    model = attach_adapters(model, adapter)
    _log_model(cfg, model)
    return model


def build_trainable(cfg: Config, resolved: Resolved) -> TrainModel:
    """The model `resolved` says trains (loratune's decoder or transformers + peft), with its adapters."""
    if not resolved.decoder:
        model = build_model(cfg)
        initial = None
        if cfg.adapter.type == "lora":
            initial = init_peft(model, cfg.adapter.init, cfg.model.path, cfg.model.revision, cfg.adapter.rslora)
        return TrainModel(model, resolved, None, getattr(model, "generation_config", None), _context(model),
                          initial=initial)
    from loratune.decoder.load import load_decoder

    decoder, base = load_decoder(cfg, checkpointing=resolved.checkpointing)
    if resolved.embedding_on_host:  # the frozen input embedding in host memory (model.embedding_on_host)
        decoder.embed_on_host()
    initial = None
    if cfg.adapter.type == "lora":
        initial = init_decoder(decoder, cfg.adapter.init, cfg.model.path, cfg.model.revision)
    _log_model(cfg, decoder)
    return TrainModel(decoder, resolved, base.name_or_path, base.generation_config, base.context_length,
                      initial=initial)


def _context(model: nn.Module) -> int:
    return int(getattr(getattr(model, "config", None), "max_position_embeddings", 0) or 4096)


def _log_model(cfg: Config, model: nn.Module) -> None:
    trainable, total = count_parameters(model)
    log.info("model: %s, %s base, %s trainable of %s parameters (%.3f%%)", cfg.model.path,
             weight_precision(model), f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
