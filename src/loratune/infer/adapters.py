"""Named PEFT adapters beside one loaded decoder: an LRU of them on the device, used one at a time or per row.

Each adapter is known by a key and the folder it came from. The folder is read and checked against the
decoder once (`loratune.decoder.peft_io.read_adapter`: peft's names, ranks and scales, shapes, every refusal it
makes); an adapter on the device ("resident") keeps, per layer, its fp32 weights (`AdapterState`, for putting
it on the decoder's layers) and their compute-dtype pair (`multi_lora.LoRAPair`, for rows of a batch on
different adapters). At most `max_resident` adapters are resident: making another one resident drops the least
recently used one that no running request holds (`pin`); a dropped adapter is read again from its folder when
it is next asked for.

Two ways to answer with adapters:
- `activate(key)`: the adapter on the decoder's layers (`QLoRALinear.set_adapter_state`, no copy), the bare
  base with None: one adapter for the whole model, the fused LoRA kernel;
- `plan.rows(groups)` around a forward pass (with no adapter activated): each row of the pass on its own
  adapter (`loratune.decoder.multi_lora`), the base product shared.
The bank is not thread-safe: its owner (`loratune.infer.load.Engine`) calls it under its lock.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from loratune.decoder.lora import AdapterState, lora_scale
from loratune.decoder.model import Decoder
from loratune.decoder.multi_lora import LayerAdapters, LoRAPair, RowPlan
from loratune.decoder.peft_io import AdapterFile, read_adapter
from loratune.errors import ModelError


class AdapterBusy(ModelError):
    """Every resident adapter is held by a running request and no more may be resident."""


@dataclass(frozen=True)
class _Resident:
    states: dict[str, AdapterState]  # our layer name -> fp32 weights on the device


class AdapterBank:
    """Adapters by key beside one decoder (see the module docstring). `max_resident`: None, no limit."""

    def __init__(self, decoder: Decoder, max_resident: int | None = None) -> None:
        if max_resident is not None and max_resident < 1:
            raise ModelError(f"--max-adapters must be >= 1, got {max_resident}")
        self.decoder = decoder
        self.max_resident = max_resident
        self.folders: dict[str, Path] = {}
        self.resident: OrderedDict[str, _Resident] = OrderedDict()  # least recently used first
        self.pins: Counter[str] = Counter()
        self.active: str | None = None
        self.loads = 0  # adapters read from their folders onto the device (first loads and reloads)
        self.plan = RowPlan()
        self.layers = decoder.linear_layers()
        for layer in self.layers.values():
            layer.mixed = LayerAdapters(self.plan)
        self._clear()

    # ------------------------------------------------------------------------------------------ registry

    def add(self, key: str, folder: str | Path, adapter: AdapterFile | None = None) -> None:
        """Know `key` as the adapter in `folder` (read and checked now, or `adapter` already read from it) and
        make it resident when there is room (else it is read again when first asked for)."""
        if key in self.folders:
            raise ModelError(f"adapter key {key!r} is taken")
        adapter = adapter or read_adapter(self.decoder, folder)
        self.folders[key] = Path(folder)
        try:
            self._make_room(key)
        except AdapterBusy:
            return
        self._put(key, adapter)

    def remove(self, key: str) -> None:
        """Forget `key`; its device copy goes now, or when the last request holding it ends (`unpin`)."""
        self.folders.pop(key)
        if not self.pins[key]:
            self._evict(key)

    def __contains__(self, key: object) -> bool:
        return key in self.folders

    # ------------------------------------------------------------------------------------------ residency

    def ensure(self, key: str) -> None:
        """`key` resident (read again from its folder if it was dropped) and the most recently used."""
        if key in self.resident:
            self.resident.move_to_end(key)
            return
        if key not in self.folders:
            raise ModelError(f"no adapter {key!r}")
        self._make_room(key)
        try:
            adapter = read_adapter(self.decoder, self.folders[key])
        except ModelError as e:
            raise ModelError(f"the adapter could not be read again from {self.folders[key]}: {e}") from None
        self._put(key, adapter)

    def limit(self, max_resident: int | None) -> None:
        """At most `max_resident` adapters resident from now on (None: no limit): the least recently used ones no
        request holds are dropped down to it (held ones stay until they are let go and room is needed)."""
        self.max_resident = max_resident
        if max_resident is not None:
            for key in [k for k in self.resident if not self.pins[k]][:max(0, len(self.resident) - max_resident)]:
                self._evict(key)

    def has_room(self, key: str | None) -> bool:
        """Whether `key` can be resident now without dropping an adapter a request holds (None: always)."""
        if key is None or key in self.resident or self.max_resident is None:
            return True
        return len(self.resident) < self.max_resident or any(not self.pins[k] for k in self.resident)

    def pin(self, key: str | None) -> None:
        """A request answers with `key` from now on: resident until `unpin` (None: the base, nothing to hold)."""
        if key is not None:
            self.ensure(key)
            self.pins[key] += 1

    def unpin(self, key: str | None) -> None:
        if key is None:
            return
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]
            if key not in self.folders:  # removed while requests used it
                self._evict(key)

    def _make_room(self, key: str) -> None:
        if self.max_resident is None or key in self.resident:
            return
        while len(self.resident) >= self.max_resident:
            victim = next((k for k in self.resident if not self.pins[k]), None)
            if victim is None:
                raise AdapterBusy(f"all {self.max_resident} resident adapters are in use by running requests "
                                  "(loratune serve --max-adapters)")
            self._evict(victim)

    def _put(self, key: str, adapter: AdapterFile) -> None:
        device = self.decoder.device
        states = {}
        for name, w in adapter.layers.items():
            a = nn.Parameter(w.lora_A.to(device, torch.float32), requires_grad=False)
            b = nn.Parameter(w.lora_B.to(device, torch.float32), requires_grad=False)
            states[name] = AdapterState(a, b, w.rank, w.alpha, adapter.rslora, adapter.dropout)
            layer = self.layers[name]
            layer.mixed.put(key, LoRAPair.of(a, b, lora_scale(w.rank, w.alpha, adapter.rslora), layer.compute_dtype))
        self.resident[key] = _Resident(states)
        self.loads += 1

    def _evict(self, key: str) -> None:
        if self.resident.pop(key, None) is None:
            return
        for layer in self.layers.values():
            layer.mixed.drop(key)
        if self.active == key:
            self._clear()

    # ------------------------------------------------------------------------------------------ answering

    def _clear(self) -> None:
        for layer in self.layers.values():
            layer.set_adapter_state(None)
        self.decoder.track_adapters()
        self.active = None

    def activate(self, key: str | None) -> None:
        """Adapter `key` on the decoder's layers (None: none, the base alone); nothing to do if it is on."""
        if key is not None and key not in self.folders and key not in self.resident:
            raise KeyError(key)
        if key is not None:
            self.ensure(key)
        if key == self.active:
            return
        states = self.resident[key].states if key is not None else {}
        for name, layer in self.layers.items():
            layer.set_adapter_state(states.get(name), self.decoder.casts)
        self.decoder.track_adapters()
        self.active = key
