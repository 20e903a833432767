"""The training paths on a CUDA GPU, timed in one process and alternating (``vae-bench
device=cuda``): for each model, one epoch of 60k images at batch 128, the training batches only,

- (a) the framework's default step (``step.name=automatic``, ``data.on_device=true``);
- (f) the framework's fast step (``step.name=fast``: a chunk of steps in one CUDA graph);
- (b) a bare eager loop over the split resident on the GPU;
- (c) the seeds' loop (torchvision, ``ToTensor``, a ``DataLoader`` of 2 workers, ``.item()``);
- (g) the reference: the whole step (gather, forward, backward, Adam with ``capturable=True``)
  captured in one CUDA graph and replayed once per batch.

The framework's paths are timed by their History (the training batches of the epoch); the
others by the wall clock around the epoch, synchronised. ``bench.json`` gets the medians and the
ratios f/g, a/g, f/b and a/b. Used by ``make bench-gpu`` (``studies.bench_gpu``) too.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vae_lightning import config
from vae_lightning.train import train

log = logging.getLogger(__name__)

DATA = {"vae": "mnist", "ae": "mnist", "conv_vae": "fashion_mnist"}
PATHS = {
    "a": "(a) framework, default step", "f": "(f) framework, fast step",
    "b": "(b) bare eager loop", "c": "(c) seeds' loop", "g": "(g) CUDA-graph reference",
}  # fmt: skip


def _overrides(name: str, data_dir: Path, step: str) -> list[str]:
    return [
        f"model={name}", f"data={DATA[name]}", f"paths.data_dir={data_dir}",
        "data.val_on_test=true", "data.on_device=true", "trainer.accelerator=gpu",
        "trainer.max_epochs=1", "callbacks=minimal",
        "logger=none", "test=false", f"step.name={step}", "data.verify=false",
    ]  # fmt: skip


def framework_epoch(name: str, data_dir: Path, step: str, out: Path) -> float:
    """(a) or (f): one epoch of ``train()``; its training batches' seconds (History)."""
    train(config.compose([*_overrides(name, data_dir, step), f"paths.output_dir={out}"]))
    return json.loads((out / "metrics.json").read_text())["time/epoch_s"][0]


def _model(name: str, data_dir: Path, seed: int) -> Any:
    cfg = config.compose([*_overrides(name, data_dir, "automatic"), "paths.output_dir=unused"])
    torch.manual_seed(seed)
    return config.instantiate(cfg.model, "model").cuda().train(), cfg.data.batch_size


def _loss(model: Any, x: torch.Tensor) -> torch.Tensor:
    out = model.terms(x)
    return out.get("objective", out["loss"])


def _step(model: Any, adam: torch.optim.Optimizer, images: torch.Tensor, index: Any) -> None:
    """One eager training step on the batch ``images[index]`` (uint8, converted here)."""
    loss = _loss(model, images[index].float().div_(255.0))
    adam.zero_grad(set_to_none=True)
    loss.backward()
    adam.step()


def bare_epoch(name: str, data_dir: Path, images: torch.Tensor, seed: int) -> float:
    """(b) the eager loop of pytorch/examples over the split on the GPU (uint8, converted per
    batch), Adam's fused kernel."""
    model, size = _model(name, data_dir, seed)
    adam = torch.optim.Adam(model.parameters(), lr=model.lr, fused=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for index in torch.randperm(len(images), device=images.device).split(size):
        _step(model, adam, images, index)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def seeds_epoch(name: str, data_dir: Path, seed: int) -> float:
    """(c) the seeds' data path: torchvision's dataset, ToTensor, 2 workers, ``.item()``."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    model, size = _model(name, data_dir, seed)
    cls = datasets.MNIST if DATA[name] == "mnist" else datasets.FashionMNIST
    ds = cls(str(data_dir), train=True, download=False, transform=transforms.ToTensor())
    adam = torch.optim.Adam(model.parameters(), lr=model.lr)
    t0 = time.perf_counter()
    total = 0.0
    for x, _ in DataLoader(ds, batch_size=size, shuffle=True, num_workers=2):
        loss = _loss(model, x.cuda(non_blocking=True))
        adam.zero_grad()
        loss.backward()
        adam.step()
        total += loss.item()
    return time.perf_counter() - t0


def graph_epoch(name: str, data_dir: Path, images: torch.Tensor, seed: int) -> float:
    """(g) the whole step in one CUDA graph (static index buffer, capturable Adam), replayed
    once per full batch; the short last batch eagerly. Three warm-up steps are not timed."""
    model, size = _model(name, data_dir, seed)
    lr = torch.tensor(float(model.lr), device="cuda")
    adam = torch.optim.Adam(model.parameters(), lr=lr, fused=True, capturable=True)
    index = torch.zeros(size, dtype=torch.long, device="cuda")

    def step() -> None:
        _step(model, adam, images, index)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    order = torch.randperm(len(images), device=images.device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for batch in order.split(size):
        if len(batch) == size:
            index.copy_(batch)
            graph.replay()
        else:
            _step(model, adam, images, batch)
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def bench_model(name: str, data_dir: Path, repeats: int) -> dict[str, Any]:
    """Every path's seconds per epoch for model ``name``, the paths' order rotated per run."""
    from vae_lightning.data import load_split
    from vae_lightning.data.sources import get_spec

    images = load_split(get_spec(DATA[name]).raw_dir(data_dir), "train")[0].cuda()
    times: dict[str, list[float]] = {p: [] for p in PATHS}
    order = list(PATHS)
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(repeats):
            for p in order[run % len(order) :] + order[: run % len(order)]:
                out = Path(tmp) / f"{p}{run}"
                if p in ("a", "f"):
                    seconds = framework_epoch(name, data_dir, "automatic" if p == "a" else "fast",
                                              out)  # fmt: skip
                elif p == "b":
                    seconds = bare_epoch(name, data_dir, images, run)
                elif p == "c":
                    seconds = seeds_epoch(name, data_dir, run)
                else:
                    seconds = graph_epoch(name, data_dir, images, run)
                times[p].append(seconds)
            log.info("%s run %d: %s", name, run, {p: round(t[-1], 3) for p, t in times.items()})
    med = {p: statistics.median(t) for p, t in times.items()}
    ratios = {"f/g": med["f"] / med["g"], "a/g": med["a"] / med["g"],
              "f/b": med["f"] / med["b"], "a/b": med["a"] / med["b"]}  # fmt: skip
    return {"seconds_per_epoch": times, "median_s": med, "ratios": ratios}


def bench(models: list[str], data_dir: Path, repeats: int) -> dict[str, Any]:
    """The CUDA bench of ``models``: bench.json's ``cuda`` record."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "vae_lightning.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return {
        "device": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "repeats": repeats,
        "paths": PATHS,
        "models": {name: bench_model(name, data_dir, repeats) for name in models},
    }


def cuda_lines(result: dict[str, Any]) -> list[str]:
    """The CUDA bench as the table the log shows."""
    lines = [f"{result['device']}, torch {result['torch']}, medians of {result['repeats']} "
             f"epochs (training batches, 60k images, batch 128)",
             "model     path                           s/epoch"]  # fmt: skip
    for name, r in result["models"].items():
        for p, t in r["median_s"].items():
            lines.append(f"{name:<9} {PATHS[p]:<30} {t:8.3f}")
        lines.append(f"{name:<9} " + ", ".join(f"{k} = {v:.2f}" for k, v in r["ratios"].items()))
    return lines
