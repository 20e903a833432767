"""A sweep's group of jobs trained as one stacked model (``training.stack.Stack``) by an ordinary
Lightning Trainer, each job's folder receiving what its own run writes while it trains.

``train_group`` builds each job as ``train()`` would (seeded, then its data and its model; its
noise generator continues its global RNG from there, so the stack draws what the job alone
draws), stacks them, and fits the stack with a Trainer whose callbacks are the job's own where
they apply, one per job, reading the job's ``job<j>/`` metrics: ``History`` (its
``history.csv``), the job's ``ModelCheckpoint`` (its best checkpoint and ``last.ckpt``), the
collapse statistics of its ``PosteriorCollapse``, and its loggers (``JobLogger``). A checkpoint
the Trainer saves into a job's folder is that job's, cut out of the stack by ``JobCheckpoints``:
its own weights, Adam state, callbacks' states, RNG and partial epoch, with Lightning's own
loop state, so ``train()`` resumes it as a checkpoint of the job alone. The per-epoch image
callbacks do not apply to a stack; each job draws its pictures at its end of fit.

When the stack has trained every epoch, the launcher runs each job the ordinary way with
``resume=true``: ``train()`` finds its training complete in ``last.ckpt`` and does the end of
fit (images, probes), the test and ``metrics.json`` on the job's own model. A job whose loss
turns non-finite leaves the stack and is run alone from its last good checkpoint, where it
fails as a job alone fails. On SIGTERM/SIGINT every job's ``last.ckpt`` is saved where the
stack stopped (``RunInterrupted``); each job then resumes alone.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.data import to_unit_float
from vae_lightning.evaluation.metrics import LatentMoments, active_units
from vae_lightning.models.losses import gaussian_kl
from vae_lightning.run.checkpoints import AtomicCheckpointIO
from vae_lightning.run.history import History
from vae_lightning.run.loggers import finished_at_end
from vae_lightning.run.stops import StopOnSignal
from vae_lightning.sweeps.fused import stack_device
from vae_lightning.training import AutomaticStep, resolve_step
from vae_lightning.training.stack import Stack
from vae_lightning.views.measures import PosteriorCollapse

log = logging.getLogger(__name__)

# the trainer keys a stack's Trainer takes from its jobs' (sweeps.fused checks the others)
TRAINER_KEYS = (
    "max_epochs", "min_epochs", "limit_train_batches", "limit_val_batches", "log_every_n_steps",
    "deterministic", "benchmark", "enable_model_summary", "enable_progress_bar",
)  # fmt: skip


@dataclass
class Job:
    """One job of a group: its config and folder, built as ``train()`` builds it."""

    cfg: DictConfig
    output_dir: Path
    model: Any
    datamodule: Any
    generator: torch.Generator
    callbacks: list[Any]  # its configured callbacks, instantiated (their states travel)
    loggers: list[Any]
    history: History = field(init=False)

    @property
    def checkpoint(self) -> ModelCheckpoint | None:
        return next((c for c in self.callbacks if isinstance(c, ModelCheckpoint)), None)

    @property
    def collapse(self) -> PosteriorCollapse | None:
        found = next((c for c in self.callbacks if isinstance(c, PosteriorCollapse)), None)
        return found if found is not None and self.model.variational else None


def build_job(cfg: DictConfig, output_dir: Path, device: torch.device) -> Job:
    """The job as ``train()`` builds it: seeded, then its data and its model; its noise
    generator continues the global RNG from there (on a GPU: the CUDA generator, seeded)."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = config.instantiate(cfg.data, "data")
    model = AutomaticStep().bind(config.instantiate(cfg.model, "model"))  # as train() checks it
    if device.type == "cuda":  # the job alone draws its noise on the GPU
        generator = torch.Generator(device=device).manual_seed(int(cfg.seed))
    else:
        generator = torch.Generator()
        generator.set_state(torch.get_rng_state())
    callbacks = config.instantiate_group(cfg.get("callbacks"), "callbacks")
    loggers = config.instantiate_group(cfg.get("logger"), "logger")
    return Job(cfg, Path(output_dir), model, datamodule, generator, callbacks, loggers)


