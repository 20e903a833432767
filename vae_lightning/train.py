"""The one training entry point: ``python -m vae_lightning.train [overrides]`` (``vae-train``).

Wiring only: seed, instantiate, fit, test, record. Single runs and multiruns (``-m``) alike;
CPU or GPU by ``trainer.accelerator``. The run record is ``run.RunRecord``, the Hydra glue
``config``, checkpoint checks ``checkpoints``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.errors import ConfigError, DataError

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Fit (and test) the configured model; write metrics.json; return ``optimized_metric``."""
    import lightning as L

    from vae_lightning.checkpoints import AtomicCheckpointIO, check_fits
    from vae_lightning.run import RunRecord, log_hparams, resume_checkpoint, run_callbacks

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume") is True and (done := RunRecord.finished(output_dir)) is not None:
        log.info("already finished, skipped (resume=true): %s", output_dir)
        return done.get("metrics", {}).get(cfg.get("optimized_metric") or "")
    config.route_lightning_logs()
    config.set_torch_threads(cfg.get("threads"))
    _check_writable(output_dir)
    config.save_config(cfg, output_dir)
    with RunRecord(output_dir) as record:
        L.seed_everything(cfg.seed, workers=True)
        datamodule = config.instantiate(cfg.data, "data")
        model = config.instantiate(cfg.model, "model")
        record.data["hparams"] = _key_hparams(cfg, model, datamodule)
        always = run_callbacks(output_dir)  # history.csv, signals, non-finite stop, RNG
        record.history = always[0]
        callbacks = config.instantiate_group(cfg.get("callbacks"), "callbacks") + always
        loggers = config.instantiate_group(cfg.get("logger"), "logger")
        trainer = config.instantiate(
            cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
            plugins=[AtomicCheckpointIO()],
        )  # fmt: skip
        ckpt_path = resume_checkpoint(cfg.get("resume"), output_dir)
        if ckpt_path is not None:
            check_fits(ckpt_path, model)
            log.info("resuming from %s", ckpt_path)
        log.info("run folder: %s", output_dir)

        t_fit = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        record.data["time/fit_s"] = time.perf_counter() - t_fit
        if trainer.interrupted:
            raise RuntimeError("training was interrupted")
        record.add_metrics(trainer.callback_metrics)
        best = _best_checkpoint(trainer, record)
        record.add_summaries(callbacks)
        tested = _test(trainer, model, datamodule, best, record) if cfg.get("test") else None
        record.finish(epochs=len(record.history.rows), best_checkpoint=best, tested=tested)
        log_hparams(trainer, record.data["hparams"], record.metrics)
    shown = {k: round(v, 4) for k, v in record.metrics.items() if k.startswith("test/")}
    log.info("done: %s; run folder: %s", shown or record.metrics, output_dir)
    return record.metric(cfg.get("optimized_metric"))


def _test(trainer: Any, model: Any, datamodule: Any, best: str | None, record: Any) -> str:
    """Test the best checkpoint when there is one, else (fast_dev_run) the current weights.

    With val_on_test the "best" checkpoint was chosen on the test set itself, so its test
    figures would be biased: the final weights are tested instead. Returns what was tested.
    """
    tested = None if getattr(datamodule, "val_on_test", False) else best
    trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
    record.add_metrics(trainer.callback_metrics)
    return tested or "final weights"


def _key_hparams(cfg: DictConfig, model: Any, datamodule: Any) -> dict[str, Any]:
    """The hyper-parameters that identify a run (metrics.json, the TensorBoard hparams view)."""
    hp: dict[str, Any] = {
        "model": type(model).__name__,
        "data": datamodule.dataset_name,
        "batch_size": datamodule.batch_size,
        "max_epochs": cfg.trainer.get("max_epochs"),
        "seed": cfg.seed,
    }
    for key, value in model.hparams.items():
        if isinstance(value, (int, float, str, bool)):
            hp[key] = value
    hp.setdefault("beta", getattr(model, "beta", 0.0))
    return hp


def _best_checkpoint(trainer: Any, record: Any) -> str | None:
    """The best checkpoint's path (and its score as ``<monitor>_best``), if one was saved."""
    ckpt = trainer.checkpoint_callback
    if ckpt is None:
        return None
    if ckpt.best_model_score is not None:
        record.metrics[f"{ckpt.monitor}_best"] = float(ckpt.best_model_score)
    return getattr(ckpt, "best_model_path", "") or None


def _check_writable(output_dir: Path) -> None:
    import os

    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise ConfigError(
            "paths.output_dir",
            f"{output_dir} cannot be written ({err.strerror or err}). Choose another folder with "
            f"hydra.run.dir=... or paths.log_dir=...",
        ) from None


@hydra.main(version_base="1.3", config_path=str(config.CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    from vae_lightning.run import RunInterrupted

    try:
        return train(cfg)
    except RunInterrupted as err:
        command = config.resume_command(Path(cfg.paths.output_dir))
        message = f"interrupted: {err}. Resume with:\n  {command}"
        log.error("%s", message)
        sys.stderr.write(message + "\n")  # also where a user error's line goes
        raise SystemExit(128 + err.signum) from None
    except (ConfigError, DataError) as err:
        if config.in_multirun():  # one job's bad value must not stop the others
            log.error("job failed (recorded in its metrics.json): %s", err)
            return math.nan
        log.error("%s", err)  # a user error: one clear line, no traceback
        raise SystemExit(f"error: {err}") from None
    except Exception:
        if config.in_multirun():
            # Hydra's sweepers stop the whole sweep on a job's exception; record and go on.
            log.exception("job failed (recorded in its metrics.json)")
            return math.nan
        raise


def main() -> None:
    """``vae-train``: register the resolvers the config uses, then run Hydra's main."""
    config.register_resolvers()
    config.quiet_known_warnings()
    _hydra_main()


if __name__ == "__main__":
    main()
