"""A trained reward model (train.method rm) scoring conversations: what `loratune serve` (/v1/rewards) and
`loratune eval` (reward tasks) call.

The model is built as training built it (`reward.load_reward_model`: same model code, precision, adapter and
head), and a conversation is rendered as training rendered an answer: the run's chat template, the labels of the
final assistant turn (`train_on=last`), fitted to the run's `data.max_length` by its truncation policy. Its reward
is the head on the final hidden state of the last supervised token, as `reward.sequence_rewards` computes it in
training. Samples go through the preference batching in padded micro-batches of `batch_size`: a pair
(`PreferenceSample`) gives two rewards (chosen, rejected), a plain `Sample` (one conversation) one.
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
from loratune.pref.reward import load_reward_model, sequence_rewards


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
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, folder: str | Path, device: str | None = None) -> RewardScorer:
        runner, cfg, tokenizer, info = load_reward_model(Path(folder), device)
        template = resolve_template(cfg.data.template, tokenizer, cfg.data.template_variables)
        return cls(Path(folder), runner, cfg, tokenizer, info, template)

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
                out += sequence_rewards(self.runner, batch).double().cpu().tolist()
        return out
