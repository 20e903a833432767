"""checkpoints.read: a missing file, a file that would run code, and a damaged one are three
different messages, and none of them passes on torch's hint to load with weights_only=False."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch

from vae_lightning.errors import ConfigError, DataError
from vae_lightning.run.checkpoints import ADVICE, read, torch_reason

REAL = Path(__file__).parent / "fixtures" / "pre_redesign" / "vae.ckpt"


class RunsCode:
    """Unpickling it would run a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def refused(path: Path) -> str:
    with pytest.raises(DataError) as err:
        read(path)
    message = str(err.value)
    assert "weights_only" not in message and "will likely succeed" not in message, message
    return message


def test_a_real_checkpoint_is_read():
    assert set(read(REAL)["state_dict"]) >= {"encoder.net.1.weight"}


def test_a_missing_file_names_the_key():
    with pytest.raises(ConfigError) as err:
        read(REAL.parent / "nope.ckpt", "resume")
    assert err.value.key == "resume"
    assert str(err.value) == (
        f"resume points to {REAL.parent / 'nope.ckpt'}, which is not a file: give a checkpoint "
        "written by vae_lightning, e.g. resume=<run folder>/checkpoints/last.ckpt"
    )


@pytest.mark.parametrize("protocol", [2, 4])
def test_a_checkpoint_that_would_run_code_is_not_loaded(tmp_path, protocol):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({**torch.load(REAL, weights_only=True), "x": RunsCode(marker)}, path,
               pickle_protocol=protocol)  # fmt: skip
    assert refused(path) == (
        f"{path} was not loaded: it holds a posix.system object, not only tensors and plain "
        f"containers, and unpickling it could run code. {ADVICE}"
    )
    assert not marker.exists()


def test_a_bare_pickle_that_would_run_code_is_not_unpickled(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)}))
    message = refused(path)
    assert message.startswith(f"{path} is truncated or not a checkpoint (not a zip archive")
    assert not marker.exists()


def test_damaged_files_are_described_as_damaged(tmp_path):
    data = REAL.read_bytes()
    truncated, noise, empty = tmp_path / "t.ckpt", tmp_path / "n.ckpt", tmp_path / "e.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    noise.write_bytes(os.urandom(4096))
    empty.write_bytes(b"")
    for path in (truncated, noise, empty):
        assert refused(path) == (
            f"{path} is truncated or not a checkpoint (not a zip archive, as torch.save "
            f"writes). {ADVICE}"
        )
    # a whole zip archive whose pickle is garbage: damaged, not "would run code"
    garbled = tmp_path / "g.ckpt"
    with zipfile.ZipFile(REAL) as zin, zipfile.ZipFile(garbled, "w") as zout:
        for info in zin.infolist():
            body = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                body = body[:2] + bytes(range(200, 250)) + body[52:]
            zout.writestr(info, body)
    message = refused(garbled)
    assert message.startswith(f"{garbled} is truncated or not a checkpoint (UnpicklingError: ")
    assert "could run code" not in message


def test_a_checkpoint_without_weights_is_not_a_lightning_checkpoint(tmp_path):
    path = tmp_path / "list.ckpt"
    torch.save([1, 2], path)
    assert refused(path) == f"{path} is not a Lightning checkpoint (no state_dict). {ADVICE}"


def test_torch_reason_drops_torch_advice():
    err = pickle.UnpicklingError(
        "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` "
        "will likely succeed, but it can result in arbitrary code execution.\n"
        "Please file an issue with the following so that we can make `weights_only=True` "
        "compatible: WeightsUnpickler error: \n\nUnsupported operand 149\n\n"
        "Check the documentation of torch.load to learn more"
    )
    assert torch_reason(err) == "UnpicklingError: Unsupported operand 149"
    zip_error = RuntimeError(
        "PytorchStreamReader failed reading zip archive: failed finding central directory. "
        "This is an internal miniz error. If you are seeing this error, ..."
    )
    assert torch_reason(zip_error) == (
        "RuntimeError: PytorchStreamReader failed reading zip archive: failed finding central "
        "directory"
    )


PRE_FLOORS = Path(__file__).parent / "fixtures" / "pre_floors"


@pytest.mark.parametrize("name", ["vae", "ae", "conv_vae", "cvae", "hvae", "vq_vae"])
def test_checkpoints_written_before_the_floors_load_and_evaluate_as_they_did(name, tmp_path):
    """Each model's checkpoint written by the code before the package was split (9857f7e,
    fixtures/pre_floors/README.md) evaluates to the test terms that code measured."""
    import json
    import shutil

    from tests.conftest import write_synthetic
    from vae_lightning.evaluate import evaluate
    from vae_lightning.models import MODELS

    run = tmp_path / name
    shutil.copytree(PRE_FLOORS / name, run)
    data = write_synthetic(tmp_path / "data")
    result = evaluate(run / "checkpoints" / "last.ckpt", data_dir=data, k=1, n_fid=0,
                      batch_size=128)  # fmt: skip
    expected = json.loads((PRE_FLOORS / "expected.json").read_text())[name]
    assert set(expected) <= set(result["metrics"])
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    model = MODELS[result["model"]].load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.latent_dim == 3
