"""Several models of one kind trained as one: a sweep's jobs stacked along a leading axis, as one
LightningModule that an ordinary Trainer drives.

A sweep over ``beta``, ``latent_dim`` and ``seed`` trains models that differ only in those
values. ``Stack`` holds the jobs' parameters as stacked tensors (job j at index j), runs their
maths (``model.terms``, the same function one model runs) with ``torch.func.vmap`` over the
stack, and is updated by one Adam: Adam is elementwise, so Adam on stacked tensors is one Adam
per job, and the gradient of the sum of the jobs' objectives is each job's own gradient.

A job whose ``latent_dim`` is below the stack's largest is padded into it: its own weights sit
in the first ``latent_dim`` rows of each latent block of the encoder's last layer and the first
columns of the decoder's first layer, the rest is zero, and so is its noise in the unused
dimensions. Those dimensions are then exactly zero in mu, logvar and z, their KL is exactly 0,
and every gradient that reaches their weights is exactly 0: they stay zero, and the job's maths
is that of the job alone, with no mask in it.

Each job keeps its own initialisation (it is built alone, from its own seed), its own batches
(a batch per job, ``(J, B, C, H, W)``, or one for all when they share their data), its own noise
(drawn by its own generator, ``generators[j]``, at its own size, in the order the job alone
draws it) and its own Adam state. A job whose loss turns non-finite leaves the stack's
objective (``alive``); the others train on untouched. ``unstack(j)`` gives job j back as an
ordinary model of its own size, and ``job_state(j)`` what its checkpoint needs besides:
what the sweep writes into each job's folder is ``sweeps.fused``'s business.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.func import functional_call, stack_module_state, vmap

from vae_lightning.errors import ConfigError
from vae_lightning.models import Autoencoder
from vae_lightning.models.ae import CodeMoments
from vae_lightning.training.chunks import ChunkRunner, adam
from vae_lightning.training.step import EpochMeans

log = logging.getLogger(__name__)

# the hyper-parameters in which the jobs of one stack may differ (seed: through initialisation,
# batches and noise, which the caller gives); every other one must be equal
STACKABLE = ("latent_dim", "beta")


def _blocks(
    small: Sequence[int], big: Sequence[int], d: int, d_max: int
) -> list[tuple[tuple[slice, ...], tuple[slice, ...]]]:
    """Where a job's tensor (shape ``small``, at ``latent_dim`` d) sits in the stack's (shape
    ``big``, at ``d_max``): (index in big, index in small) pairs. Along every axis where the
    shapes differ, the axis holds k latent blocks (k = 1: z; k = 2: mu and logvar), and block c
    of size d sits at the start of block c of size d_max."""
    axes: list[list[tuple[slice, slice]]] = []
    for n_small, n_big in zip(small, big, strict=True):
        if n_small == n_big:
            axes.append([(slice(None), slice(None))])
            continue
        k = n_big // d_max
        if n_big != k * d_max or n_small != k * d:
            raise ConfigError("model", f"cannot stack a tensor of shape {tuple(small)}")
        axes.append(
            [(slice(c * d_max, c * d_max + d), slice(c * d, (c + 1) * d)) for c in range(k)]
        )
    pairs: list[tuple[tuple[slice, ...], tuple[slice, ...]]] = [((), ())]
    for choices in axes:
        pairs = [((*b, bs), (*s, ss)) for b, s in pairs for bs, ss in choices]
    return pairs


def _check_stackable(models: Sequence[Autoencoder]) -> list[dict[str, Any]]:
    """The jobs' hyper-parameters, checked to differ only in ``STACKABLE`` ones."""
    if not models:
        raise ConfigError("models", "must hold at least one model to stack")
    first, hparams = models[0], [dict(m.hparams) for m in models]
    for hp, m in zip(hparams, models, strict=True):
        differs = sorted(
            k for k in {*hp, *hparams[0]} - set(STACKABLE) if hp.get(k) != hparams[0].get(k)
        )
        if type(m) is not type(first) or differs:
            raise ConfigError(
                "model",
                f"cannot stack a {type(m).__name__} with {', '.join(differs) or 'its class'} "
                f"different from the first job's {type(first).__name__}: only "
                f"{', '.join(STACKABLE)} (and seed) may differ within a stack",
            )
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in first.modules()):
        # under vmap a training-mode BatchNorm cannot update its running statistics
        raise ConfigError("model", "cannot stack a model with BatchNorm (batchnorm=true)")
    return hparams


