"""`loratune train`: config -> decisions -> tokenizer -> data -> model -> loop -> checkpoints -> adapter.

The recipe in the torchtune sense. The run's decisions (which model code trains, dtype, checkpointing,
kernels, graphs, padded or padding-free micro-batches, batch size) are made once, with the memory plan,
before anything loads (`check_memory`: `loratune.model.resolve` and `loratune.model.memory.plan_run`), and
handed to model building (`loratune.model.build.build_trainable`), the runner and the loop. `Run.__init__` sets everything up, fresh or from a checkpoint;
`Run.fit` is the loop over optimizer steps with evaluation, checkpoints and the stop checks written
out; `Run.finish` evaluates a last time, saves the final checkpoint, writes the adapter and its model card
to the output folder and prints the summary. Where a run starts (step 0, a checkpoint, a finished run
continued, or nothing to do) is decided by `resume.plan_start`; its module docstring has the rules.

Launched as several processes (docs/multi-gpu.md), every rank runs this recipe; rank 0 alone prints and
writes (metrics, checkpoints with every rank's RNG state, the output folder) while the others wait at a
barrier, and a stop request on any rank stops all after the step (`loratune.train.distributed`).

Order matters for exact resume: after step N the run evaluates (if due), then checkpoints (if due), so a
checkpoint of step N holds the state after step N's evaluation, and a resumed run continues with step
N+1 exactly as the uninterrupted run does. Evaluation consumes no randomness (no dropout, fixed order).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

from loratune.config import Config, to_dict
from loratune.data.collate import Batching
from loratune.data.pipeline import prepare_data
from loratune.data.preference import prepare_preference_data
from loratune.errors import ConfigError, ModelError
from loratune.infer.load import quiet_loading
from loratune.decoder import s2_attn
from loratune.model import neftune
from loratune.train.trackers import open_trackers
from loratune.model.build import TrainModel, build_trainable
from loratune.model.load import load_tokenizer
from loratune.model.memory import WouldNotFit, describe, load_model_config, plan_run, render
from loratune.model.parallel_plan import choose_strategy
from loratune.model.resolve import Resolved, decide
from loratune.pref.batching import PreferenceBatching
from loratune.pref.objective import make_objective
from loratune.pref.reference import precompute_reference
from loratune.pref.reward import attach_reward_head, load_reward_head, save_reward_head
from loratune.train import card, faults
from loratune.train import distributed, fsdp
from loratune.train.checkpoint import (CHECKPOINTS, Parts, checkpoint_name, clean_leftovers, fill, load_weights,
                                       read_meta, restore_training, rotate, write_checkpoint)
from loratune.train.interrupt import GracefulStop
from loratune.train.loop import Loop, LoopState, StepResult
from loratune.train.metrics import PLOT_FILE, MetricsLog, Window, plot_losses, span_text
from loratune.train.optim import apply_schedule, build_optimizer
from loratune.train.progress import Reporter, memory_gib
from loratune.train.resume import (AlreadyFinished, FinishedRun, Start, check_compatible, config_diff, config_hash,
                                   continue_message, data_diff, data_fingerprint, drop_newer, judge_length,
                                   length_message, plan_start, resume_mode)
from loratune.train.trainer_state import rng_state
from loratune.train.run_folder import RUN_FILE, library_versions, save_run
from loratune.train.runner import DecoderRunner, HFRunner, Runner, decoder_graphs
from loratune.train.samples import answer, format_before, format_comparison, read_samples, write_samples

log = logging.getLogger("loratune.train")


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    tokens: int
    seconds: float
    first_loss: float  # the reported train loss (metrics.Window) at the first logged step
    last_loss: float  # the reported train loss at the last step
    peak_memory_gib: float
    best_eval_loss: float | None = None
    best_step: int | None = None
    checkpoint: Path | None = None  # the newest checkpoint
    interrupted: str | None = None  # name of the signal that stopped the run early, if one did
    stopped_early: bool = False  # early stopping on the eval loss
    exit_code: int = 0
    nothing_to_do: bool = False  # output.dir held this run finished: nothing was trained (resume.AlreadyFinished)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # every CUDA device too


@contextlib.contextmanager
def deterministic_mode(on: bool) -> Iterator[None]:
    """torch.use_deterministic_algorithms for the run's duration (then the previous setting again)."""
    previous = torch.are_deterministic_algorithms_enabled()
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it to be deterministic
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def make_accelerator(resolved: Resolved) -> Accelerator:
    """bf16 autocast, fp16 autocast with a loss scaler, or none (fp32), as the compute dtype says (loratune's
    decoder computes in its dtype itself and uses only the scaler)."""
    mixed = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(resolved.compute_dtype, "no")
    cpu = resolved.device == "cpu"
    if cpu and mixed == "fp16":
        log.info("fp16 autocast needs a GPU: on CPU the adapters compute in fp32 (the base still runs in fp16)")
        mixed = "no"
    # accelerate keeps its settings in a process-wide singleton that refuses a different precision;
    # one process may train several times (tests, the web UI), so each run starts from a clean one.
    AcceleratorState._reset_state()
    # launched by torchrun / accelerate launch, this also joins the process group (gloo on CPU, NCCL on GPUs)
    return Accelerator(mixed_precision=mixed, cpu=cpu)


