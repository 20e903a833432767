"""The one training entry point: ``python -m vae_lightning.train [overrides]`` (``vae-train``).

Wiring only: check, seed, instantiate, fit, test, record. Single runs and multiruns (``-m``)
alike; CPU or GPU by ``trainer.accelerator``. The run's record, history, folder rules, stops
and checkpoints are the ``run`` floor's, the step that trains the model ``training``'s, the
Hydra glue ``config``.
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
from vae_lightning.errors import USER_ERRORS, FolderRefused, RunError, RunInterrupted

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float | None:
    """Fit (and test) the configured model; write metrics.json; return ``optimized_metric``.

    Everything that can refuse the run (the values, the folder, the checkpoint to resume) is
    checked before anything is written into the run folder.
    """
    # first, so that a bad value is refused without importing Lightning
    config.check_run_config(cfg)
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    from vae_lightning.run.folder import check_writable, claim_folder
    from vae_lightning.run.record import RunRecord

    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume") is True and (done := RunRecord.finished(output_dir)) is not None:
        config.detach_folder_log(output_dir)  # a finished run's folder is left as it is
        log.info("already finished, skipped (resume=true): %s", output_dir)
        return done.get("metrics", {}).get(cfg.get("optimized_metric") or "")
    check_writable(output_dir)
    with claim_folder(output_dir, cfg.get("resume"), rank=rank_zero_only.rank):
        config.route_lightning_logs()
        config.set_torch_threads(cfg.get("threads"))
        config.spread_over_gpus(cfg)
        return _run(cfg, output_dir)


def _prepare(cfg: DictConfig, output_dir: Path) -> tuple[Any, Any, str | None, dict | None]:
    """Seed; the data, the model and the checkpoint to resume from, checked to fit; and, for
    a job the fused launcher trained in a group, what the group recorded (its timings)."""
    import lightning as L

    from vae_lightning.run.checkpoints import check_fits
    from vae_lightning.run.folder import check_resume, resume_checkpoint
    from vae_lightning.training import attach

    L.seed_everything(cfg.seed, workers=True)
    datamodule = config.instantiate(cfg.data, "data")
    model = config.instantiate(cfg.model, "model")
    attach(model, cfg.get("step"), str(cfg.trainer.get("accelerator", "auto")))
    ckpt_path = resume_checkpoint(cfg.get("resume"), output_dir)
    if getattr(model, "feature_net", None) is not None and ckpt_path is None:
        from vae_lightning.evaluation.fid import feature_classifier_for

        # a resumed run has it in its checkpoint
        model.load_feature_classifier(feature_classifier_for(datamodule))
    fused = None
    if ckpt_path is not None:
        checkpoint = check_fits(ckpt_path, model)
        model.step.check_checkpoint(checkpoint, ckpt_path)
        check_resume(checkpoint, ckpt_path, datamodule, cfg.trainer.get("max_epochs"), output_dir)
        log.info("resuming from %s", ckpt_path)
        fused = (checkpoint.get("vae_lightning") or {}).get("fused")
    return datamodule, model, ckpt_path, fused


def _run(cfg: DictConfig, output_dir: Path) -> float | None:
    from vae_lightning.run.checkpoints import AtomicCheckpointIO
    from vae_lightning.run.history import History
    from vae_lightning.run.loggers import finished_at_end
    from vae_lightning.run.record import RunRecord, key_hparams, log_hparams
    from vae_lightning.run.resume import ExactResume
    from vae_lightning.run.stops import NonFiniteStop, StopOnSignal

    try:
        datamodule, model, ckpt_path, fused = _prepare(cfg, output_dir)
    except USER_ERRORS as err:
        if RunRecord.read(output_dir) is None:  # a new folder records why (sweep reports list
            config.save_config(cfg, output_dir)  # it); an earlier run's record is kept as it is
            RunRecord.failed_to_start(output_dir, err)
        raise
    config.save_config(cfg, output_dir)
    signals = StopOnSignal(output_dir / "checkpoints" / "last.ckpt")
    with signals, RunRecord(output_dir) as record:
        max_epochs = cfg.trainer.get("max_epochs")
        record.data["hparams"] = key_hparams(model, datamodule, max_epochs, cfg.seed)
        record.history = History(output_dir / "history.csv")
        configured = config.instantiate_group(cfg.get("callbacks"), "callbacks")
        # signals first: its on_train_end must come before the end-of-fit probe's
        callbacks = [signals, *configured, record.history, NonFiniteStop(), ExactResume()]
        loggers = config.instantiate_group(cfg.get("logger"), "logger")
        with finished_at_end(loggers):
            trainer = config.instantiate(
                cfg.trainer, "trainer", callbacks=callbacks, logger=loggers or False,
                plugins=[AtomicCheckpointIO()],
            )  # fmt: skip
            log.info("run folder: %s", output_dir)
            _fit(trainer, model, datamodule, ckpt_path, record, fused)
            record.add_summaries(configured)
            best = record.best_checkpoint(trainer)
            test = cfg.get("test")
            tested = _test(trainer, model, datamodule, best, record, cfg.seed) if test else None
            record.finish(epochs=len(record.history.rows), best_checkpoint=best, tested=tested)
            log_hparams(trainer, record.data["hparams"], record.metrics)
    shown = {k: round(v, 4) for k, v in record.metrics.items() if k.startswith("test/")}
    log.info("done: %s; run folder: %s", shown or record.metrics, output_dir)
    return record.metric(cfg.get("optimized_metric"))


def _fit(
    trainer: Any, model: Any, datamodule: Any, ckpt_path: str | None, record: Any, fused: Any
) -> None:
    """Fit, timed; the last epoch's metrics into the record (also when fit resumed at its end,
    and for a job a fused stack trained, with its share of the stack's time)."""
    t_fit = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    record.data["time/fit_s"] = time.perf_counter() - t_fit
    if fused:  # trained in a fused group: its share of the group's training counts too
        record.data["fused"] = fused
        record.data["time/fit_s"] += fused.get("fit_share_s", 0.0)
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    if not record.history.rows:
        raise RunError(
            "no training epoch ran (the training split or trainer.limit_train_batches gave "
            "no batches), so there is nothing to record. Check data.val_size and the trainer."
        )
    record.add_metrics(record.history.final_metrics())
    record.add_metrics(trainer.callback_metrics)


