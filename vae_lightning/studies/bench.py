"""Performance benchmark (``vae-bench``, ``make bench``): the framework against plain PyTorch.

In one process, with the same model initialisation, for each model (vae, ae, conv_vae) and
alternating the runs so that machine drift affects all three alike, it times epochs of

(a) the framework's real training path: ``train(cfg)`` with its DataModule, LightningModule and
    Trainer, the default logger (TensorBoard), checkpointing and the progress bar, image
    callbacks off (``callbacks=minimal``); the training batches of the epoch, timed by History;
(b) a bare PyTorch loop over a preloaded float tensor: permutation, slice, forward, loss,
    backward, ``torch.optim.Adam`` with its defaults (as pytorch/examples' VAE);
(c) the seeds' loop: torchvision's dataset with ``ToTensor``, a ``DataLoader`` with 2 workers,
    and ``loss.item()`` every step.

It reports seconds per epoch (median), samples/s, the achieved GFLOP/s (FLOPs of one training
step counted by ``torch.utils.flop_counter`` times the steps) against a measured sgemm peak, the
ratios a/b and c/a, the start-up of ``python -m vae_lightning.train`` (process start to first
training step) and, when asked, the time of ``vae-evaluate`` at its defaults.

Every option is checked before any timing starts. bench.json is rewritten (atomically) after each
model, so a bench that fails or is interrupted keeps the models done; ``complete`` is true once
everything asked for is in it. Options: conf/bench.yaml (``vae-bench --help``), e.g.
``vae-bench models=[vae] repeats=3``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from hydra.errors import HydraException
from omegaconf import DictConfig, ListConfig

from vae_lightning import config
from vae_lightning.errors import ConfigError, RunError, check_path
from vae_lightning.files import atomic_write_json
from vae_lightning.models.losses import gaussian_kl, recon_bce
from vae_lightning.train import train

log = logging.getLogger(__name__)
DATA = {"vae": "mnist", "ae": "mnist", "conv_vae": "fashion_mnist"}
LABELS = {"a": "(a) framework", "b": "(b) bare loop", "c": "(c) seeds' loop"}


def _model(cfg, seed: int):
    import hydra

    torch.manual_seed(seed)
    return hydra.utils.instantiate(cfg.model)


def _loss(model, x: torch.Tensor) -> torch.Tensor:
    """The training loss as pytorch/examples writes it (no extra metrics)."""
    if model.variational:
        mu, logvar = model.encode(x)
        logits = model.decoder(model.reparameterize(mu, logvar))
        return recon_bce(logits, x).mean() + model.beta * gaussian_kl(mu, logvar).sum(1).mean()
    return recon_bce(model.decoder(model.encoder(x)), x).mean()


def bare_epoch(cfg, images: torch.Tensor, seed: int) -> float:
    """(b) one epoch over ``images`` (N, 1, 28, 28) float32 already in memory; seconds."""
    model = _model(cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.model.lr)
    bs = cfg.data.batch_size
    t0 = time.perf_counter()
    perm = torch.randperm(len(images))
    for i in range(0, len(images), bs):
        loss = _loss(model, images[perm[i : i + bs]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def seeds_epoch(cfg, data_dir: Path, dataset: str, seed: int) -> float:
    """(c) one epoch the way the seeds load data: torchvision + ToTensor + DataLoader(2 workers)."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST}[dataset]
    ds = cls(str(data_dir), train=True, download=False, transform=transforms.ToTensor())
    loader = DataLoader(ds, batch_size=cfg.data.batch_size, shuffle=True, num_workers=2)
    model = _model(cfg, seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.model.lr)
    t0 = time.perf_counter()
    total = 0.0
    for x, _ in loader:
        loss = _loss(model, x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total += loss.item()  # as the seeds accumulate train_loss
    return time.perf_counter() - t0


def framework_epoch(overrides: list[str], workdir: Path, run: int) -> float:
    """(a) one epoch of the real training path; the training batches' time from History."""
    out = workdir / f"run{run}"
    train(config.compose([*overrides, f"paths.output_dir={out}"]))
    return json.loads((out / "metrics.json").read_text())["time/epoch_s"][0]


def step_flops(cfg, batch_size: int) -> int:
    """FLOPs of one training step (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(cfg, 0)
    x = torch.rand(batch_size, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        _loss(model, x).backward()
    return counter.get_total_flops()


def sgemm_peak(n: int = 2048, repeats: int = 10) -> float:
    """The best GFLOP/s of an n x n float32 matrix product with the current threads."""
    a, b = torch.rand(n, n), torch.rand(n, n)
    a @ b
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e9


def startup_seconds(data_dir: Path, repeats: int = 3, extra: Sequence[str] = ()) -> list[float]:
    """Process start to first training step of ``python -m vae_lightning.train``."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            out = Path(tmp) / f"s{i}"
            t0 = time.time()
            subprocess.run(
                [
                    sys.executable, "-m", "vae_lightning.train", f"paths.data_dir={data_dir}",
                    f"hydra.run.dir={out}", "trainer.max_steps=1", "callbacks=minimal",
                    "test=false", "trainer.limit_val_batches=1", *extra,
                ],
                check=True, capture_output=True,
            )  # fmt: skip
            first = json.loads((out / "metrics.json").read_text())["time/first_step_unix"]
            times.append(first - t0)
    return times


def _paths_in_turn(cfg: DictConfig) -> list[str]:
    return ["a", "b"] + (["c"] if cfg.seeds_loop else [])


def time_paths(cfg: DictConfig, name: str, overrides: list[str], train_cfg: DictConfig) -> dict:
    """Seconds per epoch of each path, ``cfg.repeats`` epochs each, their order rotated."""
    import hydra

    dm = hydra.utils.instantiate(train_cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    images = dm.splits["train"][0].float().div_(255)  # (b)'s preloaded tensor
    times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
    paths = _paths_in_turn(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(cfg.repeats):
            for path in paths[run % len(paths) :] + paths[: run % len(paths)]:  # rotate
                if path == "a":
                    times["a"].append(framework_epoch(overrides, Path(tmp), run))
                elif path == "b":
                    times["b"].append(bare_epoch(train_cfg, images, seed=run))
                else:
                    data_dir = Path(cfg.data_dir)
                    times["c"].append(seeds_epoch(train_cfg, data_dir, DATA[name], seed=run))
            log.info(
                "%s run %d: %s", name, run, ", ".join(f"{p} {times[p][-1]:.3f} s" for p in paths)
            )
    return {"images": len(images), "times": times}


def train_overrides(cfg: DictConfig, name: str) -> list[str]:
    """The overrides of the framework's runs of model ``name``."""
    return [
        f"model={name}", f"data={DATA[name]}", f"paths.data_dir={Path(cfg.data_dir).resolve()}",
        "data.val_on_test=true",  # train on all the training images, as (b) and (c) do
        "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=minimal", "test=false",
        f"threads={cfg.threads}", *cfg.train,
    ]  # fmt: skip


def bench_model(cfg: DictConfig, name: str, peak: float) -> dict[str, Any]:
    """The three paths' timings for model ``name`` and what follows from them."""
    dataset = DATA[name]
    overrides = train_overrides(cfg, name)
    train_cfg = config.compose([*overrides, "paths.output_dir=unused"])
    timed = time_paths(cfg, name, overrides, train_cfg)
    n, times, bs = timed["images"], timed["times"], train_cfg.data.batch_size
    flops = step_flops(train_cfg, bs) * math.ceil(n / bs)
    med = {p: statistics.median(v) for p, v in times.items() if v}
    return {
        "dataset": dataset,
        "images": n,
        "batch_size": bs,
        "seconds_per_epoch": times,
        "median_s": med,
        "samples_per_s": {p: n / t for p, t in med.items()},
        "gflop_per_epoch": flops / 1e9,
        "gflops": {p: flops / t / 1e9 for p, t in med.items()},
        "fraction_of_peak": {p: flops / t / 1e9 / peak for p, t in med.items()},
        "a_over_b": med["a"] / med["b"],
        "c_over_a": med["c"] / med["a"] if "c" in med else None,
    }


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """bench.json as the table the log shows."""
    lines = [
        f"{summary['threads']} threads, medians of {summary['repeats']} epochs, "
        f"sgemm peak {summary['sgemm_peak_gflops']:.0f} GFLOP/s",
        "model     path                    s/epoch  samples/s  GFLOP/s  of peak",
    ]
    for name, r in summary["models"].items():
        for p, t in r["median_s"].items():
            lines.append(
                f"{name:<9} {LABELS[p]:<22} {t:8.3f} {r['samples_per_s'][p]:10.0f} "
                f"{r['gflops'][p]:8.1f} {r['fraction_of_peak'][p]:8.1%}"
            )
        ratio = f"  a/b = {r['a_over_b']:.3f}"
        if r["c_over_a"] is not None:
            ratio += f", c/a = {r['c_over_a']:.2f}"
        lines.append(f"{name:<9}{ratio}  ({r['gflop_per_epoch']:.0f} GFLOP per epoch)")
    if summary["startup_s"]:
        median = summary["startup_s_median"]
        lines.append(f"start-up to the first training step: {median:.2f} s (median)")
    if "evaluate_s" in summary:
        lines.append(f"vae-evaluate at its defaults: {summary['evaluate_s']:.1f} s")
    return lines


def _check_evaluate(value: object) -> Path:
    """The checkpoint of ``evaluate``: a file, with the run config vae-evaluate reads beside it."""
    hint = (
        "give a checkpoint written by vae-train (<run folder>/checkpoints/<file>.ckpt), or "
        "evaluate=null not to time vae-evaluate"
    )
    ckpt = check_path("evaluate", value, "file", hint, must_exist=True)
    run_config = ckpt.parent.parent / ".hydra" / "config.yaml"  # as evaluate.read_run_config
    if not run_config.is_file():
        raise ConfigError("evaluate", f"{ckpt} has no run config {run_config}: {hint}")
    return ckpt


def _check(cfg: DictConfig) -> None:
    """Every option, before any timing: a mistake costs seconds, not a bench's minutes."""
    models = cfg.models
    if not isinstance(models, (list, ListConfig)) or not models or set(models) - set(DATA):
        raise ConfigError("models", f"must be a non-empty list of {', '.join(DATA)}, got {models}")
    if len(set(models)) < len(models):
        raise ConfigError("models", f"lists a model twice: {list(models)}; list each once")
    for key, minimum in (("repeats", 1), ("threads", 1), ("startup_repeats", 0)):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ConfigError(key, f"must be an integer >= {minimum}, got {value!r}")
    if not isinstance(cfg.seeds_loop, bool):
        raise ConfigError("seeds_loop", f"must be true or false, got {cfg.seeds_loop!r}")
    if not isinstance(cfg.train, (list, ListConfig)) or not all(
        isinstance(o, str) for o in cfg.train
    ):
        raise ConfigError(
            "train", f"must be a list of overrides, got {cfg.train!r}: e.g. train=\"['a.b=1']\""
        )
    check_path("data_dir", cfg.data_dir, "folder", "give the folder of the raw files (`make data`)")
    check_path("out", cfg.out, "file", "give the file for the results, e.g. out=bench.json")
    if cfg.evaluate is not None:
        _check_evaluate(cfg.evaluate)
    for name in models:  # the framework's config of each model composes and instantiates
        try:
            train_cfg = config.compose([*train_overrides(cfg, name), "paths.output_dir=unused"])
        except HydraException as err:
            first = str(err).strip().splitlines()[0]
            raise ConfigError("train", f"holds an override vae-train refuses: {first}") from None
        config.instantiate(train_cfg.model, "model")
        config.instantiate(train_cfg.data, "data")


def time_evaluate(ckpt: str, out: Path) -> float:
    """Seconds of ``vae-evaluate ckpt=...`` at its defaults."""
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "vae_lightning.evaluate", f"ckpt={ckpt}"])
    if result.returncode != 0:
        raise ConfigError(
            "evaluate", f"vae-evaluate ckpt={ckpt} failed with exit status {result.returncode} "
            f"(its error is above); the other results are in {out}",
        )  # fmt: skip
    return time.perf_counter() - t0


@config.tool_main("bench", doc=__doc__)
def main(cfg: DictConfig) -> None:
    if cfg.sweep:
        return _bench_sweeps(cfg)
    if cfg.device != "cpu":
        return _bench_cuda(cfg)
    _check(cfg)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "vae_lightning.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    peak = sgemm_peak()
    log.info("sgemm peak: %.1f GFLOP/s with %d threads", peak, cfg.threads)
    summary: dict[str, Any] = {
        "complete": False,
        "threads": cfg.threads,
        "repeats": cfg.repeats,
        "sgemm_peak_gflops": peak,
        "torch": torch.__version__,
        "models": {},
        "startup_s": None,
        "startup_s_median": None,
    }
    for name in cfg.models:
        summary["models"][name] = bench_model(cfg, name, peak)
        atomic_write_json(out, summary)  # a later failure keeps the models done
        log.info("%s done, written to %s", name, out)
    startup = startup_seconds(Path(cfg.data_dir).resolve(), cfg.startup_repeats, list(cfg.train))
    summary["startup_s"] = startup
    summary["startup_s_median"] = statistics.median(startup) if startup else None
    atomic_write_json(out, summary)
    if cfg.evaluate:
        summary["evaluate_s"] = time_evaluate(cfg.evaluate, out)
    summary["complete"] = True
    atomic_write_json(out, summary)
    log.info("\n".join(summary_lines(summary)))


def _bench_cuda(cfg: DictConfig) -> None:
    """``device=cuda``: the training paths on the GPU (cuda_bench.py)."""
    from vae_lightning.studies import cuda_bench

    if cfg.device != "cuda":
        raise ConfigError("device", f"must be cpu or cuda, got {cfg.device!r}")
    if not torch.cuda.is_available():
        raise ConfigError("device", "is cuda, but no CUDA GPU is available here: use device=cpu")
    models = list(cfg.models)
    if not models or set(models) - set(DATA):
        raise ConfigError("models", f"must be a non-empty list of {', '.join(DATA)}, got {models}")
    data_dir = check_path("data_dir", cfg.data_dir, "folder", "the raw files (`make data`)",
                          must_exist=True)  # fmt: skip
    out = Path(check_path("out", cfg.out, "file", "give the file for the results"))
    result = cuda_bench.bench(models, data_dir, int(cfg.repeats))
    atomic_write_json(out, {"complete": True, "cuda": result})
    log.info("\n".join(cuda_bench.cuda_lines(result)))


def _bench_sweeps(cfg: DictConfig) -> None:
    """``sweep=true``: the sweep grid through each launcher (sweep_bench.py)."""
    from vae_lightning.studies import sweep_bench

    if not isinstance(cfg.sweep, bool):
        raise ConfigError("sweep", f"must be true or false, got {cfg.sweep!r}")
    sweep_bench.check(cfg)
    check_path("data_dir", cfg.data_dir, "folder", "give the folder of the raw files (`make data`)")
    out = Path(check_path("out", cfg.out, "file", "give the file for the results"))
    summary = {"complete": False, "torch": torch.__version__, "sweep": None}
    summary["sweep"] = sweep_bench.time_sweeps(cfg)
    summary["complete"] = all(r["complete"] for r in summary["sweep"]["launchers"].values())
    atomic_write_json(out, summary)
    log.info("\n".join(sweep_bench.sweep_lines(summary["sweep"])))
    if not summary["complete"]:
        raise RunError(f"a launcher left jobs unfinished (its error is above); see {out}")


if __name__ == "__main__":
    raise SystemExit(main())
