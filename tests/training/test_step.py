"""The step that drives a model's maths (training.step): Adam's fused kernel trains as the plain
loop does, a seed gives its numbers, torch.compile compiles the maths only, the GPU speed options
run, and DDP's epoch means are exact over uneven shards."""

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import SWEEP, history, run_cli
from vae_lightning.train import train

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# seed 0, 3 epochs of the synthetic data in batches of 64 (8 steps an epoch)
PINNED = ["callbacks=minimal", "trainer.max_epochs=3", "logger=none"]


@pytest.fixture(scope="module")
def pinned_run(data_dir, tmp_path_factory):
    """The pinned run of the default settings (Adam's fused kernel), trained once for the module."""
    from tests.conftest import small_overrides
    from vae_lightning.config import compose

    out = tmp_path_factory.mktemp("pinned")
    train(compose([*small_overrides(data_dir, out), *PINNED]))
    return out


def run_metrics(compose_cfg, *overrides: str) -> dict[str, float]:
    cfg = compose_cfg(*PINNED, *overrides)
    train(cfg)
    return json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())["metrics"]


def test_the_fused_adam_kernel_trains_as_the_plain_loop_does(compose_cfg, pinned_run):
    """Relations, not one machine's floats: the two optimizers' runs agree with each other (to
    rounding, which 3 epochs of Adam amplify), and the run learns."""
    fused = json.loads((pinned_run / "metrics.json").read_text())["metrics"]
    plain = run_metrics(compose_cfg, "model.fused_adam=false")
    assert set(plain) == set(fused)
    for key in ("train/loss", "val/loss", "test/loss", "test/recon", "test/kl"):
        assert plain[key] == pytest.approx(fused[key], rel=1e-3), key
    epochs = history(pinned_run)
    losses = [row["train/loss"] for row in epochs]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2], losses
    assert epochs[-1]["val/loss"] < epochs[0]["val/loss"]
    assert fused["val/loss"] == epochs[-1]["val/loss"]


def test_same_seed_same_numbers_other_seed_other_numbers(compose_cfg, tmp_path, pinned_run):
    a = json.loads((pinned_run / "metrics.json").read_text())["metrics"]
    b = run_metrics(compose_cfg, f"paths.output_dir={tmp_path / 'b'}")
    c = run_metrics(compose_cfg, f"paths.output_dir={tmp_path / 'c'}", "seed=1")
    assert a == b  # bit for bit
    assert a["train/loss"] != c["train/loss"] and a["test/loss"] != c["test/loss"]


def test_compile_compiles_the_maths_not_the_networks():
    from vae_lightning.models import VAE
    from vae_lightning.training import AutomaticStep

    model = AutomaticStep().bind(VAE(latent_dim=2, compile=True))
    names = set(model.state_dict())
    model.configure_model()  # the step compiles what it runs
    assert model.terms_fn is not model.terms
    assert hasattr(model.terms_fn, "_torchdynamo_orig_callable")  # torch.compile's wrapper
    assert set(model.state_dict()) == names  # no _orig_mod. prefixes in checkpoints
    plain = AutomaticStep().bind(VAE(latent_dim=2))
    plain.configure_model()
    assert plain.terms_fn == plain.terms


@needs_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("option", ["trainer.precision=bf16-mixed", "model.compile=true"])
def test_gpu_speed_options_train_and_test(compose_cfg, option):
    cfg = compose_cfg("debug=limit", "callbacks=minimal", "trainer.accelerator=gpu", option)
    train(cfg)
    record = json.loads((Path(cfg.paths.output_dir) / "metrics.json").read_text())
    assert record["status"] == "ok" and record["metrics"]["test/loss"] > 0


@pytest.mark.slow
def test_a_multirun_of_ddp_jobs_logs_exact_means_over_uneven_shards(data_dir, tmp_path):
    """Each job of a multirun on two gloo processes, the default callbacks. 131 validation
    images on 2 ranks (66 + 65, in batches of 32, 32, 2 and 32, 32, 1): the logged val/loss is
    the mean over the 131 images, not a mean of the ranks' or batches' means. The AE is
    deterministic, so the checkpoint's val loss can be recomputed in one process. (With 129
    images, rank 0 has 3 batches and rank 1 two, and the logged mean covers only the first two
    batches of each rank: Lightning's DDP evaluation stops at the shorter shard.)"""
    import torch
    from omegaconf import OmegaConf

    from vae_lightning.data import MNISTDataModule
    from vae_lightning.models import AE
    from vae_lightning.models.losses import recon_bce

    out = tmp_path / "sweep"
    result = run_cli(
        "-m", "trainer=ddp", "trainer.devices=2", "model=ae", "model.latent_dim=2,3",
        "debug=limit", "trainer.limit_train_batches=null", "trainer.limit_val_batches=1.0",
        f"paths.data_dir={data_dir}", f"hydra.sweep.dir={out}", *SWEEP,
        # after SWEEP, whose val_size=128 would win (Hydra keeps the last of a key's overrides)
        "data.batch_size=64", "data.val_size=131", "data.eval_batch_size=32",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    dm = MNISTDataModule(data_dir=str(data_dir), verify=False, val_size=131)
    dm.setup()
    x = dm.splits["val"][0].float() / 255
    jobs = sorted(p.parent for p in out.glob("*/metrics.json"))
    assert len(jobs) == 2
    for job in jobs:
        record = json.loads((job / "metrics.json").read_text())
        assert record["status"] == "ok"
        assert OmegaConf.load(job / ".hydra" / "config.yaml").data.val_size == 131
        # 509 training images, 2 ranks of 255 or fewer, batch 64: 4 steps an epoch, 2 epochs
        # (one process alone would take 8 an epoch): both processes trained every job
        assert [int(row["step"]) for row in history(job)] == [4, 8]

        logged = record["metrics"]["val/loss"]
        model = AE.load_from_checkpoint(job / "checkpoints" / "last.ckpt", weights_only=True)
        with torch.no_grad():
            per_image = recon_bce(model.eval().decoder(model.encoder(x)), x).double()  # (131,)
        exact = per_image.mean().item()
        ranks = (per_image[0::2].mean() + per_image[1::2].mean()).item() / 2  # a mean of means
        batches = [per_image[r::2][i : i + 32].mean() for r in (0, 1) for i in (0, 32, 64)]
        wrong = [ranks, torch.stack(batches).mean().item()]
        # the images' losses are alike here (a spread of a few nats): the wrong means differ
        # from the exact one by 1e-4 of it or less, the logged one by rounding (1e-7 of it)
        gap = min(abs(w - exact) for w in wrong)
        assert gap > 1e-7 * exact
        assert abs(logged - exact) < gap / 4, (job.name, logged, exact, wrong)
