"""The fast step (training.fast): several optimizer steps per Lightning step, to the same
figures as Lightning's automatic step; its CUDA-graph path run on the CPU with CUDA faked."""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import run_cli, small_overrides
from vae_lightning.config import compose
from vae_lightning.errors import ConfigError, NonFiniteLossError, RunInterrupted
from vae_lightning.train import train
from vae_lightning.training import chunks, fast

# 512 training images in batches of 60: 9 steps an epoch, the last of 32 images; chunks of 4:
# 4, 4 and 1 batches (the last chunk short, its batch short)
RUN = [
    "data.batch_size=60", "trainer.max_epochs=3", "logger=none", "callbacks=minimal",
    "trainer.log_every_n_steps=2", "threads=1", "test=true",
]  # fmt: skip
MODELS = {
    "vae": ["model=vae", "model.hidden_dim=32", "data.binarize=dynamic"],
    "ae": ["model=ae", "model.hidden_dim=32"],
    "conv_vae": ["model=conv_vae", "model.channels=[4,8,8]", "scheduler=cosine"],
    "cvae": ["model=cvae", "model.hidden_dim=32", "kl=warmup", "model.kl.length=5",
             "model.kl.unit=step"],
}  # fmt: skip


def run(data_dir: Path, folder: Path, *overrides: str) -> Path:
    train(compose([*small_overrides(data_dir, folder), *RUN, *overrides]))
    return folder


def history(folder: Path) -> list[dict[str, float]]:
    with open(folder / "history.csv") as f:
        return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(f)]


def assert_same_training(a: Path, b: Path, rel: float = 1e-5) -> None:
    """The same epochs (steps, every train/ and val/ value) and the same test figures."""
    ha, hb = history(a), history(b)
    assert [r["step"] for r in ha] == [r["step"] for r in hb]
    for ra, rb in zip(ha, hb, strict=True):
        keys = {k for k in ra if "/" in k and not k.startswith("time/")}
        assert keys == {k for k in rb if "/" in k and not k.startswith("time/")}
        for k in keys:
            assert rb[k] == pytest.approx(ra[k], rel=rel, abs=1e-7), (ra["epoch"], k)
    ma = json.loads((a / "metrics.json").read_text())["metrics"]
    mb = json.loads((b / "metrics.json").read_text())["metrics"]
    for k, v in ma.items():
        assert mb[k] == pytest.approx(v, rel=rel, abs=1e-7), k


