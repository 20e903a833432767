"""Reproduce both seed studies with one command: ``make reproduce`` (``quick=true``: 2 epochs each).

Trains seed 1's VAE and AE (MNIST, 20 epochs) and seed 2's ConvVAE (Fashion-MNIST, 100 epochs,
latent 32, and latent 16 for its probe), evaluates each final checkpoint (evaluate.py), and
writes ``<out>/REPORT.md`` with the seeds' claims beside the measured numbers, the loss curves
and each model's pictures. The seeds' numbers are quoted as the seeds state them
(``reproduce_report.SEEDS``); none is copied into a measured column. Options:
conf/reproduce.yaml (``vae-reproduce --help``).

This module holds the plan (``RUNS``), the running (``run_all``: train, then evaluate, reusing
what is already done) and the command; REPORT.md's renderers are reproduce_report.py's.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from vae_lightning import config
from vae_lightning.errors import ConfigError
from vae_lightning.run.record import RunRecord
from vae_lightning.studies.reproduce_report import write_report
from vae_lightning.studies.runs import Result, Results
from vae_lightning.train import train

log = logging.getLogger(__name__)

# name -> (experiment, extra overrides, epochs at full length)
RUNS: dict[str, tuple[str, list[str], int]] = {
    "seed1_vae": ("seed1_vae_mnist", [], 20),
    "seed1_ae": ("seed1_ae_mnist", [], 20),
    "seed2_convvae_z32": ("seed2_convvae_fashion", ["model.latent_dim=32"], 100),
    "seed2_convvae_z16": ("seed2_convvae_fashion", ["model.latent_dim=16"], 100),
    "binarized_vae": ("vae_binarized_mnist", [], 20),
}


# --- running ------------------------------------------------------------------------------------


def planned(names: list[str], quick: bool) -> dict[str, tuple[list[str], int]]:
    """``run_all``'s plan for the reproduction runs ``names``: name -> (overrides, epochs)."""
    plan = {}
    for name in names:
        experiment, overrides, epochs = RUNS[name]
        plan[name] = ([f"experiment={experiment}", *overrides], 2 if quick else epochs)
    return plan


def run_all(
    out: Path,
    data_dir: Path,
    plan: dict[str, tuple[list[str], int]],
    extra: list[str],
    eval_kwargs: dict[str, Any],
    stage_two: Callable[[str, Path], Path] | None = None,
) -> Results:
    """Train and evaluate every run of ``plan`` (name -> (overrides, epochs)) in ``out/<name>``,
    skipping the training of runs already finished there and the evaluations already done.
    ``stage_two(name, last.ckpt)``: the checkpoint to evaluate (a VQ-VAE's with its prior
    fitted); default: last.ckpt."""
    from vae_lightning.evaluate import evaluate

    results = {}
    for name, (overrides, epochs) in plan.items():
        folder = out / name
        record = RunRecord.parse(folder).data if (folder / "metrics.json").exists() else {}
        done = record.get("status") == "ok"
        if done and record.get("hparams", {}).get("max_epochs") != epochs:
            raise ConfigError(
                "out",
                f"{folder} holds a finished run of {record['hparams'].get('max_epochs')} epochs, "
                f"not {epochs}: choose another out=... (or remove that folder)",
            )
        if not done:
            log.info("reproduce: training %s (%d epochs) in %s", name, epochs, folder)
            # resume=true: an interrupted run continues from its last.ckpt, one that failed
            # before its first checkpoint starts again
            run = [*overrides, f"trainer.max_epochs={epochs}", "resume=true"]
            paths = [f"paths.data_dir={data_dir}", f"paths.output_dir={folder}"]
            train(config.compose([*run, *paths, *extra]))
        # The final model, as in the seeds. The "best" checkpoint is chosen by val/loss, which is
        # the test loss here (val_on_test, as in the seeds): evaluating it on the test set would
        # report a test-selected figure.
        ckpt = (folder / "checkpoints" / "last.ckpt").resolve()
        if stage_two is not None:
            ckpt = stage_two(name, ckpt).resolve()
        evaluation = _finished_eval(folder / "eval.json", ckpt, eval_kwargs)
        if evaluation is None:
            log.info("reproduce: evaluating %s", ckpt)
            evaluation = evaluate(ckpt, data_dir=data_dir, **eval_kwargs)
        else:
            log.info("reproduce: reusing %s (same checkpoint, k and n_fid)", folder / "eval.json")
        results[name] = Result.read(folder, evaluation)
    return results


