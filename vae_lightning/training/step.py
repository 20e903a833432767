"""The step: what drives a model's maths each batch, kept apart from the maths itself.

A model (``vae_lightning.models``) computes ``terms(x, beta=w)``: a pure function of its
parameters and a batch. A step decides how that function is run and owns what training adds to
it: the optimizer and its learning-rate schedule, the KL weight's schedule (``w``, per step),
compilation, and the epoch means it logs. ``AutomaticStep`` is Lightning's automatic
optimization, one optimizer step per batch; ``FastStep`` (``fast.py``) runs several optimizer
steps per Lightning step, in one CUDA graph on a GPU; ``stack.py`` trains a sweep's models as
one. A step is attached with ``step.bind(model)`` (or ``model.step = step``, bound when fit
starts), which also checks the model's schedules. Every step reports the same epoch means
through ``EpochMeans``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from vae_lightning.training.schedules import check_kl, check_scheduler, kl_weight, lr_scheduler

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
        self.add_sums(stage, values, n, tuple(terms))

    def add_sums(self, stage: str, values: torch.Tensor, n: int, keys: tuple[str, ...]) -> None:
        """Add the sums ``values`` (one per term in ``keys``) over ``n`` images."""
        if stage not in self._sums:
            self._sums[stage] = (values, n, keys)
            return
        sums, count, old = self._sums[stage]
        if sums.device != values.device:  # restored from a checkpoint onto the CPU
            sums = sums.to(values.device)
        self._sums[stage] = (sums + values, count + n, old)

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

    automatic_optimization = True
    kind = "automatic"  # what a checkpoint records of the step that trained it

    def __init__(self) -> None:
        self.means = EpochMeans()
        self.scheduler: dict[str, Any] | None = None  # the model's, checked (None: constant lr)
        self.kl: dict[str, Any] | None = None  # the model's KL schedule, checked
        self._bound: Autoencoder | None = None

    # --- attaching ---------------------------------------------------------------------------
    def bind(self, model: Autoencoder) -> Autoencoder:
        """Check the model's schedules (a ConfigError names ``scheduler.<key>`` or
        ``kl.<key>``), keep them in its hyper-parameters as checked, and attach this step."""
        hp = model.hparams
        self.scheduler = hp["scheduler"] = check_scheduler(hp.get("scheduler"))
        if model.variational:
            self.kl = hp["kl"] = check_kl(hp.get("kl"))
        model.step, self._bound = self, model
        return model

    def configure(self, model: Autoencoder) -> None:
        """When fit or test starts (Lightning's ``configure_model``): bound, and compiled."""
        if self._bound is not model:
            self.bind(model)
        if model.hparams.compile and model.terms_fn == model.terms:
            # the maths, not the networks: compiled submodules would rename the state_dict keys
            # (_orig_mod.) and break checkpoints
            model.terms_fn = torch.compile(model.terms)

    def configure_optimizers(self, model: Autoencoder) -> Any:
        trained = [p for p in model.parameters() if p.requires_grad]  # not the frozen features
        optimizer = self.optimizer(model, trained)
        trainer = model._trainer
        max_epochs = (trainer.max_epochs if trainer is not None else None) or 1
        scheduler = lr_scheduler(optimizer, self.scheduler, max_epochs)
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def optimizer(self, model: Autoencoder, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        # fused: one kernel for all parameters instead of a Python loop over them; the same
        # update (to float rounding), and on CPU the single largest saving after the data path
        return torch.optim.Adam(params, lr=model.lr, fused=model.hparams.fused_adam or None)

    def kl_weight(self, model: Autoencoder, offset: int = 0) -> float | None:
        """The scheduled KL weight of the training step ``offset`` steps after the trainer's
        global step, or None for a constant ``beta`` (and for a model without a KL term)."""
        trainer = model._trainer
        if self.kl is None or self.kl["name"] == "constant" or trainer is None:
            return None
        steps, total = self.schedule_lengths(trainer)
        return kl_weight(self.kl, model.beta, trainer.global_step + offset, steps, total)

    def schedule_lengths(self, trainer: Any) -> tuple[int, int]:
        """The optimizer steps of an epoch and of the whole fit, for the KL schedule."""
        return max(1, trainer.num_training_batches), int(trainer.estimated_stepping_batches)

    # --- the hooks -----------------------------------------------------------------------------
    def training_step(self, model: Autoencoder, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch  # (B, C, H, W) float in [0, 1], converted on the device by the DataModule
        if batch_idx == 0:  # a new epoch (a run resumed mid-epoch restored its partial sums)
            self.means.reset("train")
        weight = self.kl_weight(model)
        knobs = {"y": y} if model.conditional else {}
        if weight is not None:  # a tensor, so that a compiled terms is not recompiled each value
            knobs["beta"] = torch.tensor(weight, device=x.device)
        out = model.terms_fn(x, **knobs)
        model.observe(out)
        terms = scalars(out)
        self.means.add("train", terms, x.size(0))
        self.log_step(model, terms, batch_idx, weight)
        return terms.get("objective", terms["loss"])

    def log_step(
        self, model: Autoencoder, terms: dict[str, torch.Tensor], batch_idx: int, weight: Any
    ) -> None:
        """What a training step logs: the loss at the steps where Lightning writes step
        metrics, and at the epoch's last batch its means, learning rate and KL weight."""
        trainer = model._trainer
        if trainer is None:
            return
        if (trainer.global_step + 1) % trainer.log_every_n_steps == 0:
            model.log("train/loss_step", terms["loss"], prog_bar=True, on_step=True)
        if batch_idx == trainer.num_training_batches - 1:
            # Logged at the epoch's last batch rather than in on_train_epoch_end: callbacks'
            # on_train_epoch_end (History, which writes history.csv) run before the module's.
            self.log_means(model, "train")
            if self.scheduler is not None:  # the rate this epoch trained with
                lr = trainer.optimizers[0].param_groups[0]["lr"]
                model.log("train/lr", lr, on_step=False, on_epoch=True)
            if weight is not None:  # the KL weight of the epoch's last step
                model.log("train/beta", float(weight), on_step=False, on_epoch=True)

    def eval_step(self, model: Autoencoder, batch: Any, stage: str) -> None:
        x, y = batch
        knobs = {"y": y} if model.conditional else {}
        self.means.add(stage, scalars(model.terms_fn(x, **knobs)), x.size(0))

    def log_means(self, model: Autoencoder, stage: str) -> dict[str, torch.Tensor]:
        """Log the epoch's means of ``stage`` (reduced over processes); return them."""
        trainer = model._trainer
        means = self.means.pop(stage, trainer.strategy if trainer is not None else None)
        if means:
            model.log_dict(
                {f"{stage}/{k}": v for k, v in means.items()}, on_step=False, on_epoch=True
            )
        return means

    def state_dict(self) -> dict[str, Any]:
        return {"epoch_means": self.means.state_dict(), "kind": self.kind}

    def check_checkpoint(self, checkpoint: dict[str, Any], path: Any) -> None:
        """Refuse to continue a checkpoint another kind of step trained: Lightning counts the
        steps of automatic and manual optimization apart, so the count (and a KL schedule by
        step) would start again. Checkpoints without a kind are the automatic step's."""
        kind = ((checkpoint.get("vae_lightning") or {}).get("step") or {}).get("kind")
        if (kind or "automatic") != self.kind:
            from vae_lightning.errors import ConfigError

            raise ConfigError(
                "step.name",
                f"is {self.kind}, but {path} was trained with step.name={kind}: continue it "
                f"with the same step (its weights load under either: vae-evaluate ckpt=...)",
            )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.means.load_state_dict(state.get("epoch_means") or {})


def scalars(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch means among a model's outputs (0-dim tensors); the rest (the AE's codes) are
    for ``observe`` only."""
    return {k: v for k, v in out.items() if v.ndim == 0}
