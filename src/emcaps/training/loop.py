"""The training loop: one RunConfig in, one run directory out.

    RUN_DIR/config.toml     the run's config (also stored inside every checkpoint)
    RUN_DIR/checkpoint.pt   the latest checkpoint, replaced atomically every epoch / N minutes / N steps
    RUN_DIR/log.jsonl       one JSON object per line: step, epoch and eval events
    RUN_DIR/tensorboard/    the same scalars, if the `tensorboard` package is installed

The budget is train.epochs, or train.max_steps steps when that is set (the last epoch then ends early).
A callback sees the model after every step and may stop the run (early stopping, matched-error checks).
With train.ema_decay the model that is tested, checkpointed for export and shown to callbacks is the
moving average of the weights (training.averaging); the raw weights still train and resume.

Resuming is exact: the data order of an epoch comes from a generator whose state is checkpointed, and
each batch's augmentation draws from its own generator seeded by (seed, epoch, batch, rank), so a run
stopped and resumed on the same device computes the same weights as one that never stopped.
Under torchrun every rank trains on its own shard of each epoch; only rank 0 writes.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from emcaps.config import ConfigError, RunConfig
from emcaps.data.splits import ImageSet, batch_generator, epoch_order, eval_batches, load_split
from emcaps.data.transforms import center_crop, train_augment
from emcaps.models import Reconstructing, count_parameters
from emcaps.predict import predict, predict_reconstructing
from emcaps.progress import progress_bar
from emcaps.routing.native import native_available
from emcaps.training.averaging import WeightAverage
from emcaps.training.build import (
    build_model,
    build_optimizer,
    compute_loss,
    loss_name,
    lr_factor,
    margin_at,
    routing_path,
)
from emcaps.training.checkpoint import (
    CHECKPOINT_NAME,
    atomic_write_bytes,
    config_of,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from emcaps.training.distributed import (
    Distributed,
    backend_name,
    end_distributed,
    resolve_device,
    setup_distributed,
)
from emcaps.training.divergence import TrainingDiverged, diagnose, first_nonfinite_parameter
from emcaps.training.log import Logger, say

# callback(step, model) after every optimiser step (model: the weight average when the run keeps one); a true
# result stops the run there (checkpointed).
Callback = Callable[[int, nn.Module], Any]


def evaluate_split(model: nn.Module, data: ImageSet, config: RunConfig, device: torch.device,
                   dd: Distributed, loss: str, margin: float) -> dict[str, float]:
    """Test loss and error on the centre crops, each rank taking every world-th image, summed over ranks;
    with a decoder also the reconstruction error (from the predicted class's pose) per pixel."""
    batches = eval_batches(data, config.train.eval_batch_size, config.data.crop, rank=dd.rank, world=dd.world)
    decoder = getattr(model, "decoder", None) is not None
    if decoder:
        scores, labels, errors = predict_reconstructing(model, batches, device)
    else:
        scores, labels = predict(model, batches, device)
        errors = torch.zeros(0)
    total = torch.tensor([
        compute_loss(loss, scores, labels, margin).item() * len(labels) if len(labels) else 0.0,
        float((scores.argmax(1) == labels).sum()), float(len(labels)), float(errors.sum())],
        dtype=torch.float64)
    if dd.world > 1:
        dist.all_reduce(total)
    n = max(total[2].item(), 1.0)
    result = {"test_loss": total[0].item() / n, "test_error": 1.0 - total[1].item() / n,
              "test_images": int(n)}
    if decoder:
        result["test_reconstruction_mse"] = total[3].item() / n
    return result


@dataclass
class RunState:
    """Where a run stands; all of it goes into every checkpoint."""

    step: int = 0
    epoch: int = 0                   # the epoch in progress (== the last epoch + 1 when finished)
    position: int = 0                # batches of `epoch` already done
    order_state: Tensor | None = None  # data-order generator state at the start of `epoch`
    totals: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])   # epoch's loss*n, correct, n
    seconds: float = 0.0             # training time before this process
    best_error: float | None = None
    last_loss: float = math.nan      # the last batch's loss


