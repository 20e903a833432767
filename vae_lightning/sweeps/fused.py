"""A sweep's group of jobs trained as one stack (``fused.Stack``), each job's folder a normal run.

The fused launcher (``hydra_plugins/vae_lightning_fused``) hands a group here: jobs whose
configs differ only in ``model.beta``, ``model.latent_dim`` and ``seed``. ``FusedGroup`` builds
each job as ``train()`` would (seed, model, data), trains all of them in one loop, and leaves in
each job's folder what an ordinary run leaves at the same point:

- every epoch, just before its last batch: ``checkpoints/last.ckpt``, a Lightning checkpoint of
  a run stopped part-way through an epoch (as ``StopOnSignal`` writes one: weights, Adam state,
  loop and loader position, the epoch's partial means, the job's RNG state, ``history.csv``'s
  rows and the best checkpoint so far);
- after each epoch's validation: a row of ``history.csv``, the epoch's scalars in TensorBoard,
  and ``checkpoints/best-epochNNN.ckpt`` when ``val/loss`` improved.

The last epoch stops one batch short: the launcher then runs each job through the ordinary
``train()`` with ``resume=true``, which resumes the job's last.ckpt exactly (the path tested for
preempted runs), trains that last batch, validates, and runs the end of fit (images, probes),
the test and the record, per job, on the job's own unstacked model.

Each job draws its batches from its own seed's order and its noise from a generator that
continues its own global RNG after seeding and initialisation, in the order the job alone draws
it (each training batch, then each validation; Lightning restores the RNG after its sanity
check), so a fused job trains as the job alone does, to float rounding.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from vae_lightning import config
from vae_lightning.errors import ConfigError, RunInterrupted
from vae_lightning.evaluation.metrics import LatentMoments, active_units
from vae_lightning.models.losses import gaussian_kl
from vae_lightning.training.schedules import check_kl, check_scheduler

log = logging.getLogger(__name__)

# the keys in which a group's jobs may differ (data.seed and the callbacks' seeds follow seed)
STACKABLE_KEYS = ("model.beta", "model.latent_dim", "seed")

# trainer keys the fused loop honours; every other key must keep its Lightning default
_TRAINER_HONOURED = {
    "_target_", "default_root_dir", "accelerator", "devices", "max_epochs", "min_epochs",
    "limit_train_batches", "limit_val_batches", "limit_test_batches", "log_every_n_steps",
    "num_sanity_val_steps", "deterministic", "enable_model_summary", "enable_progress_bar",
    "enable_checkpointing", "benchmark",
}  # fmt: skip
_TRAINER_DEFAULTS = {
    "max_steps": (-1, None),
    "precision": ("32-true", "32", 32, None),
    "check_val_every_n_epoch": (1, None),
    "val_check_interval": (1.0, None),
    "accumulate_grad_batches": (1, None),
    "gradient_clip_val": (None, 0, 0.0),
    "strategy": ("auto", None),
    "num_nodes": (1, None),
    "fast_dev_run": (False, 0, None),
    "overfit_batches": (0, 0.0, None),
}


# the ModelCheckpoint the fused loop writes checkpoints for (conf/callbacks/minimal.yaml's)
_CHECKPOINT_SETTINGS = {"monitor": "val/loss", "mode": "min", "save_top_k": 1, "save_last": True}


def group_key(cfg: DictConfig) -> str:
    """What a job's config must share with the others of its group: all of it but the
    stackable keys and the folders (unresolved, so ``${seed}`` is the same text everywhere)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    plain.pop("hydra", None)
    plain.pop("resume", None)
    for key in STACKABLE_KEYS:
        *parents, leaf = key.split(".")
        node = plain
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return OmegaConf.to_yaml(OmegaConf.create(plain), sort_keys=True)


def stack_device(trainer: DictConfig) -> torch.device:
    """Where a stack of jobs with this trainer config trains: the GPU under accelerator=auto
    when there is one, as Lightning would put each job."""
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available()):
        index = torch.cuda.current_device() if torch.cuda.is_available() else None
        return torch.device("cuda", index)
    return torch.device("cpu")


