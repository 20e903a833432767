"""Plain nn.Modules that know nothing of Lightning. Decoders return logits.

Encoders return ``out_features`` values per image: 2 * latent_dim for a VAE (mu and log-variance,
split by the model), latent_dim for a plain autoencoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class MLPEncoder(nn.Module):
    """(B, C, H, W) -> flatten -> Linear + ReLU -> Linear -> (B, out_features). Seed 1: 784-400-."""

    def __init__(self, in_features: int, hidden_dim: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class MLPDecoder(nn.Module):
    """(B, latent_dim) -> Linear + ReLU -> Linear -> logits (B, *out_shape). Seed 1: -400-784."""

    def __init__(self, latent_dim: int, hidden_dim: int, out_shape: Sequence[int]) -> None:
        super().__init__()
        self.out_shape = tuple(out_shape)
        n_out = 1
        for d in self.out_shape:
            n_out *= d
        self.net = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, n_out),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, *self.out_shape)


class TanhMLP(nn.Module):
    """(B, ...) -> flatten -> two tanh layers of ``hidden`` -> (B, out_features): one
    deterministic block of the IWAE paper's networks (Burda et al. 2015, Sec. 5)."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(in_features, hidden),
            nn.Tanh(),
            nn.Linear(hidden, hidden),
            nn.Tanh(),
            nn.Linear(hidden, out_features),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


ACTIVATIONS = ("relu", "leaky_relu")


def activation(name: str) -> nn.Module:
    """ReLU (seed 2), or LeakyReLU with slope 0.2 (seed 2's proposed deeper model)."""
    return nn.LeakyReLU(0.2) if name == "leaky_relu" else nn.ReLU()


def _block(conv: nn.Module, channels: int, batchnorm: bool, act: str) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(channels)] if batchnorm else []), activation(act)]