def _check_run_dir(run_dir: Path, resuming: bool) -> None:
    if not resuming and (run_dir / CHECKPOINT_NAME).exists():
        raise FileExistsError(f"run directory {str(run_dir)!r} already holds a checkpoint; resume it with "
                              f"--resume {run_dir} or choose another --run-dir")


def check_backend(backend: str, device: torch.device) -> None:
    """Raise ConfigError unless routing backend `backend` (Runtime.backend) runs on `device`: the layers
    would only find out at the first batch, after the run directory is written."""
    if backend == "native" and not native_available(device):
        need = ("a CPU" if device.type != "cpu" else
                "the emcaps C++ kernels, which are off (EMCAPS_NATIVE=0) or did not build (see emcaps.kernels)")
        raise ConfigError(f"runtime.backend 'native' needs {need}; the device is {device}: "
                          f"use runtime.backend=auto")
    if backend == "triton":
        from emcaps.kernels.triton_kernels import triton, triton_available  # imports triton: only here

        if not triton_available(device):
            need = "the triton package" if triton is None else "a CUDA device (or TRITON_INTERPRET=1 on a CPU)"
            raise ConfigError(f"runtime.backend 'triton' needs {need}; the device is {device}: "
                              f"use runtime.backend=auto")


def train(config: RunConfig, run_dir: str | Path, *, state: dict[str, Any] | None = None, quiet: bool = False,
          stop_at_step: int | None = None, callback: Callback | None = None) -> dict[str, Any]:
    """Train `config` into `run_dir`; with `state` (a loaded checkpoint), continue exactly where it stopped.

    stop_at_step: checkpoint and return after this global step (to split a run, e.g. in tests).
    callback(step, model): called after each optimiser step; a true result ends the run after that step
    (checkpointed; the summary says stopped_early). Under torchrun rank 0's answer decides.
    Returns a summary: steps, epochs, final train/test metrics, parameter count, seconds, run_dir.
    Raises TrainingDiverged on a non-finite loss or weights, keeping the last good checkpoint.
    """
    run_dir = Path(run_dir)
    with deterministic_algorithms(config.train.deterministic):
        dd = setup_distributed(config.train.device)
        summary = _train(config, run_dir, dd, state, quiet, stop_at_step, callback)
        end_distributed()    # only on success: after one rank's error the others may still be in a collective
    return summary


@contextlib.contextmanager
def deterministic_algorithms(on: bool) -> Iterator[None]:
    """Within the block, with `on`, every operation takes its deterministic algorithm (cuBLAS needs its
    workspace fixed before its first call: set here unless the environment sets it); the previous mode
    comes back after it."""
    if not on:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def _train(config: RunConfig, run_dir: Path, dd: Distributed, state: dict[str, Any] | None, quiet: bool,
           stop_at_step: int | None, callback: Callback | None) -> dict[str, Any]:
    run = _Run(config, run_dir, dd, state, quiet, callback)
    try:
        return run.loop(stop_at_step)
    finally:
        run.logger.close()


