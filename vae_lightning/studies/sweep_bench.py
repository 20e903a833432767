"""``vae-bench sweep=true``: the 20-job ``experiment=sweep_latent_beta`` grid timed through
several Hydra launchers in one run (``make bench ARGS="sweep=true"``).

Each launcher runs the same grid, at the same ``sweep_epochs``, as a real command
(``python -m vae_lightning.train -m ... hydra/launcher=<name>``) into a sweep folder of its own,
one after the other; the wall time of the whole command is measured (start-up, every job's
training, end-of-fit images and probes, tests, REPORT.md), then every job's folder is checked
(metrics.json ``ok``) and REPORT.md must exist: a launcher that leaves a job unfinished is
reported as failed, not timed. Printed: seconds, jobs per hour, and each launcher's time over
the fastest one's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig

from vae_lightning.errors import ConfigError

log = logging.getLogger(__name__)
LAUNCHERS = ("basic", "joblib", "fused", "submitit_local")


def check(cfg: DictConfig) -> None:
    launchers = cfg.sweep_launchers
    if (
        not isinstance(launchers, (list, ListConfig))
        or not launchers
        or set(launchers) - set(LAUNCHERS)
    ):
        raise ConfigError(
            "sweep_launchers",
            f"must be a non-empty list of {', '.join(LAUNCHERS)}, got {launchers}",
        )
    epochs = cfg.sweep_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("sweep_epochs", f"must be an integer >= 1, got {epochs!r}")


def run_sweep(launcher: str, cfg: DictConfig, folder: Path) -> dict[str, Any]:
    """One launcher's sweep: its wall time and whether every job finished."""
    command = [
        sys.executable, "-m", "vae_lightning.train", "experiment=sweep_latent_beta",
        f"hydra/launcher={launcher}", f"trainer.max_epochs={cfg.sweep_epochs}",
        f"paths.data_dir={Path(cfg.data_dir).resolve()}", f"hydra.sweep.dir={folder}",
        *cfg.train,
    ]  # fmt: skip
    log.info("sweep through %s: %s", launcher, " ".join(command[2:]))
    t0 = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    records = [json.loads(p.read_text()) for p in folder.glob("*/metrics.json")]
    ok = sum(r.get("status") == "ok" for r in records)
    complete = (
        result.returncode == 0 and ok == len(records) > 0 and (folder / "REPORT.md").is_file()
    )
    if not complete:
        log.error("%s: exit %d, %d of %d jobs ok:\n%s", launcher, result.returncode, ok,
                  len(records), result.stderr[-2000:])  # fmt: skip
    return {
        "wall_s": wall,
        "jobs": len(records),
        "ok": ok,
        "complete": complete,
        "jobs_per_hour": len(records) / wall * 3600 if complete else None,
        "epoch_s_median": _median([r.get("time/epoch_s_median") for r in records]),
    }


def _median(values: list[Any]) -> float | None:
    import statistics

    numbers = [v for v in values if isinstance(v, (int, float))]
    return statistics.median(numbers) if numbers else None


def time_sweeps(cfg: DictConfig) -> dict[str, Any]:
    """Every launcher of ``sweep_launchers`` over the grid, with the ratios to the fastest."""
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vae-bench-sweep-") as tmp:
        for launcher in cfg.sweep_launchers:
            results[launcher] = run_sweep(launcher, cfg, Path(tmp) / launcher)
    timed = {k: v["wall_s"] for k, v in results.items() if v["complete"]}
    if timed:
        fastest = min(timed.values())
        for name, wall in timed.items():
            results[name]["over_fastest"] = wall / fastest
    return {"epochs": cfg.sweep_epochs, "launchers": results}


def sweep_lines(sweep: dict[str, Any]) -> list[str]:
    lines = [f"20-job grid (experiment=sweep_latent_beta) at {sweep['epochs']} epochs",
             "launcher         wall s   jobs/h   x fastest  epoch s (median per job)"]  # fmt: skip
    for name, r in sweep["launchers"].items():
        if not r["complete"]:
            lines.append(f"{name:<15} failed ({r['ok']} of {r['jobs']} jobs ok)")
            continue
        lines.append(f"{name:<15} {r['wall_s']:7.1f} {r['jobs_per_hour']:8.0f} "
                     f"{r['over_fastest']:10.2f}  {r['epoch_s_median'] or 0:.2f}")  # fmt: skip
    return lines
