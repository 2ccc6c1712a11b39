"""Reward models (train.method rm): a scalar head on the base + LoRA, trained on preference pairs.

The reward of a sequence is a linear function of the final hidden state at its last token (the end of turn that
closes the answer), as transformers' `*ForSequenceClassification` with one label computes it, and as TRL's
RewardTrainer trains it: the loss of a pair is -log sigmoid(r_chosen - r_rejected) (the Bradley-Terry model;
Ouyang et al. 2022, Eq. 1), normalised per pair like the other preference methods.

The head is `score`: a [1, hidden] fp32 weight without bias (transformers' `score` of a sequence classifier),
initialised N(0, 0.02) from the run's seed, registered on the trained module as `reward_head` before the
optimizer is built, so it trains, clips and checkpoints with the adapter. It is saved beside the adapter as
`reward_head.safetensors` (key `score.weight`): the adapter stays a standard PEFT LoRA checkpoint of the causal
LM, and `load_reward_head` puts the head back (for resuming, `output.adapter: best`, or scoring with `score`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loratune.errors import ModelError
from loratune.pref.logps import segments

HEAD_FILE = "reward_head.safetensors"
HEAD_KEY = "score.weight"
ATTRIBUTE = "reward_head"


def _hidden_size(module: nn.Module) -> int:
    """The width of the final hidden states: the output head's input size (decoder or transformers model)."""
    from loratune.train.loss import unwrap_model

    head = getattr(module, "head", None)
    weight = head.weight if head is not None else unwrap_model(module).get_output_embeddings().weight
    return int(weight.shape[-1])


def attach_reward_head(module: nn.Module, seed: int) -> nn.Linear:
    """A fresh `score` head on `module` (as its `reward_head`), on the device of its output head."""
    from loratune.train.loss import unwrap_model

    head_weight = module.head.weight if hasattr(module, "head") else unwrap_model(module).get_output_embeddings().weight
    head = nn.Linear(_hidden_size(module), 1, bias=False, dtype=torch.float32)
    with torch.no_grad():
        head.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed))
    head = head.to(head_weight.device)
    module.add_module(ATTRIBUTE, head)
    return head


def reward_head(module: nn.Module) -> nn.Linear:
    """The reward head of `module` (or of the module under accelerate's wrappers)."""
    while not hasattr(module, ATTRIBUTE) and isinstance(getattr(module, "module", None), nn.Module):
        module = module.module
    head = getattr(module, ATTRIBUTE, None)
    if not isinstance(head, nn.Linear):
        raise ModelError("the model has no reward head (train.method rm attaches one)")
    return head


def save_reward_head(module: nn.Module, folder: Path) -> Path:
    from safetensors.torch import save_file

    path = Path(folder) / HEAD_FILE
    save_file({HEAD_KEY: reward_head(module).weight.detach().cpu().contiguous()}, str(path),
              metadata={"format": "pt"})  # one key: safetensors writes several in no fixed order
    return path


def load_reward_head(module: nn.Module, folder: Path) -> None:
    """The head saved in `folder` into `module`'s own head tensor, exactly (it must exist and fit)."""
    from safetensors.torch import load_file

    path = Path(folder) / HEAD_FILE
    if not path.is_file():
        raise ModelError(f"{path} does not exist: {folder} holds no reward model (train.method rm)")
    saved = load_file(str(path))
    head = reward_head(module)
    if HEAD_KEY not in saved or tuple(saved[HEAD_KEY].shape) != tuple(head.weight.shape):
        got = tuple(saved[HEAD_KEY].shape) if HEAD_KEY in saved else "no score.weight"
        raise ModelError(f"{path}: expected {HEAD_KEY} of shape {tuple(head.weight.shape)}, got {got}")
    with torch.no_grad():
        head.weight.copy_(saved[HEAD_KEY])


def last_positions(batch: dict[str, Tensor]) -> Tensor:
    """Flat position of each numbered sequence's last supervised token (its end of turn), on the host."""
    rows, number, counts = segments(batch)
    last = torch.zeros(counts.numel(), dtype=torch.long).scatter_reduce(0, number, rows, "amax", include_self=False)
    return last + 1  # a row predicts the next position's label


def sequence_rewards(runner, batch: dict[str, Tensor]) -> Tensor:
    """The reward of every numbered sequence of the batch (chosen, rejected, chosen, ...)."""
    from loratune.pref.objective import MODEL_KEYS

    hidden, _, _ = runner.head_inputs({k: v for k, v in batch.items() if k in MODEL_KEYS})
    head = reward_head(runner.module)
    picked = hidden.index_select(0, last_positions(batch).to(hidden.device))
    return head(picked.to(head.weight.dtype)).squeeze(-1)