class ConvEncoder(nn.Module):
    """Seed 2's encoder: Conv2d k4 s2 p1 per channel count, ReLU, flatten, Linear.

    For 28x28 and channels (32, 64, 128): 28 -> 14 -> 7 -> 3, flatten 128 * 3 * 3 = 1152.
    Seed 2's deeper variant: ``extra_channels`` adds a k3 s1 p1 convolution at the smallest
    size (3x3, e.g. 256 channels), ``batchnorm`` a BatchNorm2d after every convolution,
    ``act`` "leaky_relu". The defaults build exactly seed 2's layers (and state_dict keys).
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        out_features: int,
        in_size: int = 28,
        extra_channels: int | None = None,
        batchnorm: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in, size = in_channels, in_size
        for c in channels:
            layers += _block(
                nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1), c, batchnorm, act
            )
            c_in, size = c, size // 2  # k4 s2 p1 halves (rounding down)
        if extra_channels:
            conv = nn.Conv2d(c_in, extra_channels, kernel_size=3, stride=1, padding=1)
            layers += _block(conv, extra_channels, batchnorm, act)
            c_in = extra_channels
        self.conv = nn.Sequential(*layers, nn.Flatten())
        self.out_spatial = size
        self.fc = nn.Linear(c_in * size * size, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))  # (B, 1, 28, 28) -> (B, 1152) -> (B, out_features)


class ConvDecoder(nn.Module):
    """Seed 2's decoder, the encoder mirrored: Linear to (C, 3, 3), ConvTranspose2d k4 s2 p1.

    The first stride-2 transposed convolution has ``output_padding=1`` so that 3 -> 7 -> 14 ->
    28. No activation after the last layer: it returns logits. ``extra_channels``,
    ``batchnorm`` and ``act`` mirror the encoder's.
    """

    def __init__(
        self,
        latent_dim: int,
        channels: Sequence[int],
        out_channels: int,
        start_size: int = 3,
        extra_channels: int | None = None,
        batchnorm: bool = False,
        act: str = "relu",
    ) -> None:
        super().__init__()
        rev = list(channels)[::-1]  # (128, 64, 32)
        top = extra_channels or rev[0]
        self.start = (top, start_size, start_size)
        self.fc = nn.Linear(latent_dim, top * start_size * start_size)
        self.act = activation(act)
        layers: list[nn.Module] = []
        if extra_channels:
            conv = nn.ConvTranspose2d(extra_channels, rev[0], 3, 1, 1)
            layers += _block(conv, rev[0], batchnorm, act)
        for i, (c_in, c_out) in enumerate(zip(rev, [*rev[1:], out_channels], strict=True)):
            conv = nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, output_padding=1 if i == 0 else 0)
            layers += [conv] if i == len(rev) - 1 else _block(conv, c_out, batchnorm, act)
        self.deconv = nn.Sequential(*layers)
        # k4 s2 p1 doubles, plus output_padding on the first layer: 3 -> 7 -> 14 -> 28
        self.out_size = start_size * 2 + 1
        for _ in rev[1:]:
            self.out_size *= 2

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(z)).view(-1, *self.start)  # (B, 128, 3, 3)
        return self.deconv(h)  # (B, 1, 28, 28) logits


class VQEncoder(nn.Module):
    """(B, C, 28, 28) -> (B, code_dim, 7, 7): the VQ-VAE's encoder. Seed 2's k4 s2 p1
    convolutions stopped at 7x7 (channels (32, 64)), a k3 convolution, and a 1x1 projection to
    the code vectors (van den Oord et al. 2017 use residual blocks here; two plain layers do on
    28x28 images)."""

    def __init__(self, in_channels: int, channels: Sequence[int], code_dim: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = in_channels
        for c in channels:
            layers += [nn.Conv2d(c_in, c, kernel_size=4, stride=2, padding=1), nn.ReLU()]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, 1, 1), nn.ReLU(), nn.Conv2d(c_in, code_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class VQDecoder(nn.Module):
    """(B, code_dim, 7, 7) -> logits (B, C, 28, 28): the VQ-VAE's encoder mirrored."""

    def __init__(self, code_dim: int, channels: Sequence[int], out_channels: int) -> None:
        super().__init__()
        rev = list(channels)[::-1]  # (64, 32)
        layers: list[nn.Module] = [nn.Conv2d(code_dim, rev[0], 3, 1, 1), nn.ReLU()]
        for i, (c_in, c_out) in enumerate(zip(rev, [*rev[1:], out_channels], strict=True)):
            layers.append(nn.ConvTranspose2d(c_in, c_out, kernel_size=4, stride=2, padding=1))
            if i < len(rev) - 1:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class MaskedConv2d(nn.Conv2d):
    """A convolution that sees only the positions above, and left of, its centre in raster
    order (van den Oord et al. 2016, PixelCNN): mask "A" hides the centre too (the first layer,
    which must not see the value it predicts), "B" lets it through (the layers after)."""

    def __init__(self, mask: str, c_in: int, c_out: int, kernel_size: int) -> None:
        super().__init__(c_in, c_out, kernel_size, padding=kernel_size // 2)
        k = kernel_size // 2
        keep = torch.ones_like(self.weight)  # (c_out, c_in, k, k)
        keep[:, :, k, k + (mask == "B") :] = 0  # the centre's right (and the centre for "A")
        keep[:, :, k + 1 :] = 0  # the rows below
        self.register_buffer("keep", keep, persistent=False)  # rebuilt, never loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * self.keep, self.bias)


class PixelCNN(nn.Module):
    """An autoregressive prior over a map of code indices (B, H, W) -> logits (B, K, H, W):
    p(z) = prod_i p(z_i | z_<i) in raster order. An embedding of the K codes, a 7x7 type-A
    masked convolution, ``layers`` residual 3x3 type-B ones, and a 1x1 head. The plain
    PixelCNN's blind spot (a few positions up-right of the receptive field) is accepted on a
    7x7 map, where the first layer already sees the three rows above."""

    def __init__(self, num_codes: int, channels: int = 64, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(num_codes, channels)
        self.first = MaskedConv2d("A", channels, channels, 7)
        self.blocks = nn.ModuleList(MaskedConv2d("B", channels, channels, 3) for _ in range(layers))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1), nn.ReLU())
        self.out = nn.Conv2d(channels, num_codes, 1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        h = self.first(self.embed(codes).permute(0, 3, 1, 2))  # (B, C, H, W)
        for block in self.blocks:
            h = h + block(torch.relu(h))
        return self.out(self.head(h))  # (B, K, H, W)


# --- the dataset classifier: FID's features (evaluation.fid), the feature-matching loss's ---


class FeatureClassifier(nn.Module):
    """A small CNN for 28x28 grey images; ``features(x)`` is its penultimate layer (B, 128).

    Conv 32 -> pool -> Conv 64 -> pool -> Linear 128 (BatchNorm, ReLU), dropout, Linear to the
    classes: about 4 M multiply-adds per image. Trained for the default 4 epochs on 2 CPU cores it
    took 2 minutes on MNIST (99.4 % test accuracy) and 3 on Fashion-MNIST (91.6 %). Input: float
    images in [0, 1], (B, 1, 28, 28).
    """

    def __init__(self, num_classes: int = 10, feature_dim: int = 128, in_channels: int = 1) -> None:
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, feature_dim),
            nn.BatchNorm1d(feature_dim),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))  # (B, num_classes) logits


class ClassifierFeatures(nn.Module):
    """A FeatureClassifier's ``features`` as a feature extractor: torchmetrics' for FID, and a
    model's frozen one for its feature-matching loss (``dtype=None``).

    Takes uint8 images in [0, 255] or float images in [0, 1], (B, 1, 28, 28); returns features
    (B, num_features) in ``dtype`` (float64 by default, so that torchmetrics keeps its result
    in float64; None: as computed). Always in eval mode (BatchNorm's running statistics, no
    dropout), also inside a model that is training.
    """

    def __init__(
        self, classifier: FeatureClassifier, dtype: torch.dtype | None = torch.float64
    ) -> None:
        super().__init__()
        self.classifier = classifier
        self.dtype = dtype
        self.num_features = classifier.feature_dim  # read by FrechetInceptionDistance
        self.train(False)  # from the start, not only once a model's .train() reaches it

    def train(self, mode: bool = True) -> ClassifierFeatures:
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()  # as data.to_unit_float
        features = self.classifier.features(x)
        return features if self.dtype is None else features.to(self.dtype)
