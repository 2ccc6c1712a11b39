"""Preference losses as pure functions of per-sequence log-probabilities: one place for the formulas.

Each function takes the policy's (and, where the method has one, the reference's) summed log-probability of
each completion and returns the loss of each unit (a pair, or one KTO completion), unreduced: the training
loop sums them and divides by the units of the whole accumulation window, as it divides SFT's token losses by
the window's supervised tokens. The formulas and their defaults, with their sources:

- DPO `sigmoid` (Rafailov et al. 2023, "Direct Preference Optimization", Eq. 7; beta 0.1 in the paper's
  experiments and TRL's default): -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).
  With `label_smoothing` e > 0 it is conservative DPO (cDPO, Mitchell 2023): (1-e) * that - e * log sigmoid(-...).
- DPO `robust` (Chowdhury et al. 2024, "Provably Robust DPO", Eq. 8): the unbiased estimate under label noise
  e: ((1-e) * -log sigmoid(beta d) - e * -log sigmoid(-beta d)) / (1 - 2e); e must be < 0.5.
- IPO (Azar et al. 2023, "A General Theoretical Paradigm", Eq. 17; beta is their tau): (d' - 1/(2 beta))^2
  where d' uses log-ratios averaged per completion token, as TRL does (confirmed with the IPO authors).
- SimPO (Meng et al. 2024, "SimPO", Eq. 6): no reference; -log sigmoid(beta * (avg_c - avg_r) - gamma) with
  per-token average log-probs; the paper tunes beta in [2, 2.5] and gamma/beta near 0.5: defaults 2.0 and 1.0.
  `label_smoothing` as in cDPO.
- ORPO (Hong et al. 2024, "ORPO", Eqs. 4-7; lambda 0.1 in the paper, called beta here and in TRL): no
  reference; NLL of the chosen completion (mean per token) - beta * log sigmoid(log odds(avg_c) - log odds(avg_r)),
  log odds(p) = log p - log(1 - p) with p the average per-token probability.
- KTO (Ethayarajh et al. 2024, "KTO", Eq. 7; beta 0.1, desirable/undesirable weights 1.0): desirable
  completions 1 - sigmoid(beta * (logratio - z)), undesirable 1 - sigmoid(beta * (z - logratio)), each times its
  weight; z = max(0, mean of the reference point's log-ratios), detached: the KL of mismatched
  prompt/completion pairs of the same micro-batch.

Rewards (what the metrics report) are beta x log-ratio for DPO, IPO and KTO, beta x average log-prob for SimPO
and ORPO (as TRL reports them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def dpo_sigmoid(delta: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """DPO (and cDPO with label smoothing) from `delta` = chosen log-ratio - rejected log-ratio."""
    z = beta * delta
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_robust(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    """Robust DPO: the noise-corrected loss, `label_smoothing` the assumed rate of flipped labels (< 0.5)."""
    z = beta * delta
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def ipo(delta_avg: Tensor, beta: float) -> Tensor:
    """IPO from the per-token averaged log-ratio difference."""
    return (delta_avg - 1 / (2 * beta)) ** 2


def simpo(avg_chosen: Tensor, avg_rejected: Tensor, beta: float, gamma: float, label_smoothing: float = 0.0) -> Tensor:
    """SimPO from per-token average log-probs of the policy."""
    z = beta * (avg_chosen - avg_rejected) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012)."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_odds(avg_chosen: Tensor, avg_rejected: Tensor) -> Tensor:
    """ORPO's log odds ratio of the chosen over the rejected completion (average per-token log-probs)."""
    return (avg_chosen - avg_rejected) - (log1mexp(avg_chosen) - log1mexp(avg_rejected))


def orpo(nll_chosen: Tensor, avg_chosen: Tensor, avg_rejected: Tensor, beta: float) -> Tensor:
    """ORPO: the chosen completion's mean NLL minus beta x log sigmoid(log odds ratio)."""
    return nll_chosen - beta * F.logsigmoid(orpo_odds(avg_chosen, avg_rejected))


def kto(logratio: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float,
        undesirable_weight: float) -> Tensor:
    """KTO per completion; `desirable` bool per completion, `kl` the (detached, clamped) reference point."""
    good = desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl)))
    bad = undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio)))
    return torch.where(desirable, good, bad)


def kto_reference_point(kl_policy: Tensor, kl_reference: Tensor) -> Tensor:
    """KTO's z: the mean log-ratio of the mismatched pairs, clamped at 0 and detached."""
    if kl_policy.numel() == 0:
        return torch.zeros((), dtype=kl_policy.dtype, device=kl_policy.device)
    return (kl_policy - kl_reference).mean().detach().clamp(min=0)
