import pytest
import torch

from vae_lightning.models import AE, VAE, ConvVAE
from vae_lightning.models.networks import ConvDecoder, ConvEncoder, MLPDecoder, MLPEncoder


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_mlp_shapes_and_seed1_sizes():
    enc, dec = MLPEncoder(784, 400, 40), MLPDecoder(20, 400, (1, 28, 28))
    x = torch.rand(3, 1, 28, 28)
    assert enc(x).shape == (3, 40)
    assert dec(torch.randn(3, 20)).shape == (3, 1, 28, 28)
    # pytorch/examples' VAE: fc1, fc21 + fc22, fc3, fc4
    assert (
        n_params(VAE()) == 784 * 400 + 400 + 2 * (400 * 20 + 20) + 20 * 400 + 400 + 400 * 784 + 784
    )
    assert n_params(AE()) == 784 * 400 + 400 + 400 * 20 + 20 + 20 * 400 + 400 + 400 * 784 + 784


def test_conv_shapes_follow_seed2():
    enc = ConvEncoder(1, (32, 64, 128), 64)
    x = torch.rand(2, 1, 28, 28)
    assert enc.conv(x).shape == (2, 128 * 3 * 3)  # 28 -> 14 -> 7 -> 3, flatten 1152
    assert enc(x).shape == (2, 64)
    dec = ConvDecoder(32, (32, 64, 128), 1)
    assert dec(torch.randn(2, 32)).shape == (2, 1, 28, 28)
    assert dec.deconv[0].output_padding == (1, 1)
    # seed 2's ConvVAE: enc1..3, fc_mu, fc_log, fc_dec, dec1..3
    conv = (1 * 32 * 16 + 32) + (32 * 64 * 16 + 64) + (64 * 128 * 16 + 128)
    heads = 2 * (1152 * 32 + 32)
    dec_fc = 32 * 1152 + 1152
    deconv = (128 * 64 * 16 + 64) + (64 * 32 * 16 + 32) + (32 * 1 * 16 + 1)
    assert n_params(ConvVAE()) == conv + heads + dec_fc + deconv


@pytest.mark.parametrize("model_cls", [VAE, AE, ConvVAE])
def test_decoders_return_logits_and_decode_returns_images(model_cls):
    torch.manual_seed(0)
    model = model_cls()
    z = torch.randn(4, model.latent_dim) * 10
    logits = model.decoder(z)
    assert logits.min() < 0 or logits.max() > 1  # raw logits, not probabilities
    images = model.decode(z)
    assert images.shape == (4, 1, 28, 28)
    assert 0 <= images.min() and images.max() <= 1