def stack_devices(on_cuda: bool, n_gpus: int, n_processes: int) -> list[str]:
    """The devices on which a sweep's stacks train at the same time, one process each: every
    GPU when the stacks train on CUDA (the first one only when there is one), else
    ``n_processes`` shares of the CPU (on 2 cores a 1-thread stack of 10 seed-1 VAEs took 20.1
    ms a job-step, a 2-thread stack of 20 12.5 ms: two 1-thread stacks do 1.24x the work)."""
    if on_cuda:
        return [f"cuda:{i}" for i in range(max(1, n_gpus))]
    return ["cpu"] * max(1, n_processes)


def spread_stacks(
    groups: Sequence[Sequence[int]], weights: Sequence[float], n_devices: int
) -> list[list[list[int]]]:
    """Each device's stacks (lists of job indices), trained one after another on it, so that
    every device has work: while there are fewer stacks than devices, the heaviest stack of 4
    or more jobs is cut in two (a stack keeps 2 jobs at least); then the stacks go, heaviest
    first, to the least loaded device. ``weights``: each job's work (its epochs)."""
    stacks = [list(g) for g in groups]
    load = lambda stack: sum(weights[i] for i in stack)  # noqa: E731
    while len(stacks) < n_devices:
        big = max(stacks, key=lambda st: (len(st) >= 4, load(st)), default=None)
        if big is None or len(big) < 4:
            break
        stacks.remove(big)
        half = (len(big) + 1) // 2
        stacks += [big[:half], big[half:]]
    slots: list[list[list[int]]] = [[] for _ in range(max(1, n_devices))]
    for stack in sorted(stacks, key=lambda st: (-load(st), st[0])):
        min(slots, key=lambda slot: sum(load(st) for st in slot)).append(stack)
    return slots


def why_not_fused(cfg: DictConfig, gpu: bool = False) -> str | None:
    """Why this (resolved) job config cannot be trained in a stack, or None when it can.
    ``gpu``: stacks may train on a CUDA GPU (off until the stack has run on one: its CUDA
    path, per-job CUDA generators and its deferred non-finite check, is untested)."""
    trainer = cfg.get("trainer") or {}
    for key, allowed in _TRAINER_DEFAULTS.items():
        if key in trainer and trainer.get(key) not in allowed:
            return f"trainer.{key}={trainer.get(key)} (the fused loop keeps Lightning's default)"
    extra = sorted(set(trainer) - _TRAINER_HONOURED - set(_TRAINER_DEFAULTS))
    if extra:
        return f"trainer.{extra[0]} is set (the fused loop does not know it)"
    if str(trainer.get("accelerator", "auto")) not in ("auto", "cpu", "gpu", "cuda"):
        return f"trainer.accelerator={trainer.get('accelerator')}"
    if trainer.get("devices", 1) not in (1, "1", "auto"):
        return f"trainer.devices={trainer.get('devices')} (one device per group)"
    if stack_device(trainer).type == "cuda":
        if not torch.cuda.is_available():
            return f"trainer.accelerator={trainer.get('accelerator')} but no CUDA GPU is here"
        if not gpu:
            return ("it would train on the GPU, where the stack has not run yet "
                    "(hydra.launcher.gpu=true to try it)")  # fmt: skip
    if not isinstance(trainer.get("max_epochs"), int) or trainer.get("max_epochs") < 1:
        return "trainer.max_epochs is not a number of epochs"
    model = cfg.get("model") or {}
    target = str(model.get("_target_", ""))
    if target.rsplit(".", 1)[-1] not in ("VAE", "AE", "ConvVAE"):
        return f"model {target} (fused: VAE, AE, ConvVAE)"
    if model.get("batchnorm"):
        return "model.batchnorm=true (BatchNorm's running statistics cannot be stacked)"
    if model.get("compile"):
        return "model.compile=true"
    if model.get("feature_loss_weight"):
        return "model.feature_loss_weight > 0 (its frozen classifier is not stacked)"
    scheduler = check_scheduler(model.get("scheduler"))
    if scheduler is not None:
        return f"scheduler={scheduler['name']} (the fused loop trains at a constant rate)"
    kl = check_kl(model.get("kl"))
    if kl is not None and kl["name"] != "constant":
        return f"kl={kl['name']} (the fused loop trains with a constant beta)"
    for name, cb in (cfg.get("callbacks") or {}).items():
        if cb and str(cb.get("_target_", "")).endswith("ModelCheckpoint"):
            settings = {k: cb.get(k) for k in _CHECKPOINT_SETTINGS}
            if settings != {**settings, **_CHECKPOINT_SETTINGS}:
                return (f"callbacks.{name} is not the default (the best checkpoint by val/loss, "
                        f"and last.ckpt)")  # fmt: skip
    return None


