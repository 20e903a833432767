"""Several optimizer steps per Lightning step (``step.name=fast``): the same maths as
``AutomaticStep``, without a Lightning step, a batch transfer and a host synchronisation per
batch.

The training loader hands over ``chunk`` batches' indices at once (``data.IndexChunks``); for
each batch the step gathers the images from the split, which stays on the device as uint8,
converts (and binarizes) them as the DataModule does (``gather``), computes ``terms`` and takes
one Adam step: batch size, losses, learning-rate and KL schedules per step, and the epoch's
last, short batch are those of one Lightning step per batch. The epoch's sums are accumulated
on the device (``EpochMeans``). On a CUDA GPU (``cuda_graph=true``) a full chunk runs in one
CUDA graph (``chunks.ChunkRunner``); elsewhere, and for the chunk the graph does not fit (an
epoch's last), eagerly: the same step, which the tests compare with ``AutomaticStep``.

What Lightning sees: one training step per chunk, and a ``ChunkOptimizer`` stepped once per
batch after it, so ``trainer.global_step`` counts optimizer steps, and checkpoints (Adam's
state as a plain Adam saves it), schedulers and resume are Lightning's own. A loss that is not
finite stops the run (``NonFiniteLossError``): on the CPU before the backward of its batch, on
a GPU after its chunk, before any checkpoint is written. A run stopped by a signal stops at a
chunk boundary, and resumes exactly there. Under DDP each step averages the gradients over the
processes itself (as DDP does): DDP's reducer is switched off, the chunk's steps running
inside one call of DDP's forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vae_lightning.errors import ConfigError, NonFiniteLossError, check_int
from vae_lightning.training.chunks import ChunkRunner, adam
from vae_lightning.training.step import AutomaticStep, scalars

if TYPE_CHECKING:
    from vae_lightning.models import Autoencoder


class FastStep(AutomaticStep):
    """``chunk`` optimizer steps per Lightning step, a full chunk in one CUDA graph on a GPU
    (``cuda_graph``), eagerly on the CPU. See the module's docstring."""

    automatic_optimization = False
    kind = "fast"

    def __init__(self, chunk: int = 16, cuda_graph: bool = True) -> None:
        super().__init__()
        self.chunk = check_int("chunk", chunk, 1)
        if not isinstance(cuda_graph, bool):
            raise ConfigError("cuda_graph", f"must be true or false, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self.runner: ChunkRunner | None = None
        self._batches = 1  # training batches per epoch, as the DataModule cuts them

    # --- attaching ---------------------------------------------------------------------------
    def configure(self, model: Autoencoder) -> None:
        """When fit starts: the DataModule hands over chunks of batches' indices (and on an
        accelerator keeps its splits there); ``limit_train_batches`` goes with it, in batches."""
        super().configure(model)
        trainer = model._trainer
        if trainer is None or trainer.state.fn != "fit":  # a test or validation: as ever
            return
        dm = getattr(trainer, "datamodule", None)
        if dm is None or not hasattr(dm, "batches_per_step"):
            raise ConfigError(
                "step", "fast needs the framework's MNIST/Fashion-MNIST DataModule (in memory)"
            )
        dm.batches_per_step, dm.train_limit = self.chunk, trainer.limit_train_batches
        trainer.limit_train_batches = 1.0  # the loader applies it, in batches
        if trainer.strategy.root_device.type != "cpu":
            dm.on_device = True

    def uses_graph(self, model: Autoencoder) -> bool:
        """Whether full chunks are captured: on CUDA, for models whose steps hold no host
        work (not the AE's code moments, nor the VQ-VAE's codebook counts)."""
        from vae_lightning.models import Autoencoder as Base

        plain = type(model).observe is Base.observe and not hasattr(model, "quantizer")
        eligible = plain and not model.hparams.compile and not world()
        return self.cuda_graph and model.device.type == "cuda" and eligible

    def optimizer(self, model: Autoencoder, params: list[Tensor]) -> torch.optim.Optimizer:
        """Adam as Lightning sees it under chunks (its rate a device tensor for a graph)."""
        return adam(params, model.lr, model.hparams.fused_adam, self.uses_graph(model))

    def schedule_lengths(self, trainer: Any) -> tuple[int, int]:
        return self._batches, self._batches * int(trainer.max_epochs or 1)

    # --- a chunk -------------------------------------------------------------------------------
    def training_step(self, model: Autoencoder, batch: Any, batch_idx: int) -> None:
        trainer, dm = model._trainer, model._trainer.datamodule
        self._batches = dm._train_loader.n_batches
        if world() > 1:  # each step averages the gradients itself (all_reduce_grads)
            trainer.strategy.model.require_backward_grad_sync = False
        if batch_idx == 0:  # a new epoch (a run resumed mid-epoch restored its partial sums)
            self.means.reset("train")
        if self.runner is None:
            self.runner = ChunkRunner(self.chunk, self.uses_graph(model))
        batches = list(batch.split(dm.batch_size))  # the chunk's batches' indices
        weights = [self.kl_weight(model, k) for k in range(len(batches))]
        betas = [model.beta if w is None else w for w in weights] if model.variational else None
        result = self.runner.run(self._step_fn(model, dm), batches, betas)
        self.means.add_sums("train", result.sums, result.images, result.keys)
        # on the CPU each step checks its loss itself, before its backward; on a GPU, here:
        # the chunk's one host synchronisation
        bad = int(result.first_bad) if result.first_bad.is_cuda else -1
        if bad >= 0:
            raise NonFiniteLossError.of(trainer, trainer.global_step + bad)
        self._after_chunk(model, trainer, list(result.losses), weights, batch_idx)

    def _step_fn(self, model: Autoencoder, dm: Any):
        """One batch's step: its terms (with the KL weight ``beta``), backward, Adam."""
        optimizer = model._trainer.optimizers[0].adam

        def step(index: Tensor, beta: Tensor | None, k: int) -> dict[str, Tensor]:
            x, y = dm.gather(index)
            knobs: dict[str, Any] = {"y": y} if model.conditional else {}
            if beta is not None:
                knobs["beta"] = beta
            out = model.terms_fn(x, **knobs)
            model.observe(out)
            terms = scalars(out)
            objective = terms.get("objective", terms["loss"])
            if x.device.type == "cpu" and not torch.isfinite(objective):  # before its backward
                step_ = model._trainer.global_step + k
                raise NonFiniteLossError.of(model._trainer, step_, objective.item())
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            all_reduce_grads(model)
            optimizer.step()
            return terms

        return step

    def _after_chunk(
        self, model: Autoencoder, trainer: Any, losses: list, weights: list, batch_idx: int
    ) -> None:
        """Lightning's count of optimizer steps (one per batch), the step metrics, and at
        the epoch's last chunk its means, rate, KL weight and the schedulers' epoch step."""
        optimizer = model.optimizers()
        start = trainer.global_step
        for _ in losses:
            optimizer.step()
        every = trainer.log_every_n_steps
        logged = [k for k in range(len(losses)) if (start + k + 1) % every == 0]
        if logged:
            model.log("train/loss_step", losses[logged[-1]], prog_bar=True, on_step=True)
        if batch_idx == trainer.num_training_batches - 1:
            self.log_means(model, "train")
            if self.scheduler is not None:
                lr = float(trainer.optimizers[0].param_groups[0]["lr"])
                model.log("train/lr", lr, on_step=False, on_epoch=True)
            if weights[-1] is not None:
                model.log("train/beta", float(weights[-1]), on_step=False, on_epoch=True)
            self._step_schedulers(model, val_loss=None)

    def log_means(self, model: Autoencoder, stage: str) -> dict[str, torch.Tensor]:
        means = super().log_means(model, stage)
        if stage == "val" and "loss" in means and self.scheduler is not None:
            self._step_schedulers(model, val_loss=float(means["loss"]))
        return means

    def _step_schedulers(self, model: Autoencoder, val_loss: float | None) -> None:
        """Manual optimization steps no scheduler: each epoch's, as Lightning would (a plateau
        scheduler after the validation, on val/loss; the others at the end of the epoch)."""
        scheduler = model.lr_schedulers()
        plateau = isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if scheduler is None or plateau != (val_loss is not None):
            return
        scheduler.step(val_loss) if plateau else scheduler.step()


def world() -> int:
    """The processes of a distributed run (0: not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_grads(model: torch.nn.Module) -> None:
    """Under DDP, each gradient averaged over the processes, as DDP's reducer averages it."""
    n = world()
    if n < 2:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(n)
