"""The schedules (training.schedules): the learning rate's (scheduler=) and the KL weight's
(kl=, with free bits), their checked values, the rates and weights they give, their config."""

from __future__ import annotations

import pytest
import torch

from vae_lightning.config import compose
from vae_lightning.errors import ConfigError
from vae_lightning.models import VAE
from vae_lightning.training import AutomaticStep
from vae_lightning.training.schedules import (
    burda_epochs,
    burda_factor,
    check_kl,
    check_scheduler,
    lr_scheduler,
)


def rates(spec: dict, max_epochs: int, lr: float = 1.0) -> list[float]:
    """The learning rate of each epoch, as Lightning steps the scheduler once per epoch."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    config = lr_scheduler(optimizer, check_scheduler(spec), max_epochs)
    out = []
    for _ in range(max_epochs):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    return out


def test_cosine_anneals_over_the_epochs_after_its_warm_up():
    assert rates({"name": "cosine"}, 4) == pytest.approx([1.0, 0.8535534, 0.5, 0.1464466])
    warm = rates({"name": "cosine", "warmup_epochs": 2, "eta_min": 0.1}, 5)
    # 2 epochs up from lr / 3, then the cosine over the 3 left (as without warm-up, the last
    # epoch stays above eta_min: the rate an epoch trains with is the one before its step)
    assert warm == pytest.approx([1 / 3, 2 / 3, 1.0, 0.775, 0.325])


def test_plateau_lowers_the_rate_when_val_loss_stops_improving():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    config = lr_scheduler(optimizer, check_scheduler({"name": "plateau", "patience": 1}), 10)
    assert config["monitor"] == "val/loss" and config["interval"] == "epoch"
    seen = []
    for val_loss in (5.0, 4.0, 4.0, 4.0, 4.0, 4.0):
        config["scheduler"].step(val_loss)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen == [1.0, 1.0, 1.0, 0.5, 0.5, 0.25]


def test_the_burda_schedule_divides_the_rate_by_10_to_the_1_7_every_3_to_the_i_epochs():
    factors = [burda_factor(e, 8) for e in range(14)]
    assert factors[0] == 1.0
    assert factors[1:4] == pytest.approx([10 ** (-1 / 7)] * 3)
    assert factors[4:13] == pytest.approx([10 ** (-2 / 7)] * 9)
    assert factors[13] == pytest.approx(10 ** (-3 / 7))
    assert burda_epochs(8) == 3280 and burda_epochs(3) == 13
    assert burda_factor(10_000, 3) == pytest.approx(10 ** (-2 / 7))  # the last rate stays
    with pytest.raises(ConfigError, match=r"scheduler\.stages must be an integer >= 1"):
        check_scheduler({"name": "burda", "stages": 0})


def test_none_is_a_constant_rate_and_the_default():
    assert check_scheduler({"name": "none"}) is None and check_scheduler(None) is None
    cfg = compose(["model=conv_vae"])
    assert cfg.model.scheduler.name == "none"
    model = AutomaticStep().bind(VAE())
    assert isinstance(model.configure_optimizers(), torch.optim.Adam)  # as before schedulers


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"name": "cosine", "warmup_epochs": -1},
            "scheduler.warmup_epochs must be an integer >= 0",
        ),
        ({"name": "cosine", "eta_min": -1.0}, "scheduler.eta_min must be a finite number >= 0"),
        ({"name": "plateau", "factor": 1.5}, "scheduler.factor must be below 1"),
        ({"name": "plateau", "factor": 0}, "scheduler.factor must be a finite number > 0"),
        ({"name": "plateau", "patience": "x"}, "scheduler.patience must be an integer >= 0"),
        (
            {"name": "step"},
            "scheduler.name must be one of none, plateau, cosine, burda, got 'step'",
        ),
        ({"name": "cosine", "T_max": 3}, "cosine takes warmup_epochs, eta_min, not T_max"),
        ("cosine", "scheduler must be a mapping"),
    ],
)
def test_bad_schedules_are_refused_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        AutomaticStep().bind(VAE(scheduler=spec))  # the step checks the schedules it applies


def test_a_schedule_composes_from_its_group_and_survives_a_checkpoint(tmp_path):
    cfg = compose(["scheduler=cosine", "model.scheduler.warmup_epochs=3"])
    assert dict(cfg.model.scheduler) == {"name": "cosine", "warmup_epochs": 3, "eta_min": 0.0}
    model = AutomaticStep().bind(VAE(scheduler=cfg.model.scheduler))
    assert model.hparams.scheduler == {"name": "cosine", "warmup_epochs": 3, "eta_min": 0.0}
    assert type(model.hparams.scheduler) is dict  # plain data: weights_only checkpoints load it


def test_kl_warmup_rises_linearly_to_beta_then_stays():
    from vae_lightning.training.schedules import kl_weight

    epochs = check_kl({"name": "warmup", "length": 2, "unit": "epoch"})
    assert [kl_weight(epochs, 4.0, s, 10, 100) for s in (0, 5, 10, 20, 99)] == [0, 1, 2, 4, 4]
    steps = check_kl({"name": "warmup", "length": 4, "unit": "step"})
    assert [kl_weight(steps, 1.0, s, 10, 100) for s in range(6)] == [0, 0.25, 0.5, 0.75, 1, 1]


def test_cyclical_annealing_repeats_its_ramp_each_cycle():
    from vae_lightning.training.schedules import kl_weight

    spec = check_kl({"name": "cyclical", "cycles": 4, "ratio": 0.5})  # 100 steps: period 25
    got = [kl_weight(spec, 2.0, s, 10, 100) for s in (0, 5, 12, 13, 24, 25, 30, 99)]
    assert got == pytest.approx([0, 0.8, 1.92, 2, 2, 0, 0.8, 2])


def test_free_bits_take_the_kl_pressure_off_dimensions_below_the_floor():
    x = torch.rand(16, 1, 28, 28)
    plain, floored = VAE(latent_dim=4), VAE(latent_dim=4, kl={"name": "constant", "free_bits": 1e6})
    floored.load_state_dict(plain.state_dict())
    noise = torch.randn(16, 4)
    a, b = plain.terms(x, eps=noise), floored.terms(x, eps=noise)
    assert torch.equal(a["loss"], b["loss"]) and torch.equal(a["kl"], b["kl"])  # the same ELBO
    assert b["objective"].item() == pytest.approx(b["recon"].item() + 4e6)  # all 4 dims floored
    b["objective"].backward()
    a["recon"].backward()  # no KL gradient at all: the objective's gradient is recon's
    for (name, p), q in zip(floored.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"name": "cyclical", "cycles": 0}, "kl.cycles must be an integer >= 1"),
        ({"name": "cyclical", "ratio": 1.5}, "kl.ratio must be in"),
        ({"name": "warmup", "length": -1}, "kl.length must be an integer >= 1"),
        ({"name": "warmup", "unit": "batch"}, "kl.unit must be epoch or step"),
        ({"name": "constant", "free_bits": -0.5}, "kl.free_bits must be a finite number >= 0"),
        ({"name": "annealed"}, "kl.name must be one of constant, warmup, cyclical"),
    ],
)
def test_bad_kl_schedules_are_refused_naming_the_key(spec, message):
    with pytest.raises(ConfigError, match=message):
        AutomaticStep().bind(VAE(kl=spec))


def test_an_ae_refuses_a_kl_schedule_and_takes_the_default():
    from vae_lightning.models import AE

    assert "kl" not in AE(kl={"name": "constant", "free_bits": 0.0}).hparams
    with pytest.raises(ConfigError, match="an AE has none"):
        AE(kl={"name": "warmup"})
    assert compose(["model=ae"]).model.kl.name == "constant"
