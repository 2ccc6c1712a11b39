"""Sampling settings and the one function that turns a row of logits into the next token.

Written out in plain PyTorch rather than through transformers' logits processors so that the order of
operations is visible and the generation loop owns its random generator (a seed reproduces a request).
The order is the usual one: repetition penalty on the raw logits, then temperature, then top-k, then
top-p, then a draw. Temperature 0 means greedy (argmax), as in the OpenAI API.

Every setting in its valid range gives a valid distribution, extreme ones included. The arithmetic runs
in float64, where every valid setting is a non-zero number (1e-300 is 0 in float32, and x / 0 is NaN);
the logits are shifted so that the largest is 0 before dividing by the temperature (a temperature of
1e-300 then sends the others to -inf, i.e. greedy, instead of every logit to +-inf and the softmax to
NaN); a tiny repetition penalty's division is capped at the largest finite float. Shifting changes no
probability.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field, replace

import torch

from loratune.errors import LoratuneError


class SamplingError(LoratuneError):
    """A sampling setting is out of range."""


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop. Defaults: greedy, 256 new tokens, no stop strings."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability reaches top_p
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or the answer
    seed: int | None = None  # None draws a fresh seed per request
    stop: tuple[str, ...] = field(default=())  # extra stop strings (the template's end of turn is implicit)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        checks = [
            (self.max_new_tokens < 1, f"max new tokens must be >= 1, got {self.max_new_tokens}"),
            (not 0.0 <= self.temperature <= 2.0, f"temperature must be in [0, 2], got {self.temperature}"),
            (not 0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0, got {self.top_k}"),
            (not 0.0 < self.repetition_penalty <= 10.0,
             f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}"),
            (any(not s for s in self.stop), "stop strings must not be empty"),
        ]
        for bad, message in checks:
            if bad:
                raise SamplingError(message)
        return self

    def with_updates(self, **kw) -> "SamplingParams":
        return replace(self, **kw).validate()


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A private generator: requests never disturb each other's (or torch's global) random state."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else secrets.randbits(63))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019) on tokens marked in the boolean `seen` (B, V)."""
    if penalty == 1.0:
        return logits
    largest = torch.finfo(logits.dtype).max  # a tiny penalty must not turn a logit into inf (inf - inf = NaN)
    penalised = torch.where(logits > 0, (logits / penalty).clamp(max=largest), logits * penalty)
    return torch.where(seen, penalised, logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the most likely tokens until their probability mass reaches p (always at least one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(logits: torch.Tensor, seen: torch.Tensor, params: SamplingParams,
                generator: torch.Generator) -> torch.Tensor:
    """The next token of each row: (B, V) logits -> (B,) ids."""
    logits = apply_repetition_penalty(logits.double(), seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    shifted = logits - logits.max(dim=-1, keepdim=True).values  # <= 0: dividing by any temperature stays finite or -inf
    logits = top_p_filter(top_k_filter(shifted / params.temperature, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
