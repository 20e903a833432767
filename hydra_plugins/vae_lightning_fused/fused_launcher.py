"""``hydra/launcher=fused``: a multirun's jobs that differ only in ``model.beta``,
``model.latent_dim`` and ``seed`` are trained together as one stacked model (one process, one
optimizer step for all of them), and each job still ends as its own ordinary run.

For every group (``vae_lightning.fused_group``): the group's epochs are trained as one stack,
each job's folder receiving its history, TensorBoard scalars and checkpoints as it goes; then
each job is run the ordinary way (``train()`` under Hydra's ``run_job``, with ``resume=true``):
its last batch, the last validation, the end-of-fit images and probes, the test and
``metrics.json``. A job that cannot join a group (another model or trainer setting, a folder
that already holds a run, a group of one) runs the ordinary way from the start, as under the
basic launcher. Hydra finds this plugin in the ``hydra_plugins`` namespace package.
"""

import copy
import logging
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

log = logging.getLogger(__name__)


@dataclass
class FusedLauncherConf:
    _target_: str = "hydra_plugins.vae_lightning_fused.fused_launcher.FusedLauncher"
    # the most jobs trained as one stack (null: a whole group); smaller stacks use less memory
    max_group: int | None = None
    # processes that then finish the jobs (each one's last batch, end of fit, test), and run the
    # jobs that train alone: -1 one per core, 1 in this process. Each gets cores / n_jobs torch
    # threads (train.py's thread policy), as under the joblib launcher
    n_jobs: int = -1
    # true: stacks may train on a CUDA GPU. Off until the stack has run on one: on a machine
    # with a GPU its jobs run alone meanwhile (the log says so)
    gpu: bool = False


ConfigStore.instance().store(group="hydra/launcher", name="fused", node=FusedLauncherConf)


@dataclass
class _Job:
    num: int
    overrides: list[str]
    config: DictConfig  # the job's sweep config (with its hydra node)
    task: DictConfig  # the job's own config, resolved
    output_dir: Path