# --- the data: each job's batches, stacked -------------------------------------------------------


class StackedBatches:
    """One batch of each job's loader at a time, stacked (J, B, ...); or, with one loader
    shared by all jobs, its batches as they are. Lightning sets the epoch and saves and restores
    the loader position through it, as through ``InMemoryBatches``."""

    def __init__(self, loaders: Sequence[Any]) -> None:
        self.loaders = list(loaders)
        self.sampler = self.batch_sampler = self  # where Lightning looks for set_epoch

    def set_epoch(self, epoch: int) -> None:
        for loader in self.loaders:
            loader.set_epoch(epoch)

    def state_dict(self) -> dict[str, int]:
        return self.loaders[0].state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        for loader in self.loaders:
            loader.load_state_dict(state)

    def mark_consumed(self, n: int | None = None) -> None:
        for loader in self.loaders:
            loader.mark_consumed() if n is None else loader.mark_consumed(n)

    def __len__(self) -> int:
        return len(self.loaders[0])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if len(self.loaders) == 1:
            yield from self.loaders[0]
            return
        for batches in zip(*self.loaders, strict=True):
            if isinstance(batches[0], torch.Tensor):  # chunks of the batches' indices
                yield torch.stack(batches)
            else:
                yield torch.stack([b[0] for b in batches]), torch.stack([b[1] for b in batches])