def _finished_eval(path: Path, ckpt: Path, eval_kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """An ``eval.json`` written for this very checkpoint with the same ``k`` and ``n_fid``, or None.

    Evaluating the ConvVAEs with k = 1000 costs minutes each; reusing a finished evaluation lets
    ``make reproduce`` resume after an interruption, or rewrite the report, without redoing it.
    A checkpoint newer than the evaluation (a retrained run) is evaluated again."""
    try:
        evaluation = json.loads(path.read_text())
        if Path(evaluation["checkpoint"]) != ckpt.resolve():
            return None
        if path.stat().st_mtime < ckpt.stat().st_mtime:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    k_done = (evaluation.get("nll_iw") or {}).get("k", 0)
    n_done = (evaluation.get("fid") or {}).get("n", 0)
    judge = (evaluation.get("fid") or {}).get("classifier_seed", 0)
    if n_done and judge != eval_kwargs.get("classifier_seed", 0):
        return None
    # the models with an IWAE bound (a VQ-VAE's test/kl is its code prior's, with no k)
    iwae = "test/kl" in evaluation.get("metrics", {}) and evaluation.get("model") != "VQVAE"
    if iwae and k_done != eval_kwargs["k"]:
        return None
    n_test = (evaluation.get("data") or {}).get("n_test", 0)
    if n_done != min(eval_kwargs["n_fid"], n_test):
        return None
    return evaluation


# --- the command --------------------------------------------------------------------------------


def _strings(value: Any, key: str) -> list[str]:
    """A list of strings from a list or a single string (``runs=seed1_vae``)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, (list, ListConfig)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(key, f"must be a list of strings, got {value!r}")


def _count(key: str, value: Any, minimum: int, why: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be {why}, got {value!r}")


def check(cfg: DictConfig) -> tuple[list[str], dict[str, Any]]:
    """The runs asked for and evaluate()'s arguments; a ConfigError before anything is made."""
    names = _strings(cfg.runs, "runs")
    unknown = sorted(set(names) - set(RUNS))
    if unknown or not names:
        raise ConfigError(
            "runs",
            f"names unknown run(s) {', '.join(unknown) or '(none given)'}; "
            f"choose among {', '.join(RUNS)}",
        )
    k = cfg.k if cfg.k is not None else (50 if cfg.quick else 1000)
    n_fid = cfg.n_fid if cfg.n_fid is not None else (2000 if cfg.quick else 10_000)
    _count("k", k, 1, "at least 1 (the report quotes the IWAE bound)")
    _count("n_fid", n_fid, 0, ">= 0 (0 skips FID)")
    if cfg.classifier_max_steps is not None:
        _count("classifier_max_steps", cfg.classifier_max_steps, 1, "an integer >= 1 or null")
    from vae_lightning.evaluate import check_settings

    floor = cfg.classifier_min_accuracy
    check_settings({"classifier_min_accuracy": floor})  # evaluate's own rule for the key
    return names, {
        "k": k, "n_fid": n_fid, "classifier_max_steps": cfg.classifier_max_steps,
        "classifier_min_accuracy": floor,
    }  # fmt: skip


@config.tool_main("reproduce", doc=__doc__)
def main(cfg: DictConfig) -> None:
    """vae-reproduce [quick=true] [runs=[seed1_vae,...]] [k=..] [n_fid=..] [out=..]
    [data_dir=..] [train="['trainer.accelerator=cpu']"]: train, evaluate and report both
    seed studies (make reproduce; quick=true: 2 epochs per model, smaller k and FID)."""
    names, eval_kwargs = check(cfg)
    extra = _strings(cfg.train, "train")
    quick = bool(cfg.quick)
    default_out = config.root_dir() / "outputs" / ("reproduce_quick" if quick else "reproduce")
    out = Path(cfg.out) if cfg.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    results = run_all(out, Path(cfg.data_dir).resolve(), planned(names, quick), extra, eval_kwargs)
    log.info("reproduce: report written: %s", write_report(results, out, quick))


if __name__ == "__main__":
    raise SystemExit(main())