def _test(
    trainer: Any, model: Any, datamodule: Any, best: str | None, record: Any, seed: int
) -> str:
    """Test the best checkpoint when there is one, else (fast_dev_run) the current weights.

    With val_on_test the "best" checkpoint was chosen on the test set itself, so its test
    figures would be biased: the final weights are tested instead. The test's noise (the
    ELBO's one draw) starts from ``seed``, so that it does not depend on what ran before it:
    a run resumed for its test reports what the uninterrupted run did. Returns what was tested.
    """
    import lightning as L

    tested = None if getattr(datamodule, "val_on_test", False) else best
    L.seed_everything(seed, workers=True, verbose=False)
    trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
    record.add_metrics(trainer.callback_metrics)
    return tested or "final weights"


@hydra.main(version_base="1.3", config_path=str(config.CONFIG_DIR), config_name="train")
def _hydra_main(cfg: DictConfig) -> float | None:
    """Run ``train``; a user error is one line, an interruption the command that resumes; in a
    multirun each job's outcome goes to the sweep's jobs.jsonl and the others go on."""

    multirun = config.in_multirun()
    try:
        result = train(cfg)
    except RunInterrupted as err:
        command = config.resume_command(Path(cfg.paths.output_dir))
        message = f"interrupted: {err}. Resume with:\n  {command}"
        log.error("%s", message)
        sys.stderr.write(message + "\n")  # also where a user error's line goes
        raise SystemExit(128 + err.signum) from None
    except USER_ERRORS as err:
        if isinstance(err, FolderRefused):  # nothing goes into a folder this run may not write
            config.detach_folder_log(Path(cfg.paths.output_dir))
        if multirun:  # one job's bad value must not stop the others
            log.error("job failed: %s", err)
            config.record_job("failed", str(err))
            return math.nan
        log.error("%s", err)
        sys.stderr.write(f"error: {err}\n")  # one clear line, no traceback
        raise SystemExit(2) from None
    except Exception as err:
        # a bug: its traceback goes to the log; Hydra's sweepers would stop the whole sweep
        log_file = Path(cfg.paths.output_dir) / "train.log"
        log.exception("unexpected error (a bug; the traceback is in %s)", log_file)
        if multirun:
            config.record_job("failed", f"{type(err).__name__}: {err}")
            return math.nan
        raise SystemExit(1) from None
    if multirun:
        config.record_job("ok")
    return result


def main() -> None:
    """``vae-train``: the resolvers; one line for what Hydra words naming neither cause nor cure
    (a bad ``$VAE_LIGHTNING_ROOT``, a launcher's missing extra); then Hydra's main."""
    config.register_resolvers()
    config.quiet_known_warnings()
    try:
        config.root_dir()
        config.check_extras(sys.argv[1:])
    except USER_ERRORS as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    _hydra_main()


if __name__ == "__main__":
    main()