def _limited(n: int, limit: Any) -> int:
    """Lightning's count of batches under ``limit_*_batches`` (a fraction or a count)."""
    if limit is None:
        return n
    if isinstance(limit, int) and not isinstance(limit, bool):
        return min(n, limit)
    return n if float(limit) == 1.0 else int(n * float(limit))


@dataclass
class _Job:
    """One job of the group: its config, folder, model, data and what it has recorded."""

    cfg: DictConfig
    output_dir: Path
    model: Any
    datamodule: Any
    generator: torch.Generator
    callbacks: list[Any]
    rows: list[dict[str, float]] = field(default_factory=list)
    best: tuple[float, str] | None = None  # (val/loss, checkpoint path)
    last_val: float | None = None
    writer: Any = None
    code_stats: list[torch.Tensor] | None = None  # the AE's moments of this epoch's codes
    code_fit: tuple[torch.Tensor, torch.Tensor] | None = None  # (mean, cov) of the last epoch

    @property
    def checkpoint_callback(self) -> Any:
        from lightning.pytorch.callbacks import ModelCheckpoint

        return next((c for c in self.callbacks if isinstance(c, ModelCheckpoint)), None)


class FusedGroup:
    """Train ``cfgs`` (resolved job configs of one group, with their run folders) as one stack.

    ``run()`` trains every epoch but the last batch of the last one and leaves each job's
    hand-over checkpoint; it returns the indices of the jobs it dropped (a non-finite loss),
    which the launcher runs the ordinary way from their last good checkpoint (where they fail
    as a job alone does, naming the step). Raises ``RunInterrupted`` on SIGTERM/SIGINT after
    the current step; every job then resumes from its last checkpoint.
    """

    def __init__(self, cfgs: Sequence[DictConfig], output_dirs: Sequence[Path]) -> None:
        self.cfgs, self.output_dirs = list(cfgs), [Path(d) for d in output_dirs]
        first = self.cfgs[0].trainer
        self.max_epochs = int(first.max_epochs)
        self.log_every = int(first.get("log_every_n_steps", 50))
        self.device = stack_device(first)
        self.received: int | None = None
        self.time: dict[str, float] = {}
        self._writers: list[Any] = []

    # --- building the jobs --------------------------------------------------------------------
    def _build(self, cfg: DictConfig, output_dir: Path) -> _Job:
        """The job as ``train()`` builds it: seeded, then its data and its model; its noise
        generator continues the global RNG from there."""
        import lightning as L

        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule = config.instantiate(cfg.data, "data")
        model = config.instantiate(cfg.model, "model")
        if self.device.type == "cuda":  # the job alone draws its noise on the GPU
            generator = torch.Generator(device=self.device).manual_seed(int(cfg.seed))
        else:
            generator = torch.Generator()
            generator.set_state(torch.get_rng_state())
        datamodule.prepare_data()
        datamodule.setup("fit")
        callbacks = config.instantiate_group(cfg.get("callbacks"), "callbacks")
        job = _Job(cfg, output_dir, model.to(self.device), datamodule, generator, callbacks)
        job.writer = self._writer(cfg)
        self._writers.append(job.writer)
        return job

    @staticmethod
    def _writer(cfg: DictConfig) -> Any:
        """A TensorBoard writer into the folder the job's TensorBoardLogger writes, if any."""
        from lightning.pytorch.loggers import TensorBoardLogger
        from torch.utils.tensorboard import SummaryWriter

        for logger in config.instantiate_group(cfg.get("logger"), "logger"):
            if isinstance(logger, TensorBoardLogger):
                return SummaryWriter(logger.log_dir)
        return None

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> list[int]:
        from vae_lightning.training.stack import Stack

        t0 = self._t_start = time.perf_counter()
        with self._signals(), contextlib.ExitStack() as cleanup:
            # the TensorBoard files complete, whatever happens
            cleanup.callback(lambda: [w.close() for w in self._writers if w is not None])
            jobs = [self._build(c, d) for c, d in zip(self.cfgs, self.output_dirs, strict=True)]
            stack = Stack([j.model for j in jobs])
            first = jobs[0].datamodule
            trainer = self.cfgs[0].trainer
            self.n_train = _limited(len(first.train_dataloader()),
                                    trainer.get("limit_train_batches"))  # fmt: skip
            self.n_val = _limited(len(first.val_dataloader()), trainer.get("limit_val_batches"))
            if self.n_train < 2 or self.n_val < 1:
                raise ConfigError(
                    "trainer.limit_train_batches",
                    f"gives {self.n_train} training and {self.n_val} validation batches per "
                    f"epoch; a stack needs 2 and 1 or more (these jobs run alone)",
                )
            self.time["setup_s"] = time.perf_counter() - t0
            dropped: list[int] = []
            alive = list(range(len(jobs)))  # the jobs still in the stack, in its order
            for epoch in range(self.max_epochs):
                last = epoch == self.max_epochs - 1
                self._train_epoch(stack, jobs, alive, dropped, epoch, last)
                if last or not alive:
                    break
                self._validate(stack, [jobs[i] for i in alive], epoch)
            if self.received is not None:  # came after the last step: stop all the same
                raise RunInterrupted(self.received, None, self.max_epochs - 1, 0)
        self.time["fit_s"] = time.perf_counter() - t0
        return dropped

    def _train_epoch(
        self, stack: Any, jobs: list[_Job], alive: list[int], dropped: list[int], epoch: int,
        last: bool,
    ) -> None:  # fmt: skip
        """One epoch's training batches (the last epoch's all but one). A job whose loss is not
        finite leaves ``alive`` (and the stack) for ``dropped``; the others go on."""
        group = [jobs[i] for i in alive]
        loaders = []
        for job in group[:1] if self._shared(group) else group:
            loader = job.datamodule.train_dataloader()
            loader.set_epoch(epoch)
            loaders.append(iter(loader))
        sums: torch.Tensor | None = None
        count, keys = 0, ()
        t0 = time.perf_counter()
        for i in range(self.n_train - 1 if last else self.n_train):
            if i == self.n_train - 1:  # just before the epoch's last batch: each job's last.ckpt
                self._snapshot(stack, group, epoch, i, (sums, count, keys), t0)
            x, n = self._batch(loaders, group)
            out = stack.step(x, stack.draw_noise([j.generator for j in group], n))
            scalars = {k: v for k, v in out.items() if v.ndim == 1}
            keys = tuple(scalars)
            step = epoch * self.n_train + i + 1
            if self.device.type == "cpu" or step % self.log_every == 0:  # a GPU: fewer syncs
                loss = scalars.get("objective", scalars["loss"])
                bad = (~torch.isfinite(loss)).nonzero().flatten().tolist()
                if bad:
                    keep = [k for k in range(len(group)) if k not in bad]
                    group, out, scalars, sums = self._drop(stack, group, alive, dropped, keep,
                                                           out, scalars, sums)  # fmt: skip
                    if not group:
                        return
            values = torch.stack(list(scalars.values()), dim=1) * n  # (J, K)
            sums = values if sums is None else sums + values
            count += n
            if "z" in out:
                self._observe_codes(group, out["z"])
            if step % self.log_every == 0:
                self._log_steps(group, scalars["loss"].tolist(), step - 1)
            if self.received is not None:
                raise RunInterrupted(self.received, None, epoch, step)
        if last:  # the hand-over: the last batch and everything after it run per job
            self._snapshot(stack, group, epoch, self.n_train - 1, (sums, count, keys), t0)
            return
        means = (sums / count).cpu()
        share = (time.perf_counter() - t0) / len(group)  # the group's epoch, split evenly
        for j, job in enumerate(group):
            job.rows.append({"epoch": epoch, "step": (epoch + 1) * self.n_train,
                             **{f"train/{k}": float(means[j, n]) for n, k in enumerate(keys)},
                             "time/epoch_s": share})  # fmt: skip
            self._fit_codes(job)

    @staticmethod
    def _drop(stack: Any, group: list[_Job], alive: list[int], dropped: list[int],
              keep: list[int], out: dict, scalars: dict, sums: Any) -> tuple:  # fmt: skip
        """Take the jobs not in ``keep`` (indices into ``group``) out of the stack: they go on
        alone from their last checkpoint (the launcher runs them the ordinary way)."""
        for k in range(len(group)):
            if k not in keep:
                log.warning("job %s: non-finite loss; it leaves the stack and goes on alone "
                            "from its last checkpoint", group[k].output_dir)  # fmt: skip
                dropped.append(alive[k])
        alive[:] = [alive[k] for k in keep]
        group = [group[k] for k in keep]
        if keep:
            stack.keep(keep)
        index = torch.tensor(keep, dtype=torch.long)
        pick = lambda t: t[index.to(t.device)]  # noqa: E731
        out = {k: pick(v) for k, v in out.items()}
        scalars = {k: pick(v) for k, v in scalars.items()}
        return group, out, scalars, None if sums is None else pick(sums)

    def _validate(self, stack: Any, group: list[_Job], epoch: int) -> None:
        """Every job's validation of this epoch: its row of history.csv, its TensorBoard
        scalars, and its best checkpoint when val/loss improved."""
        t0 = time.perf_counter()
        before = [job.generator.get_state() for job in group]  # a best checkpoint's RNG
        shared = group[:1] if self._shared(group) else group
        loaders = [iter(job.datamodule.val_dataloader()) for job in shared]
        sums: torch.Tensor | None = None
        count, keys = 0, ()
        collapse = [self._collapse(job) for job in group]
        moments = [LatentMoments() for _ in group]
        for _ in range(self.n_val):
            x, n = self._batch(loaders, group)
            out = stack.evaluate(x, stack.draw_noise([j.generator for j in group], n))
            if any(collapse):  # PosteriorCollapse's statistics, as it takes them
                mu, logvar = stack.encode(x)
                kl = gaussian_kl(mu, logvar)
                for j, job in enumerate(group):
                    d = job.model.latent_dim
                    moments[j].update(mu[j, :, :d], kl[j, :, :d])
            keys = tuple(out)
            values = torch.stack(list(out.values()), dim=1) * n
            sums = values if sums is None else sums + values
            count += n
        means = (sums / count).cpu()
        share = (time.perf_counter() - t0) / len(group)
        for j, job in enumerate(group):
            row = job.rows[-1]
            row.update({f"val/{k}": float(means[j, n]) for n, k in enumerate(keys)})
            if collapse[j]:
                var = moments[j].mu_variance()
                collapse[j].active = active_units(var, collapse[j].threshold)
                collapse[j].kl_per_dim = moments[j].kl_per_dim().tolist()
                collapse[j].mu_variance = var.tolist()
                row["val/active_units"] = float(collapse[j].active)
            metrics = sorted(k for k in row if "/" in k and not k.startswith("time/"))
            job.rows[-1] = {"epoch": row["epoch"], "step": row["step"],
                            **{k: row[k] for k in metrics},
                            "time/epoch_s": row["time/epoch_s"], "time/val_s": share}  # fmt: skip
            job.last_val = job.rows[-1]["val/loss"]
            self._log_epoch(job, job.rows[-1])
            self._write_history(job)
            if job.best is None or job.last_val < job.best[0]:
                self._save_best(stack, j, job, epoch, before[j])

    @staticmethod
    def _collapse(job: _Job) -> Any:
        """The job's PosteriorCollapse callback, when it has one that applies (VAEs)."""
        from vae_lightning.views.measures import PosteriorCollapse

        if not job.model.variational:
            return None
        return next((c for c in job.callbacks if isinstance(c, PosteriorCollapse)), None)

    @staticmethod
    def _shared(group: list[_Job]) -> bool:
        """Whether every job trains on the same batches (one seed, no per-job Bernoulli draw):
        then one batch serves them all."""
        first = group[0].datamodule
        return first.binarize != "dynamic" and all(j.datamodule.seed == first.seed for j in group)

    def _batch(self, loaders: list[Iterator], group: list[_Job]) -> tuple[torch.Tensor, int]:
        """The next batch of every loader as floats on the device: (B, C, H, W) from one
        shared loader, else (J, B, C, H, W), one per job; and the batch size."""
        from vae_lightning.data import to_unit_float

        images = [next(it)[0] for it in loaders]
        if len(loaders) == 1 and len(group) > 1:
            return to_unit_float(images[0].to(self.device)), images[0].size(0)
        x = to_unit_float(torch.stack(images).to(self.device))
        return self._binarized(x, group), x.size(1)

    def _binarized(self, x: torch.Tensor, group: list[_Job]) -> torch.Tensor:
        """``binarize=dynamic``: each job's own Bernoulli draw, as its DataModule draws it."""
        if group[0].datamodule.binarize != "dynamic":
            return x
        return torch.stack([torch.bernoulli(x[j], generator=job.generator)
                            for j, job in enumerate(group)])  # fmt: skip

    # --- the AE's sampling Gaussian: its codes' moments per epoch, as AE.observe keeps them --
    def _observe_codes(self, group: list[_Job], z: torch.Tensor) -> None:
        for j, job in enumerate(group):
            d = job.model.latent_dim
            codes = z[j, :, :d].detach().double()
            if job.code_stats is None:
                kw = {"device": codes.device, "dtype": torch.float64}
                job.code_stats = [torch.zeros(d, **kw), torch.zeros(d, d, **kw),
                                  torch.zeros((), **kw)]  # fmt: skip
            total, outer, n = job.code_stats
            total += codes.sum(0)
            outer += codes.T @ codes
            n += codes.size(0)

    @staticmethod
    def _fit_codes(job: _Job) -> None:
        if job.code_stats is None:
            return
        total, outer, n = job.code_stats
        if n.item() > 1:
            mean = total / n
            job.code_fit = (mean.float(), (outer / n - torch.outer(mean, mean)).float())
        job.code_stats = None

    # --- what each job's folder receives -------------------------------------------------------
    def _log_steps(self, group: list[_Job], losses: list[float], step: int) -> None:
        for job, loss in zip(group, losses, strict=True):
            if job.writer is not None:
                job.writer.add_scalar("train/loss_step", loss, step)

    @staticmethod
    def _log_epoch(job: _Job, row: dict[str, float]) -> None:
        if job.writer is None:
            return
        step = int(row["step"]) - 1  # where Lightning logs an epoch's values
        job.writer.add_scalar("epoch", row["epoch"], step)
        for key, value in row.items():
            if "/" in key and not key.startswith("time/"):
                job.writer.add_scalar(key, value, step)

    @staticmethod
    def _write_history(job: _Job) -> None:
        from vae_lightning.run.history import History

        history = History(job.output_dir / "history.csv")
        history.rows = job.rows
        history._write()

    def _paths(self, job: _Job, epoch: int, score: float | None) -> tuple[Path, Path | None]:
        """last.ckpt's path, and the best checkpoint's name for ``epoch`` (None: no
        ModelCheckpoint configured)."""
        cb = job.checkpoint_callback
        if cb is None or not cb.dirpath:
            return job.output_dir / "checkpoints" / "last.ckpt", None
        step = (epoch + 1) * self.n_train
        best = cb.format_checkpoint_name({"epoch": epoch, "step": step, "val/loss": score})
        return Path(cb.dirpath) / f"{cb.CHECKPOINT_NAME_LAST}.ckpt", Path(best)

    def _snapshot(self, stack: Any, group: list[_Job], epoch: int, done: int,
                  partial: tuple, t0: float) -> None:  # fmt: skip
        """Each job's last.ckpt: the run stopped after ``done`` batches of ``epoch``."""
        sums, count, keys = partial
        elapsed = (time.perf_counter() - t0) / len(group)
        for j, job in enumerate(group):
            means = {}
            if sums is not None:
                means = {"train": {"sums": sums[j].detach().cpu(), "count": count,
                                   "keys": list(keys)}}  # fmt: skip
            ckpt = self._checkpoint(stack, j, job, epoch, done, job.rows, means,
                                    job.generator.get_state(), elapsed)  # fmt: skip
            if job.code_stats is not None:
                ckpt["vae_lightning"]["code_stats"] = [t.cpu() for t in job.code_stats]
            self._save(ckpt, self._paths(job, epoch, None)[0])

    def _save_best(self, stack: Any, j: int, job: _Job, epoch: int, rng: torch.Tensor) -> None:
        """The job's best checkpoint: after ``epoch``'s training, before its validation (as a
        run stopped at the epoch's last batch is saved); the previous best is removed."""
        _, path = self._paths(job, epoch, job.last_val)
        if path is None:
            job.best = (job.last_val, "")
            return
        previous = job.best
        ckpt = self._checkpoint(stack, j, job, epoch, self.n_train, job.rows[:-1], {}, rng, 0.0)
        self._save(ckpt, path)
        job.best = (job.last_val, str(path))
        if previous and previous[1] and previous[1] != str(path):
            Path(previous[1]).unlink(missing_ok=True)

    @staticmethod
    def _save(ckpt: dict[str, Any], path: Path) -> None:
        from vae_lightning.files import atomic_write

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp))

    def _checkpoint(
        self, stack: Any, j: int, job: _Job, epoch: int, done: int,
        rows: list[dict[str, float]], means: dict[str, Any], rng: torch.Tensor, epoch_s: float,
    ) -> dict[str, Any]:  # fmt: skip
        """Job ``j`` as Lightning saves a run stopped after ``done`` training batches of
        ``epoch`` (``StopOnSignal``'s checkpoint; tests/test_fused_launcher.py compares the
        two key by key)."""
        import lightning as L

        model = stack.unstack(j)
        if job.code_fit is not None:  # the AE's Gaussian, fitted to its last epoch's codes
            model.code_mean.copy_(job.code_fit[0])
            model.code_cov.copy_(job.code_fit[1])
        callbacks: dict[str, Any] = {}
        for cb in job.callbacks:
            state = cb.state_dict()
            if state:
                callbacks[cb.state_key] = state
        if job.checkpoint_callback is not None:
            callbacks[job.checkpoint_callback.state_key] = self._best_state(job, rows)
        callbacks["History"] = {"rows": [dict(r) for r in rows], "epoch_s": epoch_s}
        if self.device.type == "cuda":
            cuda = torch.cuda.get_rng_state_all()
            cuda[self.device.index] = rng
            callbacks["ExactResume"] = {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
        else:
            callbacks["ExactResume"] = {"torch_rng": rng, "cuda_rng": []}
        state_dict = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return {
            "epoch": epoch,
            "global_step": epoch * self.n_train + done,
            "pytorch-lightning_version": L.__version__,
            "state_dict": state_dict,
            "loops": loops_state(epoch, done, self.n_train, self._val_batches_seen(epoch)),
            "callbacks": callbacks,
            "optimizer_states": [stack.adam_state(j, model)],
            "lr_schedulers": [],
            "hparams_name": "kwargs",
            "hyper_parameters": dict(model.hparams),
            "datamodule_hparams_name": "kwargs",
            "datamodule_hyper_parameters": dict(job.datamodule.hparams),
            "vae_lightning": {
                "model_class": type(model).__name__,
                "step": {"epoch_means": means},
                "dataset": job.datamodule.dataset_name,
                "fused": {
                    "jobs": len(stack),
                    **self.time,
                    "fit_share_s": (time.perf_counter() - self._t_start) / len(stack),
                },
            },
        }

    def _val_batches_seen(self, epoch: int) -> int:
        return self.n_val if epoch > 0 else 0

    def _best_state(self, job: _Job, rows: list[dict[str, float]]) -> dict[str, Any]:
        """ModelCheckpoint's state as of ``rows`` (its best and last checkpoints so far)."""
        cb = job.checkpoint_callback
        scored = [r for r in rows if "val/loss" in r]
        best = min(scored, key=lambda r: r["val/loss"]) if scored else None
        best_path = ""
        if best is not None:
            best_path = str(self._paths(job, int(best["epoch"]), best["val/loss"])[1])
        score = torch.tensor(best["val/loss"]) if best else None
        return {
            "monitor": cb.monitor,
            "best_model_score": score,
            "best_model_path": best_path,
            "current_score": torch.tensor(scored[-1]["val/loss"]) if scored else None,
            "dirpath": cb.dirpath,
            "best_k_models": {best_path: score} if best else {},
            "kth_best_model_path": best_path,
            "kth_value": score if best else torch.tensor(math.inf),
            "last_model_path": str(self._paths(job, 0, None)[0]) if rows else "",
        }

    # --- signals -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGTERM/SIGINT stop the group after the current step (``RunInterrupted``); each job
        then resumes from its last.ckpt (``resume=true``), alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: Any) -> None:
            self.received = signum

        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)


