"""``make bench-gpu``: every GPU check in one command, one table and one JSON file
(``bench_gpu.json``). Needs a CUDA GPU: anywhere else it ends at once, in one line.

In order, each a process of its own, each recorded as soon as it ends (a failure is recorded
and the next goes on), all within ``BENCH_GPU_BUDGET_S`` seconds (default 540; a check that
would start after it is recorded as skipped):

1. ``tests``: the tests marked ``gpu``;
2. ``bench``: ``vae-bench device=cuda`` (studies/cuda_bench.py): the default and the fast step
   against a bare eager loop, the seeds' loop and a whole-step CUDA-graph reference;
3. ``mnist_vae``: the MNIST VAE study's 20 epochs with the fast step and the default callbacks;
4. ``fashion_convvae``: the Fashion-MNIST ConvVAE study's 100 epochs with the fast step;
5. ``sweep``: the 20-job latent_dim x beta grid at 20 epochs through the fused launcher on the
   GPU;
6. ``resume``: a fast-step run stopped by SIGTERM after its first epoch and resumed, against
   the same run uninterrupted.

A machine with the package's dependencies but no Hydra (a GPU box with PyTorch only) is
prepared with ``make gpu-bundle`` here: ``.gpu/site`` holds Hydra, OmegaConf and ANTLR (pure
Python) and ``.gpu/data_gz`` the raw datasets gzipped; carry ``.gpu`` along and run ``make
bench-gpu`` there (the Makefile puts ``.gpu/site`` on the path; the data is unpacked here).
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "vae_lightning.train"]
# the CPU figures of the same runs (2 cores, docs/reproduction.md), beside the GPU's
TARGETS = {"mnist_vae": "fit <= 10 s", "fashion_convvae": "fit <= 90 s",
           "sweep": "<= 90 s", "bench": "f/g <= 1.5"}  # fmt: skip


def unpack_data(root: Path = REPO) -> None:
    """``.gpu/data_gz/<Dataset>/*.gz`` into ``data/<Dataset>/raw/`` where a file is missing."""
    for packed in sorted((root / ".gpu" / "data_gz").glob("*/*.gz")):
        raw = root / "data" / packed.parent.name / "raw" / packed.stem
        if not raw.is_file():
            raw.parent.mkdir(parents=True, exist_ok=True)
            with gzip.open(packed, "rb") as src, open(raw, "wb") as dst:
                shutil.copyfileobj(src, dst)


