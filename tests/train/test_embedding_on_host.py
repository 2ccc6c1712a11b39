"""model.embedding_on_host: the decoder's frozen input embedding in host memory, its rows gathered on host ids and
copied to the device (loratune.decoder.model.TokenEmbedding). On CPU the "device" is the CPU too, so these tests
exercise the code path: the same logits, losses and adapter gradients as the embedding on the device; the
resolved decision, its refusal for a tied head, and the memory plan's figures."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import build_loop

from loratune.config import load_config
from loratune.data.sample import Sample
from loratune.errors import ConfigError
from loratune.model.memory import load_model_config, plan_for
from loratune.model.resolve import decide
from loratune.train.runner import EMBEDS, decoder_stream_loss_sum, host_embeds


def _samples() -> list[Sample]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n in (9, 13, 17, 21):
        ids = torch.randint(5, 400, (n,), generator=g).tolist()
        out.append(Sample(ids, [-100, -100] + ids[2:]))
    return out


def _loop(model: Path, on: str, *overrides: str):
    return build_loop(model, _samples(), "adapter.rank=4", "adapter.dropout=0", "model.implementation=loratune",
                      f"model.embedding_on_host={on}", "data.max_length=32", "train.batch_size=2",
                      "train.grad_accum=2", "train.max_steps=2", "train.optimizer=adamw", *overrides)


def _grads(loop) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in loop.runner.module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("batching", ["padding_free", "padded"])
def test_the_host_embedding_gives_the_same_loss_and_gradients(tiny_llama: Path, batching: str) -> None:
    host, dev = _loop(tiny_llama, "true", f"train.batching={batching}"), _loop(tiny_llama, "false",
                                                                                f"train.batching={batching}")
    assert host.runner.module.embed.on_host and not dev.runner.module.embed.on_host
    window = [[0, 1], [2, 3]]
    loss_h, n_h = host.forward_backward(host.batches(window))
    loss_d, n_d = dev.forward_backward(dev.batches(window))
    assert n_h == n_d > 0 and loss_h == loss_d
    gh, gd = _grads(host), _grads(dev)
    assert set(gh) == set(gd) and len(gd) > 0
    assert all(torch.equal(gh[k], gd[k]) for k in gd)


def test_logits_and_the_runners_rows(tiny_llama: Path) -> None:
    """The decoder's logits from host or device ids, and the rows `host_embeds` hands a graphed micro-batch."""
    host, dev = _loop(tiny_llama, "true"), _loop(tiny_llama, "false")
    a, b = host.runner.module.eval(), dev.runner.module.eval()
    ids = torch.tensor([[5, 17, 301, 42, 9, 77]])
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))
        assert torch.equal(host_embeds(a, {"input_ids": ids})[EMBEDS], b.embed(ids.reshape(-1)))
    assert host_embeds(b, {"input_ids": ids}) == {}  # on the device: the graph looks the ids up itself
    # the loss a graphed micro-batch captures, given the host rows as its static input
    stream = {"input_ids": ids, "labels": ids.clone(), "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2]])}
    with torch.no_grad():
        want = decoder_stream_loss_sum(b, stream)
        assert torch.equal(decoder_stream_loss_sum(a, {**stream, **host_embeds(a, stream)}), want)
    assert a.embed.weight.device.type == "cpu" and not a.embed.weight.requires_grad
    assert a.device == b.device


def test_the_decision(tiny_llama: Path, tiny_models: dict[str, Path]) -> None:
    def resolved(model: Path, device: str, *overrides: str):
        cfg = load_config(None, [f"model.path={model}", "model.implementation=loratune", *overrides])
        return decide(cfg, device, load_model_config(cfg)).embedding_on_host

    assert not resolved(tiny_llama, "cuda")  # the default (false) until measured on a GPU
    assert resolved(tiny_llama, "cuda", "model.embedding_on_host=auto")  # auto: on CUDA
    assert not resolved(tiny_llama, "cpu", "model.embedding_on_host=auto")
    assert not resolved(tiny_llama, "cuda", "model.embedding_on_host=false")
    assert resolved(tiny_llama, "cpu", "model.embedding_on_host=true")
    assert not resolved(tiny_llama, "cuda", "train.strategy=fsdp", "model.embedding_on_host=auto")
    with pytest.raises(ConfigError, match="fsdp"):
        resolved(tiny_llama, "cuda", "train.strategy=fsdp", "model.embedding_on_host=true")
    assert not resolved(tiny_models["gemma"], "cuda", "model.embedding_on_host=auto")  # a tied head needs the embedding on the GPU
    with pytest.raises(ConfigError, match="tied"):
        resolved(tiny_models["gemma"], "cuda", "model.embedding_on_host=true")
    cfg = load_config(None, [f"model.path={tiny_llama}", "model.implementation=transformers",
                             "model.embedding_on_host=true"])
    assert not decide(cfg, "cuda", load_model_config(cfg)).embedding_on_host  # the fallback ignores it


def test_the_plan_counts_the_host_embedding_off_the_gpu(tiny_llama: Path) -> None:
    cfg = load_config(None, [f"model.path={tiny_llama}", "model.implementation=loratune", "train.batch_size=2",
                             "model.embedding_on_host=auto"])
    shape = load_model_config(cfg)
    on = decide(cfg, "cuda", shape)
    off = decide(load_config(None, [f"model.path={tiny_llama}", "model.implementation=loratune",
                                    "train.batch_size=2", "model.embedding_on_host=false"]), "cuda", shape)
    p_on, p_off = plan_for(cfg, shape, on), plan_for(cfg, shape, off)
    emb = {p: next(c for c in p.components if c.name == "embedding") for p in (p_on, p_off)}
    vocab, hidden = shape.vocab_size, shape.hidden_size
    assert emb[p_off].bytes in (vocab * hidden * 2, vocab * hidden * 4)  # the table's bytes on the GPU
    assert emb[p_on].bytes == 0 and "in host memory" in emb[p_on].detail
    assert p_off.total - p_on.total == emb[p_off].bytes
    # on CPU the host is where everything is: nothing moves out of the plan
    cpu = decide(load_config(None, [f"model.path={tiny_llama}", "model.implementation=loratune", "train.batch_size=2",
                                    "model.embedding_on_host=true"]), "cpu", shape)
    assert cpu.embedding_on_host and next(c for c in plan_for(cfg, shape, cpu).components
                                          if c.name == "embedding").bytes > 0
