"""Performance work must not change results; GPU options are tested where there is a GPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vae_lightning.train import REPO_ROOT, train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# Measured with commit 148b6a8 (before the performance work: per-step non-fused Adam) on the
# synthetic data of conftest.py: seed 0, 3 epochs, batch 64, val_size 128, callbacks=minimal.
BEFORE = {
    "train/loss": 317.92950439453125,
    "val/loss": 314.2677001953125,
    "test/loss": 314.0056457519531,
}
PINNED = ["callbacks=minimal", "trainer.max_epochs=3", "logger=none"]


@pytest.mark.parametrize("fused", [True, False])
def test_same_seed_gives_the_same_losses_as_before_the_performance_work(compose_cfg, fused):
    cfg = compose_cfg(*PINNED, f"model.fused_adam={str(fused).lower()}")
    train(cfg)
    metrics = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]
    for key, value in BEFORE.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5), key


def test_composing_and_importing_does_not_pay_for_what_a_run_does_not_use():
    """Start-up: the entry point and the config do not import Lightning, scikit-learn or the
    report (they are imported where used: training, probes, the end of a sweep). (matplotlib
    and scipy come with Lightning's torchmetrics when a run imports Lightning.)"""
    code = (
        "import sys\n"
        "from hydra import compose, initialize_config_dir\n"
        "from vae_lightning.train import CONFIG_DIR\n"
        "with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base='1.3'):\n"
        "    compose(config_name='train')\n"
        "print(sorted(m for m in ('lightning', 'sklearn', 'vae_lightning.report')"
        " if m in sys.modules))\n"
        "import vae_lightning.models, vae_lightning.data, vae_lightning.callbacks\n"
        "print(sorted(m for m in ('sklearn', 'vae_lightning.report') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "[]"]


@needs_cuda
def test_dataset_resident_on_the_gpu(compose_cfg):
    cfg = compose_cfg(
        "debug=limit", "callbacks=minimal", "trainer.accelerator=gpu", "data.on_device=true"
    )
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok"


@needs_cuda
def test_bf16_mixed_precision(compose_cfg):
    cfg = compose_cfg(
        "debug=limit",
        "callbacks=minimal",
        "trainer.accelerator=gpu",
        "trainer.precision=bf16-mixed",
    )
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["test/loss"] > 0


@needs_cuda
def test_compiled_model(compose_cfg):
    cfg = compose_cfg(
        "debug=limit", "callbacks=minimal", "trainer.accelerator=gpu", "model.compile=true"
    )
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok"


def test_on_device_is_a_no_op_on_the_cpu(compose_cfg):
    cfg = compose_cfg("debug=limit", "callbacks=minimal", "data.on_device=true")
    train(cfg)
    assert json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["status"] == "ok"
