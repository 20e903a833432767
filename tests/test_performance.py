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


@pytest.mark.parametrize(
    "option",
    [
        pytest.param("data.on_device=true", marks=needs_cuda, id="dataset-on-gpu"),
        pytest.param("trainer.precision=bf16-mixed", marks=needs_cuda, id="bf16-mixed"),
        pytest.param("model.compile=true", marks=needs_cuda, id="compile"),
        pytest.param("data.on_device=true trainer.accelerator=cpu", id="on-device-no-op-on-cpu"),
    ],
)
def test_speed_options_train_and_test(compose_cfg, option):
    accelerator = [] if "accelerator" in option else ["trainer.accelerator=gpu"]
    cfg = compose_cfg("debug=limit", "callbacks=minimal", *accelerator, *option.split())
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["test/loss"] > 0
