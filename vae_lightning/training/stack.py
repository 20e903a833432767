"""Several models of one kind trained as one: a sweep's jobs stacked along a leading axis.

A sweep over ``beta``, ``latent_dim`` and ``seed`` trains models that differ only in those
values. ``Stack`` holds the jobs' parameters as stacked tensors (job j at index j), runs their
maths (``model.terms``, the same function one model runs) with ``torch.func.vmap`` over the
stack, and updates them with one Adam: Adam is elementwise, so Adam on stacked tensors is one
Adam per job. A job whose ``latent_dim`` is below the stack's largest is padded into it: its own
weights sit in the first ``latent_dim`` rows of each latent block of the encoder's last layer
and the first columns of the decoder's first layer, the rest is zero, and so is its noise in the
unused dimensions. Those dimensions are then exactly zero in mu, logvar and z, their KL is
exactly 0, and every gradient that reaches their weights is exactly 0: they stay zero, and the
job's maths is that of the job alone with no mask in it. Each job keeps its own initialisation
(it is built alone, from its own seed), its own batches, its own noise (drawn by its own
generator at its own size) and its own Adam state; ``unstack(j)`` returns job j as an ordinary
model of its own size.

This is the stacked maths; ``fused_group.py`` trains a sweep's group of jobs with it and
writes each one's run folder, and ``hydra_plugins/vae_lightning_fused`` is the Hydra launcher.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from vae_lightning.errors import ConfigError
from vae_lightning.models import Autoencoder

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


class _Encode(torch.nn.Module):
    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Any:
        return self.model.encode(x)


class Stack:
    """``models`` (one class, equal hyper-parameters but ``STACKABLE`` ones) as one stack.

    ``terms(xs, noise)`` gives every job's loss terms, each a (J,) tensor, for a batch per job
    (``xs``: (J, B, C, H, W)); ``step(xs, noise)`` also takes one Adam step for all of them.
    """

    def __init__(self, models: Sequence[Autoencoder], fused_adam: bool | None = None) -> None:
        if not models:
            raise ConfigError("models", "must hold at least one model to stack")
        first = models[0]
        self.kind = type(first)
        self.hparams = [dict(m.hparams) for m in models]
        for hp, m in zip(self.hparams, models, strict=True):
            differs = sorted(
                k for k in {*hp, *self.hparams[0]} - set(STACKABLE)
                if hp.get(k) != self.hparams[0].get(k)
            )  # fmt: skip
            if type(m) is not self.kind or differs:
                raise ConfigError(
                    "model",
                    f"cannot stack a {type(m).__name__} with {', '.join(differs) or 'its class'} "
                    f"different from the first job's {self.kind.__name__}: only "
                    f"{', '.join(STACKABLE)} (and seed) may differ within a stack",
                )
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in first.modules()):
            # under vmap a training-mode BatchNorm cannot update its running statistics
            raise ConfigError("model", "cannot stack a model with BatchNorm (batchnorm=true)")
        self.latent_dims = [m.latent_dim for m in models]
        self.d_max = max(self.latent_dims)
        template = self.kind(**{**self.hparams[0], "latent_dim": self.d_max})
        self.base = copy.deepcopy(template).to("meta")  # the structure functional_call runs
        padded = [self._padded(m, template) for m in models]
        params, buffers = stack_module_state(padded)
        device = first.device
        self.params = {k: v.to(device).detach().requires_grad_() for k, v in params.items()}
        self.buffers = {k: v.to(device) for k, v in buffers.items()}
        self.beta = torch.tensor([float(hp.get("beta", 0.0)) for hp in self.hparams], device=device)
        fused = first.hparams.fused_adam if fused_adam is None else fused_adam
        self.optimizer = torch.optim.Adam(
            list(self.params.values()), lr=first.lr, fused=bool(fused) or None
        )
        self._vmapped = vmap(self._one, randomness="error")
        # every job on the same batch (a grid over beta and latent_dim at one seed): the batch
        # is not copied per job, and the first layer is one matrix product for all of them
        self._vmapped_shared = vmap(self._one, in_dims=(0, 0, None, 0, 0), randomness="error")
        self._encoder = _Encode(self.base)  # functional_call runs forward: encode as forward
        self._encode = vmap(lambda p, b, x: functional_call(self._encoder, {
            **{f"model.{k}": v for k, v in p.items()},
            **{f"model.{k}": v for k, v in b.items()}}, (x,)))  # fmt: skip

    def __len__(self) -> int:
        return len(self.latent_dims)

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

    def _one(self, params: dict, buffers: dict, x, noise, beta) -> dict[str, torch.Tensor]:
        knobs = {"beta": beta, "eps": noise} if self.kind.variational else {"beta": beta}
        out = functional_call(self.base, (params, buffers), (x,), knobs)
        # the batch means, and the AE's codes (its sampling Gaussian is fitted to them)
        return {k: v for k, v in out.items() if v.ndim == 0 or k == "z"}

    def terms(self, xs: torch.Tensor, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every job's loss terms, each (J,), for ``xs`` (J, B, C, H, W): a batch per job, or
        (B, C, H, W): one batch for all; ``noise`` (J, B, d_max) from ``draw_noise`` (None for
        the AE, which draws none)."""
        shared = xs.dim() == len(self.hparams[0]["in_shape"]) + 1
        if noise is None:
            batch = xs.size(0) if shared else xs.size(1)
            noise = torch.zeros(len(self), batch, self.d_max, device=xs.device)
        run = self._vmapped_shared if shared else self._vmapped
        return run(self.params, self.buffers, xs, noise, self.beta)

    def step(self, xs: torch.Tensor, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One Adam step of every job on its own batch; their terms before the step, each (J,).
        The jobs are independent, so the gradient of the sum of their losses is each job's own
        gradient on its own parameters."""
        out = self.terms(xs, noise)
        self.optimizer.zero_grad(set_to_none=True)
        out.get("objective", out["loss"]).sum().backward()
        self.optimizer.step()
        return {k: v.detach() for k, v in out.items()}

    @torch.no_grad()
    def evaluate(self, xs: torch.Tensor, noise: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Every job's loss terms on its own batch, each (J,), without training."""
        return {k: v for k, v in self.terms(xs, noise).items() if v.ndim == 1}

    @torch.no_grad()
    def encode(self, xs: torch.Tensor) -> Any:
        """Every job's ``encode`` of its own batch (VAEs: mu and logvar, each (J, B, d_max);
        a padded job's unused dimensions are zero); ``xs`` as for ``terms``."""
        if xs.dim() == len(self.hparams[0]["in_shape"]) + 1:
            xs = xs.expand(len(self), *xs.shape)
        return self._encode(self.params, self.buffers, xs)

    def keep(self, jobs: Sequence[int]) -> None:
        """Go on with ``jobs`` only (indices into the stack), each with its Adam state: a job
        that failed leaves the others' maths untouched."""
        index = torch.tensor(list(jobs), device=self.beta.device)
        old = self.optimizer
        fresh = {k: v[index].detach().requires_grad_() for k, v in self.params.items()}
        self.optimizer = torch.optim.Adam(list(fresh.values()), **{
            k: v for k, v in old.param_groups[0].items() if k != "params"})  # fmt: skip
        for before, after in zip(self.params.values(), fresh.values(), strict=True):
            state = old.state.get(before)
            if state:
                self.optimizer.state[after] = {
                    k: (v[index].clone() if k != "step" else v.clone()) for k, v in state.items()
                }
        self.params = fresh
        self.buffers = {k: v[index] for k, v in self.buffers.items()}
        self.beta = self.beta[index]
        self.hparams = [self.hparams[j] for j in jobs]
        self.latent_dims = [self.latent_dims[j] for j in jobs]

    def adam_state(self, j: int, model: Autoencoder) -> dict[str, Any]:
        """Job ``j``'s Adam state as ``torch.optim.Adam(model.parameters()).state_dict()`` of
        the job alone would hold it (``model``: ``unstack(j)``)."""
        group = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        names = [name for name, _ in model.named_parameters()]
        state: dict[int, dict[str, torch.Tensor]] = {}
        d = self.latent_dims[j]
        for i, (name, own) in enumerate(model.named_parameters()):
            stacked = self.optimizer.state.get(self.params[name])
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

    def draw_noise(self, generators: Sequence[torch.Generator], batch: int) -> torch.Tensor | None:
        """eps for one batch per job, each from its job's generator at its own size (B,
        latent_dim), as the job alone would draw it; padded to d_max. None for the AE."""
        if not self.kind.variational:
            return None
        device = self.beta.device
        noise = torch.zeros(len(self), batch, self.d_max, device=device)
        for j, (g, d) in enumerate(zip(generators, self.latent_dims, strict=True)):
            noise[j, :, :d] = torch.randn(batch, d, generator=g, device=g.device).to(device)
        return noise

    def unstack(self, j: int) -> Autoencoder:
        """Job ``j`` as an ordinary model of its own ``latent_dim``, with its trained weights."""
        model = self.kind(**self.hparams[j])
        d = self.latent_dims[j]
        state = {}
        with torch.no_grad():
            for name, own in [*model.named_parameters(), *model.named_buffers()]:
                stacked = self.params.get(name, self.buffers.get(name))[j].detach()
                cut = torch.empty_like(own)
                for in_big, in_small in _blocks(own.shape, stacked.shape, d, self.d_max):
                    cut[in_small] = stacked[in_big]
                state[name] = cut
        model.load_state_dict(state)
        return model.to(self.beta.device)
