"""Hydra glue, in one place: the config folder and its resolvers, composing and instantiating
with errors that name the key, the tools' shared entry point, the thread policy, and the
callback that writes a sweep's report.

Nothing here runs at import: the resolvers are registered by ``register_resolvers()``, which
every entry point and ``compose()`` call first.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from vae_lightning.errors import ConfigError, DataError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "conf"

log = logging.getLogger(__name__)


# --- resolvers ----------------------------------------------------------------------------------


def job_dirname(overrides: str) -> str:
    """A multirun job's folder name from its overrides: no '/', and at most ~200 characters
    (a long override list gets a hash instead of its tail, to stay under the 255-byte limit;
    the job's .hydra/overrides.yaml always has them all)."""
    name = overrides.replace("/", "%")
    if len(name) > 200:
        name = f"{name[:180]}_{hashlib.md5(name.encode()).hexdigest()[:8]}"
    return name


def resume_folder(resume: Any, default: str) -> str:
    """The run folder of ``resume=<run folder>``; any other value (a checkpoint file, true,
    null) leaves the run in ``default``, a new timestamped folder."""
    if isinstance(resume, str) and resume and not resume.endswith(".ckpt"):
        return resume
    return default


def register_resolvers() -> None:
    """``${repo_root:}``, ``${job_dirname:...}`` and ``${resume_folder:...}`` (idempotent)."""
    for name, resolver in (
        ("repo_root", lambda: str(REPO_ROOT)),
        ("job_dirname", job_dirname),
        ("resume_folder", resume_folder),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)


# --- composing and instantiating ----------------------------------------------------------------


def compose(
    overrides: Sequence[str] = (), config_name: str = "train", return_hydra: bool = False
) -> DictConfig:
    """``conf/<config_name>.yaml`` composed with ``overrides`` through Hydra's compose API
    (with the ``hydra`` node too when ``return_hydra``)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register_resolvers()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(
            config_name=config_name, overrides=list(overrides), return_hydra_config=return_hydra
        )


def instantiate(node: DictConfig, group: str, **kwargs: Any) -> Any:
    """hydra.utils.instantiate, turning a constructor's ConfigError into one naming the full key."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{group}.{cause.key}", cause.message) from None
        if isinstance(cause, TypeError) and "unexpected keyword" in str(cause):
            raise ConfigError(group, f"has a key its class does not take: {cause}") from None
        raise


def instantiate_group(node: DictConfig | None, group: str) -> list[Any]:
    """Every entry of a group of named objects (``callbacks``, ``logger``) that has a target."""
    return [
        instantiate(child, f"{group}.{name}")
        for name, child in (node or {}).items()
        if child is not None and "_target_" in child
    ]


# --- the run's process --------------------------------------------------------------------------


def in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def set_torch_threads(threads: int | None) -> None:
    """``threads`` when set; else, under a parallel launcher, the cores divided among its jobs."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    if threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        n_jobs, cpus = launcher.get("n_jobs"), launcher.get("cpus_per_task")
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        if cpus:
            threads = int(cpus)
        elif n_jobs:
            threads = max(1, (cores or 1) // (int(n_jobs) if n_jobs > 0 else cores or 1))
    if threads:
        torch.set_num_threads(int(threads))
        log.info("torch threads: %d", torch.get_num_threads())


def route_lightning_logs() -> None:
    # Lightning gives its loggers a handler of their own when imported before logging is set up;
    # let their records reach the root logger instead, so they land in train.log too.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def save_config(cfg: DictConfig, output_dir: Path) -> None:
    """Called through the compose API (tests, reproduce), write the run's .hydra/config.yaml
    as @hydra.main does, so that the run folder is complete."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return
    path = output_dir / ".hydra" / "config.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    OmegaConf.save(OmegaConf.create(OmegaConf.to_container(plain, resolve=True)), path)


def resume_command(output_dir: Path) -> str:
    """The command line that continues the run in ``output_dir``."""
    from hydra.core.hydra_config import HydraConfig

    overrides = []
    if HydraConfig.initialized():
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    return " ".join(["python -m vae_lightning.train", *overrides, f"resume={output_dir}"])


def quiet_known_warnings() -> None:
    # Lightning 2.6 + torch 2.14 warn on every batch transfer about an internal pytree API.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")


# --- the tools' entry point ---------------------------------------------------------------------


def tool_main(config_name: str, doc: str | None = None) -> Callable:
    """Make ``fn(cfg)`` a command line tool in the project's one argument style: Hydra
    overrides (``key=value``, ``+key=value``, lists as ``[a,b]``) on ``conf/<config_name>.yaml``.

    The decorated ``main(argv=None) -> int`` prints the config for ``--help``, and turns a
    ConfigError or DataError into one line on stderr and exit status 2. Used by the tools that
    need no run folder of their own (evaluate, report, reproduce, bench, data); ``train`` is
    a full ``@hydra.main`` for its run folders, launchers and sweeps.
    """

    def decorate(fn: Callable[[DictConfig], Any]) -> Callable[[Sequence[str] | None], int]:
        @functools.wraps(fn)
        def main(argv: Sequence[str] | None = None) -> int:
            from hydra.errors import HydraException
            from omegaconf.errors import OmegaConfBaseException

            argv = sys.argv[1:] if argv is None else list(argv)
            logging.basicConfig(
                level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"
            )
            quiet_known_warnings()
            try:
                cfg = compose(argv_overrides(argv), config_name)
                if any(arg in ("-h", "--help") for arg in argv):
                    sys.stdout.write(f"{doc or fn.__doc__}\n\n{OmegaConf.to_yaml(cfg)}")
                    return 0
                fn(cfg)
            except (ConfigError, DataError) as err:
                sys.stderr.write(f"error: {err}\n")
                return 2
            except (HydraException, OmegaConfBaseException) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                sys.stderr.write(f"error: {first}\n")
                return 2
            return 0

        return main

    return decorate


def argv_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides of a tool's command line: its arguments except --help."""
    bad = [a for a in argv if a.startswith("-") and a not in ("-h", "--help")]
    if bad:
        raise ConfigError(
            bad[0], "is not an option: the tools take key=value overrides (see --help)"
        )
    return [a for a in argv if a not in ("-h", "--help")]


class SweepReport(Callback):
    """Hydra callback: when a multirun ends, write REPORT.md, summary.csv and the plots into
    its sweep folder (report.py, imported only then)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from vae_lightning.report import write_report

        try:
            log.info("sweep report: %s", write_report(Path(config.hydra.sweep.dir)))
        except FileNotFoundError as err:  # e.g. every job was skipped before writing anything
            log.warning("no sweep report: %s", err)
