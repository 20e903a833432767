"""Checkpoints (run.checkpoints), the one home of their refusals: a missing file, a file that
would run code, and a damaged one are three different messages, none of which passes on torch's
hint to load with weights_only=False; the model class a checkpoint holds is told from its record
and its weights and checked against the configured model; a failed write keeps the previous
file; checkpoints of earlier code still load and evaluate as they did. (That these refusals reach
the user as one line, through vae-evaluate and vae-train resume=: tests/test_cli.py.)"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from tests.conftest import FIXTURES, RunsCode, write_synthetic
from vae_lightning.errors import ConfigError, DataError
from vae_lightning.models import AE, MODELS, VAE
from vae_lightning.run.checkpoints import (
    ADVICE,
    check_fits,
    load_model,
    model_class,
    read,
    torch_reason,
)

REAL = FIXTURES / "pre_redesign" / "vae.ckpt"
PRE_FLOORS = FIXTURES / "pre_floors"


class NotAllowed:  # a class torch's weights_only unpickler does not admit
    pass


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


def test_a_checkpoint_holding_an_object_of_any_other_class_is_not_loaded(tmp_path):
    path = tmp_path / "object.ckpt"
    torch.save({**torch.load(REAL, weights_only=True), "extra": NotAllowed()}, path)
    assert refused(path) == (
        f"{path} was not loaded: it holds a {__name__}.NotAllowed object, not only tensors and "
        f"plain containers, and unpickling it could run code. {ADVICE}"
    )


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


@pytest.mark.parametrize("name", ["vae", "ae", "conv_vae", "cvae", "hvae", "vq_vae"])
def test_checkpoints_written_before_the_floors_load_and_evaluate_as_they_did(name, tmp_path):
    """Each model's checkpoint written by the code before the package was split (9857f7e,
    fixtures/pre_floors/README.md) evaluates to the test terms that code measured. On the CPU,
    as they were measured (a GPU's TF32 convolutions round differently), to 1e-4: a forward pass
    of fixed weights on fixed images, which another BLAS rounds in the 7th digit, while any
    change of the maths or the data moves them by far more."""
    from vae_lightning.evaluate import evaluate

    run = tmp_path / name
    shutil.copytree(PRE_FLOORS / name, run)
    data = write_synthetic(tmp_path / "data")
    result = evaluate(run / "checkpoints" / "last.ckpt", data_dir=data, k=1, n_fid=0,
                      batch_size=128, device="cpu")  # fmt: skip
    expected = json.loads((PRE_FLOORS / "expected.json").read_text())[name]
    assert set(expected) <= set(result["metrics"])
    for key, value in expected.items():
        assert result["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
    model = MODELS[result["model"]].load_from_checkpoint(run / "checkpoints" / "last.ckpt")
    assert model.latent_dim == 3


VAE_CKPT = PRE_FLOORS / "vae" / "checkpoints" / "last.ckpt"  # a VAE of latent 3, hidden 4
AE_CKPT = PRE_FLOORS / "ae" / "checkpoints" / "last.ckpt"


def test_the_model_class_is_told_from_the_record_and_checked_against_the_weights():
    vae, ae = (torch.load(p, weights_only=True) for p in (VAE_CKPT, AE_CKPT))
    path = Path("x.ckpt")
    assert model_class(vae, path) == "VAE" and model_class(ae, path) == "AE"
    assert vae["vae_lightning"]["model_class"] == "VAE"  # recorded by the model itself

    def recorded(name):
        return {**vae, "vae_lightning": {**vae["vae_lightning"], "model_class": name}}

    unrecorded = {k: v for k, v in ae.items() if k != "vae_lightning"}
    assert model_class(unrecorded, path) == "AE"  # from the weights alone
    with pytest.raises(ConfigError, match="records model_class=AE but holds the weights of a VAE"):
        model_class(recorded("AE"), path)
    with pytest.raises(ConfigError, match="only vae_lightning's"):
        model_class(recorded("os.system"), path)
    with pytest.raises(ConfigError, match="weights of none of vae_lightning's models"):
        model_class({"state_dict": {"fc.weight": torch.zeros(1)}}, path)


def test_a_checkpoint_of_another_class_or_shape_does_not_fit():
    check_fits(VAE_CKPT, VAE(latent_dim=3, hidden_dim=4))  # fits
    with pytest.raises(ConfigError, match=r"holds a VAE, but the configured model is a AE"):
        check_fits(VAE_CKPT, AE(latent_dim=3, hidden_dim=4))
    with pytest.raises(
        ConfigError, match=r"encoder\.net\.3\.weight has shape \(6, 4\) there and \(10, 4\) here"
    ):
        check_fits(VAE_CKPT, VAE(latent_dim=5, hidden_dim=4))


def test_weights_that_do_not_fit_their_own_hyper_parameters_are_refused(tmp_path):
    checkpoint = torch.load(VAE_CKPT, weights_only=True)
    checkpoint["hyper_parameters"]["latent_dim"] = 8
    wrong = tmp_path / "wrong_hparams.ckpt"
    torch.save(checkpoint, wrong)
    with pytest.raises(ConfigError, match=r"weights do not fit a VAE .*size mismatch"):
        load_model(wrong, "VAE", torch.device("cpu"))


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path, monkeypatch):
    import errno

    from vae_lightning.run.checkpoints import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left
