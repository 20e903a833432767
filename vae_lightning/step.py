"""The step: what drives a model's maths each batch, kept apart from the maths itself.

A model (``models.py``) computes ``terms(x)``: a pure function of its parameters and a batch
(``torch.func.functional_call(model, params, (x,))`` returns the same dict). A step decides how
that function is run: ``AutomaticStep`` is Lightning's automatic optimization, one optimizer
step per batch. Faster steps (several optimizer steps per Lightning step in a CUDA graph; a
sweep's models stacked with ``vmap``) replace it by setting ``model.step`` without touching the
maths. Every step reports the same epoch means through ``EpochMeans``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from vae_lightning.models import Autoencoder


class EpochMeans:
    """Exact per-epoch means of the loss terms, accumulated on the device.

    Written here instead of ``self.log(on_epoch=True)`` per step: Lightning's ``self.log`` walks
    its result object on every call (~0.1 ms per key on a CPU), which made a third of an MLP
    epoch; one stacked add per step costs microseconds. Under DDP the sums and counts are
    reduced before dividing, so the mean over all processes is exact (not a mean of means).
    """

    def __init__(self) -> None:
        # stage -> (sums of the terms over the epoch's images (K,), image count, term names)
        self._sums: dict[str, tuple[torch.Tensor, int, tuple[str, ...]]] = {}

    def reset(self, stage: str) -> None:
        self._sums.pop(stage, None)

    def add(self, stage: str, terms: dict[str, torch.Tensor], n: int) -> None:
        """Add a batch of ``n`` images whose batch means are ``terms`` (0-dim tensors)."""
        values = torch.stack([v.detach() for v in terms.values()]) * n  # (K,) sums
        if stage not in self._sums:
            self._sums[stage] = (values, n, tuple(terms))
            return
        sums, count, keys = self._sums[stage]
        if sums.device != values.device:  # restored from a checkpoint onto the CPU
            sums = sums.to(values.device)
        self._sums[stage] = (sums + values, count + n, keys)

    def pop(self, stage: str, strategy: Any = None) -> dict[str, torch.Tensor]:
        """The epoch's means ``{name: mean}`` (reduced over processes), and forget them."""
        if stage not in self._sums:
            return {}
        sums, count, keys = self._sums.pop(stage)
        total = torch.tensor(float(count), device=sums.device)
        if strategy is not None:  # exact over processes: reduce sums and counts, then divide
            sums = strategy.reduce(sums, reduce_op="sum")
            total = strategy.reduce(total, reduce_op="sum")
        means = sums / total
        return {key: means[i] for i, key in enumerate(keys)}

    # the training epoch's partial sums travel in checkpoints: a run resumed mid-epoch reports
    # the same epoch mean as an uninterrupted one
    def state_dict(self) -> dict[str, Any]:
        return {
            stage: {"sums": sums, "count": count, "keys": list(keys)}
            for stage, (sums, count, keys) in self._sums.items()
            if stage == "train"
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for stage, acc in state.items():
            self._sums[stage] = (acc["sums"], int(acc["count"]), tuple(acc["keys"]))


class AutomaticStep:
    """Lightning's automatic optimization: ``terms`` of one batch, the loss handed back for
    Lightning's backward and optimizer step; epoch means logged as ``<stage>/<term>``."""

    def __init__(self) -> None:
        self.means = EpochMeans()

    def training_step(self, model: Autoencoder, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, C, H, W) float in [0, 1], converted on the device by the DataModule
        if batch_idx == 0:  # a new epoch (a run resumed mid-epoch restored its partial sums)
            self.means.reset("train")
        weight = model.kl_weight() if model.variational else None
        knobs = {"y": y} if model.conditional else {}
        if weight is not None:  # a tensor, so that a compiled terms is not recompiled each value
            knobs["beta"] = torch.tensor(weight, device=x.device)
        out = model.terms_fn(x, **knobs)
        model.observe(out)
        terms = _scalars(out)
        self.means.add("train", terms, x.size(0))
        trainer = model._trainer
        if trainer is not None:
            if (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
                # the steps at which Lightning writes step metrics to the loggers
                model.log("train/loss_step", terms["loss"], prog_bar=True, on_step=True)
            if batch_idx == trainer.num_training_batches - 1:
                # Logged at the epoch's last batch rather than in on_train_epoch_end: callbacks'
                # on_train_epoch_end (History, which writes history.csv) run before the module's.
                self.log_means(model, "train")
                if model.hparams.get("scheduler"):  # the rate this epoch trained with
                    lr = trainer.optimizers[0].param_groups[0]["lr"]
                    model.log("train/lr", lr, on_step=False, on_epoch=True)
                if weight is not None:  # the KL weight of the epoch's last step
                    model.log("train/beta", weight, on_step=False, on_epoch=True)
        return terms.get("objective", terms["loss"])

    def eval_step(self, model: Autoencoder, batch: Any, stage: str) -> None:
        x, y = batch
        knobs = {"y": y} if model.conditional else {}
        self.means.add(stage, _scalars(model.terms_fn(x, **knobs)), x.size(0))

    def log_means(self, model: Autoencoder, stage: str) -> None:
        trainer = model._trainer
        means = self.means.pop(stage, trainer.strategy if trainer is not None else None)
        if means:
            model.log_dict(
                {f"{stage}/{k}": v for k, v in means.items()}, on_step=False, on_epoch=True
            )

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_means": self.means.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means.load_state_dict(state.get("epoch_means") or {})


def _scalars(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch means among a model's outputs (0-dim tensors); the rest (the AE's codes) are
    for ``observe`` only."""
    return {k: v for k, v in out.items() if v.ndim == 0}