class StackedData(L.LightningDataModule):
    """The jobs' DataModules as one: a batch per job, or one for all when every job has the
    same split and order (one seed) and no per-batch Bernoulli draw. ``binarize=dynamic`` draws
    each job's images from its own generator, as its DataModule draws them from the job's
    global RNG."""

    def __init__(self, jobs: Sequence[Job], chunk: int = 1, limit: Any = 1.0) -> None:
        super().__init__()
        self.jobs = list(jobs)
        first = self.jobs[0].datamodule
        self.batch_size = first.batch_size
        self.dynamic = first.binarize == "dynamic"
        self.shared = not self.dynamic and all(j.datamodule.seed == first.seed for j in jobs)
        self._train: StackedBatches | None = None
        for dm in self._members():  # chunks of batches' indices for a stack in chunks
            dm.batches_per_step, dm.train_limit = chunk, limit

    def _members(self) -> list[Any]:
        return [self.jobs[0].datamodule] if self.shared else [j.datamodule for j in self.jobs]

    def prepare_data(self) -> None:
        for dm in self._members():
            dm.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        for dm in self._members():
            dm.setup(stage)

    def train_dataloader(self) -> StackedBatches:
        device = self.trainer.strategy.root_device if self.trainer is not None else None
        for dm in self._members():
            if dm.batches_per_step > 1 and device is not None and device.type != "cpu":
                # a stack in chunks gathers its batches where it trains (as on_device does)
                images, labels = dm.splits["train"]
                dm.splits["train"] = (images.to(device), labels.to(device))
        self._train = StackedBatches([dm.train_dataloader() for dm in self._members()])
        return self._train

    def val_dataloader(self) -> StackedBatches:
        return StackedBatches([dm.val_dataloader() for dm in self._members()])

    def gather(self, index: torch.Tensor) -> torch.Tensor:
        """The training images of a chunk's batch by their indices (n,) into the shared split,
        or (J, n) one per job, converted (and binarized) as the batches are."""
        if self.shared:
            return self.jobs[0].datamodule.gather(index)[0]
        x = torch.stack([to_unit_float(job.datamodule.splits["train"][0][index[j]])
                         for j, job in enumerate(self.jobs)])  # fmt: skip
        return self._binarized(x)

    def _binarized(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic:
            return x
        return torch.stack([torch.bernoulli(x[j], generator=job.generator)
                            for j, job in enumerate(self.jobs)])  # fmt: skip

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        training = self.trainer is not None and self.trainer.training and self._train is not None
        if isinstance(batch, torch.Tensor):  # a chunk's indices: the stack gathers each batch
            if training:
                self._train.mark_consumed(math.ceil(batch.shape[-1] / self.batch_size))
            return batch
        x, y = batch
        if training:
            self._train.mark_consumed()  # this batch goes to a training step now
        return self._binarized(to_unit_float(x)), y


# --- what each job's folder receives -------------------------------------------------------------


class JobLogger(Logger):
    """A job's own loggers, given the job's ``job<j>/`` metrics under their own names (and
    the job's hyper-parameters, not the stack's)."""

    def __init__(self, prefix: str, loggers: Sequence[Logger], hparams: dict[str, Any]) -> None:
        super().__init__()
        self.prefix, self.loggers, self.job_hparams = prefix, list(loggers), hparams

    @property
    def name(self) -> str:
        return self.loggers[0].name if self.loggers else "job"

    @property
    def version(self) -> Any:
        return self.loggers[0].version if self.loggers else 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        own = {k[len(self.prefix) :]: v for k, v in metrics.items() if k.startswith(self.prefix)}
        if own and "epoch" in metrics:
            own["epoch"] = metrics["epoch"]
        for logger in self.loggers if own else ():
            logger.log_metrics(own, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        for logger in self.loggers:
            logger.log_hyperparams(self.job_hparams)

    def save(self) -> None:
        for logger in self.loggers:
            logger.save()

    def finalize(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)


class StackedCollapse(L.Callback):
    """Each job's ``PosteriorCollapse`` statistics at each validation end, as it takes them
    alone: the KL per latent dimension and the variance of mu over the validation set, in the
    job's own dimensions; ``job<j>/val/active_units`` and its ``collapse/kl_dim_<d>`` scalars."""

    def __init__(self, jobs: Sequence[Job], loggers: Sequence[JobLogger]) -> None:
        self.jobs, self.loggers = list(jobs), list(loggers)
        self._moments: list[LatentMoments] | None = None

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Stack) -> None:
        self._moments = None if trainer.sanity_checking else [LatentMoments() for _ in self.jobs]

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: Stack, outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:  # fmt: skip
        if self._moments is None:
            return
        mu, logvar = pl_module.encode(batch[0])  # (J, B, d_max) each
        kl = gaussian_kl(mu, logvar)
        for j, moments in enumerate(self._moments):
            d = pl_module.latent_dims[j]
            moments.update(mu[j, :, :d], kl[j, :, :d])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: Stack) -> None:
        if self._moments is None:
            return
        for j, (job, moments) in enumerate(zip(self.jobs, self._moments, strict=True)):
            collapse = job.collapse
            if not pl_module.alive[j] or collapse is None or moments.n == 0:
                continue
            var = moments.mu_variance()
            collapse.active = active_units(var, collapse.threshold)
            collapse.kl_per_dim = moments.kl_per_dim().tolist()
            collapse.mu_variance = var.tolist()
            pl_module.log(f"job{j}/val/active_units", float(collapse.active))
            scalars = {f"job{j}/collapse/kl_dim_{d:02d}": kl
                       for d, kl in enumerate(collapse.kl_per_dim)}  # fmt: skip
            self.loggers[j].log_metrics(scalars, trainer.global_step)
        self._moments = None


