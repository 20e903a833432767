"""Hydra glue, in one place: the config folder and its resolvers, composing and instantiating
with errors that name the key, the tools' shared entry point, the thread policy, and a
multirun job's line in its sweep's ledger (``jobs.jsonl``). The Hydra callback that checks the
run and sweep folders and writes a sweep's report is ``sweeps.folders.RunFolders``.

A base module, as ``errors`` and ``files`` are: every floor may import it, and it imports no
floor.

Nothing here runs at import: the resolvers are registered by ``register_resolvers()``, which
every entry point and ``compose()`` call first.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from vae_lightning.errors import (
    USER_ERRORS,
    ConfigError,
    Interrupted,
    RunInterrupted,
    check_int,
    raise_on_signals,
)
from vae_lightning.files import file_lock

PACKAGE_DIR = Path(__file__).resolve().parent
# The configs: an installed wheel carries the repository's conf/ inside the package
# (pyproject.toml maps it there); a clone (the editable install) reads conf/ beside the package.
_SHIPPED_CONF = PACKAGE_DIR / "conf"
CONFIG_DIR = _SHIPPED_CONF if _SHIPPED_CONF.is_dir() else PACKAGE_DIR.parent / "conf"
# names the folder that holds data/ and outputs/ (paths.root_dir), wherever the package is
ROOT_ENV = "VAE_LIGHTNING_ROOT"
# The Hydra plugins that the optional extras install: a command line's choice that needs one,
# the plugin's module and the extra (pyproject.toml's optional-dependencies).
_SUBMITIT = ("hydra_plugins.hydra_submitit_launcher", "slurm")
_OPTUNA = ("hydra_plugins.hydra_optuna_sweeper", "optuna")
EXTRAS: dict[str, dict[str, tuple[str, str]]] = {
    "hydra/launcher": {
        "slurm": _SUBMITIT, "submitit_slurm": _SUBMITIT, "submitit_local": _SUBMITIT,
        "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    },
    "hydra/sweeper": {"optuna": _OPTUNA},
    "hparams_search": {"optuna": _OPTUNA},
}  # fmt: skip

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


def root_dir() -> Path:
    """The folder below which ``data/`` and ``outputs/`` go unless ``paths.*`` say otherwise:
    ``$VAE_LIGHTNING_ROOT`` when set; else the clone's root when the package runs from one
    (its conf/ beside the package); else, for an installed wheel, the working directory (never
    site-packages)."""
    named = os.environ.get(ROOT_ENV)
    if named:
        root = Path(named).expanduser().resolve()
        if root.exists() and not root.is_dir():
            raise ConfigError(ROOT_ENV, f"is {named!r}, a file: name a folder (or unset it)")
        return root
    if CONFIG_DIR != _SHIPPED_CONF:
        return CONFIG_DIR.parent
    return Path.cwd()


def check_extras(argv: Sequence[str]) -> None:
    """Refuse, in one line naming the extra to install, a choice on the command line whose
    Hydra plugin is not installed (Hydra would only say that it cannot find the config)."""
    for arg in argv:
        key, _, choice = arg.lstrip("+~").partition("=")
        plugin, extra = EXTRAS.get(key, {}).get(choice, (None, None))
        if plugin and not _installed(plugin):
            raise missing_extra(key, f"is {choice}, whose Hydra plugin ({plugin})", extra)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module in sys.modules without a spec
        return False


def missing_extra(key: str, what: str, extra: str) -> ConfigError:
    """The one refusal of a choice whose package is an optional extra that is not installed."""
    return ConfigError(
        key,
        f"{what} is not installed: install the {extra!r} extra, pip install "
        f"'vae_lightning[{extra}]' (in a checkout: pip install -e '.[{extra}]'; make install "
        f"has it)",
    )


def register_resolvers() -> None:
    """``${root_dir:}`` (``root_dir()``; ``${repo_root:}`` is its older name, which the run
    folders written before it still hold), ``${job_dirname:...}`` and ``${resume_folder:...}``
    (idempotent)."""
    for name, resolver in (
        ("root_dir", lambda: str(root_dir())),
        ("repo_root", lambda: str(root_dir())),
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


def cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def set_torch_threads(threads: int | None) -> None:
    """``threads`` when set; else, under a parallel launcher, the cores divided among its jobs."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    if threads is None and HydraConfig.initialized():
        launcher = HydraConfig.get().launcher
        n_jobs, cpus = launcher.get("n_jobs"), launcher.get("cpus_per_task")
        if cpus:
            threads = int(cpus)
        elif n_jobs:
            threads = max(1, cores() // (int(n_jobs) if n_jobs > 0 else cores()))
    if threads:
        torch.set_num_threads(int(threads))
        log.info("torch threads: %d", torch.get_num_threads())


def job_devices(devices: Any, accelerator: Any, job_num: int | None, n_gpus: int) -> Any:
    """``trainer.devices`` for job ``job_num`` of a multirun on a machine with ``n_gpus`` CUDA
    GPUs: a single-device job gets GPU ``job_num % n_gpus``, so that a parallel launcher's jobs
    spread over every GPU instead of all training on the first (Lightning's ``devices=1`` always
    means GPU 0). Anything else is left as configured: not a multirun, fewer than two GPUs, the
    CPU, a list of GPUs (the user's choice), or several devices per job (DDP, whose processes
    must agree on them)."""
    if job_num is None or n_gpus < 2 or str(accelerator) not in ("auto", "gpu", "cuda"):
        return devices
    if isinstance(devices, bool) or devices != 1:
        return devices
    return [job_num % n_gpus]


def spread_over_gpus(cfg: DictConfig) -> None:
    """With ``spread_gpus=true``, give this multirun job its GPU (``job_devices``), before the
    config is saved, so the run's .hydra/config.yaml says where it trained."""
    import torch
    from hydra.core.hydra_config import HydraConfig

    if not cfg.get("spread_gpus") or not in_multirun() or not torch.cuda.is_available():
        return
    n_gpus = torch.cuda.device_count()
    trainer = cfg.trainer
    devices = job_devices(trainer.get("devices"), trainer.get("accelerator"),
                          HydraConfig.get().job.num, n_gpus)  # fmt: skip
    if devices != trainer.get("devices"):
        with open_dict(cfg):
            trainer.devices = devices
        log.info("multirun job %d: GPU %d of %d", HydraConfig.get().job.num, devices[0], n_gpus)


def route_lightning_logs() -> None:
    # Lightning gives its loggers a handler of their own when imported before logging is set up;
    # let their records reach the root logger instead, so they land in train.log too.
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True


def save_config(cfg: DictConfig, output_dir: Path) -> None:
    """Write the run's ``.hydra/`` (config.yaml; under @hydra.main also hydra.yaml and
    overrides.yaml, as Hydra writes them), once train() has checked that the folder may be
    written: ``hydra.output_subdir`` is null, so that Hydra does not rewrite a finished run's
    config before the check. Through the compose API (tests, reproduce) config.yaml is saved
    resolved, as there is no Hydra runtime to resolve it later."""
    from hydra.core.hydra_config import HydraConfig

    if ddp_child():  # DDP's other processes run with other Hydra settings
        return
    folder = output_dir / ".hydra"
    folder.mkdir(parents=True, exist_ok=True)
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        pin_root(cfg)
        OmegaConf.save(cfg, folder / "config.yaml")
        OmegaConf.save(OmegaConf.create({"hydra": hydra_cfg}), folder / "hydra.yaml")
        OmegaConf.save(hydra_cfg.overrides.task, folder / "overrides.yaml")
        return
    plain = OmegaConf.create({k: v for k, v in cfg.items() if k != "hydra"})
    resolved = OmegaConf.create(OmegaConf.to_container(plain, resolve=True))
    OmegaConf.save(resolved, folder / "config.yaml")


def pin_root(cfg: DictConfig) -> None:
    """``paths.root_dir`` as the folder it resolved to, in place of ``${root_dir:}``: the saved
    config then names the data this run read, also for a ``vae-evaluate`` of it started in
    another folder (where ``${root_dir:}`` of an installed wheel would be another one)."""
    paths = cfg.get("paths")
    if paths is not None and "root_dir" in paths:
        with open_dict(cfg):
            paths.root_dir = str(paths.root_dir)


# The loggers whose package is an optional extra of this project: class -> (module, extra)
OPTIONAL_LOGGERS = {"WandbLogger": ("wandb", "wandb"), "MLFlowLogger": ("mlflow", "mlflow")}


def check_logger_packages(node: DictConfig | None) -> None:
    """Each configured logger's package is installed, else one line naming the extra to install
    (instead of Lightning's traceback from deep inside the Trainer's construction)."""
    for name, child in (node or {}).items():
        target = str((child or {}).get("_target_", ""))
        module, extra = OPTIONAL_LOGGERS.get(target.rsplit(".", 1)[-1], (None, None))
        if module is not None and not _installed(module):
            raise missing_extra(f"logger.{name}", f"needs the {module} package, which", extra)


def check_run_config(cfg: DictConfig) -> None:
    """The top-level and trainer values that would otherwise fail deep inside Lightning (or,
    worse, record a run that trained nothing as ``ok``): checked before anything is written."""
    check_int("seed", cfg.get("seed"), 0)
    if cfg.get("threads") is not None:
        check_int("threads", cfg.get("threads"), 1)
    if not isinstance(cfg.get("spread_gpus", False), bool):
        raise ConfigError("spread_gpus", f"must be true or false, got {cfg.get('spread_gpus')!r}")
    if not isinstance(cfg.get("test", True), bool):
        raise ConfigError("test", f"must be true or false, got {cfg.get('test')!r}")
    resume = cfg.get("resume")
    if resume is not None and not isinstance(resume, (bool, str)):
        raise ConfigError("resume", f"must be a run folder, a .ckpt file or true, got {resume!r}")
    trainer = cfg.get("trainer") or {}
    check_int("trainer.log_every_n_steps", trainer.get("log_every_n_steps", 50), 1)
    max_epochs, max_steps = trainer.get("max_epochs"), trainer.get("max_steps", -1)
    if max_epochs not in (None, -1):
        check_int("trainer.max_epochs", max_epochs, 1)
    if max_steps != -1:
        check_int("trainer.max_steps", max_steps, 1)
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches"):
        value = trainer.get(key)
        if value is None:  # Lightning's default: all
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(
                f"trainer.{key}",
                f"must be a fraction in (0, 1] or a number of batches >= 1, got {value!r}: a "
                f"run with no batches would record nothing measured as finished",
            )
    check_logger_packages(cfg.get("logger"))


def detach_folder_log(output_dir: Path) -> None:
    """Stop logging into ``output_dir`` (Hydra's train.log there): for runs that leave the
    folder as it was (a finished run skipped or refused). The console keeps the messages."""
    root = logging.getLogger()
    folder = Path(output_dir).resolve()
    for handler in list(root.handlers):
        name = getattr(handler, "baseFilename", None)
        if name and Path(name).resolve().parent == folder:
            root.removeHandler(handler)
            handler.close()


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
    # every resumed run writes into its own checkpoints/ again; claim_folder has already refused
    # a folder holding another run's checkpoints
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")


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
                root_dir()  # a bad $VAE_LIGHTNING_ROOT in its own words, before any resolving
                cfg = compose(argv_overrides(argv), config_name)
                if any(arg in ("-h", "--help") for arg in argv):
                    sys.stdout.write(f"{doc or fn.__doc__}\n\n{OmegaConf.to_yaml(cfg)}")
                    return 0
                with raise_on_signals():
                    fn(cfg)
            except (Interrupted, RunInterrupted) as err:
                sys.stderr.write(interrupted_line(err, argv))
                return 128 + err.signum
            except USER_ERRORS as err:
                sys.stderr.write(f"error: {err}\n")
                return 2
            except (HydraException, OmegaConfBaseException) as err:
                first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
                sys.stderr.write(f"error: {first}\n")
                return 2
            return 0

        return main

    return decorate


def interrupted_line(err: BaseException, argv: Sequence[str]) -> str:
    """The line a tool stopped by a signal ends with: where it stopped and the command that
    continues it (the same command: what a tool finished is kept, and a training it started
    continues from its checkpoint, ``resume=true``)."""
    import shlex

    command = shlex.join([Path(sys.argv[0]).name, *argv])
    return f"interrupted: {err}; what it finished is kept. Run it again to finish: {command}\n"


def argv_overrides(argv: Sequence[str]) -> list[str]:
    """The overrides of a tool's command line: its arguments except --help."""
    bad = [a for a in argv if a.startswith("-") and a not in ("-h", "--help")]
    if bad:
        raise ConfigError(
            bad[0], "is not an option: the tools take key=value overrides (see --help)"
        )
    return [a for a in argv if a not in ("-h", "--help")]


def ddp_child() -> bool:
    """Whether this process is one of the processes DDP starts beside rank zero (Lightning runs
    them with the job's command line, which may be a multirun's)."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return rank_zero_only.rank != 0


def record_job(status: str, error: str | None = None) -> None:
    """Append this multirun job's outcome to its sweep's ``jobs.jsonl`` (under a file lock:
    parallel launchers' jobs append to it at once)."""
    from hydra.core.hydra_config import HydraConfig

    if ddp_child():
        return
    hydra_cfg = HydraConfig.get()
    ledger = Path(hydra_cfg.sweep.dir) / "jobs.jsonl"
    entry = {
        "job": hydra_cfg.job.num,
        "dir": hydra_cfg.runtime.output_dir,
        "status": status,
        "error": error,
    }
    with file_lock(ledger):
        with open(ledger, "a") as f:
            f.write(json.dumps(entry) + "\n")
