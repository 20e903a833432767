"""The seeds' proposals, measured: ``make claims`` (``vae-claims``).

Trains seed 2's ConvVAE on Fashion-MNIST (latent 32, β 1, Adam 5e-4, batch 128) as the baseline,
the same baseline with another seed (the seed-to-seed spread every difference is judged
against), and one variant per proposal: each learning-rate scheduler, KL warm-up, cyclical
annealing, free bits, β 2 and 4, the feature-matching loss, latent 64 and 128, and a longer run.
Each final checkpoint is evaluated (evaluate.py: the ELBO and the IWAE bound, MSE, FID in a
second classifier's features, active units; the RandomForest probe is the training run's), and
``<out>/CLAIMS.md`` gets a table beside the baseline and one sentence per seed claim saying
whether the numbers support it. Options: conf/claims.yaml (``vae-claims --help``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from vae_lightning import config
from vae_lightning.errors import check_float, check_int, check_names
from vae_lightning.files import atomic_write_text
from vae_lightning.studies.markdown import fmt, md_row, pct
from vae_lightning.studies.reproduce import Result, Results, run_all

log = logging.getLogger(__name__)

BASE = ["experiment=seed2_convvae_fashion"]


@dataclass(frozen=True)
class Variant:
    """One run of the study: what it changes, in words and as overrides."""

    setting: str
    overrides: tuple[str, ...]
    long: bool = False  # trained for long_epochs instead of epochs


def variants(epochs: int, free_bits: float, feature_weight: float) -> dict[str, Variant]:
    """The study's runs. Lengths that the seeds or papers give per epoch scale with ``epochs``:
    the warm-up covers the first quarter of training, the plateau's patience is 5 epochs at
    seed 2's 100 (1 at a CPU length), cyclical annealing keeps Fu et al.'s 4 cycles."""
    quarter, patience = max(1, epochs // 4), max(1, epochs // 20)
    return {
        "baseline": Variant("seed 2's ConvVAE: constant rate, β 1, latent 32", ()),
        "baseline_seed1": Variant(
            "the baseline with seed 1 (the seed-to-seed spread)", ("seed=1",)
        ),
        "plateau": Variant(
            f"ReduceLROnPlateau on val/loss (factor 0.5, patience {patience})",
            ("scheduler=plateau", f"model.scheduler.patience={patience}"),
        ),
        "cosine": Variant("CosineAnnealingLR to 0 over the run", ("scheduler=cosine",)),
        "kl_warmup": Variant(
            f"KL warm-up 0 → β over {quarter} epoch(s)", ("kl=warmup", f"model.kl.length={quarter}")
        ),
        "kl_cyclical": Variant("cyclical KL: 4 cycles, ramp 0.5", ("kl=cyclical",)),
        "free_bits": Variant(
            f"free bits λ = {free_bits} nats per dimension", (f"model.kl.free_bits={free_bits}",)
        ),
        "beta2": Variant("β = 2", ("model.beta=2.0",)),
        "beta4": Variant("β = 4", ("model.beta=4.0",)),
        "feature": Variant(
            f"feature matching in the FID classifier's features, weight {feature_weight}",
            (f"model.feature_loss_weight={feature_weight}",),
        ),
        "z64": Variant("latent 64", ("model.latent_dim=64",)),
        "z128": Variant("latent 128", ("model.latent_dim=128",)),
        "long": Variant("the baseline, trained longer", (), long=True),
    }


# --- the figures --------------------------------------------------------------------------------

# (column, where it comes from, which way is better: -1 lower, +1 higher, 0 neither)
COLUMNS = {
    "test loss": ("eval", "test/loss", -1),
    "test nll_iw": ("eval", "test/nll_iw", -1),
    "MSE": ("eval", "test/mse", -1),
    "FID": ("eval", "gen/fid", -1),
    "RF probe": ("record", "probe/rf_acc", +1),
    "active units": ("eval", "test/active_units", +1),
}


def figure(result: Result, column: str) -> float | None:
    source, key, _ = COLUMNS[column]
    found = (result.metrics if source == "eval" else result.record.get("metrics", {})).get(key)
    return None if found is None else float(found)


def _final_lr(result: Result) -> float | None:
    rates = [row.get("train/lr") for row in result.history]
    rates = [r for r in rates if r is not None and r == r]  # NaN where the column was empty
    return rates[-1] if rates else None


def _cell(column: str, value: float | None) -> str:
    if column == "RF probe":
        return pct(value)
    return fmt(value, 0 if column == "active units" else 4 if column == "MSE" else 2)


def spread(results: Results) -> dict[str, float]:
    """|baseline − baseline_seed1| per column: how much a second seed alone moves a figure."""
    a, b = results.get("baseline"), results.get("baseline_seed1")
    out = {}
    for column in COLUMNS:
        x, y = (figure(r, column) if r else None for r in (a, b))
        if x is not None and y is not None:
            out[column] = abs(x - y)
    return out


def compare(results: Results, name: str, column: str, noise: dict[str, float]) -> tuple[int, str]:
    """(+1 better, -1 worse, 0 within the seed spread or unknown) and the words for it."""
    base, other = (figure(results[n], column) for n in ("baseline", name))
    if base is None or other is None:
        return 0, f"{name}: {column} not measured"
    sign = COLUMNS[column][2]
    delta, tolerance = other - base, noise.get(column, 0.0)
    verdict = 0 if abs(delta) <= tolerance else (1 if sign * delta > 0 else -1)
    word = {1: "better", -1: "worse", 0: "within the seed spread"}[verdict]
    return verdict, (
        f"{name} {_cell(column, other)} against {_cell(column, base)} "
        f"(Δ {delta:+.4g}, seed spread {tolerance:.4g}): {word}"
    )


@dataclass(frozen=True)
class Claim:
    """A claim, as its author words it; the runs and figures that test it; and which way those
    figures move if it holds (+1: better than the baseline, -1: worse)."""

    who: str
    claim: str
    runs: tuple[str, ...]
    columns: tuple[str, ...]
    expect: int = +1


CLAIMS = (
    Claim("Seed 2", "learning-rate schedulers (ReduceLROnPlateau or CosineAnnealing) improve "
          "the ConvVAE", ("plateau", "cosine"), ("test nll_iw", "FID")),
    Claim("Seed 2", "β-VAE (β > 1) improves the order of the latent space", ("beta2", "beta4"),
          ("RF probe", "active units")),
    Claim("Seed 2", "150–200 epochs improve the ConvVAE", ("long",), ("test nll_iw", "FID")),
    Claim("Seed 2", "a perceptual (VGG) or feature-matching loss gives sharper outputs",
          ("feature",), ("FID", "MSE")),
    Claim("Seed 2", "latent sizes 64 and 128 improve the model", ("z64", "z128"),
          ("test nll_iw", "FID", "RF probe")),
    Claim("Seed 1", "the KL term costs some reconstruction quality (so a larger KL weight costs "
          "more)", ("beta2", "beta4"), ("MSE",), expect=-1),
    Claim("Bowman et al., Fu et al., Kingma et al.", "KL warm-up, cyclical annealing and free "
          "bits keep more latent units active", ("kl_warmup", "kl_cyclical", "free_bits"),
          ("active units", "test nll_iw")),
)  # fmt: skip


def judge(results: Results, claim: Claim) -> tuple[str, str]:
    """The verdict on a claim and the comparisons behind it."""
    noise = spread(results)
    if "baseline" not in results or not any(n in results for n in claim.runs):
        return "not measured (its runs are not in this study)", ""
    found = [
        compare(results, n, c, noise) for n in claim.runs if n in results for c in claim.columns
    ]
    verdicts = {v * claim.expect for v, _ in found}
    if verdicts == {1}:
        verdict = "supported at this length"
    elif verdicts == {-1}:
        verdict = "contradicted at this length"
    elif verdicts == {0}:
        verdict = "not resolved: every difference is within the seed-to-seed spread"
    elif -1 not in verdicts:
        verdict = "partly supported (the rest within the seed spread)"
    elif 1 not in verdicts:
        verdict = "not supported (worse or within the seed spread)"
    else:
        verdict = "mixed: better on some figures, worse on others"
    return verdict, "; ".join(text for _, text in found)


# --- the report ---------------------------------------------------------------------------------


def render(results: Results, study: dict[str, Variant], lengths: tuple[int, int], k: int) -> str:
    epochs, long_epochs = lengths
    n_test = next(iter(results.values())).evaluation.get("data", {}).get("n_test", "the")
    lines = [
        "# The seeds' proposals, measured on seed 2's ConvVAE",
        "",
        f"Every run: seed 2's ConvVAE on Fashion-MNIST, {epochs} epochs (`long`: {long_epochs}),"
        f" evaluated at its last epoch on the {n_test} test images. `test loss` is the negative"
        " ELBO with β = 1 terms (nats per image, one posterior sample) whatever the run optimised;"
        f" `test nll_iw` the importance-weighted bound with k = {k}; MSE per pixel of the"
        " reconstructions; FID of decoded prior samples against test images in the features of a"
        " second classifier (another seed than the one the feature-matching loss uses, so that"
        " FID stays an independent judge); `RF probe` seed 2's RandomForest (100 trees,"
        " random_state 42) on the encoder means; active units: Cov_x E[z|x] > 0.01."
        " A difference counts only when it exceeds the difference between the baseline and the"
        " same baseline with seed 1 (`seed spread`).",
        "",
        "| run | setting | epochs | " + " | ".join(COLUMNS) + " | final lr | fit time |",
        "|---|---|---|" + "---|" * (len(COLUMNS) + 2),
    ]
    for name, result in results.items():
        variant = study[name]
        record = result.record
        cells = [_cell(c, figure(result, c)) for c in COLUMNS]
        hp = record.get("hparams", {})
        lr = _final_lr(result)
        rate = f"{hp.get('lr', 0):.2e} (constant)" if lr is None else f"{lr:.2e}"
        lines.append(
            md_row(
                name, variant.setting, hp.get("max_epochs", "—"), *cells,
                rate, f"{fmt(record.get('time/fit_s'), 0)} s",
            )
        )  # fmt: skip
    noise = spread(results)
    measured = ", ".join(f"{c} {noise[c]:.4g}" for c in noise)
    lines += ["", f"Seed spread (|baseline − baseline_seed1|): {measured or 'not measured'}.", ""]
    lines += ["## The claims", ""]
    for claim in CLAIMS:
        verdict, detail = judge(results, claim)
        lines.append(f"- **{claim.who}: {claim.claim}.** {verdict.capitalize()}." + (
            f" {detail}." if detail else ""))  # fmt: skip
    lines += [
        "",
        f"“At this length” matters: {epochs} epochs is the start of training for runs the seeds"
        " mean to last 100–200 epochs; `vae-claims epochs=100 long_epochs=200` is the full study"
        " (a GPU's work).",
        "",
    ]
    return "\n".join(lines)


# --- the command --------------------------------------------------------------------------------


def check(cfg: DictConfig) -> tuple[dict[str, Variant], dict[str, tuple[list[str], int]]]:
    """The study's variants and run_all's plan; a ConfigError naming the key before any run."""
    epochs = check_int("epochs", cfg.epochs, 1)
    long_epochs = check_int("long_epochs", cfg.long_epochs, 1)
    free_bits = check_float("free_bits", cfg.free_bits, 0.0, inclusive=False)
    weight = check_float("feature_loss_weight", cfg.feature_loss_weight, 0.0, inclusive=False)
    study = variants(epochs, free_bits, weight)
    names = check_names("variants", cfg.variants, study)
    plan = {
        n: ([*BASE, *study[n].overrides], long_epochs if study[n].long else epochs) for n in names
    }
    return {n: study[n] for n in names}, plan


@config.tool_main("claims", doc=__doc__)
def main(cfg: DictConfig) -> None:
    """vae-claims [epochs=5] [long_epochs=15] [variants=[baseline,...]] [out=..] [k=..]
    [n_fid=..] [classifier_seed=1] [train="['trainer.accelerator=cpu']"]: train, evaluate and
    report the seeds' proposals on seed 2's ConvVAE (make claims)."""
    study, plan = check(cfg)
    k = check_int("k", cfg.k, 1)
    n_fid = check_int("n_fid", cfg.n_fid, 1)
    seed = check_int("classifier_seed", cfg.classifier_seed, 0)
    classifier_epochs = check_int("classifier_epochs", cfg.classifier_epochs, 1)
    extra = [str(o) for o in cfg.train or []]
    default = config.root_dir() / "outputs" / f"claims_{cfg.epochs}ep"
    out = Path(cfg.out) if cfg.out else default
    out.mkdir(parents=True, exist_ok=True)
    eval_kwargs: dict[str, Any] = {
        "k": k, "n_fid": n_fid, "classifier_seed": seed, "classifier_epochs": classifier_epochs,
    }  # fmt: skip
    results = run_all(out, Path(cfg.data_dir).resolve(), plan, extra, eval_kwargs)
    path = out / "CLAIMS.md"
    atomic_write_text(path, render(results, study, (cfg.epochs, cfg.long_epochs), k))
    log.info("claims: report written: %s", path)


if __name__ == "__main__":
    raise SystemExit(main())
