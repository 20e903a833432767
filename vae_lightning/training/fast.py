"""Several optimizer steps per Lightning step (``step=fast``): the same maths as
``AutomaticStep``, without a Lightning step, a batch transfer and a host synchronisation per
batch.

The training loader hands over ``chunk`` batches' indices at once (``data.IndexChunks``); for
each batch the step gathers the images from the split, which stays on the device as uint8,
converts (and binarizes) them, computes ``terms``, and takes one Adam step: batch size, losses,
learning-rate and KL schedules per step, and the epoch's last, short batch are those of one
Lightning step per batch. The epoch's sums are accumulated on the device (``EpochMeans``).

On a CUDA GPU (``cuda_graph=true``) a full chunk is captured once in a ``torch.cuda.CUDAGraph``
and replayed: the first full chunk runs eagerly on a side stream (its steps are real training,
and they create Adam's state and the autograd buffers), the second is captured and replayed,
every later one replayed. The graph reads static buffers that the step fills before each
replay: the batches' indices and the KL weights; the learning rate is a device tensor in Adam's
parameter groups (``capturable=True``), so a schedule changes it in place; the
reparameterisation noise comes from the CUDA generator, which the graph advances on each
replay. A chunk the graph does not fit (the epoch's last) runs eagerly. On the CPU every chunk
runs eagerly: the same body, which the tests compare with ``AutomaticStep``.

What Lightning sees: one training step per chunk, and an optimizer (``ChunkOptimizer``) that
holds Adam's parameter groups and state (checkpoints, schedulers and resume are Lightning's
own) and is stepped once per batch after the chunk, so ``trainer.global_step`` counts optimizer
steps as ever. A loss that is not finite stops the run (``NonFiniteLossError``): on the CPU
before the backward of its batch, on a GPU after its chunk, before any checkpoint is written.
A run stopped by a signal stops at a chunk boundary, and resumes exactly there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from vae_lightning.errors import ConfigError, NonFiniteLossError, check_int
from vae_lightning.training.schedules import lr_scheduler
from vae_lightning.training.step import AutomaticStep, scalars

if TYPE_CHECKING:
    from vae_lightning.models import Autoencoder

log = logging.getLogger(__name__)


class ChunkOptimizer(torch.optim.Optimizer):
    """The optimizer Lightning sees for a ``FastStep``: Adam's parameter groups and state (so
    the checkpoint holds Adam's, and a scheduler changes Adam's rate), stepped once per batch
    after the chunk that took the real steps. Its ``state_dict`` is the one a plain Adam saves
    (a float learning rate, not capturable), so checkpoints load under either step."""

    def __init__(self, adam: torch.optim.Optimizer) -> None:
        super().__init__([p for g in adam.param_groups for p in g["params"]], adam.defaults)
        self.adam = adam
        self.param_groups, self.state = adam.param_groups, adam.state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return closure() if closure is not None else None  # the chunk took the real step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the chunk zeroes the gradients of each of its steps."""

    def state_dict(self) -> dict[str, Any]:
        state = self.adam.state_dict()  # its per-parameter states are Adam's own: copied
        state["state"] = {i: dict(s) for i, s in state["state"].items()}
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
            group["capturable"] = False
        for param_state in state["state"].values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].detach().float().cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        capturable = self.adam.defaults.get("capturable", False)
        lr = [g["lr"] for g in self.adam.param_groups]
        self.adam.load_state_dict(state_dict)
        for group, old in zip(self.adam.param_groups, lr, strict=True):
            if torch.is_tensor(old):  # a graph reads the rate from its tensor: keep it
                old.fill_(float(group["lr"]))
                group["lr"] = old
            group["capturable"] = capturable
        if capturable:
            for param_state in self.adam.state.values():
                device = next(iter(v for v in param_state.values() if v.dim())).device
                param_state["step"] = param_state["step"].to(device)
        self.param_groups, self.state = self.adam.param_groups, self.adam.state