def make_runner(model: TrainModel, optimizer: torch.optim.Optimizer, cfg: Config,
                acc: Accelerator) -> tuple[Runner, torch.optim.Optimizer]:
    """The micro-batch runner of `model` and the optimizer as accelerate wraps it (its loss scaler, if any)."""
    r = model.resolved
    if r.decoder:
        # CUDA graph replay of its fixed-shape streams where resolved on (loratune.train.runner.decoder_graphs)
        graphs = decoder_graphs(model.module) if r.graphs else None
        return DecoderRunner(model.module, acc.device, graphs), acc.prepare(optimizer)
    if acc.num_processes > 1:  # not wrapped in DDP: the loop sums the adapters' gradients itself, once per window
        # (loratune.train.distributed says why); accelerate still places the model and applies autocast
        prepared, optimizer = acc.prepare_model(model.module, evaluation_mode=True), acc.prepare(optimizer)
    else:
        prepared, optimizer = acc.prepare(model.module, optimizer)
    return HFRunner(prepared, acc), optimizer  # eager: the fallback runs as transformers and peft ship


def make_batching(cfg: Config, r: Resolved, pad_id: int) -> Batching:
    """How samples become micro-batches (a preference method's budget was planned for its pairs: `planned`)."""
    if cfg.train.method == "sft":
        return Batching(r.padding_free, r.batch_size, r.tokens_per_batch, pad_id, pad_to_budget=r.pad_streams)
    return PreferenceBatching(r.padding_free, r.batch_size, r.tokens_per_batch, pad_id, pad_to_budget=r.pad_streams)


def planned(cfg: Config) -> Config:
    """The config the run's decisions and memory plan are made for. A preference sample holds two sequences
    (chosen and rejected, or a KTO completion and its mismatched one) of up to data.max_length each, in one row:
    it is planned as a sample of twice that length (and an explicit train.tokens_per_batch counts pairs' tokens
    at the same rate), so batch_size auto and the padding-free budget fit the pairs."""
    if cfg.train.method == "sft":
        return cfg
    tokens = cfg.train.tokens_per_batch
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_length=2 * cfg.data.max_length),
                               train=dataclasses.replace(cfg.train, tokens_per_batch=tokens if tokens == "auto"
                                                         else 2 * tokens))


