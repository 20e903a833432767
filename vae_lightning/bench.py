"""Performance benchmark (``vae-bench``, ``make bench``): the framework against plain PyTorch.

In one process, with the same model initialisation, for each model (vae, ae, conv_vae) and
alternating the runs so that machine drift affects all three alike, it times epochs of

(a) the framework's real training path: ``train(cfg)`` with its DataModule, LightningModule and
    Trainer, the default loggers (TensorBoard + CSV), checkpointing and the progress bar, image
    callbacks off (``callbacks=minimal``); the training batches of the epoch, timed by History;
(b) a bare PyTorch loop over a preloaded float tensor: permutation, slice, forward, loss,
    backward, ``torch.optim.Adam`` with its defaults (as pytorch/examples' VAE);
(c) the seeds' loop: torchvision's dataset with ``ToTensor``, a ``DataLoader`` with 2 workers,
    and ``loss.item()`` every step.

It reports seconds per epoch (median), samples/s, the achieved GFLOP/s (FLOPs of one training
step counted by ``torch.utils.flop_counter`` times the steps) against a measured sgemm peak, the
ratios a/b and c/a, the start-up of ``python -m vae_lightning.train`` (process start to first
training step) and, when asked, the time of ``vae-evaluate`` at its defaults; writes bench.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vae_lightning.losses import gaussian_kl, recon_bce
from vae_lightning.train import CONFIG_DIR, REPO_ROOT, train

log = logging.getLogger(__name__)
DATA = {"vae": "mnist", "ae": "mnist", "conv_vae": "fashion_mnist"}


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


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
    train(compose_cfg([*overrides, f"paths.output_dir={out}"]))
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


def startup_seconds(data_dir: Path, repeats: int = 3) -> list[float]:
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
                    "test=false", "trainer.limit_val_batches=0",
                ],
                check=True, capture_output=True,
            )  # fmt: skip
            first = json.loads((out / "metrics.json").read_text())["time/first_step_unix"]
            times.append(first - t0)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vae,ae,conv_vae", help="comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="epochs of each path per model")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(REPO_ROOT / "data"))
    parser.add_argument("--no-seeds-loop", action="store_true", help="skip (c)")
    parser.add_argument("--evaluate", metavar="CKPT", help="also time vae-evaluate on CKPT")
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "vae_lightning.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    peak = sgemm_peak()
    log.info("sgemm peak: %.1f GFLOP/s with %d threads", peak, args.threads)

    results: dict[str, Any] = {}
    for name in args.models.split(","):
        dataset = DATA[name]
        overrides = [
            f"model={name}", f"data={dataset}", f"paths.data_dir={data_dir}",
            "data.val_on_test=true",  # train on all 60k, as (b) and (c) do
            "trainer.max_epochs=1", "trainer.accelerator=cpu", "callbacks=minimal", "test=false",
            f"threads={args.threads}",
        ]  # fmt: skip
        cfg = compose_cfg([*overrides, "paths.output_dir=unused"])
        import hydra

        dm = hydra.utils.instantiate(cfg.data)
        dm.prepare_data()
        dm.setup("fit")
        images = dm.splits["train"][0].float().div_(255)  # (b)'s preloaded tensor
        n = len(images)
        times: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        paths = ["a", "b"] + ([] if args.no_seeds_loop else ["c"])
        with tempfile.TemporaryDirectory() as tmp:
            for run in range(args.repeats):
                for path in paths[run % len(paths) :] + paths[: run % len(paths)]:  # rotate
                    if path == "a":
                        times["a"].append(framework_epoch(overrides, Path(tmp), run))
                    elif path == "b":
                        times["b"].append(bare_epoch(cfg, images, seed=run))
                    else:
                        times["c"].append(seeds_epoch(cfg, data_dir, dataset, seed=run))
                log.info(
                    "%s run %d: %s", name, run,
                    ", ".join(f"{p} {times[p][-1]:.3f} s" for p in paths),
                )  # fmt: skip
        flops = step_flops(cfg, cfg.data.batch_size) * math.ceil(n / cfg.data.batch_size)
        med = {p: statistics.median(v) for p, v in times.items() if v}
        results[name] = {
            "dataset": dataset,
            "images": n,
            "batch_size": cfg.data.batch_size,
            "seconds_per_epoch": times,
            "median_s": med,
            "samples_per_s": {p: n / t for p, t in med.items()},
            "gflop_per_epoch": flops / 1e9,
            "gflops": {p: flops / t / 1e9 for p, t in med.items()},
            "fraction_of_peak": {p: flops / t / 1e9 / peak for p, t in med.items()},
            "a_over_b": med["a"] / med["b"],
            "c_over_a": med["c"] / med["a"] if "c" in med else None,
        }

    startup = startup_seconds(data_dir)
    summary: dict[str, Any] = {
        "threads": args.threads,
        "repeats": args.repeats,
        "sgemm_peak_gflops": peak,
        "torch": torch.__version__,
        "models": results,
        "startup_s": startup,
        "startup_s_median": statistics.median(startup),
    }
    if args.evaluate:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "vae_lightning.evaluate", f"ckpt={args.evaluate}"], check=True
        )
        summary["evaluate_s"] = time.perf_counter() - t0
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")

    lines = [
        f"{args.threads} threads, medians of {args.repeats} epochs, sgemm peak {peak:.0f} GFLOP/s",
        "model     path                    s/epoch  samples/s  GFLOP/s  of peak",
    ]
    labels = {"a": "(a) framework", "b": "(b) bare loop", "c": "(c) seeds' loop"}
    for name, r in results.items():
        for p, t in r["median_s"].items():
            lines.append(
                f"{name:<9} {labels[p]:<22} {t:8.3f} {r['samples_per_s'][p]:10.0f} "
                f"{r['gflops'][p]:8.1f} {r['fraction_of_peak'][p]:8.1%}"
            )
        ratio = f"  a/b = {r['a_over_b']:.3f}"
        if r["c_over_a"] is not None:
            ratio += f", c/a = {r['c_over_a']:.2f}"
        lines.append(f"{name:<9}{ratio}  ({r['gflop_per_epoch']:.0f} GFLOP per epoch)")
    lines.append(
        f"start-up to the first training step: {summary['startup_s_median']:.2f} s (median)"
    )
    if "evaluate_s" in summary:
        lines.append(f"vae-evaluate at its defaults: {summary['evaluate_s']:.1f} s")
    log.info("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
