"""Every preference loss equals TRL's (trl 1.16) on the same model, batch and reference log-probabilities: loss and
adapter gradients within 1e-5 (fp32, CPU; gradients within 1e-5 of their largest entry, measured: below 4e-6),
through both model codes (transformers + peft, loratune's decoder) and both layouts (padded rows, a padding-free stream), with padding and multi-turn prompts in the batch.

The reference side is TRL's: chosen and rejected as separate right-padded rows, full logits from the peft model,
per-sequence log-probs from TRL's `get_batch_logps`, the reference policy through peft's `disable_adapter`, and the
loss from TRL's own functions where TRL has one callable on log-probs (`CPOTrainer.cpo_loss` for SimPO and
label-smoothed sigmoid DPO, `ORPOTrainer.odds_ratio_loss` for ORPO's odds-ratio term). DPO's sigmoid, IPO and
robust losses and KTO's loss are written inline in TRL 1.16's `DPOTrainer._compute_loss` / `KTOTrainer._compute_loss`
(needing a whole trainer and TRL's fused head); the same lines are reproduced here from that source.

ORPO's NLL term is the chosen completion's mean token NLL per pair, as the ORPO paper defines L_SFT; TRL's
ORPOTrainer instead averages over the prompt and the completion tokens of the whole batch. So the reference's NLL
term is computed from the full logits with the paper's definition, and the odds-ratio term is TRL's.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from loratune.config import PreferenceConfig, load_config
from loratune.data.preference import prepare_preference_data
from loratune.decoder.load import decoder_from_hf
from loratune.model.adapters import attach_adapters
from loratune.model.load import load_base, load_tokenizer
from loratune.pref.batching import PreferenceBatching
from loratune.pref.objective import Preference
from loratune.train.runner import DecoderRunner, HFRunner

trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")
CPOTrainer, ORPOTrainer = trl_cpo.CPOTrainer, trl_orpo.ORPOTrainer

TOL = 1e-5

PAIRS = [
    {"prompt": "What is 2+2?", "chosen": "It is 4.", "rejected": "It is five, or maybe six; hard to say."},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Name a color of the sky"}],
     "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Seven"}]},
    {"chosen": "\n\nHuman: Tell me a joke\n\nAssistant: Why did the chicken cross the road? To get to the other side.",
     "rejected": "\n\nHuman: Tell me a joke\n\nAssistant: No."},
]
KTO = [
    {"prompt": "What is 2+2?", "completion": "It is 4.", "label": True},
    {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Name a color"}], "completion": "Seven, obviously.", "label": False},
    {"prompt": "Tell me a joke", "completion": "Why did the chicken cross the road?", "label": True},
    {"prompt": "Capital of France?", "completion": "London.", "label": False},
]
CASES = {  # id: (train.method, preference options)
    "dpo": ("dpo", {}),
    "cdpo": ("dpo", {"label_smoothing": 0.2}),
    "ipo": ("dpo", {"loss": "ipo", "beta": 0.5}),
    "robust": ("dpo", {"loss": "robust", "label_smoothing": 0.2}),
    "simpo": ("simpo", {}),
    "orpo": ("orpo", {"beta": 0.3}),
    "kto": ("kto", {"desirable_weight": 1.3, "undesirable_weight": 0.8}),
}


@pytest.fixture(scope="module")
def models(tiny_llama: Path):
    """The tiny Llama in fp32: peft's model and loratune's decoder over the same base tensors, with the same
    random non-zero adapters (so that policy and reference differ)."""
    cfg = load_config(None, [f"model.path={tiny_llama}", "quantization.bits=32", "adapter.rank=4",
                             "adapter.alpha=8", "adapter.dropout=0"])
    hf = load_base(cfg)
    dec = decoder_from_hf(hf)
    peft = attach_adapters(hf, cfg.adapter)
    dec.add_adapters(4, 8.0)
    g = torch.Generator().manual_seed(0)
    modules = dict(peft.named_modules())
    for name, layer in dec.adapted_layers().items():
        a, b = torch.randn(layer.lora_A.shape, generator=g) * 0.2, torch.randn(layer.lora_B.shape, generator=g) * 0.2
        layer.set_adapter_weights(a, b)
        theirs = modules["base_model.model." + dec.hf_name(name)]
        with torch.no_grad():
            theirs.lora_A["default"].weight.copy_(a)
            theirs.lora_B["default"].weight.copy_(b)
    tokenizer, info = load_tokenizer(cfg.model)
    return SimpleNamespace(cfg=cfg, peft=peft.train(), dec=dec.train(), tokenizer=tokenizer, info=info)


def _samples(models, tmp_path: Path, method: str):
    f = tmp_path / "data.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in (KTO if method == "kto" else PAIRS)) + "\n")
    cfg = load_config(None, [f"model.path={models.cfg.model.path}", f"data.datasets=[{{path: {f}}}]",
                             f"train.method={method}", "data.cache=false"])
    return prepare_preference_data(cfg.data, models.tokenizer, models.info, 0, method, log_stats=False).train


def _split(sample):
    """The two sequences of a preference sample: (ids, labels) each."""
    cut = sample.position_ids.index(0, 1)
    return ((sample.input_ids[:cut], sample.labels[:cut]), (sample.input_ids[cut:], sample.labels[cut:]))


def _padded(seqs, pad_id: int):
    width = max(len(ids) for ids, _ in seqs)
    ids = torch.full((len(seqs), width), pad_id)
    labels = torch.full((len(seqs), width), -100)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (s, lab) in enumerate(seqs):
        ids[i, :len(s)], labels[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), torch.tensor(lab), 1
    return ids, labels, mask


def _trl_logps(peft, seqs, pad_id: int, reference: bool):
    """(summed, averaged) completion log-probs as TRL computes them: full logits of right-padded rows."""
    ids, labels, mask = _padded(seqs, pad_id)
    if reference:
        with torch.no_grad(), peft.disable_adapter():
            logits = peft(input_ids=ids, attention_mask=mask).logits
    else:
        logits = peft(input_ids=ids, attention_mask=mask).logits
    return (ORPOTrainer.get_batch_logps(logits, labels), ORPOTrainer.get_batch_logps(logits, labels, True))


def _trl_loss(models, samples, method: str, options: dict) -> torch.Tensor:
    """TRL's loss of the batch (mean over pairs / completions)."""
    pref = PreferenceConfig(**options)
    beta = Preference(method, pref).beta
    firsts, seconds = zip(*[_split(s) for s in samples])
    pad = models.info.pad_id
    n = len(samples)
    if method == "kto":  # TRL KTOTrainer._compute_loss, loss_type "kto"
        logps, _ = _trl_logps(models.peft, list(firsts), pad, False)
        ref, _ = _trl_logps(models.peft, list(firsts), pad, True)
        with torch.no_grad():
            kl_logps, _ = _trl_logps(models.peft, list(seconds), pad, False)
        ref_kl, _ = _trl_logps(models.peft, list(seconds), pad, True)
        labels = torch.tensor([bool(s.desirable) for s in samples])
        kl = (kl_logps - ref_kl).mean().detach().clamp(min=0)
        chosen_logratios = logps[labels] - ref[labels]
        rejected_logratios = logps[~labels] - ref[~labels]
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - F.sigmoid(beta * (kl - rejected_logratios))
        losses = torch.cat((pref.desirable_weight * chosen_losses, pref.undesirable_weight * rejected_losses), 0)
        return losses.nanmean()
    logps, avg = _trl_logps(models.peft, list(firsts) + list(seconds), pad, False)
    chosen, rejected, avg_c, avg_r = logps[:n], logps[n:], avg[:n], avg[n:]
    trainer = SimpleNamespace(beta=beta, label_smoothing=pref.label_smoothing, simpo_gamma=pref.simpo_gamma,
                              alpha=0.0, accelerator=SimpleNamespace(device=torch.device("cpu")))
    if method == "simpo":
        trainer.loss_type = "simpo"
        return CPOTrainer.cpo_loss(trainer, avg_c, avg_r)[0].mean()
    if method == "orpo":
        nll = -avg_c  # the paper's L_SFT: mean NLL of the chosen completion, per pair
        return (nll - ORPOTrainer.odds_ratio_loss(trainer, avg_c, avg_r)[0]).mean()
    ref, _ = _trl_logps(models.peft, list(firsts) + list(seconds), pad, True)
    chosen_logratios, rejected_logratios = chosen - ref[:n], rejected - ref[n:]
    delta_score = chosen_logratios - rejected_logratios
    if pref.loss == "sigmoid" and pref.label_smoothing == 0:  # DPOTrainer, loss_type "sigmoid"
        return (-F.logsigmoid(beta * delta_score)).mean()
    if pref.loss == "sigmoid":  # cDPO: CPOTrainer's sigmoid loss on the log-ratios
        trainer.loss_type = "sigmoid"
        return CPOTrainer.cpo_loss(trainer, chosen_logratios, rejected_logratios)[0].mean()
    if pref.loss == "ipo":  # DPOTrainer, loss_type "ipo"
        chosen_mask = torch.tensor([sum(x != -100 for x in lab) for _, lab in firsts], dtype=torch.float)
        rejected_mask = torch.tensor([sum(x != -100 for x in lab) for _, lab in seconds], dtype=torch.float)
        ipo_delta = chosen_logratios / chosen_mask.clamp(min=1.0) - rejected_logratios / rejected_mask.clamp(min=1.0)
        return ((ipo_delta - 1 / (2 * beta)) ** 2).mean()
    eps = pref.label_smoothing  # DPOTrainer, loss_type "robust"
    clean = -(1 - eps) * F.logsigmoid(beta * delta_score)
    flipped = -eps * F.logsigmoid(-beta * delta_score)
    return ((clean - flipped) / (1 - 2 * eps)).mean()