class Run:
    """One training run in `cfg.output.dir`, from step 0 or from a checkpoint."""

    def __init__(self, cfg: Config, stop: GracefulStop) -> None:
        self.stop, self.out = stop, Path(cfg.output.dir)
        self.root = self.out / CHECKPOINTS
        # several processes (torchrun / accelerate launch): rank 0 alone prints and writes (distributed.py)
        self.world = distributed.world_from_env()
        if not self.world.main:  # rank 0 tells the story; the others speak up only for warnings and errors
            logging.getLogger("loratune").setLevel(logging.WARNING)
        self.strategy = distributed.check_world(cfg.train.devices, cfg.train.strategy, self.world)
        distributed.bind_device(self.world)
        distributed.join(self.world, host_collectives=cfg.train.fsdp_offload)
        start = distributed.main_first(self.world, lambda: plan_start(cfg, self.say))  # it may clear the folder
        meta = read_meta(start.checkpoint) if start.checkpoint is not None else None
        saved_accum = (meta or {}).get("config", {}).get("train", {}).get("grad_accum")
        # another process count resumes when grad_accum x processes stays (the global batch)
        self.saved_world = distributed.check_checkpoint_world(self.world, start.checkpoint, cfg.train.grad_accum,
                                                              saved_accum if isinstance(saved_accum, int) else None)
        # before anything is loaded: print the memory plan, resolve batch_size auto, refuse a run that won't fit
        saved_batch = (meta or {}).get("config", {}).get("train", {}).get("batch_size")
        saved_batch = saved_batch if isinstance(saved_batch, int) else None
        with contextlib.nullcontext() if self.world.main else contextlib.redirect_stdout(io.StringIO()):
            if self.strategy == "auto":  # ddp when a full 4-bit copy fits one GPU, else fsdp (the memory plan)
                self.strategy = choose_strategy(planned(cfg), self.world.size, saved_batch)
                log.info("train.strategy auto: %s (%s)", self.strategy,
                         "a full 4-bit copy and the activations fit one GPU" if self.strategy == "ddp"
                         else "one GPU's plan does not fit; sharded over the processes it does")
            cfg, self.resolved = check_memory(cfg, saved_batch, self.world.size if self.strategy == "fsdp" else 1)
        self.cfg = cfg
        if self.strategy == "fsdp":
            fsdp.check_supported(self.resolved.decoder, cfg.train.method, cfg.adapter.type,
                                 self.resolved.compute_dtype)
            self.world = dataclasses.replace(self.world, sharded=True)
        if meta is not None:  # before the slow part, so a refused resume fails at once
            current = to_dict(cfg)
            if self.saved_world != self.world.size:  # grad_accum x processes is what must stay (checked above)
                current["train"]["grad_accum"] = meta["config"]["train"].get("grad_accum")
                log.info("resuming on %d process(es) a checkpoint written by %d: the same global batch (%s)",
                         self.world.size, self.saved_world, "grad_accum x processes unchanged")
            check_compatible(config_diff(meta["config"], current), cfg, start.checkpoint)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.world.main:
            clean_leftovers(self.out)
            clean_leftovers(self.root)
        seed_everything(cfg.train.seed)
        self.tokenizer, self.info = load_tokenizer(cfg.model)
        if self.info.pad_is_eos:
            log.info("the tokenizer has no pad token of its own: batches are padded with eos (id %d), masked by "
                     "position, so the model still learns to end its answers with eos", self.info.eos_id)
        if cfg.train.method == "sft":
            self.data = prepare_data(cfg.data, self.tokenizer, self.info, cfg.train.seed)
        else:  # pairs (or KTO's labelled completions), labels on the completions (loratune.data.preference)
            self.data = prepare_preference_data(cfg.data, self.tokenizer, self.info, cfg.train.seed, cfg.train.method)
        self.acc = make_accelerator(self.resolved)
        distributed.check_launch(self.acc.num_processes, self.world)
        model = build_trainable(cfg, self.resolved)
        if cfg.train.method == "sft":  # NEFTune noise on the input embeddings, in training mode only
            neftune.attach(model.module, cfg.train.neftune_alpha)
        if cfg.adapter.type == "lora" and cfg.adapter.init == "eva" and (start.checkpoint is None
                                                                         or cfg.adapter.eva_rho != 1):
            from loratune.model.eva import init_eva  # LoRA A from the training data's activations

            # (resuming with rho > 1: recomputed from the same data for the layers' ranks; the checkpoint's
            # weights replace the values)
            init_eva(model.module, self.data.train, rho=cfg.adapter.eva_rho)
        if cfg.train.s2_attn:  # shifted sparse attention in training mode, after any EVA init (loratune.decoder.s2_attn)
            s2_attn.attach(model.module, cfg.train.s2_attn_group)
        if cfg.train.method == "rm":  # the reward head trains, and is saved, with the adapter (loratune.pref.reward)
            attach_reward_head(model.module, cfg.train.seed)
        log.info("data: %d train, %d eval samples", len(self.data.train), len(self.data.eval))
        self.model_facts = card.model_facts(model)  # read once (before sharding): the model's shape and storage
        if self.world.sharded:  # FSDP2 over the processes (loratune.train.fsdp); the optimizer sees the shards
            fsdp.shard_decoder(model.module, self.world, cfg.train.fsdp_offload)
            optimizer = self.acc.prepare(build_optimizer(model.module, cfg.train))
            runner = fsdp.ShardedRunner(model.module, self.acc.device)
        else:
            runner, optimizer = make_runner(model, build_optimizer(model.module, cfg.train), cfg, self.acc)
        r = self.resolved
        batching = make_batching(cfg, r, self.info.pad_id)
        self.loop = Loop(runner, self.data.train, cfg.train, optimizer, self.acc, batching,
                         group_by_length=cfg.data.group_by_length,
                         objective=make_objective(cfg.train.method, cfg.preference), world=self.world)
        if cfg.train.method in ("dpo", "kto") and cfg.preference.reference == "precomputed":
            precompute_reference(self.loop.objective, runner, batching, self.data.train + self.data.eval)
        self.parts = Parts(model, optimizer, self.loop.scheduler, self.acc.scaler, self.tokenizer,
                           self.data.template, self.info,
                           fsdp.ShardedState(model.module, optimizer, self.world) if self.world.sharded else None)
        self.fingerprints = {"train": data_fingerprint(self.data.train), "eval": data_fingerprint(self.data.eval)}
        self.state, self.saved_step = LoopState(), -1
        self.fresh = start.checkpoint is None  # a resumed run's weights are trained: no "before" answers
        if start.checkpoint is not None:
            check_compatible(data_diff(meta["data"], self.fingerprints), cfg, start.checkpoint)
            self._restore(start, meta)
        self.window = Window(cfg.train.log_every, self.state.window)  # the reported loss and tokens/s
        self.reporter = Reporter(self.loop.total, self.state.step) if self.world.main else distributed.Quiet()
        self.base_seconds, self.t_start = self.state.seconds, time.perf_counter()
        self.metrics = (MetricsLog(self.out, cfg.train.tensorboard or "tensorboard" in cfg.train.report_to,
                                   None if self.fresh else self.state.step,
                                   open_trackers(cfg.train.report_to, self.out, to_dict(cfg), cfg.train.tracker_project,
                                                 resume=not self.fresh))
                        if self.world.main else distributed.Quiet())
        self.has_eval = bool(self.data.eval)
        self.benchmark, self.benchmark_step = None, -1  # train.eval_benchmark (read and tokenized now: a bad
        # file fails before training) and the last step it was scored at
        if cfg.train.eval_benchmark.path is not None:
            from loratune.eval.during_training import TrainingBenchmark, rows_of

            self.benchmark = TrainingBenchmark(cfg.train.eval_benchmark, self.tokenizer, model.context_length)
            log.info("benchmark scored during training: %s", self.benchmark.describe())
            scored = rows_of(self.metrics.rows())
            self.benchmark_step = scored[-1]["step"] if scored else -1
        if cfg.train.eval_every and not self.has_eval:
            log.warning("train.eval_every is set but there is no eval split (data.eval_split / data.eval_datasets)")

    def say(self, text: str) -> None:
        log.warning("%s", text)

    def _restore(self, start: Start, meta: dict) -> None:
        """Continue from `start.checkpoint`; the length of the run may have changed (resume.py's docstring)."""
        folder, done = start.checkpoint, start.continues
        self.state = restore_training(folder, meta, self.parts)
        self._load_head(folder)
        # restore_training set rank 0's RNG: this rank's own comes last
        distributed.restore_rank_rng(folder, self.world, self.cfg.train.seed, self.state.step)
        if self.saved_world != self.world.size and self.cfg.adapter.dropout > 0:
            log.warning("adapter.dropout %g: the dropout masks after this resume differ from those of an "
                        "uninterrupted run (each rank's random stream belongs to the process count that saved it)",
                        self.cfg.adapter.dropout)
        if done is not None:  # only now is the length known in epochs for a run that did not record it
            judge_length(self.cfg, done, self.loop.total)
        planned = meta.get("total_steps") or (done.total if done is not None else self.loop.total)
        if self.loop.total < self.state.step:
            raise ConfigError(f"the checkpoint {folder} is at step {self.state.step}, past the {self.loop.total} "
                              "steps this config plans: raise train.max_steps (or train.epochs), or start afresh with "
                              "train.resume=off and output.overwrite=true")
        lr_saved = self.parts.optimizer.param_groups[0]["lr"]
        lr = apply_schedule(self.loop.scheduler)[0]  # this run's schedule (the total may differ from the saved one)
        if folder.parent.resolve() == self.root.resolve():  # (a checkpoint of another run is not ours)
            self.saved_step = self.state.step
            if self.world.main:
                drop_newer(self.root, self.state.step, self.say)
            self.world.barrier()
        if done is not None:
            self._continue(done, lr_saved, lr)
            return
        log.info("resuming from %s: step %d of %d", folder, self.state.step, self.loop.total)
        if planned != self.loop.total:
            log.info("%s", length_message(self.cfg, self.state.step, planned, self.loop.total, lr_saved, lr))

    def _continue(self, done: FinishedRun, lr_saved: float, lr: float) -> None:
        """Train the finished run `done` further (to the longer total this config plans), saying so in one line."""
        self.state.stopped_early = False
        if self.world.main:
            (self.out / RUN_FILE).unlink(missing_ok=True)  # unfinished again, until this run finishes
        log.info("%s", continue_message(self.cfg, done, self.loop.total, lr_saved, lr))

    # ---------------------------------------------------------------------------------------- the loop

    @property
    def finished(self) -> bool:
        return self.state.stopped_early or self.state.step >= self.loop.total

    def fit(self) -> TrainResult:
        state = self.state
        if self.fresh and self.cfg.output.sample_prompts and not self.finished and self._answers():
            self._samples_before()
        if self.benchmark is not None and self.fresh and state.step == 0 and not self.finished:
            self._score_benchmark()  # the base's accuracy, before any training
        with self.reporter:
            if not self.finished:
                for epoch, micro, batch_ids in self.loop.windows(state):
                    r = self.loop.step(state, batch_ids)
                    state.epoch, state.micro = epoch, micro
                    self._record(r, epoch + micro / max(self.loop.n_micro, 1))
                    if self._after_step():
                        break
            if self.stop.requested and not self.finished:
                result, message = self._interrupted()
            else:
                result, message = self.finish()
        # after the progress bar is gone, so that it cannot redraw over the summary
        if self.world.main:
            print(message, file=sys.stderr if result.interrupted else sys.stdout, flush=True)
        return result

    # ---------------------------------------------------------------------------------------- samples

    def _answer(self) -> list[str]:
        o = self.cfg.output
        return answer(self.parts.model, self.tokenizer, self.info, self.data.template, o.sample_prompts,
                      o.sample_max_new_tokens)

    def _samples_before(self) -> None:
        """Answer the sample prompts with the untrained model; not counted as training time."""
        t0 = time.perf_counter()
        before = self._answer()
        write_samples(self.out, self.cfg.output.sample_prompts, before)
        print(format_before(self.cfg.output.sample_prompts, before, self.cfg.output.sample_max_new_tokens),
              flush=True)
        self.t_start += time.perf_counter() - t0

    def _samples_after(self) -> str:
        """Answer the sample prompts with the weights going to the output folder; the text to print."""
        prompts = self.cfg.output.sample_prompts
        saved = read_samples(self.out)
        before = None
        if [s.get("prompt") for s in saved.get("samples", [])] == list(prompts):
            before = [s["before"] for s in saved["samples"]] if all(
                isinstance(s.get("before"), str) for s in saved["samples"]) else None
        after = self._answer()
        write_samples(self.out, prompts, before, after, self.state.step)
        return format_comparison(prompts, before, after)

    def _record(self, r: StepResult, epoch: float) -> None:
        """The step into the window; the window's loss and tokens/s to the console and (when due) the metrics."""
        state, step = self.state, self.state.step
        self.window.add(r.loss_sum, r.tokens, r.input_tokens, r.seconds)
        loss, rate = self.window.loss(), self.window.tokens_per_s()
        state.last_loss = loss
        mem = memory_gib(self.acc.device)
        due = step % self.cfg.train.log_every == 0 or step == self.loop.total
        if due:
            if state.first_loss is None and loss is not None:
                state.first_loss, state.first_loss_steps = loss, self.window.span(step)
            self.metrics.write({
                "step": step, "epoch": round(epoch, 4), "loss": loss, "lr": r.lr, "grad_norm": r.grad_norm,
                "tokens": state.tokens, "step_input_tokens": r.input_tokens, "tokens_per_s": round(rate, 1),
                "memory_gib": round(mem, 3),
                "skipped": state.skipped_steps, **r.extra})  # extra: a preference objective's rewards, margin, ...
        shown = "".join(f" {name} {r.extra[k]:.2f}" for k, name in (("accuracy", "acc"), ("margin", "margin"))
                        if k in r.extra)  # a preference objective's figures of this step
        self.reporter.step(step, epoch, loss, r.lr, rate, mem, due, shown)

    def _after_step(self) -> bool:
        """Evaluate and checkpoint as due; True to leave the loop (end, early stop or a stop request)."""
        cfg, state = self.cfg.train, self.state
        if state.step >= self.loop.total:
            return True  # finish() evaluates and saves the last step
        save = cfg.save_every > 0 and state.step % cfg.save_every == 0
        bench = self.benchmark is not None and self.benchmark.due(state.step, eval_every=cfg.eval_every, saving=save)
        if self.has_eval and (state.step % cfg.eval_every == 0 if cfg.eval_every else save):
            better = self._evaluate()
            save = save or (better and self.cfg.output.adapter == "best")
            patience = cfg.early_stopping_patience
            if patience and state.evals_without_improvement >= patience:
                state.stopped_early = True
                self.reporter.print(f"early stopping at step {state.step}: no eval improvement in {patience} "
                                    f"evaluations (best {state.best_eval:.4f} at step {state.best_step})")
                return True
        if bench:
            self._score_benchmark()
        # a signal on any rank stops all after this step, with one checkpoint (the same exit code everywhere)
        code = self.world.max_int(distributed.stop_code(self.stop.signal_name), self.acc.device)
        if code and not self.stop.requested:
            self.stop.request(distributed.stop_name(code))
        if save or self.stop.requested:
            self.save_checkpoint()
        return self.stop.requested

    def _evaluate(self) -> bool:
        """Eval loss now; updates best and patience; True if it is the best so far."""
        state = self.state
        loss = self.loop.evaluate(self.data.eval)
        better = state.best_eval is None or loss < state.best_eval
        if state.best_eval is None or loss < state.best_eval - self.cfg.train.early_stopping_min_delta:
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        if better:
            state.best_eval, state.best_step = loss, state.step
        state.last_eval_step, state.last_eval = state.step, loss
        extra = self.loop.eval_stats  # a preference objective's metrics on the eval pairs
        self.metrics.write({"step": state.step, "eval_loss": loss, "best_eval_loss": state.best_eval,
                            **{f"eval_{k}": v for k, v in extra.items()}})
        shown = "".join(f", {k} {extra[k]:.4f}" for k in ("accuracy", "margin") if k in extra)
        self.reporter.print(f"step {state.step}: eval loss {loss:.4f}{shown}" + ("  (best so far)" if better else ""))
        self._plot()
        return better

    def _score_benchmark(self) -> None:
        """train.eval_benchmark's accuracies now, into metrics.jsonl and loss.png; not counted as training time."""
        assert self.benchmark is not None
        t0 = time.perf_counter()
        row = self.benchmark.run(self.parts.model.module)
        self.metrics.write({"step": self.state.step, **row})
        self.benchmark_step = self.state.step
        acc = row.get("benchmark_acc")
        self.reporter.print(f"step {self.state.step}: {row['benchmark']} accuracy "
                            f"{'n/a' if acc is None else format(acc, '.4f')} ({row['benchmark_n']} questions, "
                            f"{time.perf_counter() - t0:.1f}s)")
        self._plot()
        self.t_start += time.perf_counter() - t0

    def _plot(self) -> None:
        if self.cfg.train.plot and self.world.main:
            note = plot_losses(self.metrics.rows(), self.out / PLOT_FILE)
            if note and not getattr(self, "_plot_noted", False):
                self._plot_noted = True
                self.reporter.print(note)

    # ---------------------------------------------------------------------------------------- saving

    def _epochs(self) -> float:
        return self.state.epoch + self.state.micro / max(self.loop.n_micro, 1)

    def _facts(self) -> dict:
        """The run's record (loratune_run.json): what a finished run is continued from and its card reports."""
        s = self.state
        s.seconds = self.base_seconds + time.perf_counter() - self.t_start
        r = self.resolved
        return {"implementation": r.implementation, "batching": "padding_free" if r.padding_free else "padded",
                "tokens_per_batch": r.tokens_per_batch,
                "steps": s.step, "total_steps": self.loop.total, "steps_per_epoch": self.loop.steps_per_epoch,
                "epochs": round(self._epochs(), 4), "tokens": s.tokens, "seconds": round(s.seconds, 2),
                "processes": self.world.size, "strategy": self.strategy, "first_train_loss": s.first_loss, "first_train_loss_steps": s.first_loss_steps or None,
                "train_loss": s.last_loss, "train_loss_steps": self.window.span(s.step) if s.last_loss is not None
                else None, "eval_loss": s.last_eval if s.last_eval_step == s.step else None,
                "best_eval_loss": s.best_eval, "best_step": s.best_step if s.best_step >= 0 else None,
                "benchmark": self._benchmark_summary()}

    def _benchmark_summary(self) -> dict | None:
        """The benchmark's first and last accuracies, from metrics.jsonl (None without train.eval_benchmark)."""
        if self.benchmark is None:
            return None
        from loratune.eval.during_training import summary_of

        return summary_of(self.metrics.rows())

    def _card(self, facts: dict, final: bool) -> str:
        """The model card: of the finished run (`final`), or of a checkpoint."""
        samples = read_samples(self.out).get("samples", []) if final else []
        return card.render(self.cfg, card.CardFacts(
            self.model_facts, self.data.stats, facts, library_versions(), samples,
            plot=final and (self.out / PLOT_FILE).is_file(), checkpoint_of=None if final else self.loop.total))

    def _fill(self, folder: Path, rngs: list[object]) -> None:
        facts = self._facts()
        fill(folder, self.parts, self.state, self.cfg, self.fingerprints, facts, config_hash=config_hash(self.cfg),
             card=self._card(facts, final=False))
        distributed.save_rank_rngs(folder, rngs)  # ranks past 0 (rank 0's is in the training state)
        if self.cfg.train.method == "rm":
            save_reward_head(self.parts.model.module, folder)

    def _load_head(self, folder: Path) -> None:
        """A reward model's head back from `folder` (the rest of the weights are `load_weights`')."""
        if self.cfg.train.method == "rm":
            load_reward_head(self.parts.model.module, folder)

    def save_checkpoint(self) -> Path:
        """Atomically write the checkpoint of the current step; then rotate older ones."""
        if self.saved_step == self.state.step:
            return self.root / checkpoint_name(self.state.step)
        rngs = self.world.gather(rng_state())  # every rank's RNG (a collective: all ranks save together)
        path = self.root / checkpoint_name(self.state.step)
        with self._gathered():  # fsdp: the full adapter and optimizer state on rank 0 while it writes
            if self.world.main:
                path = write_checkpoint(self.root, self.state.step,
                                        lambda folder: self._fill(folder, rngs), fault=faults.fault)
        self.world.barrier()  # the others wait until it is in place
        self.saved_step = self.state.step
        self._rotate()
        faults.fault("save.rotated")
        self.reporter.print(f"checkpoint saved: {path}")
        return path

    def _gathered(self) -> contextlib.AbstractContextManager:
        """fsdp (all ranks): the full adapter and optimizer state gathered for rank 0 to write; else nothing."""
        return self.parts.sharding.gathered() if self.parts.sharding is not None else contextlib.nullcontext()

    def _answers(self) -> bool:
        """Whether this process answers the sample prompts: rank 0, unless the model is sharded (a generation on
        one rank alone would wait for the others' shards forever)."""
        if self.world.sharded:
            if self.world.main and not getattr(self, "_samples_noted", False):
                self._samples_noted = True
                log.info("output.sample_prompts: not answered under train.strategy fsdp (chat with the output)")
            return False
        return self.world.main

    def _rotate(self) -> None:
        """Keep the newest train.keep_last checkpoints and the best one (only after a save completed)."""
        if not self.world.main:
            return
        best = {self.root / checkpoint_name(self.state.best_step)} if self.state.best_step >= 0 else set()
        rotate(self.root, self.cfg.train.keep_last, protect=best)

    def _interrupted(self) -> tuple[TrainResult, str]:
        path = self.save_checkpoint()
        how = ("run the same command again" if resume_mode(self.cfg) != "off"
               else "run the same command with train.resume=auto")
        message = (f"stopped by {self.stop.signal_name} after step {self.state.step}/{self.loop.total}; checkpoint "
                   f"saved: {path}\nto resume, {how}: training continues from that checkpoint exactly")
        self.metrics.close()
        return self._result(path, interrupted=self.stop.signal_name, exit_code=self.stop.exit_code()), message

    def finish(self) -> tuple[TrainResult, str]:
        """Last evaluation and checkpoint, then the adapter into the output folder; returns the summary too."""
        state = self.state
        if self.has_eval and state.last_eval_step != state.step:
            self._evaluate()
        if self.benchmark is not None and self.benchmark_step != state.step:
            self._score_benchmark()
        path = self.save_checkpoint()
        self._rotate()  # again: a run killed between its last save and the rotation resumes here
        which = f"last step, {state.step}"
        if self.cfg.output.adapter == "best" and 0 <= state.best_step != state.step:
            best = self.root / checkpoint_name(state.best_step)
            if best.is_dir():
                load_weights(self.parts.model, best, self.parts.sharding)
                self._load_head(best)
                which = f"best eval loss, step {state.best_step}"
            else:
                log.warning("the best checkpoint (step %d) is gone; the output holds the last step", state.best_step)
        samples = self._samples_after() if self.cfg.output.sample_prompts and self._answers() else ""
        self._plot()  # before the card, which shows it
        facts = {**self._facts(), "adapter": which, "checkpoint": str(path)}
        with self._gathered():
            if self.world.main:
                save_run(self.out, self.parts.model, self.tokenizer, self.data.template, self.info, self.cfg,
                         extra=facts, card=self._card(facts, final=True))
                if self.cfg.train.method == "rm":
                    save_reward_head(self.parts.model.module, self.out)
        self.world.barrier()  # the output folder is complete when any process returns
        self.metrics.close()
        result = self._result(path)
        summary = self._summary(result, which)
        return result, f"{samples}\n{summary}" if samples else summary

    def _result(self, path: Path, interrupted: str | None = None, exit_code: int = 0) -> TrainResult:
        s = self.state
        nan = float("nan")
        return TrainResult(self.out, s.step, s.tokens, s.seconds, s.first_loss if s.first_loss is not None else nan,
                           s.last_loss if s.last_loss is not None else nan, memory_gib(self.acc.device),
                           s.best_eval, s.best_step if s.best_step >= 0 else None, path, interrupted,
                           s.stopped_early, exit_code)

    def _summary(self, r: TrainResult, which: str) -> str:
        mem = "GPU peak allocated" if self.acc.device.type == "cuda" else "CPU peak resident"
        lines = [
            f"training done: {r.steps} steps ({self._epochs():.2f} epochs), {r.tokens:,} {self.loop.objective.unit}, "
            f"{_duration(r.seconds)}, {mem} memory {r.peak_memory_gib:.2f} GiB"
            + (f", {self.state.skipped_steps} steps skipped (non-finite)" if self.state.skipped_steps else ""),
            self._loss_line(r),
            *self._benchmark_lines(),
            *([f"CUDA graphs: {self.loop.graphs.replays:,} micro-batches replayed"]
              if self.loop.graphs is not None and self.loop.graphs.replays else []),
            f"adapter ({which}): {self.out}/   checkpoints: {self.root}/",
            f"chat with it:  loratune chat {self.out}",
        ]
        return "\n".join(lines)

    def _benchmark_lines(self) -> list[str]:
        summary = self._benchmark_summary()
        return [card.bench_line(summary)] if summary else []

    def _loss_line(self, r: TrainResult) -> str:
        """'train loss A (steps 1-10) -> B (steps 241-250), mean per supervised token; best eval loss ...'."""
        s, parts = self.state, []
        last = self.window.span(s.step)
        if s.last_loss is None:
            parts.append(f"train loss: no finite loss in {span_text(last)}")
        else:
            first = (f"{s.first_loss:.4f} ({span_text(s.first_loss_steps)}) -> "
                     if s.first_loss is not None and s.first_loss_steps != last else "")
            per = self.loop.objective.unit.removesuffix("s")
            parts.append(f"train loss {first}{s.last_loss:.4f} ({span_text(last)}), mean per {per}")
        if r.best_eval_loss is not None:
            parts.append(f"best eval loss {r.best_eval_loss:.4f} at step {r.best_step}")
        if r.stopped_early:
            parts.append("stopped early")
        return "; ".join(parts)


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{seconds:.1f}s"