def loops_state(epoch: int, done: int, n_train: int, n_val_seen: int) -> dict[str, Any]:
    """Lightning's loop state of a run stopped after ``done`` of the ``n_train`` training
    batches of ``epoch`` (saved in ``on_train_batch_end``); ``n_val_seen``: the batches of the
    previous epoch's validation (0 in the first epoch: the sanity check's do not count)."""
    step = epoch * n_train + done

    def progress(n: int, last: int | None = None, started: bool = True, processed: bool = True):
        out = {"ready": n, "completed": n if last is None else last}
        if started:
            out["started"] = n
        if processed:
            out["processed"] = n
        return out

    def zeros(started: bool = True, processed: bool = True) -> dict[str, Any]:
        return {"total": progress(0, None, started, processed),
                "current": progress(0, None, started, processed)}  # fmt: skip

    optimizer = {
        "step": {"total": progress(step, None, False, False),
                 "current": progress(done, None, False, False)},
        "zero_grad": {"total": progress(step, None, True, False),
                      "current": progress(done, None, True, False)},
    }  # fmt: skip
    epochs = {"ready": epoch + 1, "completed": epoch, "started": epoch + 1, "processed": epoch}
    evaluation = {"state_dict": {}, "batch_progress": {**zeros(), "is_last_batch": False}}
    return {
        "fit_loop": {
            "state_dict": {"combined_loader": [{"epoch": epoch, "consumed": done}]},
            "epoch_loop.state_dict": {"_batches_that_stepped": step - 1},
            "epoch_loop.batch_progress": {
                "total": progress(step, step - 1),
                "current": progress(done, done - 1),
                "is_last_batch": done == n_train,
            },
            "epoch_loop.scheduler_progress": zeros(False, False),
            "epoch_loop.automatic_optimization.state_dict": {},
            "epoch_loop.automatic_optimization.optim_progress": {"optimizer": optimizer},
            "epoch_loop.manual_optimization.state_dict": {},
            "epoch_loop.manual_optimization.optim_step_progress": zeros(False, False),
            "epoch_loop.val_loop.state_dict": {},
            "epoch_loop.val_loop.batch_progress": {
                "total": progress(0),
                "current": progress(n_val_seen),
                "is_last_batch": n_val_seen > 0,
            },
            "epoch_progress": {"total": dict(epochs), "current": dict(epochs)},
        },
        "validate_loop": evaluation,
        "test_loop": {"state_dict": {}, "batch_progress": {**zeros(), "is_last_batch": False}},
        "predict_loop": {"state_dict": {}, "batch_progress": zeros()},
    }