class RewardModel:
    """The pairwise (Bradley-Terry) loss of a scalar reward head; units are pairs."""

    name, unit = "rm", "pairs"

    def units(self, batch: dict[str, Tensor]) -> int:
        return segments(batch)[2].numel() // 2

    def loss_sum(self, runner, batch: dict[str, Tensor]) -> tuple[Tensor, dict]:
        rewards = sequence_rewards(runner, batch)
        chosen, rejected = rewards[0::2], rewards[1::2]
        loss = -F.logsigmoid(chosen - rejected)
        c, r, n = chosen.detach(), rejected.detach(), float(chosen.numel())
        return loss.sum(), {"rewards_chosen": (c.sum(), n), "rewards_rejected": (r.sum(), n),
                            "margin": ((c - r).sum(), n), "accuracy": ((c > r).sum(), n)}


def load_run_model(folder: Path, device: str | None = None):
    """A run written by `loratune train`, ready to score (eval mode): (runner, config, tokenizer, tokenizer info).
    Built as training builds it (same model code and precision), then the adapter loaded from `folder`, and for
    a reward model (train.method rm) its head."""
    from loratune.config import load_config
    from loratune.model.build import build_trainable
    from loratune.model.load import load_tokenizer
    from loratune.model.memory import load_model_config
    from loratune.model.resolve import decide
    from loratune.train.run import make_accelerator, make_runner
    from loratune.train.run_folder import CONFIG_FILE

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file():
        raise ModelError(f"{folder} is not a run written by `loratune train`: it has no {CONFIG_FILE}")
    cfg = load_config(folder / CONFIG_FILE)
    resolved = decide(cfg, device, load_model_config(cfg))
    model = build_trainable(cfg, resolved)
    if cfg.train.method == "rm":
        attach_reward_head(model.module, cfg.train.seed)
    model.load_weights(folder)
    if cfg.train.method == "rm":
        load_reward_head(model.module, folder)
    model.module.eval()
    params = [p for p in model.module.parameters() if p.requires_grad][:1] or [nn.Parameter(torch.zeros(1))]
    runner, _ = make_runner(model, torch.optim.SGD(params, lr=0.0), cfg, make_accelerator(resolved))
    tokenizer, info = load_tokenizer(cfg.model)
    return runner, cfg, tokenizer, info


def load_reward_model(folder: Path, device: str | None = None):
    """A reward model written by `loratune train` (train.method rm), ready to score: (runner, config, tokenizer,
    tokenizer info), as `load_run_model` loads it."""
    from loratune.train.run_folder import CONFIG_FILE

    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / HEAD_FILE).is_file():
        raise ModelError(f"{folder} is not a reward model written by `loratune train` (train.method rm): it needs "
                         f"{CONFIG_FILE} and {HEAD_FILE}")
    return load_run_model(folder, device)


def pairwise_accuracy(folder: Path, pairs: str, batch_size: int = 8, device: str | None = None) -> dict[str, float]:
    """The reward model in `folder` on the preference pairs in `pairs` (any shape `loratune.data.preference`
    reads): the fraction of pairs whose chosen answer gets the higher reward, the mean margin and loss."""
    import dataclasses

    from loratune.config import DatasetConfig
    from loratune.data.preference import prepare_preference_data
    from loratune.pref.batching import PreferenceBatching

    runner, cfg, tokenizer, info = load_reward_model(folder, device)
    data_cfg = dataclasses.replace(cfg.data, datasets=[DatasetConfig(path=str(pairs))], eval_datasets=[],
                                   eval_split=0.0)
    samples = prepare_preference_data(data_cfg, tokenizer, info, cfg.train.seed, "rm", log_stats=False).train
    batching = PreferenceBatching(False, batch_size, 0, info.pad_id)
    objective = RewardModel()
    total, n, hits, margin = 0.0, 0, 0.0, 0.0
    with torch.no_grad():
        for batch in batching.eval_batches(samples):
            loss, stats = objective.loss_sum(runner, batch)
            total, n = total + float(loss), n + objective.units(batch)
            hits, margin = hits + float(stats["accuracy"][0]), margin + float(stats["margin"][0])
    return {"pairs": n, "accuracy": hits / n, "margin": margin / n, "loss": total / n}