def _gather(dm: Any, index: torch.Tensor, conditional: bool) -> tuple[torch.Tensor, Any]:
    """A batch of the training split by its indices, converted as the DataModule converts it
    (float in [0, 1], a fresh Bernoulli draw with ``binarize=dynamic``); its labels."""
    images, labels = dm.splits["train"]
    x = images[index].float().div_(255.0)
    if dm.binarize == "dynamic":
        x = torch.bernoulli(x)
    return x, labels[index] if conditional else None


class FastStep(AutomaticStep):
    """``chunk`` optimizer steps per Lightning step, captured in one CUDA graph on a GPU
    (``cuda_graph``), eager on the CPU. See the module's docstring."""

    automatic_optimization = False
    kind = "fast"

    def __init__(self, chunk: int = 16, cuda_graph: bool = True) -> None:
        super().__init__()
        self.chunk = check_int("chunk", chunk, 1)
        if not isinstance(cuda_graph, bool):
            raise ConfigError("cuda_graph", f"must be true or false, got {cuda_graph!r}")
        self.cuda_graph = cuda_graph
        self.graph: ChunkGraph | None = None
        self._full_chunks = 0  # full chunks run so far (the first warms the graph up)
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
        eligible = plain and not model.hparams.compile and not _world()
        return self.cuda_graph and model.device.type == "cuda" and eligible

    def configure_optimizers(self, model: Autoencoder) -> Any:
        trained = [p for p in model.parameters() if p.requires_grad]
        fused = model.hparams.fused_adam or None
        if self.uses_graph(model):  # the rate as a device tensor the graph reads
            lr = torch.tensor(float(model.lr), device=model.device)
            adam = torch.optim.Adam(trained, lr=lr, fused=fused, capturable=True)
        else:
            adam = torch.optim.Adam(trained, lr=model.lr, fused=fused)
        optimizer = ChunkOptimizer(adam)
        trainer = model._trainer
        max_epochs = (trainer.max_epochs if trainer is not None else None) or 1
        scheduler = lr_scheduler(optimizer, self.scheduler, max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def schedule_lengths(self, trainer: Any) -> tuple[int, int]:
        return self._batches, self._batches * int(trainer.max_epochs or 1)

    # --- a chunk -------------------------------------------------------------------------------
    def training_step(self, model: Autoencoder, batch: Any, batch_idx: int) -> None:
        trainer, dm = model._trainer, model._trainer.datamodule
        self._batches = dm._train_loader.n_batches
        if _world() > 1:  # the chunk averages the gradients itself (_all_reduce_grads)
            trainer.strategy.model.require_backward_grad_sync = False
        if batch_idx == 0:  # a new epoch (a run resumed mid-epoch restored its partial sums)
            self.means.reset("train")
        batches = list(batch.split(dm.batch_size))  # the chunk's batches' indices
        weights = [self.kl_weight(model, k) for k in range(len(batches))]
        full = len(batches) == self.chunk and len(batches[-1]) == dm.batch_size
        if full and self.uses_graph(model):
            self._full_chunks += 1
            losses = self._graph_chunk(model, dm, batch, weights)
        else:
            losses = self._eager_chunk(model, dm, batches, weights)
        self._after_chunk(model, trainer, losses, weights, batch_idx)

    def _eager_chunk(self, model: Autoencoder, dm: Any, batches: list, weights: list) -> list:
        """The chunk's steps one after another: each batch's loss terms, backward, Adam."""
        adam = model._trainer.optimizers[0].adam
        losses = []
        for k, index in enumerate(batches):
            x, y = _gather(dm, index, model.conditional)
            knobs: dict[str, Any] = {"y": y} if model.conditional else {}
            if weights[k] is not None:
                knobs["beta"] = torch.tensor(weights[k], device=x.device)
            out = model.terms_fn(x, **knobs)
            model.observe(out)
            terms = scalars(out)
            objective = terms.get("objective", terms["loss"])
            if x.device.type == "cpu" and not torch.isfinite(objective):  # before its backward
                raise NonFiniteLossError.of(model._trainer, model._trainer.global_step + k,
                                            objective.item())  # fmt: skip
            adam.zero_grad(set_to_none=True)
            objective.backward()
            _all_reduce_grads(model)
            adam.step()
            self.means.add("train", terms, x.size(0))
            losses.append(terms["loss"].detach())
        return losses

    def _graph_chunk(self, model: Autoencoder, dm: Any, index: torch.Tensor, weights: list):
        """A full chunk by its CUDA graph: the first eagerly on a side stream (warm-up), the
        second captured, every one after replayed."""
        beta = [model.beta if w is None else w for w in weights]
        if self.graph is None:
            if self._full_chunks == 1:  # warm-up: real steps, on the stream it will capture on
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    batches = list(index.split(dm.batch_size))
                    losses = self._eager_chunk(model, dm, batches, weights)
                torch.cuda.current_stream().wait_stream(side)
                return losses
            keys = self.means._sums["train"][2]  # the terms' names, as the warm-up added them
            self.graph = ChunkGraph(model, dm, self.chunk, keys)
        sums, losses, first_bad = self.graph.run(index, beta)
        self.means.add_sums("train", sums, len(index), self.graph.keys)
        bad = int(first_bad.item())  # the chunk's one host synchronisation
        if bad >= 0:
            step = model._trainer.global_step + bad
            raise NonFiniteLossError.of(model._trainer, step)
        return list(losses)

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


def _world() -> int:
    """The processes of a distributed run (0: not distributed)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 0


def _all_reduce_grads(model: Autoencoder) -> None:
    """Under DDP, each gradient averaged over the processes, as DDP's reducer averages it (the
    chunk's steps run inside one call of DDP's forward: the step switches its reducer off)."""
    world = _world()
    if world < 2:
        return
    for p in model.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


class ChunkGraph:
    """A full chunk's steps captured in one CUDA graph: static buffers for the batches'
    indices and KL weights (filled before each replay), for the epoch's sums, the steps' losses
    and the first step whose objective was not finite (read after it)."""

    def __init__(self, model: Autoencoder, dm: Any, chunk: int, keys: tuple[str, ...]) -> None:
        device, size = model.device, dm.batch_size
        self.model, self.dm, self.chunk, self.keys = model, dm, chunk, keys
        self.adam = model._trainer.optimizers[0].adam
        self.index = torch.zeros(chunk, size, dtype=torch.long, device=device)
        self.beta = torch.zeros(chunk, device=device)
        self.sums = torch.zeros(len(keys), device=device)
        self.losses = torch.zeros(chunk, device=device)
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.graph: Any = None  # captured at the first run

    def run(self, index: torch.Tensor, beta: list[float]):
        """Replay the chunk on ``index`` (chunk * batch_size indices) with KL weights ``beta``
        (captured first): its sums of the terms, the losses of its steps, its first bad step."""
        self.index.copy_(index.view(self.chunk, -1))
        self.beta.copy_(torch.tensor(beta, dtype=self.beta.dtype))
        self.sums.zero_()
        self.first_bad.fill_(-1)
        if self.graph is None:  # capturing runs nothing: the replay below runs this chunk
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._body()
        self.graph.replay()
        return self.sums.clone(), self.losses.clone(), self.first_bad

    def _body(self) -> None:
        model, dm, size = self.model, self.dm, self.index.size(1)
        for k in range(self.chunk):
            x, y = _gather(dm, self.index[k], model.conditional)
            knobs: dict[str, Any] = {"beta": self.beta[k]}
            if model.conditional:
                knobs["y"] = y
            out = scalars(model.terms_fn(x, **knobs))
            objective = out.get("objective", out["loss"])
            bad = ~torch.isfinite(objective) & (self.first_bad < 0)
            self.first_bad.copy_(torch.where(bad, k, self.first_bad))
            self.adam.zero_grad(set_to_none=True)
            objective.backward()
            self.adam.step()
            self.sums.add_(torch.stack([out[key].detach() for key in self.keys]) * size)
            self.losses[k].copy_(out["loss"].detach())
