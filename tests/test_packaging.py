"""Packaging: the declared dependencies against what the code imports and uses, and the wheel
installed outside the clone (its configs inside it, its data/ and outputs/ in the working
directory) training and evaluating as the clone does."""

from __future__ import annotations

import ast
import json
import math
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from importlib.metadata import files, packages_distributions, version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO_ROOT, SMALL, one_line_error, run_here, write_synthetic
from vae_lightning import config
from vae_lightning.errors import ConfigError

SOURCES = ("vae_lightning", "hydra_plugins")

# The oldest release of each dependency with what the code uses: (distribution, release, file,
# what in it needs that release). The file must still hold it: where it is gone, say so here and
# the floor may come down.
NEEDS = [
    ("lightning", "2.6", "vae_lightning/train.py", "weights_only=True)"),  # Trainer.fit's, 2.6.0
    ("torch", "2.4", "vae_lightning/training/step.py", "fused="),  # the fused Adam on the CPU
    ("torchvision", "0.19", "vae_lightning/views/grids.py", "torchvision"),  # torch 2.4's
    ("numpy", "1.26.1", "vae_lightning/data/sources.py", "from numpy._core.multiarray"),
    ("typing-extensions", "4.4", "vae_lightning/views/measures.py", "import override"),
    ("hydra-core", "1.3", "vae_lightning/train.py", 'version_base="1.3"'),
]
# declared, used, and imported nowhere: what names them instead
USED_BY_NAME = {
    "tensorboard": ("conf/logger/tensorboard.yaml", "TensorBoardLogger"),  # Lightning imports it
    "hydra-joblib-launcher": ("conf/bench.yaml", "joblib"),  # hydra/launcher=joblib
}


