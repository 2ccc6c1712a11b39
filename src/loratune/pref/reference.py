"""Reference log-probabilities computed once (preference.reference precomputed), instead of in every step.

The reference policy of DPO and KTO is the frozen base, so its log-probability of a sequence never changes during
training: it can be computed once per sample, before the first step, and carried by the sample
(`PreferenceSample.ref`; `PreferenceBatching` hands it to the objective as `ref_logps`), which saves the extra
forward pass of every later step (TRL's `precompute_ref_log_probs`). They are computed as the loop would compute
them (the same runner, batching and code path, adapters disabled, no gradient, in fixed order) and kept in memory
only: a resumed run recomputes the same values (the base is the same), so checkpoints do not change.
"""

from __future__ import annotations

import logging
import time

from loratune.data.collate import Batching
from loratune.data.preference import PreferenceSample
from loratune.pref.objective import Preference

log = logging.getLogger("loratune.train")


def _groups(batching: Batching, samples: list, indices: list[int]) -> list[list[int]]:
    if batching.padding_free:
        return batching.groups(samples, indices)
    return [indices[i:i + batching.batch_size] for i in range(0, len(indices), batching.batch_size)]


def precompute_reference(objective: Preference, runner, batching: Batching, samples: list[PreferenceSample]) -> None:
    """Set `ref` on every sample (in place): the reference log-probs of its two sequences."""
    if not samples:
        return
    t0 = time.perf_counter()
    module = runner.module
    was_training = module.training
    module.eval()
    try:
        with runner.frozen_adapters():
            for group in _groups(batching, samples, list(range(len(samples)))):
                for i in group:
                    samples[i].ref = None  # (so the batch asks for them)
                batch = batching.collate([samples[i] for i in group])
                values = objective.reference_logps(runner, batch).double().cpu().tolist()
                for k, i in enumerate(group):
                    samples[i].ref = (values[2 * k], values[2 * k + 1])
    finally:
        module.train(was_training)
    log.info("reference log-probs precomputed for %d samples in %.1fs", len(samples), time.perf_counter() - t0)
