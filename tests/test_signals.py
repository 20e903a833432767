"""Every tool stopped by a signal exits as a process killed by it would (128 + its number: 143
for SIGTERM, 130 for SIGINT), with one line that says where it stopped and the command that
continues it; never 0, never a traceback. (vae-train's own stop and resume: tests/run/.)"""

from __future__ import annotations

import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO_ROOT, write_synthetic

STUDY_TRAIN = "train=['data.verify=false','data.download=false','trainer.accelerator=cpu']"


def stop_when(command: list[str], marker: str, signum: int, tmp_path: Path, timeout: float = 180):
    """Start ``command``; once ``marker`` is in its output (it is at work), send ``signum``;
    return its exit status and output."""
    log = tmp_path / "output.txt"
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while marker not in log.read_text(errors="replace"):
            assert proc.poll() is None, log.read_text()[-3000:]  # ended before it was stopped
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        time.sleep(0.5)
        proc.send_signal(signum)
        code = proc.wait(timeout=120)
    return code, log.read_text(errors="replace")


def assert_stopped(code: int, output: str, signum: int, tool: str, args: list[str]) -> str:
    assert code == 128 + signum, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    # a progress bar's last frame (no newline after it) may precede the line on its row
    lines = [line[line.index("interrupted: ") :] for line in output.splitlines()
             if "interrupted: " in line]  # fmt: skip
    assert len(lines) == 1, output[-3000:]
    assert lines[0].endswith(f"Run it again to finish: {shlex.join([tool, *args])}"), lines[0]
    return lines[0]


def tool(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


@pytest.fixture
def data(tmp_path) -> Path:
    return write_synthetic(tmp_path / "data")


def test_a_tool_stopped_anywhere_exits_with_the_signal_and_the_command(tmp_path):
    """The tools' shared entry point (config.tool_main), on a tool that waits (as vae-report
    or vae-data would while reading): SIGINT and SIGTERM both."""
    script = (
        "import sys, time\n"
        "from vae_lightning import config\n"
        "@config.tool_main('report')\n"
        "def main(cfg):\n"
        "    print('working', flush=True)\n"
        "    time.sleep(60)\n"
        "sys.argv[0] = 'vae-slow'\n"
        "sys.exit(main())\n"
    )
    for signum in (signal.SIGINT, signal.SIGTERM):
        args = ["dir=somewhere"]
        code, output = stop_when([sys.executable, "-c", script, *args], "working", signum,
                                 tmp_path)  # fmt: skip
        line = assert_stopped(code, output, signum, "vae-slow", args)
        assert line.startswith(f"interrupted: {signal.Signals(signum).name} received")


@pytest.mark.slow
def test_vae_prior_stopped_while_it_trains(tmp_path, data):
    run = tmp_path / "run"  # the prior writes its TensorBoard logs into the run's folder
    shutil.copytree(FIXTURES / "pre_floors" / "vq_vae", run)
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
            f"data_dir={data}", "epochs=100000", f"out={tmp_path / 'prior.ckpt'}",
            "accelerator=cpu"]  # fmt: skip
    # its progress bar (rich) is drawn at the end only, into a file: the trainer's first lines
    code, output = stop_when([tool("vae-prior"), *args], "TPU available", signal.SIGTERM,
                             tmp_path)  # fmt: skip
    assert_stopped(code, output, signal.SIGTERM, "vae-prior", args)
    assert not (tmp_path / "prior.ckpt").exists()  # nothing half-written


@pytest.mark.slow
def test_vae_evaluate_stopped_while_it_measures(tmp_path, data):
    run = tmp_path / "run"
    shutil.copytree(FIXTURES / "pre_floors" / "vae", run)
    args = [f"ckpt={run / 'checkpoints' / 'last.ckpt'}", f"data_dir={data}", "verify=false",
            "k=5000", "n_fid=0", "device=cpu"]  # fmt: skip
    code, output = stop_when([tool("vae-evaluate"), *args], "evaluating", signal.SIGINT, tmp_path)
    assert_stopped(code, output, signal.SIGINT, "vae-evaluate", args)
    assert not (run / "eval.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("vae-reproduce", ["quick=true", "k=2", "n_fid=0"]),
        ("vae-claims", ["epochs=50", "variants=[baseline]", "k=2", "n_fid=64"]),
        ("vae-zoo", ["epochs=50", "runs=[seed1_vae]", "k=2", "n_fid=64"]),
        ("vae-bench", ["models=[vae]", "repeats=1", "startup_repeats=1", "seeds_loop=false"]),
    ],
)
def test_a_study_stopped_while_it_trains_names_its_rerun(tmp_path, data, name, extra):
    """The studies train through train(): its checkpoint is saved first, and rerunning the
    study continues it (resume=true)."""
    out = ["out=" + str(tmp_path / ("bench.json" if name == "vae-bench" else "out"))]
    args = [*extra, *out, f"data_dir={data}", STUDY_TRAIN]
    code, output = stop_when([tool(name), *args], "Epoch 0", signal.SIGTERM, tmp_path)
    line = assert_stopped(code, output, signal.SIGTERM, name, args)
    assert line.startswith("interrupted: SIGTERM")
