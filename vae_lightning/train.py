"""The one Hydra entry point: ``python -m vae_lightning.train [overrides]`` (``vae-train``).

Only wiring: compose objects from the config, fit, test, and record the run folder's
``metrics.json``. Single runs and multiruns (``-m``) alike; CPU or GPU by ``trainer.accelerator``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import ConfigError, DataError
from vae_lightning.files import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"
OmegaConf.register_new_resolver("repo_root", lambda: str(REPO_ROOT), replace=True)


def _job_dirname(overrides: str) -> str:
    """A multirun job's folder name from its overrides: no '/', and at most ~200 characters
    (a long override list gets a hash instead of its tail, to stay under the 255-byte limit;
    the job's .hydra/overrides.yaml always has them all)."""
    import hashlib

    name = overrides.replace("/", "%")
    if len(name) > 200:
        name = f"{name[:180]}_{hashlib.md5(name.encode()).hexdigest()[:8]}"
    return name


OmegaConf.register_new_resolver("job_dirname", _job_dirname, replace=True)
# ${first_set:a,b}: a unless it is null (oc.select returns a null that is set)
OmegaConf.register_new_resolver(
    "first_set", lambda *values: next((v for v in values if v is not None), None), replace=True
)

log = logging.getLogger(__name__)


def _instantiate(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, turning a constructor's ConfigError into one naming the full key."""
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{group}.{cause.key}", cause.message) from None
        if isinstance(cause, TypeError) and "unexpected keyword" in str(cause):
            raise ConfigError(group, f"has a key its class does not take: {cause}") from None
        raise


def _route_lightning_logs_to_hydra() -> None:
    # Lightning gives its loggers a handler of their own when imported before logging is set up;
    # let their records reach the root logger instead, so they land in train.log too.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def _resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    if ckpt_path in (None, ""):
        return None
    path = output_dir / "checkpoints" / "last.ckpt" if ckpt_path == "last" else Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(
            "ckpt_path",
            f"points to {path}, which does not exist. Give a checkpoint file, or `last` together "
            f"with hydra.run.dir=<the run folder> to resume that run.",
        )
    return str(path)


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


def _finished_record(path: Path) -> dict[str, Any] | None:
    """A run folder's metrics.json when it records a finished run, else None."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and record.get("status") == "ok" else None


def _set_torch_threads(cfg: DictConfig) -> None:
    """``threads`` when set; else, under a parallel launcher, the cores divided among its jobs."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    threads = cfg.get("threads")
    if threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        n_jobs, cpus = launcher.get("n_jobs"), launcher.get("cpus_per_task")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cpus:
            threads = int(cpus)
        elif n_jobs:
            threads = max(1, (cores or 1) // (int(n_jobs) if n_jobs > 0 else cores or 1))
    if threads:
        torch.set_num_threads(int(threads))
        log.info("torch threads: %d", torch.get_num_threads())


def check_checkpoint(path: str | Path, model: Any) -> dict:
    """Load a checkpoint safely (weights_only) and check it fits ``model``; return it.

    Raises DataError for a truncated or unreadable file and ConfigError when the checkpoint holds
    another model class or other shapes, naming both.
    """
    import torch

    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip/pickle errors of a truncated or foreign file
        raise DataError(
            f"checkpoint {path} is truncated or not a checkpoint ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]}). Use an earlier one, e.g. the best-*.ckpt."
        ) from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise DataError(f"checkpoint {path} has no state_dict: not a Lightning checkpoint")
    saved_class = (ckpt.get("vae_lightning") or {}).get("model_class")
    wanted = type(model).__name__
    if saved_class is not None and saved_class != wanted:
        raise ConfigError(
            "ckpt_path", f"{path} holds a {saved_class}, but the configured model is a {wanted}"
        )
    own = model.state_dict()
    for key, tensor in ckpt["state_dict"].items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ConfigError(
                "ckpt_path",
                f"{path} does not fit the configured {wanted}: {key} has shape "
                f"{tuple(tensor.shape)} there and {tuple(own[key].shape)} here (saved "
                f"hyper-parameters: {dict(ckpt.get('hyper_parameters') or {})})",
            )
    missing = sorted(set(own) - set(ckpt["state_dict"]))
    if missing:
        raise ConfigError(
            "ckpt_path", f"{path} lacks {', '.join(missing[:3])} of the configured {wanted}"
        )
    return ckpt


def _check_writable(output_dir: Path) -> None:
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


def _save_config_outside_hydra(cfg: DictConfig, output_dir: Path) -> None:
    """Called through the compose API (tests, reproduce.py), train() writes the run's
    .hydra/config.yaml itself, as @hydra.main does, so that the run folder is complete."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return
    path = output_dir / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in cfg.items() if k != "hydra"}
    OmegaConf.save(
        OmegaConf.create(OmegaConf.to_container(OmegaConf.create(plain), resolve=True)), path
    )


def _resume_command(output_dir: Path) -> str:
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    return " ".join(["python -m vae_lightning.train", *overrides, f"resume={output_dir}"])


def _floats(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(metrics.items()) if "/" in k and not k.endswith("_step")}


def train(cfg: DictConfig) -> float | None:
    """Fit (and test) the configured model; write metrics.json; return ``optimized_metric``."""
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only

    from vae_lightning.callbacks import AtomicCheckpointIO, History, RunInterrupted, StopOnSignal

    _route_lightning_logs_to_hydra()
    output_dir = Path(cfg.paths.output_dir)
    if cfg.get("sweep_resume"):
        previous = _finished_record(output_dir / "metrics.json")
        if previous is not None:
            log.info("already finished, skipped (sweep_resume=true): %s", output_dir)
            return previous.get("metrics", {}).get(cfg.get("optimized_metric") or "")
    _set_torch_threads(cfg)
    # Lightning 2.6 + torch 2.14 warn on every batch transfer about an internal pytree API.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    _check_writable(output_dir)
    _save_config_outside_hydra(cfg, output_dir)
    record: dict[str, Any] = {"status": "running", "output_dir": str(output_dir)}
    t_start = time.perf_counter()
    history: History | None = None
    try:
        L.seed_everything(cfg.seed, workers=True)
        datamodule = _instantiate(cfg.data, "data")
        model = _instantiate(cfg.model, "model")
        record["hparams"] = _key_hparams(cfg, model, datamodule)
        callbacks = [
            _instantiate(node, f"callbacks.{name}")
            for name, node in (cfg.get("callbacks") or {}).items()
            if node is not None and "_target_" in node
        ]
        history = History(output_dir / "history.csv")
        stop = StopOnSignal(output_dir / "checkpoints" / "last.ckpt")
        callbacks += [history, stop]
        loggers = [
            _instantiate(node, f"logger.{name}")
            for name, node in (cfg.get("logger") or {}).items()
            if node is not None and "_target_" in node
        ]
        trainer = _instantiate(
            cfg.trainer,
            "trainer",
            callbacks=callbacks,
            logger=loggers or False,
            plugins=[AtomicCheckpointIO()],
        )
        ckpt_path = _resolve_ckpt_path(
            cfg.get("ckpt_path") or ("last" if cfg.get("resume") else None), output_dir
        )
        if ckpt_path is not None:
            check_checkpoint(ckpt_path, model)
            log.info("resuming from %s", ckpt_path)
        log.info("run folder: %s", output_dir)

        t_fit = time.perf_counter()
        trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
        record["time/fit_s"] = time.perf_counter() - t_fit
        metrics = _floats(trainer.callback_metrics)
        ckpt_cb = trainer.checkpoint_callback
        best = getattr(ckpt_cb, "best_model_path", "") if ckpt_cb else ""
        if ckpt_cb is not None and ckpt_cb.best_model_score is not None:
            metrics[f"{ckpt_cb.monitor}_best"] = float(ckpt_cb.best_model_score)
        if trainer.interrupted:
            raise RuntimeError("training was interrupted")

        extras: dict[str, Any] = {}
        for cb in callbacks:  # what callbacks measured at the end of fit (probe, collapse)
            summary = dict(cb.summary()) if callable(getattr(cb, "summary", None)) else {}
            metrics.update(summary.pop("metrics", {}))
            for key, value in summary.items():
                if isinstance(value, dict) and isinstance(extras.get(key), dict):
                    extras[key].update(value)
                else:
                    extras[key] = value

        tested = None
        if cfg.get("test"):
            # The best checkpoint when there is one; under fast_dev_run (no checkpoints) the
            # current weights. With val_on_test the "best" one was chosen on the test set itself,
            # so its test figures would be biased: the final weights are tested instead.
            tested = None if getattr(datamodule, "val_on_test", False) else best or None
            trainer.test(model, datamodule=datamodule, ckpt_path=tested, verbose=False)
            metrics.update(_floats(trainer.callback_metrics))
            tested = tested or "final weights"
        record.update(
            extras,
            status="ok",
            metrics=metrics,
            epochs=len(history.rows),
            best_checkpoint=best or None,
            tested=tested,
        )
        for tb in (lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)):
            # The hparams view with the real final metrics (Lightning's own call logs -1).
            tb.log_hyperparams(record["hparams"], {f"hp/{k}": v for k, v in metrics.items()})
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("test/")}
        log.info("done: %s; run folder: %s", shown or metrics, output_dir)
        return metrics.get(cfg.get("optimized_metric") or "")
    except RunInterrupted as err:
        resume = _resume_command(output_dir)
        record.update(status="interrupted", error=f"RunInterrupted: {err}", resume=resume)
        raise
    except BaseException as err:
        message = f"{type(err).__name__}: {err}"
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            message = (
                f"disk full while writing ({err}); earlier checkpoints are intact. Free space, "
                f"then resume: {_resume_command(output_dir)}"
            )
            log.error("%s", message)
        record.update(status="failed", error=message)
        raise
    finally:
        record["time/total_s"] = time.perf_counter() - t_start
        if history is not None:
            record["time/epoch_s_median"] = history.median_epoch_s()
            record["time/epoch_s"] = history.epoch_times
            record["time/first_step_unix"] = history.first_step_unix
        record = {
            k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()
        }
        rank_zero_only(atomic_write_json)(output_dir / "metrics.json", record)


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write REPORT.md, summary.csv and the plots into
    its sweep folder (report.py, imported only then)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_lightning.report import write_report

        try:
            log.info("sweep report: %s", write_report(Path(config.hydra.sweep.dir)))
        except FileNotFoundError as err:  # e.g. every job was skipped before writing anything
            log.warning("no sweep report: %s", err)


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    from vae_lightning.callbacks import RunInterrupted

    try:
        return train(cfg)
    except RunInterrupted as err:
        message = (
            f"interrupted: {err}. Resume with:\n  {_resume_command(Path(cfg.paths.output_dir))}"
        )
        log.error("%s", message)
        sys.stderr.write(message + "\n")  # also where a user error's line goes
        raise SystemExit(128 + err.signum) from None
    except (ConfigError, DataError) as err:
        if _in_multirun():  # one job's bad value must not stop the others
            log.error("job failed (recorded in its metrics.json): %s", err)
            return math.nan
        # A user error: one clear line, no traceback.
        log.error("%s", err)
        raise SystemExit(f"error: {err}") from None
    except Exception:
        if _in_multirun():
            # Hydra's sweepers stop the whole sweep on a job's exception; record and go on.
            log.exception("job failed (recorded in its metrics.json)")
            return math.nan
        raise


if __name__ == "__main__":
    main()