def check_memory(cfg: Config, saved_batch_size: int | None = None, shards: int = 1) -> tuple[Config, Resolved]:
    """Resolve the run's decisions and print them with the memory plan; return `cfg` with its batch size
    resolved, and the decisions (raises `WouldNotFit`). `shards`: train.strategy fsdp over that many processes,
    planned per GPU when one GPU's plan does not fit (`loratune.model.parallel_plan.fsdp_run_plan`).

    A model the planner does not know (no Llama-style config fields) trains without a plan, batch auto as 1.
    """
    shaped = planned(cfg)
    try:
        rp = plan_run(shaped, saved_batch_size=saved_batch_size)
    except WouldNotFit as e:
        from loratune.model.parallel_plan import fsdp_run_plan

        rp = fsdp_run_plan(shaped, shards, saved_batch_size) if shards > 1 else None
        if rp is None:
            print(render(e.plan), flush=True)
            raise
    except ModelError as e:
        log.warning("no memory plan: %s", e)
        batch = cfg.train.batch_size if cfg.train.batch_size != "auto" else saved_batch_size or 1
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=batch))
        shaped = dataclasses.replace(shaped, train=dataclasses.replace(shaped.train, batch_size=batch))
        try:
            model_config = load_model_config(cfg)
        except ModelError:
            model_config = None
        resolved = decide(shaped, model_config=model_config)
        log.info("%s", resolved.describe())
        return cfg, resolved
    print(describe(rp, shaped), flush=True)
    if shaped is cfg:
        return rp.cfg, rp.resolved
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, batch_size=rp.cfg.train.batch_size)), \
        rp.resolved


def train(cfg: Config) -> TrainResult:
    """Fine-tune as `cfg` says, with checkpoints and resume, and write the adapter to `cfg.output.dir`."""
    faults.reset()
    # transformers' weight-loading bar is a smear of carriage returns in a log file: off for this run only
    quiet = contextlib.nullcontext() if sys.stderr.isatty() else quiet_loading()
    with quiet, deterministic_mode(cfg.train.deterministic), GracefulStop() as stop:
        try:
            run = Run(cfg, stop)
        except AlreadyFinished as e:
            if distributed.world_from_env().main:
                print(e.message, flush=True)
            return finished_result(e.finished)
        return run.fit()


def finished_result(done: FinishedRun) -> TrainResult:
    """The result of a run that found itself already finished: its own record, nothing trained."""
    f, nan = done.facts, float("nan")
    number = lambda key: f[key] if isinstance(f.get(key), (int, float)) else nan  # noqa: E731
    return TrainResult(done.out, done.steps, int(f.get("tokens") or 0), float(f.get("seconds") or 0.0),
                       number("first_train_loss"), number("train_loss"), nan, f.get("best_eval_loss"),
                       f.get("best_step"), done.checkpoint, nothing_to_do=True)

