"""What the loop minimises: an objective computes one micro-batch's summed loss and says how many units it counts.

The training loop (`loratune.train.loop`) divides the summed loss of each micro-batch by the units of the whole
accumulation window, so the gradient does not depend on how a step's samples are split into micro-batches. The
objective says what a unit is: a supervised token for SFT (the loop's arithmetic unchanged: `SFT` is the runner's
own `loss_sum`), a pair for DPO, ORPO and SimPO, a completion for KTO. Online methods (PPO, GRPO: a later issue)
fit the same contract, with rollouts made before the step.

    objective.units(batch)              units in a host-side batch, counted on the host
    objective.loss_sum(runner, batch)   (summed loss on the device, {metric: (sum, count)} detached)

A preference micro-batch holds `loratune.data.preference.PreferenceSample`s: (chosen, rejected) or (completion,
mismatched completion) as consecutive sequences of a padding-free stream or of padded rows, in one forward pass.
Per-sequence log-probabilities come from `loratune.pref.logps` (chunked head, the full logits never held); the
reference policy, where the method has one (dpo, kto), is the same model inside `runner.adapters_disabled()`,
computed without gradient in the same step. The formulas are `loratune.pref.losses`.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from loratune.config import PreferenceConfig
from loratune.errors import ConfigError
from loratune.pref import losses
from loratune.pref.logps import segments, sequence_logps

Batch = dict[str, Tensor]
Stats = dict[str, tuple[Tensor | float, float]]

# Paper defaults of beta (sources in loratune.pref.losses)
DEFAULT_BETA = {"dpo": 0.1, "kto": 0.1, "orpo": 0.1, "simpo": 2.0}
WITH_REFERENCE = ("dpo", "kto")
MODEL_KEYS = ("input_ids", "attention_mask", "position_ids")


class Objective(Protocol):
    name: str
    unit: str  # what `units` counts, for messages

    def units(self, batch: Batch) -> int: ...

    def loss_sum(self, runner, batch: Batch) -> tuple[Tensor, Stats]: ...


class SFT:
    """The next-token loss summed over supervised tokens: the runner's own `loss_sum`."""

    name, unit = "sft", "supervised tokens"

    def units(self, batch: Batch) -> int:
        return int((batch["labels"][:, 1:] != -100).sum())

    def loss_sum(self, runner, batch: Batch) -> tuple[Tensor, Stats]:
        return runner.loss_sum(batch)[0], {}


