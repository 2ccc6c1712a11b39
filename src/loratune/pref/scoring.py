"""A trained run scoring conversations with a reward: what `loratune serve` (/v1/rewards) and `loratune eval`
(reward tasks) call.

The model is built as training built it (`reward.load_run_model`: same model code, precision, adapter, and a
reward model's head), and a conversation is rendered as training rendered an answer: the run's chat template,
the labels of the final assistant turn (`train_on=last`), fitted to the run's `data.max_length` by its
truncation policy. The reward of an answer is what training reports as the run's reward:

- train.method rm: the head on the final hidden state of the last supervised token (`reward.sequence_rewards`);
- dpo, kto: the implicit reward beta x (log pi(answer) - log pi_base(answer)), the base being the same model with
  the adapter disabled (Rafailov et al. 2023, section 5); sft: the same log-ratio with beta 1;
- simpo, orpo: beta x the mean log-probability of the answer's tokens (the reward their losses compare).

Samples go through the preference batching in padded micro-batches of `batch_size`: a pair (`PreferenceSample`)
gives two rewards (chosen, rejected), a plain `Sample` (one conversation) one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratune.data.lengths import fit_conversation
from loratune.data.render import encode, plan_conversation
from loratune.data.sample import Sample
from loratune.data.templates import ChatTemplate, resolve_template
from loratune.pref.batching import PreferenceBatching
from loratune.pref.logps import segments
from loratune.pref.objective import WITH_REFERENCE, Preference
from loratune.pref.reward import load_run_model, sequence_rewards


def _policy(cfg) -> Preference | None:
    """The objective whose reward a run of `cfg` is scored by (None: a reward model's head)."""
    method = cfg.train.method
    if method == "rm":
        return None
    policy = Preference("dpo" if method == "sft" else method, cfg.preference)
    if method == "sft":
        policy.beta = 1.0
    return policy


def reward_kind(cfg) -> str:
    """What a run's reward is, in words (for reports)."""
    policy = _policy(cfg)
    if policy is None:
        return "reward head"
    if policy.name in WITH_REFERENCE:
        return f"{cfg.train.method}: {policy.beta:g} x log-ratio to the base"
    return f"{cfg.train.method}: {policy.beta:g} x mean log-prob"


class TooLong(ValueError):
    """A conversation the run's length limits drop (or that leaves no answer token to score)."""


@dataclass
class RewardScorer:
    """One loaded reward model: its training runner, config and tokenizer, and a lock (one scoring at a time)."""

    folder: Path
    runner: object
    cfg: object
    tokenizer: object
    info: object
    template: ChatTemplate
    policy: Preference | None = None  # None: a reward model's head; else the objective whose reward is used
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> RewardScorer:
        runner, cfg, tokenizer, info = load_run_model(Path(folder), device)
        template = resolve_template(cfg.data.template, tokenizer, cfg.data.template_variables)
        return cls(Path(folder), runner, cfg, tokenizer, info, template, _policy(cfg))

    @property
    def kind(self) -> str:
        """What the reward is, in words."""
        return reward_kind(self.cfg)

    def sample(self, messages: list[dict], tools: list | None = None) -> tuple[Sample, bool]:
        """The conversation (ending with the assistant answer scored) as a sample, and whether it was truncated;
        `TooLong` when the length limits drop it, `loratune.data.render.RenderError` when it cannot be rendered."""
        plan = plan_conversation(messages, self.template, self.tokenizer, "last", tools)
        ids, labels = encode([plan], self.tokenizer, self.info)[0]
        kept, outcome = fit_conversation(ids, labels, self.cfg.data, self.info.bos_id)
        if not kept:
            raise TooLong(f"{len(ids)} tokens: " + ("longer than the reward model's data.max_length "
                                                    f"{self.cfg.data.max_length}" if outcome == "too_long" else
                                                    "no answer token left to score after the length limits"))
        ids, labels = kept[0]
        return Sample(ids, labels, list(range(len(ids)))), outcome == "truncated"

    def rewards(self, samples: list[Sample], batch_size: int = 8) -> list[float]:
        """The reward of every sequence of `samples`, in order (two per pair, chosen first)."""
        batching = PreferenceBatching(False, batch_size, 0, self.info.pad_id)
        out: list[float] = []
        with self.lock, torch.no_grad():
            for batch in batching.eval_batches(samples):
                rewards = sequence_rewards(self.runner, batch) if self.policy is None else self._implicit(batch)
                out += rewards.double().cpu().tolist()
        return out

    def _implicit(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        rows, number, counts = segments(batch)
        logps = self.policy.sequence_logps(self.runner, batch, rows, number, counts.numel()).double()
        if self.policy.name in WITH_REFERENCE:
            return self.policy.beta * (logps - self.policy.reference_logps(self.runner, batch).double())
        return self.policy.beta * logps / counts.to(logps.device, logps.dtype)