def _peft_grads(peft, dec) -> dict:
    modules = dict(peft.named_modules())
    out = {}
    for name in dec.adapted_layers():
        layer = modules["base_model.model." + dec.hf_name(name)]
        a, b = layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad
        out[name] = torch.cat([a.flatten(), b.flatten()])
    return out


def _zero(models) -> None:
    for p in list(models.peft.parameters()) + list(models.dec.parameters()):
        p.grad = None


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_trl(models, tmp_path: Path, case: str) -> None:
    method, options = CASES[case]
    samples = _samples(models, tmp_path, method)
    assert len({len(s.input_ids) for s in samples}) > 1  # lengths differ: the padded layout holds padding
    _zero(models)
    want = _trl_loss(models, samples, method, options)
    want.backward()
    want_grads = _peft_grads(models.peft, models.dec)
    objective = Preference(method, PreferenceConfig(**options))
    runners = {"hf": HFRunner(models.peft, Accelerator(cpu=True)), "decoder": DecoderRunner(models.dec, "cpu")}
    for code, runner in runners.items():
        for padding_free in (False, True):
            _zero(models)
            batching = PreferenceBatching(padding_free, len(samples), 4096, models.info.pad_id)
            (batch,) = batching.micro_batches(samples, [list(range(len(samples)))])
            assert objective.units(batch) == len(samples)
            loss_sum, stats = objective.loss_sum(runner, batch)
            got = loss_sum / objective.units(batch)
            got.backward()
            where = f"{case}, {code}, {'stream' if padding_free else 'padded'}"
            assert abs(float(got.detach()) - float(want)) < TOL, where
            grads = (_peft_grads(models.peft, models.dec) if code == "hf" else
                     {n: torch.cat([m.lora_A.grad.flatten(), m.lora_B.grad.flatten()])
                      for n, m in models.dec.adapted_layers().items()})
            scale = max(float(g.abs().max()) for g in want_grads.values())
            worst = max(float((grads[n] - want_grads[n]).abs().max()) for n in want_grads)
            assert worst < TOL * max(scale, 1.0), f"{where}: gradient off by {worst:.2e} (largest {scale:.2e})"
            assert stats["rewards_chosen"][1] > 0