class _Run:
    """One process's part of a run: what it trains with and where it stands, and the pieces of the loop
    (restore, one step, end of epoch, checkpoint), each a method."""

    def __init__(self, config: RunConfig, run_dir: Path, dd: Distributed, state: dict[str, Any] | None,
                 quiet: bool, callback: Callback | None) -> None:
        self.config, self.run_dir, self.dd, self.callback = config, run_dir, dd, callback
        self.tc = tc = config.train
        if dd.main:
            _check_run_dir(run_dir, resuming=state is not None)
        self.device = device = resolve_device(tc.device, dd.local_rank)
        check_backend(config.runtime.backend, device)
        if device.type == "cuda":
            torch.cuda.set_device(device)        # nccl and the default cuda stream follow this process's GPU
        if tc.threads:
            torch.set_num_threads(tc.threads)
        self.show = dd.main and not quiet
        self._build(state is None)
        self.run = RunState()
        if state is not None:
            self.restore(state)
        self.reported = self.average.average if self.average is not None else self.model   # tested and saved
        self.decoder = getattr(self.model, "decoder", None) is not None
        net = Reconstructing(self.model) if self.decoder else self.model
        if dd.world > 1:
            net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                      else None)
        self.net = net
        self.logger = Logger(run_dir, dd.main, state.get("log_offset") if state else None, self.run.step)
        self.data_shape = {"classes": self.train_set.classes, "in_channels": self.train_set.images.shape[1],
                           "class_names": list(self.train_set.class_names), "source": self.train_set.source}
        self._announce(state is not None)
        self.started = self.last_save = time.monotonic()
        self.last_test: dict[str, float] = {}

    def _build(self, fresh: bool) -> None:
        """Data, model, optimiser and schedules; every rank builds the same ones from the seed."""
        config, tc, dd, show = self.config, self.tc, self.dd, self.show
        torch.manual_seed(tc.seed)
        np.random.seed(tc.seed % 2**32)
        random.seed(tc.seed)
        if dd.world > 1 and not dd.main:
            dist.barrier()                       # let rank 0 render / unpack data sets first
        progress = show and sys.stderr.isatty()
        self.train_set = load_split(config.data, "train", seed=tc.seed, progress=progress)
        self.test_set = load_split(config.data, "test", seed=tc.seed, progress=progress)
        if dd.world > 1 and dd.main:
            dist.barrier()
        self.model = model = build_model(config, self.train_set.classes, self.train_set.images.shape[1])
        model.to(self.device)
        self.loss_kind = loss_name(config, model)
        if self.loss_kind in ("spread", "margin") and getattr(model, "score_kind", "") != "activation":
            raise ConfigError(f"loss.name {self.loss_kind!r} needs a capsule model (activations in [0, 1]); "
                              f"model {config.model.name!r} gives logits: use 'cross_entropy'")
        if dd.main:                              # only now: a run that cannot start leaves no folder behind
            self.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(self.run_dir / "config.toml", config.to_toml().encode())
        self.optimizer = build_optimizer(config.optim, model.parameters())
        self.batches_per_epoch = math.ceil((len(self.train_set) // dd.world) / tc.batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"training split has {len(self.train_set)} images: too few for {dd.world} processes")
        self.total_steps = tc.max_steps or self.batches_per_epoch * tc.epochs
        self.epochs = math.ceil(self.total_steps / self.batches_per_epoch)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_factor(config.optim,
                                                                                     self.total_steps))
        self.average = WeightAverage(model, tc.ema_decay) if tc.ema_decay else None

    def restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint: weights, average, optimiser, schedule, position and this rank's RNGs."""
        self.model.load_state_dict(state["model"])
        if self.average is not None:
            self.average.load_state_dict(state.get("ema_model", state["model"]))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.run = RunState(step=state["step"], epoch=state["epoch"], position=state["position"],
                            order_state=state["order_state"], totals=list(state["totals"]),
                            seconds=state["seconds"], best_error=state.get("best_error"),
                            last_loss=state.get("last_loss", math.nan))
        rng = state["rng"]
        set_rng_state(rng[self.dd.rank % len(rng)])

    def _announce(self, resumed: bool) -> None:
        config, run, model, dd = self.config, self.run, self.model, self.dd
        if resumed:
            say(self.show, f"{config.name}: resuming at step {run.step} (epoch {run.epoch + 1}, batch {run.position})")
            self.logger.log("resume", step=run.step, epoch=run.epoch, position=run.position)
            return
        train_set, test_set = self.train_set, self.test_set
        source = f" of {train_set.source}" if train_set.source else ""
        path = routing_path(model, self.device)
        say(self.show, f"{config.name}: {config.model.name} model, {count_parameters(model):,} parameters, "
                       f"{len(train_set)} train / {len(test_set)} test images{source}, {dd.world} process(es) on "
                       f"{self.device} with {torch.get_num_threads()} thread(s)" + (f", {path}" if path else ""))
        self.logger.log("start", step=0, params=count_parameters(model), train_images=len(train_set),
                        test_images=len(test_set), world=dd.world, device=str(self.device),
                        steps=self.total_steps, source=train_set.source, threads=torch.get_num_threads(),
                        routing=path, process_group=backend_name())

    def elapsed(self) -> float:
        return self.run.seconds + time.monotonic() - self.started

    def save(self, reason: str, stopped: bool = False) -> None:
        """Gather every rank's RNG state; rank 0 writes, unless the weights are no longer finite."""
        run, dd = self.run, self.dd
        rng = [rng_state()]
        if dd.world > 1:
            gathered: list[Any] = [None] * dd.world
            dist.all_gather_object(gathered, rng[0])
            rng = gathered
        bad = first_nonfinite_parameter(self.model)
        if bad:
            raise TrainingDiverged(f"parameter {bad} became non-finite by step {run.step}; checkpoint not "
                                   f"written, the last good one is kept in {self.run_dir}")
        if not dd.main:
            return
        save_checkpoint(self.run_dir / CHECKPOINT_NAME, {
            "config": self.config.to_dict(), "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng,
            "step": run.step, "epoch": run.epoch, "position": run.position, "order_state": run.order_state,
            "totals": list(run.totals), "margin": margin_at(self.config.loss, run.step, self.total_steps),
            "seconds": self.elapsed(), "best_error": run.best_error, "world_size": dd.world,
            "data_shape": self.data_shape, "log_offset": self.logger.offset(),
            "finished": stopped or run.step >= self.total_steps, "reason": reason, "stopped_early": stopped,
            "last_loss": run.last_loss, "params": count_parameters(self.model), "last_test": self.last_test,
            **({"ema_model": self.average.state_dict()} if self.average is not None else {}),
        })

    def anneal_class_floor(self) -> None:
        """The class capsules' floor for the coming step (RoutingConfig.class_floor_start): the trained model
        and its average route with it until the anneal ends, then with their own (None)."""
        routing = self.config.routing
        if not routing.class_floor_start or not hasattr(self.model, "set_class_floor"):
            return
        floor = routing.class_floor_at(self.run.step, self.total_steps)
        for model in (self.model, self.average.average if self.average is not None else None):
            if model is not None:
                model.set_class_floor(floor)

    def save_due(self) -> bool:
        due = torch.tensor([time.monotonic() - self.last_save >= 60 * self.tc.checkpoint_minutes],
                           dtype=torch.uint8)
        if self.dd.world > 1:
            dist.broadcast(due, 0)                       # rank 0's clock decides, so all ranks gather together
        return bool(due.item()) or (self.tc.checkpoint_steps > 0 and self.run.step % self.tc.checkpoint_steps == 0)

    def stop_asked(self, answer: Any) -> bool:
        stop = torch.tensor([bool(answer)], dtype=torch.uint8)
        if self.dd.world > 1:
            dist.broadcast(stop, 0)                      # rank 0's answer decides, so all ranks stop together
        return bool(stop.item())

    def summary(self, finished: bool, stopped: bool = False) -> dict[str, Any]:
        run, config = self.run, self.config
        return {"name": config.name, "model": config.model.name, "params": count_parameters(self.model),
                "steps": run.step, "epochs": run.epoch, "finished": finished, "stopped_early": stopped,
                "final_loss": run.last_loss, "seconds": self.elapsed(), "run_dir": str(self.run_dir),
                **self.last_test}

    def loop(self, stop_at_step: int | None) -> dict[str, Any]:
        """Epochs until the budget is spent (or a callback stops the run, or `stop_at_step`)."""
        run, tc = self.run, self.tc
        while run.epoch < self.epochs and run.step < self.total_steps:
            epoch = run.epoch
            order = torch.Generator()
            if run.order_state is not None and run.position > 0:
                order.set_state(run.order_state)
            else:
                order.manual_seed(tc.seed * 1_000_003 + epoch)
                run.order_state = order.get_state()
            batches = epoch_order(len(self.train_set), order, self.dd.rank, self.dd.world, tc.batch_size)
            last = min(len(batches), run.position + self.total_steps - run.step)    # batches this epoch runs
            bar = progress_bar(last, f"epoch {epoch + 1}/{self.epochs}", self.show, unit="batch",
                               initial=run.position)
            epoch_start, epoch_images = time.monotonic(), 0
            self.net.train()
            for b in range(run.position, last):
                images, stopped = self.step(epoch, b, batches[b], last, bar)
                epoch_images += images
                if stopped:
                    bar.close()
                    self.logger.log("stop", step=run.step, epoch=epoch + 1, elapsed=self.elapsed())
                    self.save("stopped", stopped=True)
                    return self.summary(finished=True, stopped=True)
                stopping = stop_at_step is not None and run.step >= stop_at_step
                if b + 1 < last and (stopping or self.save_due()):
                    self.save("interval")
                    self.last_save = time.monotonic()
                if stopping and b + 1 < last:
                    bar.close()
                    return self.summary(finished=False)
            bar.close()
            self.end_epoch(epoch, time.monotonic() - epoch_start, epoch_images)
            if stop_at_step is not None and run.step >= stop_at_step:
                break
        return self.summary(finished=run.step >= self.total_steps)

    def step(self, epoch: int, b: int, index: Tensor, last: int, bar: Any) -> tuple[int, bool]:
        """One optimiser step on batch `b` of the epoch (image indices `index`); -> (images, stop asked)."""
        run, tc, config, device = self.run, self.tc, self.config, self.device
        images = self.train_set.images[index]
        x = (train_augment(images, config.data.crop, batch_generator(tc.seed, epoch, b, self.dd.rank))
             if config.data.augment else center_crop(images, config.data.crop))
        x, y = x.to(device), self.train_set.labels[index].to(device)       # (B, C, crop, crop), (B,)
        margin = margin_at(config.loss, run.step, self.total_steps)
        self.anneal_class_floor()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=tc.precision == "bf16"):
            if self.decoder:
                scores, _, redrawn = self.net(x, y)                      # (B, E), _, (B, C, crop, crop)
                loss = (compute_loss(self.loss_kind, scores, y, margin)
                        + config.loss.reconstruction_weight * F.mse_loss(redrawn.float(), x))
            else:
                scores = self.net(x)                                     # (B, E)
                loss = compute_loss(self.loss_kind, scores, y, margin)
        scores, loss = scores.float(), loss.float()
        stats = torch.stack([loss.detach() * len(y), (scores.argmax(1) == y).sum().to(loss.dtype),
                             torch.tensor(float(len(y)), device=device)]).double()
        if self.dd.world > 1:
            dist.all_reduce(stats)
        if not torch.isfinite(stats[0]):
            raise TrainingDiverged(
                f"non-finite loss at step {run.step + 1} (epoch {epoch + 1}, batch {b + 1}); "
                f"{diagnose(self.model, x)}; the last good checkpoint is kept in {self.run_dir}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.optim.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), config.optim.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        run.step += 1
        if self.average is not None:
            self.average.update(self.model, run.step)
        run.position = b + 1
        run.totals = [t + s for t, s in zip(run.totals, stats.tolist())]
        run.last_loss = stats[0].item() / stats[2].item()
        stopped = self.callback is not None and self.stop_asked(self.callback(run.step, self.reported))
        if not stopped and tc.eval_steps and run.step % tc.eval_steps == 0 and b + 1 < last:
            # A learning curve between epochs; the epoch's own test (end_epoch) covers its last step.
            curve = evaluate_split(self.reported, self.test_set, config, device, self.dd, self.loss_kind, margin)
            self.logger.log("eval", step=run.step, epoch=epoch + 1, elapsed=self.elapsed(), **curve)
            self.net.train()
        run_loss, run_acc = run.totals[0] / run.totals[2], run.totals[1] / run.totals[2]
        bar.set_postfix(loss=f"{run_loss:.4f}", acc=f"{100 * run_acc:.1f}%", refresh=False)
        bar.update()
        if run.step % tc.log_every == 0:
            self.logger.log("step", step=run.step, epoch=epoch + 1, loss=run.last_loss,
                            acc=stats[1].item() / stats[2].item(), lr=self.scheduler.get_last_lr()[0],
                            margin=margin)
        return int(stats[2].item()), stopped

    def end_epoch(self, epoch: int, seconds: float, epoch_images: int) -> None:
        """Log the epoch, test it when due (always after the last step), and checkpoint."""
        run, tc, config = self.run, self.tc, self.config
        train_loss, train_acc = run.totals[0] / run.totals[2], run.totals[1] / run.totals[2]
        run.epoch, run.position, run.totals, run.order_state = epoch + 1, 0, [0.0, 0.0, 0.0], None
        record = {"step": run.step, "epoch": epoch + 1, "train_loss": train_loss, "train_acc": train_acc,
                  "lr": self.scheduler.get_last_lr()[0], "seconds": seconds,
                  "img_per_s": epoch_images / max(seconds, 1e-9), "elapsed": self.elapsed()}
        if (tc.eval_every and (epoch + 1) % tc.eval_every == 0) or run.step >= self.total_steps:
            self.last_test = evaluate_split(self.reported, self.test_set, config, self.device, self.dd,
                                            self.loss_kind, margin_at(config.loss, run.step, self.total_steps))
            record.update(self.last_test)
            if run.best_error is None or self.last_test["test_error"] < run.best_error:
                run.best_error = self.last_test["test_error"]
            self.net.train()
        self.logger.log("epoch", **record)
        test_text = f", test error {100 * self.last_test['test_error']:.2f}%" if "test_error" in record else ""
        say(self.show, f"epoch {epoch + 1}/{self.epochs}: loss {train_loss:.4f}, train acc {100 * train_acc:.1f}%"
                       f"{test_text}, {record['img_per_s']:.1f} img/s")
        self.save("epoch")
        self.last_save = time.monotonic()


def budget_reached(state: dict[str, Any], config: RunConfig) -> bool:
    """Whether a checkpoint's run has trained all that `config` asks for (its steps, else its epochs)."""
    if config.train.max_steps:
        return state["step"] >= config.train.max_steps
    return state["epoch"] >= config.train.epochs


def resume(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = (), **kwargs: Any) -> dict[str, Any]:
    """Continue the run in `run_dir` from its checkpoint, with its own config (plus overrides)."""
    state = load_checkpoint(run_dir)
    config = config_of(state, overrides)
    run_dir = Path(run_dir) if Path(run_dir).is_dir() else Path(run_dir).parent
    if state.get("finished") and (state.get("stopped_early") or budget_reached(state, config)):
        return {"name": config.name, "steps": state["step"], "epochs": state["epoch"], "finished": True,
                "stopped_early": bool(state.get("stopped_early")), "run_dir": str(run_dir),
                "params": state.get("params"), **state.get("last_test", {})}
    return train(config, run_dir, state=state, **kwargs)


def default_run_dir(config: RunConfig, root: str | Path = "runs") -> Path:
    return Path(root) / f"{config.name}-{time.strftime('%Y%m%d-%H%M%S')}"