@pytest.fixture(scope="module")
def project() -> dict:
    """pyproject.toml's [project] table."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def runtime(project) -> dict[str, Requirement]:
    """The declared runtime dependencies by their normalised names."""
    return {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}


def floor(requirement: Requirement) -> Version | None:
    """The lowest version a requirement admits by a ``>=`` or ``==`` bound."""
    lows = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    return max(lows, default=None)


def third_party_imports() -> dict[str, set[str]]:
    """The top-level modules that the package's sources import (at module level or inside a
    function), outside the standard library and the project itself, with the files that do."""
    found: dict[str, set[str]] = {}
    for top in SOURCES:
        for path in sorted((REPO_ROOT / top).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    first = name.split(".")[0]
                    if first not in sys.stdlib_module_names and first not in SOURCES:
                        found.setdefault(first, set()).add(str(path.relative_to(REPO_ROOT)))
    return found


def test_every_import_is_declared_and_every_dependency_used(runtime):
    providers = packages_distributions()
    imported = {}
    for module, where in third_party_imports().items():
        assert module in providers, f"{module} (imported in {sorted(where)}) is not installed"
        (dist,) = {canonicalize_name(d) for d in providers[module]}
        imported[dist] = where
    undeclared = {d: sorted(w) for d, w in imported.items() if d not in runtime}
    assert not undeclared, f"imported but not in pyproject's dependencies: {undeclared}"
    for dist in set(runtime) - set(imported):
        assert dist in USED_BY_NAME, f"{dist} is declared but nothing imports or names it"
        path, name = USED_BY_NAME[dist]
        assert name in (REPO_ROOT / path).read_text(), f"{dist}: {path} no longer names {name}"


@pytest.mark.parametrize(("dist", "needed", "path", "use"), NEEDS, ids=[n[0] for n in NEEDS])
def test_each_floor_admits_only_releases_with_what_the_code_uses(runtime, dist, needed, path, use):
    assert use in (REPO_ROOT / path).read_text(), f"{path} no longer uses {use!r}"
    low = floor(runtime[dist])
    assert low is not None and low >= Version(needed), f"{runtime[dist]}: needs >= {needed}"


def test_every_range_admits_the_releases_tested_here(runtime):
    """The installed releases (torch 2.14.1, torchvision 0.29.1, ...) are inside every range."""
    for dist, requirement in runtime.items():
        assert requirement.specifier.contains(version(dist), prereleases=True), (
            f"{requirement} excludes the installed {version(dist)}"
        )


def test_the_optional_plugins_are_extras_their_refusal_names(project, runtime):
    """The launchers and sweepers of config.EXTRAS are each extra's, not the main
    dependencies', and each extra's distribution holds the plugin that config checks for."""
    extras = project["optional-dependencies"]
    for choices in config.EXTRAS.values():
        for plugin, extra in choices.values():
            (requirement,) = [Requirement(r) for r in extras[extra]]
            assert canonicalize_name(requirement.name) not in runtime
            if extra == "ray":  # not installed by make install (see pyproject.toml)
                continue
            folder = plugin.replace(".", "/") + "/"
            assert any(str(f).startswith(folder) for f in files(requirement.name) or ())
    for module, extra in config.OPTIONAL_LOGGERS.values():  # the loggers' packages too
        names = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        assert not names & set(runtime)
        assert any(module in str(f).split("/")[0] for n in names for f in files(n) or ())
    dev = {Requirement(r).name: Requirement(r) for r in extras["dev"]}
    # the tests run their plugins and loggers
    assert dev["vae_lightning"].extras == {"slurm", "optuna", "wandb", "mlflow"}


def test_a_choice_whose_plugin_is_missing_is_one_line_naming_its_extra(monkeypatch):
    config.check_extras(["hydra/launcher=slurm", "hparams_search=optuna"])  # installed here
    monkeypatch.setitem(config.EXTRAS["hydra/launcher"], "slurm", ("hydra_plugins.none", "slurm"))
    result = run_here("vae-train", "-m", "hydra/launcher=slurm")
    one_line_error(result, "hydra/launcher is slurm", "pip install 'vae_lightning[slurm]'")


def test_license_and_classifiers(project):
    from trove_classifiers import classifiers

    assert project["license"] == "MIT" and project["license-files"] == ["LICENSE"]
    text = (REPO_ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 the vae_lightning authors" in text
    assert set(project["classifiers"]) <= classifiers
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # SPDX instead


# --- where data/ and outputs/ go ------------------------------------------------------------------


def test_the_clone_keeps_its_conf_and_root(monkeypatch):
    monkeypatch.delenv(config.ROOT_ENV, raising=False)
    assert config.CONFIG_DIR == REPO_ROOT / "conf"
    assert config.root_dir() == REPO_ROOT
    paths = config.compose().paths
    assert (paths.data_dir, paths.log_dir) == (f"{REPO_ROOT}/data", f"{REPO_ROOT}/outputs")


def test_the_root_variable_moves_data_and_outputs(monkeypatch, tmp_path):
    monkeypatch.setenv(config.ROOT_ENV, str(tmp_path))
    paths = config.compose().paths
    assert (paths.data_dir, paths.log_dir) == (f"{tmp_path}/data", f"{tmp_path}/outputs")
    monkeypatch.setenv(config.ROOT_ENV, str(tmp_path / "file"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=f"^{config.ROOT_ENV} .* name a folder"):
        config.root_dir()
    one_line_error(run_here("vae-data", "datasets=[mnist]"), config.ROOT_ENV, "name a folder")


# --- the wheel ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this environment's setuptools from a copy of what it is made of
    (a build in the clone would leave build/ there, whose stale files a later wheel takes)."""
    src, dist = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO_ROOT / name, src)
    for name in ("conf", *SOURCES):
        shutil.copytree(REPO_ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run([*pip, "-w", str(dist), str(src)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = dist.glob("vae_lightning-*.whl")
    return path


def test_the_wheel_holds_every_module_and_config(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    modules = {
        str(p.relative_to(REPO_ROOT)) for top in SOURCES for p in (REPO_ROOT / top).rglob("*.py")
    }
    configs = {
        f"vae_lightning/{p.relative_to(REPO_ROOT)}" for p in (REPO_ROOT / "conf").rglob("*.yaml")
    }
    assert not modules - names and not configs - names, sorted((modules | configs) - names)
    assert not [n for n in names if n.startswith(("conf/", "tests/"))]
    assert "vae_lightning-0.1.0.dist-info/licenses/LICENSE" in names


def fresh_venv(root: Path, wheel: Path, full: bool = False) -> Path:
    """A new venv with the wheel installed. Its dependencies are this environment's, through a
    .pth file (a path, not a site folder: this environment's own .pth files, the clone's
    editable install among them, are not run there), so torch is not installed again; with
    ``full`` (``make test-wheel``) pip installs them all there."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.check_output([python, "-c", query], text=True).strip())
    if not full:
        here = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
        (site / "dev_dependencies.pth").write_text("\n".join(sorted(here)) + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    proc = subprocess.run([*pip, *([] if full else ["--no-deps"]), str(wheel)],
                          capture_output=True, text=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return site


PROBE = """import json, vae_lightning, vae_lightning.config as c
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
launchers = [p.__name__ for p in Plugins.instance().discover(Launcher)]
print(json.dumps({"file": vae_lightning.__file__, "conf": str(c.CONFIG_DIR),
                  "root": str(c.root_dir()), "launchers": launchers}))"""


@pytest.mark.slow
def test_the_installed_wheel_trains_and_evaluates_in_the_working_directory(wheel, tmp_path):
    started = time.perf_counter()
    venv, work, elsewhere = tmp_path / "venv", tmp_path / "work", tmp_path / "elsewhere"
    site = fresh_venv(venv, wheel, full=os.environ.get("VAE_WHEEL_FULL") == "1")
    write_synthetic(work / "data")  # where paths.data_dir points by default: ./data
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in (config.ROOT_ENV, "PYTHONPATH")}

    def run(cwd: Path, *args: str, **extra: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, cwd=cwd, env={**env, **extra}, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc

    probe = json.loads(run(work, str(venv / "bin" / "python"), "-c", PROBE).stdout)
    assert Path(probe["file"]) == site / "vae_lightning" / "__init__.py"  # not the clone's
    assert Path(probe["conf"]) == site / "vae_lightning" / "conf"
    assert Path(probe["root"]) == work and "FusedLauncher" in probe["launchers"]
    moved = run(
        work, str(venv / "bin" / "python"), "-c", PROBE, **{config.ROOT_ENV: str(elsewhere)}
    )
    assert Path(json.loads(moved.stdout)["root"]) == elsewhere

    train = [str(venv / "bin" / "vae-train"), "trainer.max_epochs=1",
             "++trainer.limit_train_batches=2", *SMALL, "callbacks=minimal"]  # fmt: skip
    run(work, *train)
    (run_dir,) = (work / "outputs" / "train" / "runs").iterdir()
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "ok" and math.isfinite(record["metrics"]["test/loss"])
    assert not (site / "outputs").exists() and not (site / "data").exists()

    # from another folder: the run's config names the root it trained in, so the same data
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    run(elsewhere, str(venv / "bin" / "vae-evaluate"), f"ckpt={ckpt}", "k=5", "n_fid=0")
    evaluated = json.loads((run_dir / "eval.json").read_text())
    assert evaluated["data"]["data_dir"] == str(work / "data")
    assert math.isfinite(evaluated["metrics"]["test/nll_iw"])
    assert not list(elsewhere.iterdir())
    print(f"wheel installed, trained and evaluated in {time.perf_counter() - started:.1f} s")