def test_reward_model_loss_and_gradients_equal_trl(models, tmp_path: Path) -> None:
    """train.method rm against TRL's RewardTrainer loss (-log sigmoid(r_chosen - r_rejected), mean over pairs) on
    rewards pooled as transformers' sequence classifiers pool them: the score of the last real token of each row."""
    from loratune.pref.reward import RewardModel, attach_reward_head
    from loratune.train.loss import hidden_states

    samples = _samples(models, tmp_path, "rm")
    heads = {code: attach_reward_head(m, seed=3) for code, m in (("hf", models.peft), ("decoder", models.dec))}
    assert torch.equal(heads["hf"].weight, heads["decoder"].weight)
    _zero(models)
    firsts, seconds = zip(*[_split(s) for s in samples])
    ids, _, mask = _padded(list(firsts) + list(seconds), models.info.pad_id)
    hidden = hidden_states(models.peft, {"input_ids": ids, "attention_mask": mask})
    last = hidden[torch.arange(len(ids)), mask.sum(1) - 1]
    rewards_chosen, rewards_rejected = torch.chunk(heads["hf"](last).squeeze(-1), chunks=2)
    want = -F.logsigmoid(rewards_chosen - rewards_rejected).mean()  # TRL 1.16 RewardTrainer.compute_loss
    want.backward()
    want_grads = {**_peft_grads(models.peft, models.dec), "head": heads["hf"].weight.grad.flatten().clone()}
    runners = {"hf": HFRunner(models.peft, Accelerator(cpu=True)), "decoder": DecoderRunner(models.dec, "cpu")}
    objective = RewardModel()
    for code, runner in runners.items():
        for padding_free in (False, True):
            _zero(models)
            (batch,) = PreferenceBatching(padding_free, len(samples), 4096, models.info.pad_id).micro_batches(
                samples, [list(range(len(samples)))])
            loss_sum, stats = objective.loss_sum(runner, batch)
            got = loss_sum / objective.units(batch)
            got.backward()
            where = f"rm, {code}, {'stream' if padding_free else 'padded'}"
            assert abs(float(got.detach()) - float(want)) < TOL, where
            grads = (_peft_grads(models.peft, models.dec) if code == "hf" else
                     {n: torch.cat([m.lora_A.grad.flatten(), m.lora_B.grad.flatten()])
                      for n, m in models.dec.adapted_layers().items()})
            grads["head"] = heads[code].weight.grad.flatten()
            scale = max(float(g.abs().max()) for g in want_grads.values())
            worst = max(float((grads[n] - want_grads[n]).abs().max()) for n in want_grads)
            assert worst < TOL * max(scale, 1.0), f"{where}: gradient off by {worst:.2e} (largest {scale:.2e})"
            assert stats["accuracy"][1] == len(samples)
