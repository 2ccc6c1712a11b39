"""Several PEFT adapters on one loaded decoder, switched by name.

Each adapter folder is read once through `loratune.decoder.peft_io.load_adapter` (peft's names, ranks and
scales, every refusal it makes) and its per-layer tensors kept aside; putting an adapter on the decoder
is then a matter of pointing each layer at its tensors (`QLoRALinear.set_adapter_state`), no copy, and
the bare base is every layer without one. Only one adapter is on the decoder at a time: the engine
switches under its lock. (Rows of one batch using different adapters, a segmented LoRA product over the
kept tensors, is the step after this.)
"""

from __future__ import annotations

from pathlib import Path

from loratune.decoder.lora import AdapterState
from loratune.decoder.model import Decoder
from loratune.decoder.peft_io import load_adapter


class AdapterBank:
    """Named adapters kept beside one decoder; `activate(key)` puts one on (None: the bare base)."""

    def __init__(self, decoder: Decoder) -> None:
        self.decoder = decoder
        self.adapters: dict[str, dict[str, AdapterState]] = {}
        self.active: str | None = None
        self._clear()

    def _clear(self) -> None:
        for layer in self.decoder.linear_layers().values():
            layer.set_adapter_state(None)
        self.decoder.track_adapters()
        self.active = None

    def add(self, key: str, folder: str | Path) -> None:
        """Read the PEFT adapter in `folder` and keep it as `key` (the decoder is left with no adapter on)."""
        load_adapter(self.decoder, folder)
        self.adapters[key] = {name: state for name, layer in self.decoder.linear_layers().items()
                              if (state := layer.adapter_state()) is not None}
        self._clear()

    def activate(self, key: str | None) -> None:
        """Adapter `key` on the decoder's layers (None: none, the base alone); nothing to do if it is on."""
        if key == self.active:
            return
        if key is not None and key not in self.adapters:
            raise KeyError(key)
        states = self.adapters.get(key, {}) if key is not None else {}
        for name, layer in self.decoder.linear_layers().items():
            layer.set_adapter_state(states.get(name), self.decoder.casts)
        self.decoder.track_adapters()
        self.active = key