@pytest.mark.parametrize("kind", list(MODELS))
def test_the_eager_chunk_trains_as_the_automatic_step(kind, data_dir, tmp_path):
    """Per epoch the same losses, steps and test figures (dynamic binarization, a step-wise KL
    warm-up, a cosine learning rate: their draws and schedules per optimizer step), the last
    short batch trained, and a checkpoint that loads under the automatic step."""
    auto = run(data_dir, tmp_path / "auto", *MODELS[kind], "step.name=automatic")
    quick = run(data_dir, tmp_path / "fast", *MODELS[kind], "step.name=fast", "step.chunk=4")
    assert_same_training(auto, quick)
    assert [r["step"] for r in history(quick)] == [9, 18, 27]  # 9 steps an epoch, none lost
    ckpt = torch.load(quick / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 27
    group = ckpt["optimizer_states"][0]["param_groups"][0]
    assert isinstance(group["lr"], float) and group["capturable"] is False  # a plain Adam's
    # its weights load as any checkpoint's; it continues with the same step only (Lightning
    # counts automatic and manual optimization's steps apart)
    with pytest.raises(
        ConfigError,
        match=r"step.name is automatic, but .* was trained with "
        r"step.name=fast: continue it with the same step",
    ):
        run(data_dir, tmp_path / "more", *MODELS[kind], "step.name=automatic",
            f"resume={quick / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=4")  # fmt: skip
    run(data_dir, tmp_path / "fast_more", *MODELS[kind], "step.name=fast",
        f"resume={quick / 'checkpoints' / 'last.ckpt'}", "trainer.max_epochs=4")  # fmt: skip
    assert [r["step"] for r in history(tmp_path / "fast_more")][-1] == 36


class SignalAtChunk(L.Callback):
    """SIGTERM to this process during the training step at global step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_a_run_stopped_by_sigterm_resumes_at_its_chunk_as_if_never_stopped(data_dir, tmp_path):
    args = ["model=vae", "model.hidden_dim=32", "step.name=fast", "step.chunk=4"]
    whole = run(data_dir, tmp_path / "whole", *args)
    cut = [*args, "+callbacks.signal._target_=tests.training.test_fast_step.SignalAtChunk",
           "+callbacks.signal.step=13"]  # fmt: skip
    with pytest.raises(RunInterrupted) as info:
        run(data_dir, tmp_path / "cut", *cut)
    # epoch 1 is steps 9-17, its chunks 9-12, 13-16, 17: stopped after the chunk of step 13
    assert info.value.step == 17
    last = torch.load(tmp_path / "cut" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 17)
    run(data_dir, tmp_path / "cut", *args, f"resume={tmp_path / 'cut'}")
    assert_same_training(whole, tmp_path / "cut", rel=1e-6)


def test_the_non_finite_stop_fires_inside_a_chunk_before_its_backward(data_dir, tmp_path):
    """The 7th step's loss is made NaN (the 3rd step of the 2nd chunk): the run stops naming
    that step, and the weights that trained before it are the last ones saved."""
    from vae_lightning.models import VAE

    terms, calls = VAE.terms, []

    def poisoned(self, x, **knobs):
        out = terms(self, x, **knobs)
        if self.training and torch.is_grad_enabled():
            calls.append(1)
            if len(calls) == 7:
                out = {**out, "objective": out["objective"] * math.nan}
        return out

    folder = tmp_path / "nan"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(VAE, "terms", poisoned)
        with pytest.raises(NonFiniteLossError, match=r"non-finite training loss \(nan\) at "
                                                     r"epoch 0, step 6\. Last good checkpoint: "
                                                     r"none yet"):  # fmt: skip
            run(data_dir, folder, "model=vae", "model.hidden_dim=32", "step.name=fast",
                "step.chunk=4")  # fmt: skip
    record = json.loads((folder / "metrics.json").read_text())
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]
    assert not list((folder / "checkpoints").glob("*.ckpt"))


def test_a_bad_fast_step_setting_is_one_line_naming_its_key(data_dir, tmp_path):
    for override, key in (("step.chunk=0", "step.chunk"), ("step.name=turbo", "step.name"),
                          ("+step.batches=3", "step")):  # fmt: skip
        with pytest.raises(ConfigError) as info:
            run(data_dir, tmp_path / key, "step.name=fast", override)
        assert info.value.key == key


def test_step_auto_is_the_fast_step_on_a_gpu_only_once_measured_there(monkeypatch):
    from vae_lightning.models import VAE
    from vae_lightning.training import AutomaticStep, attach, choice

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for accelerator, on_gpu in (("cpu", False), ("auto", True), ("gpu", True)):
        chosen = attach(VAE(latent_dim=2, hidden_dim=8), {"name": "auto"}, accelerator)
        kind = fast.FastStep if on_gpu and choice.FAST_ON_CUDA else AutomaticStep
        assert type(chosen) is kind, accelerator


# --- the CUDA-graph path, on the CPU ----------------------------------------------------------


class FakeGraph:
    """A CUDA graph on the CPU: ``torch.cuda.graph(g)`` runs its block (a real capture runs
    nothing), and the replay right after it is free; every later replay runs the block again."""

    def __init__(self) -> None:
        self.body = None
        self.replays = 0
        self.fresh = False

    def replay(self) -> None:
        self.replays += 1
        if self.fresh:  # the capture ran this chunk
            self.fresh = False
            return
        self.body()


def fake_cuda(monkeypatch) -> list[FakeGraph]:
    """torch.cuda's graph, stream and generator calls the fast step makes, faked on the CPU,
    and the graph path chosen as on a GPU. Returns the graphs made."""
    graphs: list[FakeGraph] = []

    def make_graph():
        graphs.append(FakeGraph())
        return graphs[-1]

    @contextlib.contextmanager
    def capturing(graph):
        graph.fresh = True  # the block runs now: the replay that follows is free
        yield

    capture = chunks.ChunkRunner._capture

    def capture_and_record(self, step, with_beta):  # what a later replay runs again
        capture(self, step, with_beta)
        self.graph.body = self.body

    class Stream:
        def wait_stream(self, other):
            pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", make_graph)
    monkeypatch.setattr(torch.cuda, "graph", capturing)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: Stream())
    monkeypatch.setattr(chunks.ChunkRunner, "_capture", capture_and_record)
    monkeypatch.setattr(fast.FastStep, "uses_graph", lambda self, model: self.cuda_graph)
    return graphs


def test_the_graph_path_trains_as_the_eager_chunk_with_cuda_faked(data_dir, tmp_path, monkeypatch):
    """Everything the CUDA path does but the kernels: the warm-up chunk, the capture, the static
    buffers filled before each replay (indices, KL weights), the sums, losses and first bad step
    read after it, the capturable Adam with its rate as a tensor; to the eager chunk's figures
    (a float32 rate: 1e-7 of it apart)."""
    args = ["model=vae", "model.hidden_dim=32", "step.name=fast", "step.chunk=2",
            "kl=warmup", "model.kl.length=10", "model.kl.unit=step"]  # fmt: skip
    eager = run(data_dir, tmp_path / "eager", *args)
    graphs = fake_cuda(monkeypatch)
    graphed = run(data_dir, tmp_path / "graph", *args)
    # 9 steps an epoch in chunks of 2: 4 full chunks (the first of the fit eager, as warm-up)
    # and a short one, eager; 3 epochs: 11 replays of the one graph captured
    assert len(graphs) == 1 and graphs[0].replays == 11
    assert_same_training(eager, graphed, rel=1e-5)


def test_a_chunk_finds_the_first_step_whose_objective_is_not_finite_per_element():
    """ChunkRunner's accumulation, eagerly: the sums over the images, each step's loss, and
    the first non-finite step of each element of the objective (a stack's jobs each)."""
    values = [torch.tensor([1.0, 2.0]), torch.tensor([math.nan, 3.0]),
              torch.tensor([5.0, math.inf])]  # fmt: skip

    def step(index, beta, k):
        return {"loss": values[k] + 0.0, "objective": values[k] * (1.0 if beta is None else beta)}

    batches = [torch.arange(4), torch.arange(4), torch.arange(2)]
    result = chunks.ChunkRunner(3, graph=False).run(step, batches, None)
    assert result.keys == ("loss", "objective") and result.images == 10
    assert result.first_bad.tolist() == [1, 2]
    torch.testing.assert_close(result.losses, torch.stack(values), equal_nan=True)
    assert result.sums[0].tolist()[1] == math.inf  # 2*4 + 3*4 + inf*2


@pytest.mark.slow
def test_a_ddp_run_of_the_fast_step_trains_as_the_automatic_one(data_dir, tmp_path):
    """Two gloo processes each, the fast step's chunk averaging the gradients over them as DDP
    does: the same epochs as the automatic step under DDP."""
    out = tmp_path / "sweep"
    result = run_cli(
        "-m", "trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "model=vae",
        "model.hidden_dim=32", "step.name=automatic,fast", "step.chunk=3",
        f"hydra.sweep.dir={out}", *small_overrides(data_dir, out / "unused")[:1], *RUN,
        "data.verify=false", "data.download=false", "data.val_size=128",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (auto,) = out.glob("*step.name=automatic*")
    (quick,) = out.glob("*step.name=fast*")
    assert_same_training(auto, quick)
    assert [r["step"] for r in history(quick)] == [5, 10, 15]  # 256 images a rank, 60 a batch


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_graph_replays_and_trains_as_the_eager_chunk(data_dir, tmp_path):
    args = ["model=vae", "model.hidden_dim=32", "step.name=fast", "step.chunk=4",
            "trainer.accelerator=gpu"]  # fmt: skip
    eager = run(data_dir, tmp_path / "eager", *args, "step.cuda_graph=false")
    graphed = run(data_dir, tmp_path / "graph", *args)
    # the noise of a replayed graph is the CUDA generator's, drawn in another order of
    # kernels than eagerly: the figures agree as two seeds' would, within a few per cent
    ha, hb = history(eager), history(graphed)
    assert [r["step"] for r in ha] == [r["step"] for r in hb] == [9, 18, 27]
    assert hb[-1]["train/loss"] == pytest.approx(ha[-1]["train/loss"], rel=0.05)
    assert hb[-1]["train/loss"] < hb[0]["train/loss"]


# --- a sweep's stack in chunks ----------------------------------------------------------------


STACK = {
    "vae": ["model=vae", "model.hidden_dim=32", "data.binarize=dynamic"],
    "ae": ["model=ae", "model.hidden_dim=32"],
}


def stack_cfg(data_dir, folder, kind, job):
    from omegaconf import OmegaConf

    composed = compose([*small_overrides(data_dir, folder), *RUN, *STACK[kind], *job,
                        "step.name=fast", "step.chunk=4"])  # fmt: skip
    return OmegaConf.create(OmegaConf.to_container(composed, resolve=True))


@pytest.mark.parametrize(("kind", "graphed"), [("vae", False), ("ae", False), ("vae", True)])
def test_a_stack_in_chunks_trains_each_job_as_the_job_alone_with_the_fast_step(
    kind, graphed, data_dir, tmp_path, monkeypatch
):
    """A fused group whose jobs take the fast step trains in chunks (the same runner; with
    CUDA faked, its graph path); each job then finishes with its own fast step and equals
    the job alone."""
    from omegaconf import open_dict

    from vae_lightning.sweeps.stacked import train_group

    jobs = [("model.latent_dim=2", "seed=0"), ("model.latent_dim=5", "seed=1")]
    for n, job in enumerate(jobs):
        train(stack_cfg(data_dir, tmp_path / f"alone{n}", kind, job))
    if graphed:
        graphs = fake_cuda(monkeypatch)
        monkeypatch.setattr(fast.FastStep, "uses_graph", lambda self, model: False)
        from vae_lightning.training.stack import Stack

        monkeypatch.setattr(Stack, "uses_graph", lambda self: True)
    stacked = [stack_cfg(data_dir, tmp_path / f"stack{n}", kind, job) for n, job in enumerate(jobs)]
    assert train_group(stacked, [tmp_path / f"stack{n}" for n in range(2)]) == []
    if graphed:  # 9 steps an epoch in chunks of 4: 2 full a epoch, the fit's first eager
        assert len(graphs) == 1 and graphs[0].replays == 5
    for n, c in enumerate(stacked):
        with open_dict(c):
            c.resume = True
        train(c)
        assert_same_training(tmp_path / f"alone{n}", tmp_path / f"stack{n}", rel=1e-4)
