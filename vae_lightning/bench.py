"""Performance benchmark: the framework's training path against a bare PyTorch loop.

Both run in one process, alternating, so that machine drift affects both alike:

(a) the framework: ``train(cfg)`` with the real config (its DataModule, LightningModule and
    Trainer, default loggers, checkpointing and progress bar), one epoch per run, timed by the
    History callback (training batches only, validation excluded);
(b) a bare loop over a preloaded float tensor: permutation, slice, forward, loss, backward, Adam,
    as in pytorch/examples' VAE (no metrics beyond the loss).

Prints the medians and the ratio a/b, and writes ``bench.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import torch

from vae_lightning.losses import gaussian_kl, recon_bce
from vae_lightning.train import CONFIG_DIR, REPO_ROOT, train

log = logging.getLogger(__name__)


def compose_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def bare_epoch(cfg, images: torch.Tensor, seed: int) -> float:
    """One epoch of a plain loop over ``images`` (N, 1, 28, 28) float32; returns seconds."""
    import hydra

    torch.manual_seed(seed)
    model = hydra.utils.instantiate(cfg.model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.model.lr)
    bs, beta = cfg.data.batch_size, getattr(model, "beta", 0.0)
    t0 = time.perf_counter()
    perm = torch.randperm(len(images))
    for i in range(0, len(images), bs):
        x = images[perm[i : i + bs]]
        if model.variational:
            mu, logvar = model.encode(x)
            logits = model.decoder(model.reparameterize(mu, logvar))
            loss = recon_bce(logits, x).mean() + beta * gaussian_kl(mu, logvar).sum(1).mean()
        else:
            loss = recon_bce(model.decoder(model.encoder(x)), x).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def framework_epoch(overrides: list[str], workdir: Path, run: int) -> float:
    out = workdir / f"run{run}"
    cfg = compose_cfg([*overrides, f"paths.output_dir={out}"])
    train(cfg)
    record = json.loads((out / "metrics.json").read_text())
    return record["time/epoch_s"][0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vae-bench", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vae", choices=["vae", "ae", "conv_vae"])
    parser.add_argument("--data", default="mnist", choices=["mnist", "fashion_mnist"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", default=str(REPO_ROOT / "data"))
    parser.add_argument("--out", default="bench.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)

    overrides = [
        f"model={args.model}",
        f"data={args.data}",
        f"paths.data_dir={args.data_dir}",
        "data.val_on_test=true",  # train on all 60k, as the bare loop does
        "trainer.max_epochs=1",
        "trainer.accelerator=cpu",
        "test=false",
    ]
    cfg = compose_cfg([*overrides, "paths.output_dir=unused"])
    import hydra

    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    images = datamodule.splits["train"][0].float().div_(255)  # preloaded, converted once

    times: dict[str, list[float]] = {"framework": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(args.repeats):
            times["bare"].append(bare_epoch(cfg, images, seed=run))
            times["framework"].append(framework_epoch(overrides, Path(tmp), run))
            log.info(
                "run %d: bare %.3f s, framework %.3f s",
                run,
                times["bare"][-1],
                times["framework"][-1],
            )
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "model": args.model,
        "data": args.data,
        "images_per_epoch": len(images),
        "batch_size": cfg.data.batch_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "seconds_per_epoch": times,
        "median_s": med,
        "ratio_framework_over_bare": med["framework"] / med["bare"],
        "torch": torch.__version__,
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    log.info(
        f"{args.model} on {args.data}, {len(images)} images, batch {cfg.data.batch_size}, "
        f"{args.threads} threads, medians of {args.repeats}:\n"
        f"  bare loop  {med['bare']:.3f} s/epoch\n"
        f"  framework  {med['framework']:.3f} s/epoch\n"
        f"  ratio      {result['ratio_framework_over_bare']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