class FusedLauncher(Launcher):
    def __init__(self, max_group: int | None = None, n_jobs: int = -1, gpu: bool = False) -> None:
        if max_group is not None and (isinstance(max_group, bool) or int(max_group) < 1):
            _refuse(f"hydra.launcher.max_group must be a number of jobs >= 1 or null, got "
                    f"{max_group!r}")  # fmt: skip
        if isinstance(n_jobs, bool) or not isinstance(n_jobs, int) or n_jobs == 0 or n_jobs < -1:
            _refuse(f"hydra.launcher.n_jobs must be -1 (one process per core) or a number of "
                    f"processes >= 1, got {n_jobs!r}")  # fmt: skip
        if not isinstance(gpu, bool):
            _refuse(f"hydra.launcher.gpu must be true or false, got {gpu!r}")
        self.max_group = None if max_group is None else int(max_group)
        self.gpu = gpu
        self.n_jobs = _cores() if n_jobs == -1 else n_jobs
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        jobs = [self._load(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        groups, alone = self._plan(jobs)
        sizes = ", ".join(str(len(g)) for g in groups) or "none"
        log.info("fused launcher: %d jobs; stacks of %s; %d alone", len(jobs), sizes, len(alone))
        returns: dict[int, JobReturn] = {}
        for n, group in enumerate(groups, 1):
            self._train_stack([jobs[i] for i in group], f"stack {n} of {len(groups)}")
            returns.update(zip(group, self._run([jobs[i] for i in group], True), strict=True))
        returns.update(zip(alone, self._run([jobs[i] for i in alone], False), strict=True))
        return [returns[i] for i in range(len(jobs))]

    # --- planning ------------------------------------------------------------------------------
    def _load(self, overrides: list[str], num: int) -> _Job:
        """The job's config as Hydra's run_job will see it, and its own config resolved."""
        assert self.config is not None and self.hydra_context is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config):
            config.hydra.job.id = num
            config.hydra.job.num = num
        HydraConfig.instance().set_config(config)
        subdir = str(OmegaConf.select(config, "hydra.sweep.subdir"))
        output_dir = Path(os.path.abspath(Path(str(config.hydra.sweep.dir)) / subdir))
        with read_write(config.hydra.runtime):
            config.hydra.runtime.output_dir = str(output_dir)
        HydraConfig.instance().set_config(config)
        task = copy.deepcopy(config)
        with read_write(task), open_dict(task):
            del task["hydra"]
        resolved = OmegaConf.create(OmegaConf.to_container(task, resolve=True))
        return _Job(num, overrides, config, resolved, output_dir)

    def _plan(self, jobs: list[_Job]) -> tuple[list[list[int]], list[int]]:
        """Groups of jobs to stack (each of 2 or more) and the jobs that run alone."""
        from vae_lightning.fused_group import group_key, why_not_fused

        by_key: dict[str, list[int]] = defaultdict(list)
        alone: list[int] = []
        for i, job in enumerate(jobs):
            reason = self._why_alone(job) or why_not_fused(job.task, gpu=self.gpu)
            if reason:
                log.info("job #%d runs alone: %s", job.num, reason)
                alone.append(i)
            else:
                by_key[group_key(job.config)].append(i)
        groups: list[list[int]] = []
        for members in by_key.values():
            size = self.max_group or len(members)
            for start in range(0, len(members), size):
                chunk = members[start : start + size]
                if len(chunk) > 1:
                    groups.append(chunk)
                else:
                    num = jobs[chunk[0]].num
                    log.info("job #%d runs alone: no other job to stack it with", num)
                    alone.extend(chunk)
        return groups, sorted(alone)

    @staticmethod
    def _why_alone(job: _Job) -> str | None:
        from vae_lightning import config
        from vae_lightning.errors import USER_ERRORS
        from vae_lightning.run import RunRecord

        resume = job.task.get("resume")
        if resume not in (None, False, True):
            return f"resume={resume}"
        try:
            config.check_run_config(job.task)
        except USER_ERRORS as err:
            return str(err)
        folder = job.output_dir
        if RunRecord.read(folder) is not None or any((folder / "checkpoints").glob("*.ckpt")):
            return f"{folder} already holds a run (train() skips, continues or refuses it)"
        return None

    # --- running -------------------------------------------------------------------------------
    def _train_stack(self, group: list[_Job], name: str) -> None:
        """Train the group's epochs as one stack; on a failure its jobs go on alone (from what
        their folders hold), on a signal the sweep stops with the command that resumes it."""
        from vae_lightning import config
        from vae_lightning.errors import USER_ERRORS, RunInterrupted
        from vae_lightning.fused_group import FusedGroup
        from vae_lightning.run_folder import claim_folder

        t0 = time.perf_counter()
        received: list[int] = []  # a signal before the stack's own handler is in place

        def handler(signum: int, frame: Any) -> None:
            received.append(signum)

        try:
            with ExitStack() as held:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    held.callback(signal.signal, signum, signal.signal(signum, handler))
                log.info("%s: %d jobs (#%s)", name, len(group),
                         ", #".join(str(j.num) for j in group))  # fmt: skip
                for job in group:  # one writer per folder, as train() claims its own
                    job.output_dir.mkdir(parents=True, exist_ok=True)
                    held.enter_context(claim_folder(job.output_dir, None))
                config.route_lightning_logs()
                # the stack has the machine to itself: every core (its jobs' processes later
                # divide them)
                config.set_torch_threads(group[0].task.get("threads") or _cores())
                fused = FusedGroup([j.task for j in group], [j.output_dir for j in group])
                fused.received = received[0] if received else None
                dropped = fused.run()
                if received:  # after the stack's last step
                    raise RunInterrupted(received[0], None, 0, 0)
        except RunInterrupted as err:
            self._interrupted(group, err)
        except USER_ERRORS as err:
            log.error("stack not trained (%s); its jobs run alone", err)
            return
        except Exception:
            log.exception("stack failed (a bug); its jobs run alone from their checkpoints")
            return
        for i in dropped:
            log.warning("job #%d left the stack (non-finite loss): it goes on alone", group[i].num)
        log.info("stack of %d jobs trained in %.1f s; each job finishes alone now", len(group),
                 time.perf_counter() - t0)  # fmt: skip

    def _interrupted(self, group: list[_Job], err: Any) -> None:
        from vae_lightning.run import RunRecord

        command = self._resume_command()
        for job in group:
            record = RunRecord(job.output_dir)
            record.data.update(status="interrupted", error=f"RunInterrupted: {err}",
                               resume=command)  # fmt: skip
            record._write()
        message = f"interrupted: {err}. Resume the sweep with:\n  {command}"
        log.error("%s", message)
        sys.stderr.write(message + "\n")
        raise SystemExit(128 + err.signum)

    def _resume_command(self) -> str:
        assert self.config is not None
        overrides = self.config.hydra.overrides
        keep = [o for o in overrides.hydra if not o.startswith("hydra.sweep.dir=")]
        keep += [o for o in overrides.task if not o.startswith("resume=")]
        sweep_dir = os.path.abspath(str(self.config.hydra.sweep.dir))
        return " ".join(["python -m vae_lightning.train -m", *keep, "resume=true",
                         f"hydra.sweep.dir={sweep_dir}"])  # fmt: skip

    def _run(self, jobs: list[_Job], handed_over: bool) -> list[JobReturn]:
        """The jobs through Hydra's run_job, as the basic launcher runs them, or in ``n_jobs``
        processes as the joblib launcher does (its ``execute_job``); a job handed over by a
        stack continues from its checkpoint (``resume=true``)."""
        assert self.hydra_context is not None and self.task_function is not None
        assert self.config is not None
        runs = []
        for job in jobs:
            overrides = job.overrides
            if handed_over:
                overrides = [o for o in overrides if not o.startswith("resume=")]
                overrides.append("resume=true")
            log.info("\t#%d : %s", job.num, " ".join(filter_overrides(overrides)))
            runs.append((job.num, overrides))
        if self.n_jobs > 1 and len(runs) > 1:
            from hydra.core.singleton import Singleton
            from hydra_plugins.hydra_joblib_launcher._core import execute_job
            from joblib import Parallel, delayed

            state = Singleton.get_state()
            results = Parallel(n_jobs=min(self.n_jobs, len(runs)), backend="loky")(
                delayed(execute_job)(
                    num, overrides, self.hydra_context, self.config, self.task_function, state
                )
                for num, overrides in runs
            )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            return list(results)
        results = []
        for num, overrides in runs:
            config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(config):
                config.hydra.job.id = num
                config.hydra.job.num = num
            results.append(
                run_job(
                    hydra_context=self.hydra_context,
                    task_function=self.task_function,
                    config=config,
                    job_dir_key="hydra.sweep.dir",
                    job_subdir_key="hydra.sweep.subdir",
                )
            )
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return results


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _refuse(message: str) -> None:
    """One line and exit status 2 (Hydra lets SystemExit through without a traceback)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)