class _Encode(torch.nn.Module):
    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.encode(x)


class Stack(L.LightningModule):
    """``models`` (one class, equal hyper-parameters but ``STACKABLE`` ones) as one module.

    ``terms(xs, noise)`` gives every job's loss terms, each a (J,) tensor; ``training_step``
    sums the live jobs' objectives for Lightning's backward and Adam step, and logs each job's
    values under ``job<j>/``: ``job<j>/train/loss_step`` at the steps where Lightning writes
    step metrics, the epoch means ``job<j>/train/<term>`` and ``job<j>/val/<term>``.
    ``generators``: each job's noise (default: seeded 0, 1, ...). ``on_drop(j)``: called when
    job j's loss turns non-finite and it leaves the stack. ``chunk`` > 1: ``chunk`` optimizer
    steps per Lightning step, as the fast step takes them (``chunks.ChunkRunner``; a full
    chunk in one CUDA graph on a GPU with ``cuda_graph``), on the indices of the jobs' batches
    that the DataModule hands over (its ``gather`` makes the batches).
    """

    def __init__(
        self,
        models: Sequence[Autoencoder],
        generators: Sequence[torch.Generator] | None = None,
        on_drop: Callable[[int], None] | None = None,
        chunk: int = 1,
        cuda_graph: bool = True,
    ) -> None:
        super().__init__()
        self.chunk, self.cuda_graph = chunk, cuda_graph
        self.automatic_optimization = chunk == 1
        self.runner: ChunkRunner | None = None
        self.hparams_of = _check_stackable(models)
        self.kind = type(models[0])
        self.latent_dims = [m.latent_dim for m in models]
        self.d_max = max(self.latent_dims)
        template = self.kind(**{**self.hparams_of[0], "latent_dim": self.d_max})
        self.base = [copy.deepcopy(template).to("meta")]  # in a list: not a submodule
        params, buffers = stack_module_state([self._padded(m, template) for m in models])
        self._names = {name: name.replace(".", "__") for name in [*params, *buffers]}
        for name, value in params.items():
            self.register_parameter(self._names[name], torch.nn.Parameter(value.detach()))
        for name, value in buffers.items():
            self.register_buffer(self._names[name], value)
        self._param_names, self._buffer_names = list(params), list(buffers)
        beta = [float(hp.get("beta", 0.0)) for hp in self.hparams_of]
        self.register_buffer("beta", torch.tensor(beta))
        self.alive = [True] * len(models)
        self.generators = list(generators or [torch.Generator().manual_seed(j)
                                              for j in range(len(models))])  # fmt: skip
        self.on_drop = on_drop
        self.means = EpochMeans()
        self.codes: CodeMoments | None = None  # the AE's codes of this epoch, per job
        self.lr, self.fused_adam = models[0].lr, bool(models[0].hparams.fused_adam)
        self._vmapped = vmap(self._one, randomness="error")
        # every job on the same batch: it is not copied per job, and the first layer is one
        # matrix product for all of them
        self._vmapped_shared = vmap(self._one, in_dims=(0, 0, None, 0, 0), randomness="error")
        encoder = _Encode(self.base[0])  # functional_call runs forward: encode as forward
        self._encode = vmap(lambda p, b, x: functional_call(encoder, {
            **{f"model.{k}": v for k, v in p.items()},
            **{f"model.{k}": v for k, v in b.items()}}, (x,)))  # fmt: skip

    def __len__(self) -> int:
        return len(self.latent_dims)

    # --- the stacked maths ---------------------------------------------------------------------
    def _padded(self, model: Autoencoder, template: Autoencoder) -> Autoencoder:
        big = copy.deepcopy(template)
        d = model.latent_dim
        with torch.no_grad():
            own = dict(model.named_parameters()) | dict(model.named_buffers())
            for name, target in [*big.named_parameters(), *big.named_buffers()]:
                target.zero_()
                source = own[name].detach().cpu()
                for in_big, in_small in _blocks(source.shape, target.shape, d, self.d_max):
                    target[in_big] = source[in_small]
        return big

    def stacked(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The stacked parameters and buffers by the model's own names, job j at index j."""
        get = lambda n: getattr(self, self._names[n])  # noqa: E731
        return ({n: get(n) for n in self._param_names}, {n: get(n) for n in self._buffer_names})

    def _one(self, params: dict, buffers: dict, x, noise, beta) -> dict[str, torch.Tensor]:
        knobs = {"beta": beta, "eps": noise} if self.kind.variational else {"beta": beta}
        out = functional_call(self.base[0], (params, buffers), (x,), knobs)
        # the batch means, and the AE's codes (its sampling Gaussian is fitted to them)
        return {k: v for k, v in out.items() if v.ndim == 0 or k == "z"}

    def shared(self, xs: torch.Tensor) -> bool:
        """Whether ``xs`` is one batch for every job (B, C, H, W), not one per job."""
        return xs.dim() == len(self.hparams_of[0]["in_shape"]) + 1

    def terms(self, xs: torch.Tensor, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every job's loss terms, each (J,), for ``xs`` (J, B, C, H, W): a batch per job, or
        (B, C, H, W): one batch for all; ``noise`` (J, B, d_max) from ``draw_noise`` (None for
        the AE, which draws none)."""
        if noise is None:
            batch = xs.size(0) if self.shared(xs) else xs.size(1)
            noise = torch.zeros(len(self), batch, self.d_max, device=xs.device)
        run = self._vmapped_shared if self.shared(xs) else self._vmapped
        return run(*self.stacked(), xs, noise, self.beta)

    def draw_noise(self, batch: int) -> torch.Tensor | None:
        """eps for one batch per job, each from its job's generator at its own size (B,
        latent_dim), as the job alone would draw it; padded to d_max. None for the AE."""
        if not self.kind.variational:
            return None
        noise = torch.zeros(len(self), batch, self.d_max, device=self.beta.device)
        for j, (g, d) in enumerate(zip(self.generators, self.latent_dims, strict=True)):
            noise[j, :, :d] = torch.randn(batch, d, generator=g, device=g.device).to(noise)
        return noise

    @torch.no_grad()
    def encode(self, xs: torch.Tensor) -> Any:
        """Every job's ``encode`` of its own batch (VAEs: mu and logvar, each (J, B, d_max);
        a padded job's unused dimensions are zero); ``xs`` as for ``terms``."""
        if self.shared(xs):
            xs = xs.expand(len(self), *xs.shape)
        return self._encode(*self.stacked(), xs)

    # --- Lightning's hooks ---------------------------------------------------------------------
    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = list(self.stacked()[0].values())
        if self.chunk > 1:
            return adam(params, self.lr, self.fused_adam, self.uses_graph())
        return torch.optim.Adam(params, lr=self.lr, fused=self.fused_adam or None)

    def uses_graph(self) -> bool:
        """Whether full chunks are captured: on CUDA, unless the jobs are AEs (their codes'
        moments are host work)."""
        on_cuda = self.beta.device.type == "cuda"
        return self.chunk > 1 and self.cuda_graph and on_cuda and "code_mean" not in self._names

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch_idx == 0:  # a new epoch
            self.means.reset("train")
            self.codes = CodeMoments() if "code_mean" in self._buffer_names else None
        if self.chunk > 1:
            return self._chunk_step(batch, batch_idx)
        xs, _ = batch
        n = xs.size(0) if self.shared(xs) else xs.size(1)
        out = self.terms(xs, self.draw_noise(n))
        objective = out.get("objective", out["loss"])  # (J,)
        trainer = self._trainer
        if xs.device.type == "cpu" or (self.global_step + 1) % trainer.log_every_n_steps == 0:
            self._drop_non_finite(objective)  # on an accelerator: at logging steps only
        scalars = {k: v for k, v in out.items() if v.ndim == 1}
        self.means.add("train", scalars, n)
        if self.codes is not None:
            self.codes.update(out["z"])  # (J, B, d_max)
        if (self.global_step + 1) % trainer.log_every_n_steps == 0:
            self._log_jobs({"train/loss_step": out["loss"]}, on_step=True)
        if batch_idx == trainer.num_training_batches - 1:
            self._log_jobs({f"train/{k}": v for k, v in self.means.pop("train").items()})
        alive = torch.tensor(self.alive, device=objective.device)
        return torch.where(alive, objective, torch.zeros_like(objective)).sum()

    def _chunk_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        """A chunk of the jobs' batches (their indices (J, n), or (n,) when shared): the steps
        by the chunk runner; then the jobs it found non-finite leave, Lightning counts a step
        per batch, and the jobs' values are logged as ``training_step`` logs them."""
        trainer, data = self._trainer, self._trainer.datamodule
        if self.runner is None:
            self.runner = ChunkRunner(self.chunk, self.uses_graph(), self.generators)
            self._alive = torch.tensor(self.alive, device=self.beta.device)
        batches = list(batch.split(data.batch_size, dim=-1))
        result = self.runner.run(self._step_fn(data), batches, None)
        self.means.add_sums("train", result.sums, result.images, result.keys)
        bad = result.first_bad.tolist()  # the chunk's one host synchronisation
        self._drop_non_finite(torch.tensor([math.nan if b >= 0 else 0.0 for b in bad]))
        self._alive.copy_(torch.tensor(self.alive))
        optimizer, start = self.optimizers(), self.global_step
        for _ in batches:
            optimizer.step()
        logged = [k for k in range(len(batches)) if (start + k + 1) % trainer.log_every_n_steps
                  == 0]  # fmt: skip
        if logged:
            self._log_jobs({"train/loss_step": result.losses[logged[-1]]}, on_step=True)
        if batch_idx == trainer.num_training_batches - 1:
            self._log_jobs({f"train/{k}": v for k, v in self.means.pop("train").items()})

    def _step_fn(self, data: Any):
        """One step of every job on its batch: the terms, the live jobs' objectives' backward,
        one Adam step for the stack."""
        optimizer = self._trainer.optimizers[0].adam

        def step(index: torch.Tensor, beta: Any, k: int) -> dict[str, torch.Tensor]:
            xs = data.gather(index)  # (B, ...) for all jobs, or (J, B, ...) one per job
            out = self.terms(xs, self.draw_noise(index.shape[-1]))
            objective = out.get("objective", out["loss"])  # (J,)
            if self.codes is not None:
                self.codes.update(out["z"])  # (J, B, d_max)
            optimizer.zero_grad(set_to_none=True)
            torch.where(self._alive, objective, torch.zeros_like(objective)).sum().backward()
            optimizer.step()
            return {k: v for k, v in out.items() if v.ndim == 1}

        return step

    def on_train_epoch_end(self) -> None:
        fitted = self.codes.fit() if self.codes is not None else None
        if fitted is not None:  # each AE's sampling Gaussian, fitted to its epoch's codes
            mean, cov = fitted
            getattr(self, self._names["code_mean"]).copy_(mean)
            getattr(self, self._names["code_cov"]).copy_(cov)
        self.codes = None

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        xs, _ = batch
        n = xs.size(0) if self.shared(xs) else xs.size(1)
        out = self.terms(xs, self.draw_noise(n))
        self.means.add("val", {k: v for k, v in out.items() if v.ndim == 1}, n)

    def on_validation_epoch_end(self) -> None:
        self._log_jobs({f"val/{k}": v for k, v in self.means.pop("val").items()})

    def _log_jobs(self, values: dict[str, torch.Tensor], on_step: bool = False) -> None:
        """Each live job's values (each (J,)) under ``job<j>/``, as the job alone logs them."""
        for j in (j for j, alive in enumerate(self.alive) if alive):
            self.log_dict({f"job{j}/{k}": v[j] for k, v in values.items()},
                          on_step=on_step, on_epoch=not on_step)  # fmt: skip

    def _drop_non_finite(self, objective: torch.Tensor) -> None:
        bad = [j for j in (~torch.isfinite(objective)).nonzero().flatten().tolist()
               if self.alive[j]]  # fmt: skip
        for j in bad:
            log.warning("job %d of the stack: non-finite loss at step %d; it leaves the stack",
                        j, self.global_step)  # fmt: skip
            self.alive[j] = False
            if self.on_drop is not None:
                self.on_drop(j)
        if bad and not any(self.alive):
            self.trainer.should_stop = True

    # --- one job, cut out of the stack -----------------------------------------------------------
    def unstack(self, j: int) -> Autoencoder:
        """Job ``j`` as an ordinary model of its own ``latent_dim``, with its trained weights."""
        model = self.kind(**self.hparams_of[j])
        d, (params, buffers) = self.latent_dims[j], self.stacked()
        state = {}
        with torch.no_grad():
            for name, own in [*model.named_parameters(), *model.named_buffers()]:
                stacked = {**params, **buffers}[name][j].detach()
                cut = torch.empty_like(own)
                for in_big, in_small in _blocks(own.shape, stacked.shape, d, self.d_max):
                    cut[in_small] = stacked[in_big].to(cut)
                state[name] = cut
        model.load_state_dict(state)
        return model

    def adam_state(self, j: int, model: Autoencoder, optimizer: torch.optim.Optimizer) -> dict:
        """Job ``j``'s Adam state as ``torch.optim.Adam(model.parameters()).state_dict()`` of
        the job alone would hold it (``model``: ``unstack(j)``; ``optimizer``: the stack's)."""
        group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
        names = [name for name, _ in model.named_parameters()]
        params, d = self.stacked()[0], self.latent_dims[j]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for i, (name, own) in enumerate(model.named_parameters()):
            stacked = optimizer.state.get(params[name])
            if not stacked:
                continue
            cut: dict[str, torch.Tensor] = {}
            for key, value in stacked.items():
                if key == "step":
                    cut[key] = value.detach().clone().cpu()
                    continue
                piece = torch.empty_like(own, device="cpu")
                for in_big, in_small in _blocks(own.shape, value.shape[1:], d, self.d_max):
                    piece[in_small] = value[j][in_big].detach().cpu()
                cut[key] = piece
            state[i] = cut
        return {"state": state, "param_groups": [{**group, "params": list(range(len(names)))}]}

    def job_state(self, j: int) -> dict[str, Any]:
        """What job ``j``'s own run would hold besides its weights: its partial epoch's means
        and (an AE) codes' moments, in the forms ``AutomaticStep`` and ``AE`` save them."""
        state: dict[str, Any] = {"epoch_means": {}, "kind": "fast" if self.chunk > 1 else
                                 "automatic"}  # fmt: skip
        for stage, acc in self.means.state_dict().items():
            state["epoch_means"][stage] = {**acc, "sums": acc["sums"][:, j].detach().cpu()}
        if self.codes is not None and self.codes.total is not None:
            d = self.latent_dims[j]
            total, outer, n = self.codes.state()
            state["code_stats"] = [total[j, :d], outer[j, :d, :d], n]
        return state