class JobCheckpoints(AtomicCheckpointIO):
    """Checkpoints of the stack's Trainer, written as each job's own (atomically).

    Lightning dumps the stack's checkpoint (its loop state is every job's: they train the same
    batches); a checkpoint saved into a job's ``checkpoints/`` (that job's ModelCheckpoint) is
    written as that job's alone would be, and one saved to ``stack_path`` (a stop on a signal)
    as every live job's ``last.ckpt``."""

    def __init__(self, group: Group, stack_path: Path) -> None:
        super().__init__()
        self.group, self.stack_path = group, Path(stack_path)

    def save_checkpoint(self, checkpoint: dict, path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        if path == self.stack_path:
            targets = [
                (j, job.output_dir / "checkpoints" / "last.ckpt")
                for j, job in enumerate(self.group.jobs)
                if self.group.stack.alive[j]
            ]
        else:
            targets = [(self.group.job_of(path), path)]  # fmt: skip
        for j, target in targets:
            if self.group.stack.alive[j]:  # never the weights of a job that left the stack
                own = self.group.job_checkpoint(checkpoint, j)
                super().save_checkpoint(own, target, storage_options)


class Group:
    """The jobs of one stack, the stack, and how each job's checkpoint is cut out of it."""

    def __init__(self, jobs: Sequence[Job], stack: Stack) -> None:
        self.jobs, self.stack = list(jobs), stack
        self.t_start = time.perf_counter()
        self.dropped: list[int] = []
        self.trainer: L.Trainer | None = None
        self._own_callbacks: dict[int, list[Any]] = {}

    def job_of(self, path: Path) -> int:
        for j, job in enumerate(self.jobs):
            if path.resolve().is_relative_to(job.output_dir.resolve()):
                return j
        raise ValueError(f"{path} is in no job's folder")

    def job_checkpoint(self, checkpoint: dict[str, Any], j: int) -> dict[str, Any]:
        """Job ``j``'s checkpoint as its own run would have saved it at this point."""
        job, stack = self.jobs[j], self.stack
        model = stack.unstack(j)
        state = stack.job_state(j)
        own = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        own["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        own["optimizer_states"] = [stack.adam_state(j, model, self.trainer.optimizers[0])]
        own["lr_schedulers"] = []
        own.update(hparams_name="kwargs", hyper_parameters=dict(model.hparams))
        own.update(datamodule_hparams_name="kwargs",
                   datamodule_hyper_parameters=dict(job.datamodule.hparams))  # fmt: skip
        own["callbacks"] = self._callback_states(j)
        own["vae_lightning"] = {
            "model_class": type(model).__name__,
            "step": {"epoch_means": state["epoch_means"], "kind": state["kind"]},
            "dataset": job.datamodule.dataset_name,
            "fused": {"jobs": len(self.jobs),
                      "fit_share_s": (time.perf_counter() - self.t_start) / len(self.jobs)},
        }  # fmt: skip
        if "code_stats" in state:
            own["vae_lightning"]["code_stats"] = state["code_stats"]
        return own

    def _callback_states(self, j: int) -> dict[str, Any]:
        """The states of job ``j``'s callbacks under the names its own run gives them."""
        job = self.jobs[j]
        states: dict[str, Any] = {job.history.state_key.split("[")[0]: job.history.state_dict()}
        for cb in job.callbacks:
            if isinstance(cb, ModelCheckpoint):  # the stack's copy, monitoring job<j>/val/loss
                state = self._own_callbacks[j][0].state_dict()
                states[cb.state_key] = {**state, "monitor": cb.monitor}
            elif cb.state_dict():
                states[cb.state_key] = cb.state_dict()
        g = job.generator
        if g.device.type == "cuda":
            cuda = torch.cuda.get_rng_state_all()
            cuda[g.device.index or 0] = g.get_state()
            states["ExactResume"] = {"torch_rng": torch.get_rng_state(), "cuda_rng": cuda}
        else:
            states["ExactResume"] = {"torch_rng": g.get_state(), "cuda_rng": []}
        return states

    def callbacks(self) -> list[L.Callback]:
        """Each job's callbacks that apply to the stack, reading its ``job<j>/`` metrics."""
        out: list[L.Callback] = []
        share = 1.0 / len(self.jobs)
        for j, job in enumerate(self.jobs):
            job.history = History(job.output_dir / "history.csv", f"job{j}/", share)
            own: list[Any] = [job.history]
            cb = job.checkpoint
            if cb is not None:
                own.insert(0, ModelCheckpoint(
                    dirpath=cb.dirpath, filename=cb.filename, monitor=f"job{j}/{cb.monitor}",
                    mode=cb.mode, save_top_k=cb.save_top_k, save_last=cb.save_last,
                    auto_insert_metric_name=cb.auto_insert_metric_name,
                ))  # fmt: skip
            self._own_callbacks[j] = own
            out += own
        return out

    def drop(self, j: int) -> None:
        """Job ``j`` left the stack (a non-finite loss): its callbacks stop with it; it goes on
        alone from its last good checkpoint."""
        log.warning("job %s: non-finite loss; it leaves the stack and goes on alone from its "
                    "last checkpoint", self.jobs[j].output_dir)  # fmt: skip
        self.dropped.append(j)
        if self.trainer is not None:
            for cb in self._own_callbacks.get(j, []):
                if cb in self.trainer.callbacks:
                    self.trainer.callbacks.remove(cb)


def train_group(
    cfgs: Sequence[DictConfig], output_dirs: Sequence[Path], pending: Sequence[int] = ()
) -> list[int]:
    """Train ``cfgs`` (resolved job configs of one group, with their run folders) as one stack,
    every epoch, each job's folder receiving its history, TensorBoard scalars and checkpoints.
    Returns the jobs that left the stack (non-finite loss), which the launcher runs alone;
    raises ``RunInterrupted`` on SIGTERM/SIGINT once every job's last.ckpt is saved (at once
    when ``pending`` holds a signal that came while the jobs were being built)."""
    device = stack_device(cfgs[0].trainer)
    jobs = [build_job(c, d, device) for c, d in zip(cfgs, output_dirs, strict=True)]
    # the jobs' own step: in chunks when it is the fast one (their runs then continue the
    # stack's checkpoints with it)
    name, fast = resolve_step(cfgs[0].get("step"), "cuda" if device.type == "cuda" else "cpu")
    chunk = int(fast.get("chunk", 16)) if name == "fast" else 1
    stack = Stack([job.model for job in jobs], [job.generator for job in jobs], chunk=chunk,
                  cuda_graph=bool(fast.get("cuda_graph", True)))  # fmt: skip
    group = Group(jobs, stack)
    stack.on_drop = group.drop
    loggers = [JobLogger(f"job{j}/", job.loggers, dict(job.model.hparams))
               for j, job in enumerate(jobs)]  # fmt: skip
    stack_path = jobs[0].output_dir.parent / f".stack-{jobs[0].output_dir.name}.ckpt"
    signals = StopOnSignal(stack_path)
    callbacks: list[L.Callback] = [signals, *group.callbacks()]
    if any(job.collapse is not None for job in jobs):
        callbacks.append(StackedCollapse(jobs, loggers))
    trainer_cfg = cfgs[0].trainer
    limits = {k: trainer_cfg[k] for k in TRAINER_KEYS if trainer_cfg.get(k) is not None}
    # a stack in chunks: the loaders apply limit_train_batches, in batches
    train_limit = limits.pop("limit_train_batches", 1.0) if chunk > 1 else 1.0
    if trainer_cfg.get("enable_progress_bar", True):
        callbacks += [cb for cb in jobs[0].callbacks if isinstance(cb, ProgressBar)]
    trainer = L.Trainer(
        accelerator="cuda" if device.type == "cuda" else "cpu", devices=1,
        callbacks=callbacks, logger=loggers if any(job.loggers for job in jobs) else False,
        plugins=[JobCheckpoints(group, stack_path)],
        num_sanity_val_steps=0,  # its draws would come from the jobs' own generators
        default_root_dir=str(jobs[0].output_dir), **limits,
    )  # fmt: skip
    group.trainer = trainer
    # each job's W&B run of the stack's training is finished here; its end of fit opens another
    with signals, finished_at_end([logger for job in jobs for logger in job.loggers]):
        if pending:
            signals.received = pending[0]
        data = StackedData(jobs, chunk, train_limit)
        trainer.fit(stack, datamodule=data)
    return sorted(group.dropped)
