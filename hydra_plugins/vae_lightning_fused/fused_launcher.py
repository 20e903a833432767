"""``hydra/launcher=fused``: a multirun's jobs that differ only in ``model.beta``,
``model.latent_dim`` and ``seed`` are trained together as one stacked model (one Lightning
Trainer, in this process, on one device), and each job still ends as its own ordinary run.

This is Hydra plumbing only. Which jobs group is ``vae_lightning.sweeps.fused``'s; training a
group, each job's folder receiving its history, TensorBoard scalars and checkpoints as it goes,
is ``vae_lightning.sweeps.stacked``'s. Then each job is run the ordinary way (``train()`` under
Hydra's ``run_job``, with ``resume=true``): its training is complete in its last.ckpt, and it
does the end-of-fit images and probes, the test and ``metrics.json``. A job that cannot join a
group (another model or trainer setting, a folder that already holds a run, a group of one)
runs the ordinary way from the start, as under the basic launcher. Hydra finds this plugin in
the ``hydra_plugins`` namespace package (and imports every module here when it starts: keep
them light).
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
    def __init__(self, max_group: int | None = None, gpu: bool = False) -> None:
        if max_group is not None and (isinstance(max_group, bool) or int(max_group) < 1):
            _refuse(f"hydra.launcher.max_group must be a number of jobs >= 1 or null, got "
                    f"{max_group!r}")  # fmt: skip
        if not isinstance(gpu, bool):
            _refuse(f"hydra.launcher.gpu must be true or false, got {gpu!r}")
        self.max_group = None if max_group is None else int(max_group)
        self.gpu = gpu
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
        for n, group in enumerate(groups, 1):
            self._train_stack([jobs[i] for i in group], f"stack {n} of {len(groups)}")
        returns: dict[int, JobReturn] = {}
        trained = sorted(i for group in groups for i in group)
        returns.update(zip(trained, self._run([jobs[i] for i in trained], True), strict=True))
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
        from vae_lightning.sweeps.fused import group_key, why_not_fused

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
        from vae_lightning.run.record import RunRecord

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
        """Train the group's epochs as one stack in this process, with every core; on a failure
        its jobs go on alone (from what their folders hold), on a signal the sweep stops with
        the command that resumes it."""
        import traceback

        from vae_lightning import config
        from vae_lightning.errors import USER_ERRORS, RunInterrupted
        from vae_lightning.run.folder import claim_folder
        from vae_lightning.run.record import RunRecord
        from vae_lightning.sweeps.stacked import train_group

        received: list[int] = []  # a signal before the stack's own handler is in place
        with ExitStack() as held:
            for signum in (signal.SIGTERM, signal.SIGINT):
                previous = signal.signal(signum, lambda signum, frame: received.append(signum))
                held.callback(signal.signal, signum, previous)
            log.info("%s: %d jobs (#%s)", name, len(group), ", #".join(str(j.num) for j in group))
            for job in group:  # one writer per folder, as train() claims its own
                job.output_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(claim_folder(job.output_dir, None))
            for job in group:  # each says it is being trained (a killed sweep's say "killed")
                record = RunRecord(job.output_dir)
                record.data["resume"] = self._resume_command()
                record._write()
            config.route_lightning_logs()
            config.set_torch_threads(group[0].task.get("threads") or config.cores())
            t0 = time.perf_counter()
            try:
                dropped = train_group([j.task for j in group], [j.output_dir for j in group],
                                      pending=received)  # fmt: skip
            except RunInterrupted as err:
                self._interrupted(group, err)
            except USER_ERRORS as err:
                log.error("%s not trained (%s); its jobs run alone", name, err)
                return
            except Exception:
                log.error("%s failed (a bug); its jobs run alone from their checkpoints:\n%s",
                          name, traceback.format_exc())  # fmt: skip
                return
        log.info("%s: trained in %.1f s", name, time.perf_counter() - t0)
        for i in dropped:
            log.warning("job #%d left the stack (non-finite loss): it goes on alone", group[i].num)

    def _interrupted(self, group: list[_Job], err: Any) -> None:
        """Each job's record says where it stopped and what it resumes from (its own last.ckpt,
        which the stack saved on the signal), then the sweep stops with its resume command."""
        from vae_lightning.errors import RunInterrupted
        from vae_lightning.run.record import RunRecord

        command = self._resume_command()
        saved = 0
        for job in group:
            last = job.output_dir / "checkpoints" / "last.ckpt"
            own = RunInterrupted(err.signum, last if last.is_file() else None, err.epoch, err.step)
            saved += own.checkpoint is not None
            record = RunRecord(job.output_dir)
            record.data.update(status="interrupted", error=f"RunInterrupted: {own}",
                               resume=command)  # fmt: skip
            record._write()
        where = str(err).split(";")[0]
        message = (f"interrupted: {where}; {saved} of {len(group)} jobs' last.ckpt saved. Resume "
                   f"the sweep with:\n  {command}")  # fmt: skip
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
        """The jobs through Hydra's run_job, one after another in this process, as the basic
        launcher runs them; a job handed over by a stack continues from its checkpoint
        (``resume=true``)."""
        assert self.hydra_context is not None and self.task_function is not None
        assert self.config is not None
        results = []
        for job in jobs:
            config = (
                self._handed_over(job) if handed_over else self._load(job.overrides, job.num).config
            )
            overrides = list(config.hydra.overrides.task)
            log.info("\t#%d : %s", job.num, " ".join(filter_overrides(overrides)))
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

    @staticmethod
    def _handed_over(job: _Job) -> DictConfig:
        """The job's config (composed once, when planning) continuing its stack's checkpoint:
        ``resume=true``, in its overrides too (its .hydra/overrides.yaml, its resume command)."""
        config = copy.deepcopy(job.config)
        with read_write(config), open_dict(config), read_write(config.hydra.overrides):
            config.resume = True
            task = [o for o in config.hydra.overrides.task if not o.startswith("resume=")]
            config.hydra.overrides.task = [*task, "resume=true"]
        return config


def _refuse(message: str) -> None:
    """One line and exit status 2 (Hydra lets SystemExit through without a traceback)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)
