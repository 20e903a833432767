"""IDX files (data.idx): a round trip, every kind of damage named with its file, a split whose
images and labels disagree."""

import gzip

import numpy as np
import pytest

from tests.conftest import synthetic_images
from vae_lightning.data import IDXError, load_split, read_idx
from vae_lightning.data.sources import idx_bytes


def test_idx_round_trip(tmp_path):
    images, labels = synthetic_images(7, seed=0)
    (tmp_path / "i").write_bytes(idx_bytes(images))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    assert np.array_equal(read_idx(tmp_path / "i"), images)
    assert np.array_equal(read_idx(tmp_path / "l.gz"), labels)
    assert read_idx(tmp_path / "i").dtype == np.uint8


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b"\x01\x02" + b[2:], "bad magic"),
        (lambda b: b[:2] + b"\x0d" + b[3:], "unsupported"),
        (lambda b: b[:-10], "truncated"),
        (lambda b: b + b"\x00", "trailing"),
        (lambda b: b[:6], "truncated header"),
        (lambda b: b"", "bad magic"),
    ],
)
def test_malformed_idx_is_named(tmp_path, mutate, message):
    images, _ = synthetic_images(3, seed=0)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(mutate(idx_bytes(images)))
    with pytest.raises(IDXError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value)


def test_image_and_label_counts_must_agree(tmp_path):
    images, labels = synthetic_images(5, seed=0)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(IDXError, match=r"5 images but .* 4 labels"):
        load_split(tmp_path, "train")