class Preference:
    """DPO (sigmoid, IPO, robust), ORPO, SimPO on pairs; KTO on labelled completions."""

    def __init__(self, method: str, cfg: PreferenceConfig) -> None:
        if method not in DEFAULT_BETA:
            raise ConfigError(f"train.method {method!r} is not a preference method; expected one of "
                              f"{', '.join(DEFAULT_BETA)}")
        self.name, self.cfg = method, cfg
        self.beta = DEFAULT_BETA[method] if cfg.beta == "auto" else float(cfg.beta)
        self.unit = "completions" if method == "kto" else "pairs"

    def units(self, batch: Batch) -> int:
        return segments(batch)[2].numel() // 2

    def sequence_logps(self, runner, batch: Batch, rows: Tensor, number: Tensor, n_seq: int) -> Tensor:
        hidden, weight, softcap = runner.head_inputs({k: v for k, v in batch.items() if k in MODEL_KEYS})
        dev = hidden.device
        return sequence_logps(hidden, weight, batch["labels"].to(dev), rows.to(dev), number.to(dev), n_seq, softcap)

    def reference_logps(self, runner, batch: Batch) -> Tensor:
        """The reference policy's log-prob of every numbered sequence: the base, adapters disabled, no gradient."""
        rows, number, counts = segments(batch)
        with torch.no_grad(), runner.adapters_disabled():
            return self.sequence_logps(runner, batch, rows, number, counts.numel())

    def loss_sum(self, runner, batch: Batch) -> tuple[Tensor, Stats]:
        rows, number, counts = segments(batch)
        n_seq = counts.numel()
        if n_seq % 2:
            raise ValueError(f"a preference batch holds {n_seq} supervised sequences; expected pairs")
        logps = self.sequence_logps(runner, batch, rows, number, n_seq)
        ref = None
        if self.name in WITH_REFERENCE and "ref_logps" in batch:  # precomputed (loratune.pref.reference)
            ref = batch["ref_logps"].to(logps.device, logps.dtype)
        elif self.name in WITH_REFERENCE:
            ref = self.reference_logps(runner, batch)
        counts = counts.to(logps.device, logps.dtype)
        if self.name == "kto":
            desirable = batch["desirable"].to(logps.device)
            return self._kto(logps[0::2], ref[0::2], logps[1::2], ref[1::2], desirable)
        return self._paired(logps[0::2], logps[1::2], counts[0::2], counts[1::2], ref)

    def _paired(self, chosen: Tensor, rejected: Tensor, n_c: Tensor, n_r: Tensor, ref: Tensor | None
                ) -> tuple[Tensor, Stats]:
        c, b, e = self.cfg, self.beta, self.cfg.label_smoothing
        avg_c, avg_r = chosen / n_c, rejected / n_r
        if self.name == "dpo":
            ratio_c, ratio_r = chosen - ref[0::2], rejected - ref[1::2]
            if c.loss == "ipo":
                loss = losses.ipo(ratio_c / n_c - ratio_r / n_r, b)
            elif c.loss == "robust":
                loss = losses.dpo_robust(ratio_c - ratio_r, b, e)
            else:
                loss = losses.dpo_sigmoid(ratio_c - ratio_r, b, e)
            reward_c, reward_r = b * ratio_c, b * ratio_r
        elif self.name == "simpo":
            loss = losses.simpo(avg_c, avg_r, b, c.simpo_gamma, e)
            reward_c, reward_r = b * avg_c, b * avg_r
        else:  # orpo
            loss = losses.orpo(-avg_c, avg_c, avg_r, b)
            reward_c, reward_r = b * avg_c, b * avg_r
        n = float(chosen.numel())
        reward_c, reward_r = reward_c.detach(), reward_r.detach()
        stats: Stats = {"rewards_chosen": (reward_c.sum(), n), "rewards_rejected": (reward_r.sum(), n),
                        "margin": ((reward_c - reward_r).sum(), n),
                        "accuracy": ((reward_c > reward_r).sum(), n),
                        "logps_chosen": (chosen.detach().sum(), n), "logps_rejected": (rejected.detach().sum(), n)}
        if self.name == "orpo":
            stats["nll"] = ((-avg_c).detach().sum(), n)
        return loss.sum(), stats

    def _kto(self, logps: Tensor, ref: Tensor, kl_logps: Tensor, kl_ref: Tensor, desirable: Tensor
             ) -> tuple[Tensor, Stats]:
        c = self.cfg
        z = losses.kto_reference_point(kl_logps.detach(), kl_ref)
        ratio = logps - ref
        loss = losses.kto(ratio, desirable, z, self.beta, c.desirable_weight, c.undesirable_weight)
        reward = self.beta * ratio.detach()
        good, n_good = desirable.float(), float(desirable.sum())
        bad, n_bad = 1.0 - desirable.float(), float((~desirable).sum())
        stats: Stats = {"kl": (z * desirable.numel(), float(desirable.numel())),
                        "rewards_chosen": ((reward * good).sum(), n_good),
                        "rewards_rejected": ((reward * bad).sum(), n_bad),
                        "logps_chosen": ((logps.detach() * good).sum(), n_good),
                        "logps_rejected": ((logps.detach() * bad).sum(), n_bad)}
        return loss.sum(), stats


def make_objective(method: str, cfg: PreferenceConfig) -> Objective:
    """The objective of train.method."""
    if method == "rm":
        from loratune.pref.reward import RewardModel

        return RewardModel()
    return SFT() if method == "sft" else Preference(method, cfg)