def _run(args: list[str], timeout: float) -> tuple[int, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, time.perf_counter() - t0, proc.stdout + proc.stderr


def _record(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def check_tests(out: Path, budget: float) -> dict[str, Any]:
    """The tests marked gpu (a test module that needs a package this machine lacks is not
    collected, and said so: a GPU machine with PyTorch only may lack the extras)."""
    args = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
            "--continue-on-collection-errors", "tests"]  # fmt: skip
    _, wall, text = _run(args, budget)
    summary = [line for line in text.splitlines() if re.search(r"\d+ (passed|failed)", line)]
    failed = not summary or re.search(r"\d+ failed", summary[-1]) is not None
    return {"ok": not failed, "wall_s": wall, "summary": summary[-1:] or [text[-1500:]]}


def check_bench(out: Path, budget: float) -> dict[str, Any]:
    result = out / "bench.json"
    args = [sys.executable, "-m", "vae_lightning.studies.bench", "device=cuda", "repeats=3",
            f"out={result}"]  # fmt: skip
    code, wall, text = _run(args, budget)
    if code != 0:
        return {"ok": False, "wall_s": wall, "error": text[-2000:]}
    cuda = json.loads(result.read_text())["cuda"]
    return {"ok": True, "wall_s": wall, **cuda}


def _study(experiment: str, out: Path, budget: float, *extra: str) -> dict[str, Any]:
    folder = out / experiment
    args = [*TRAIN, f"experiment={experiment}", "step.name=fast", f"hydra.run.dir={folder}",
            *extra]  # fmt: skip
    code, wall, text = _run(args, budget)
    if code != 0:
        return {"ok": False, "wall_s": wall, "error": text[-2000:]}
    record = _record(folder)
    metrics = record["metrics"]
    return {
        "ok": True, "wall_s": wall, "fit_s": record["time/fit_s"], "epochs": record["epochs"],
        "epoch_s_median": record["time/epoch_s_median"],
        **{k: metrics[k] for k in ("test/loss", "test/kl", "probe/rf_acc") if k in metrics},
    }  # fmt: skip


def check_mnist_vae(out: Path, budget: float) -> dict[str, Any]:
    return _study("mnist_vae", out, budget)


def check_fashion_convvae(out: Path, budget: float) -> dict[str, Any]:
    return _study("fashion_convvae", out, budget)


def check_sweep(out: Path, budget: float) -> dict[str, Any]:
    folder = out / "sweep"
    args = [
        *TRAIN,
        "experiment=sweep_latent_beta",
        "hydra/launcher=fused",
        "hydra.launcher.gpu=true",
        "trainer.max_epochs=20",
        f"hydra.sweep.dir={folder}",
    ]
    code, wall, text = _run(args, budget)
    report = folder / "REPORT.md"
    line = next((s for s in report.read_text().splitlines() if " runs: " in s), "") if (
        report.is_file()) else ""  # fmt: skip
    stacked = re.findall(r"stacks of ([\d, ]+|none); (\d+) alone", text)
    return {"ok": code == 0, "wall_s": wall, "report": line, "stacks": stacked[:1],
            **({} if code == 0 else {"error": text[-2000:]})}  # fmt: skip


def check_resume(out: Path, budget: float) -> dict[str, Any]:
    """The same 3-epoch fast-step run whole, and stopped by SIGTERM once its first epoch is in
    history.csv, then resumed with the command it printed."""
    common = ["experiment=mnist_vae", "step.name=fast", "trainer.max_epochs=3",
              "callbacks=minimal"]  # fmt: skip
    whole, cut = out / "resume_whole", out / "resume_cut"
    code, _, text = _run([*TRAIN, *common, f"hydra.run.dir={whole}"], budget / 3)
    if code != 0:
        return {"ok": False, "error": text[-2000:]}
    proc = subprocess.Popen(
        [*TRAIN, *common, f"hydra.run.dir={cut}"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + budget / 3
    while time.time() < deadline and proc.poll() is None:
        history = cut / "history.csv"
        if history.is_file() and len(history.read_text().splitlines()) >= 2:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.05)
    stderr = proc.communicate(timeout=budget / 3)[1]
    command = stderr.split("Resume with:\n", 1)[-1].strip().splitlines()[0] if (
        "Resume with:" in stderr) else ""  # fmt: skip
    if proc.returncode != 143 or not command:
        return {"ok": False, "exit": proc.returncode, "error": stderr[-2000:]}
    code, _, text = _run([sys.executable, "-m", *command.split()[2:]], budget / 3)
    a, b = _record(whole), _record(cut) if code == 0 else {}
    if code != 0 or b.get("status") != "ok":
        return {"ok": False, "exit": code, "error": text[-2000:]}
    diff = {k: abs(b["metrics"][k] - v) / abs(v) for k, v in a["metrics"].items()
            if k.startswith(("test/", "train/", "val/")) and v}  # fmt: skip
    return {
        "ok": True,
        "exit_on_sigterm": 143,
        "epochs": b["epochs"],
        "max_rel_diff": max(diff.values()),
        "diff_s": {k: diff[k] for k in sorted(diff)},
    }


CHECKS: dict[str, Callable[[Path, float], dict[str, Any]]] = {
    "tests": check_tests, "bench": check_bench, "mnist_vae": check_mnist_vae,
    "fashion_convvae": check_fashion_convvae, "sweep": check_sweep, "resume": check_resume,
}  # fmt: skip


def table(results: dict[str, Any]) -> list[str]:
    """The results as one table."""
    lines = [f"make bench-gpu on {results['device']} (torch {results['torch']})"]
    for name, r in results["checks"].items():
        state = "ok" if r.get("ok") else ("skipped" if r.get("skipped") else "FAILED")
        shown = {
            k: v
            for k, v in r.items()
            if k
            in (
                "wall_s",
                "fit_s",
                "test/loss",
                "probe/rf_acc",
                "report",
                "summary",
                "max_rel_diff",
                "epoch_s_median",
            )
        }
        lines.append(
            f"{name:<16} {state:<8} "
            + ", ".join(
                f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items()
            )
        )
        if name == "bench" and r.get("ok"):
            from vae_lightning.studies.cuda_bench import cuda_lines

            lines += ["  " + line for line in cuda_lines(r)]
    return lines


def main(argv: list[str] | None = None) -> int:
    try:
        import torch
    except ImportError:
        sys.stderr.write("error: make bench-gpu needs PyTorch with CUDA (torch cannot be "
                         "imported here)\n")  # fmt: skip
        return 1
    if not torch.cuda.is_available():
        sys.stderr.write("error: make bench-gpu needs a CUDA GPU: torch.cuda.is_available() is "
                         "False on this machine\n")  # fmt: skip
        return 1
    unpack_data()
    budget = float(os.environ.get("BENCH_GPU_BUDGET_S", 540))
    only = [a for a in (argv if argv is not None else sys.argv[1:]) if a in CHECKS] or CHECKS
    out = REPO / "outputs" / "bench_gpu"
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "targets": TARGETS, "checks": {}}  # fmt: skip
    t0 = time.perf_counter()
    for name in only:
        left = budget - (time.perf_counter() - t0)
        if left < 20:
            results["checks"][name] = {"ok": False, "skipped": True, "why": "out of time"}
        else:
            try:
                results["checks"][name] = CHECKS[name](out, left)
            except Exception:
                results["checks"][name] = {"ok": False, "error": traceback.format_exc()[-2000:]}
        (REPO / "bench_gpu.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    print("\n".join(table(results)), flush=True)
    return 0 if all(r.get("ok") for r in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
