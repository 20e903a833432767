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
    # processes on the CPU: the stacks train in up to n_jobs processes at once (a group cut
    # in as many stacks), then the jobs finish in n_jobs processes (each one's last batch, end
    # of fit, test), with the jobs that train alone: -1 one per core, 1 in this process. Each
    # gets cores / n_jobs torch threads (train.py's thread policy), as under joblib
    n_jobs: int = -1
    # true: stacks may train on a CUDA GPU. Off until the stack has run on one: on a machine
    # with a GPU its jobs run alone meanwhile (the log says so). With several GPUs, the stacks
    # train on all of them at once (one process each), and the jobs finish on all of them
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
        from vae_lightning.config import cores

        self.n_jobs = cores() if n_jobs == -1 else n_jobs
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
        from vae_lightning.sweeps.fused import spread_stacks

        jobs = [self._load(list(o), initial_job_idx + i) for i, o in enumerate(job_overrides)]
        groups, alone = self._plan(jobs)
        devices = self._devices(jobs, groups)
        # each job's work, for sharing the stacks out (a job that runs alone may have any value)
        epochs = [job.task.get("trainer", {}).get("max_epochs") for job in jobs]
        weights = [float(e) if isinstance(e, int) and e > 0 else 1.0 for e in epochs]
        slots = [(d, slot) for d, slot in zip(devices, spread_stacks(groups, weights, len(devices)),
                                              strict=True) if slot]  # fmt: skip
        stacks = [stack for _, slot in slots for stack in slot]
        sizes = ", ".join(str(len(st)) for st in stacks) or "none"
        log.info("fused launcher: %d jobs; stacks of %s; %d alone", len(jobs), sizes, len(alone))
        if len(slots) > 1:
            self._train_at_once(jobs, slots)
        else:
            for n, stack in enumerate(stacks, 1):
                self._train_stack([jobs[i] for i in stack], f"stack {n} of {len(stacks)}")
        returns: dict[int, JobReturn] = {}
        trained = sorted(i for stack in stacks for i in stack)
        spread = len(slots) > 1 and slots[0][0].startswith("cuda")  # their ends on every GPU too
        returns.update(zip(trained, self._run([jobs[i] for i in trained], True, spread),
                           strict=True))  # fmt: skip
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

    def _devices(self, jobs: list[_Job], groups: list[list[int]]) -> list[str]:
        """Where the stacks train at the same time: every GPU when they all train on CUDA, else
        ``n_jobs`` shares of the CPU (stacks on both: one after another, each on its own)."""
        import torch

        from vae_lightning.sweeps.fused import stack_device, stack_devices

        kinds = {stack_device(jobs[g[0]].task.trainer).type for g in groups}
        if kinds == {"cuda"}:
            return stack_devices(True, torch.cuda.device_count(), 1)
        return stack_devices(False, 0, self.n_jobs if kinds == {"cpu"} else 1)

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
        from vae_lightning import config
        from vae_lightning.errors import RunInterrupted
        from vae_lightning.run.folder import claim_folder

        received: list[int] = []  # a signal before the stack's own handler is in place

        def handler(signum: int, frame: Any) -> None:
            received.append(signum)

        with ExitStack() as held:
            for signum in (signal.SIGTERM, signal.SIGINT):
                held.callback(signal.signal, signum, signal.signal(signum, handler))
            log.info("%s: %d jobs (#%s)", name, len(group), ", #".join(str(j.num) for j in group))
            for job in group:  # one writer per folder, as train() claims its own
                job.output_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(claim_folder(job.output_dir, None))
            config.route_lightning_logs()
            # the stack has the machine to itself: every core (its jobs' processes later
            # divide them)
            config.set_torch_threads(group[0].task.get("threads") or config.cores())
            payload = [(OmegaConf.to_container(j.task), str(j.output_dir)) for j in group]
            (outcome,) = _train_stacks([payload], name, received)
        if outcome[0] == "interrupted":
            self._interrupted(group, RunInterrupted(outcome[1], None, 0, 0))
        _log_outcome(outcome, group)

    def _train_at_once(self, jobs: list[_Job], slots: list[tuple[str, list[list[int]]]]) -> None:
        """Every device's stacks at once: the first device's in this process, each other's in a
        process of its own (spawned: CUDA cannot be forked), each with its share of the cores.
        A signal is passed on to them and stops the sweep as it does with one device; a stack
        that fails leaves its jobs to run alone, as in ``_train_stack``."""
        import multiprocessing

        from vae_lightning import config
        from vae_lightning.errors import RunInterrupted
        from vae_lightning.run.folder import claim_folder

        t0 = time.perf_counter()
        ctx = multiprocessing.get_context("spawn")
        results = ctx.Queue()
        procs: list[Any] = []
        received: list[int] = []

        def pass_on(signum: int) -> None:
            for proc in procs:
                if proc.is_alive():
                    os.kill(proc.pid, signum)

        def handler(signum: int, frame: Any) -> None:
            received.append(signum)
            pass_on(signum)

        stacks = {(s, k): st for s, (_, slot) in enumerate(slots) for k, st in enumerate(slot)}
        members = [jobs[i] for stack in stacks.values() for i in stack]
        threads = members[0].task.get("threads") or max(1, config.cores() // len(slots))
        payloads = [[[(OmegaConf.to_container(jobs[i].task), str(jobs[i].output_dir))
                      for i in stack] for stack in slot] for _, slot in slots]  # fmt: skip
        outcomes: dict[tuple[int, int], tuple] = {}
        with ExitStack() as held:
            for signum in (signal.SIGTERM, signal.SIGINT):
                held.callback(signal.signal, signum, signal.signal(signum, handler))
            for job in members:  # one writer per folder, as train() claims its own
                job.output_dir.mkdir(parents=True, exist_ok=True)
                held.enter_context(claim_folder(job.output_dir, None))
            for device, slot in slots:
                nums = ", #".join(str(jobs[i].num) for st in slot for i in st)
                log.info("%s: stacks of %s (#%s), %d torch threads", device,
                         ", ".join(str(len(st)) for st in slot), nums, threads)  # fmt: skip
            for s in range(1, len(slots)):
                if not received:
                    args = (s, payloads[s], slots[s][0], threads, results)
                    proc = ctx.Process(target=_train_slot, args=args)
                    proc.start()
                    procs.append(proc)
            config.route_lightning_logs()
            config.set_torch_threads(threads)
            _use_device(slots[0][0])
            here = _train_stacks(payloads[0], slots[0][0], received)
            outcomes.update({(0, k): outcome for k, outcome in enumerate(here)})
            if received:  # a signal the stack here took (its own handler): the others stop too
                pass_on(received[0])
            outcomes.update(_collect(results, procs, len(stacks) - len(here)))
            for proc in procs:
                proc.join()
        signals = [value for kind, value in outcomes.values() if kind == "interrupted"]
        if received or signals:
            self._interrupted(members, RunInterrupted((received or signals)[0], None, 0, 0))
        for key, stack in stacks.items():
            _log_outcome(outcomes.get(key, ("bug", "its process ended before it reported")),
                         [jobs[i] for i in stack])  # fmt: skip
        log.info("%d stacks trained on %d devices at once in %.1f s; each job finishes alone now",
                 len(stacks), len(slots), time.perf_counter() - t0)  # fmt: skip

    def _interrupted(self, group: list[_Job], err: Any) -> None:
        from vae_lightning.run.record import RunRecord

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

    def _run(self, jobs: list[_Job], handed_over: bool, spread: bool = False) -> list[JobReturn]:
        """The jobs through Hydra's run_job, as the basic launcher runs them, or in ``n_jobs``
        processes as the joblib launcher does (its ``execute_job``); a job handed over by a
        stack continues from its checkpoint (``resume=true``). ``spread``: each job on GPU
        (its number mod the GPUs), as ``spread_gpus=true`` places them."""
        assert self.hydra_context is not None and self.task_function is not None
        assert self.config is not None
        runs = []
        for job in jobs:
            overrides = job.overrides
            if handed_over:
                overrides = [o for o in overrides if not o.startswith("resume=")]
                overrides.append("resume=true")
            if spread:
                overrides = [o for o in overrides if not o.startswith("spread_gpus=")]
                overrides.append("spread_gpus=true")
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


def _train_slot(slot: int, stacks: list, device: str, threads: int, results: Any) -> None:
    """A spawned process of ``_train_at_once``: ``_train_stacks`` on ``device`` with
    ``threads`` torch threads, each stack's outcome put on ``results`` as (slot, index, kind,
    value)."""
    logging.basicConfig(level=logging.INFO,
                        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")  # fmt: skip
    received: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: received.append(signum))
    from vae_lightning import config

    config.quiet_known_warnings()
    config.route_lightning_logs()
    config.set_torch_threads(threads)
    _use_device(device)
    for k, outcome in enumerate(_train_stacks(stacks, device, received)):
        results.put((slot, k, *outcome))


def _use_device(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.set_device(torch.device(device))  # FusedGroup trains on the current GPU


def _train_stacks(stacks: list, where: str, received: list[int]) -> list[tuple]:
    """``stacks`` (each a list of (resolved job config, run folder)) trained one after another
    (``where``: for the log);
    each one's outcome: ok (the jobs it dropped), interrupted (the signal, also appended to
    ``received``), error (a user error's text) or bug (its traceback). After a signal, the
    stacks left are not started."""
    import traceback

    from vae_lightning.errors import USER_ERRORS, RunInterrupted
    from vae_lightning.sweeps.fused import FusedGroup

    outcomes: list[tuple[str, Any]] = []
    for stack in stacks:
        t0 = time.perf_counter()
        try:
            if received:
                raise RunInterrupted(received[0], None, 0, 0)
            fused = FusedGroup([OmegaConf.create(cfg) for cfg, _ in stack],
                               [Path(folder) for _, folder in stack])  # fmt: skip
            fused.received = received[0] if received else None  # while it was being built
            dropped = fused.run()
            outcomes.append(("interrupted", received[0]) if received else ("ok", dropped))
            log.info("%s: stack of %d jobs trained in %.1f s", where, len(stack),
                     time.perf_counter() - t0)  # fmt: skip
        except RunInterrupted as err:
            if not received:
                received.append(err.signum)
            outcomes.append(("interrupted", err.signum))
        except USER_ERRORS as err:
            outcomes.append(("error", str(err)))
        except Exception:
            outcomes.append(("bug", traceback.format_exc()))
    return outcomes


def _log_outcome(outcome: tuple[str, Any], stack: list[_Job]) -> None:
    """What becomes of a stack's jobs after ``_train_stacks``' outcome: all go on to their end
    of fit; those a failure left untrained, or the stack dropped, go on alone."""
    kind, value = outcome
    if kind == "ok":
        for i in value:
            log.warning("job #%d left the stack (non-finite loss): it goes on alone", stack[i].num)
    elif kind == "error":
        log.error("stack not trained (%s); its jobs run alone", value)
    elif kind == "bug":
        log.error("stack failed (a bug); its jobs run alone from their checkpoints:\n%s", value)


def _collect(results: Any, procs: list[Any], expected: int) -> dict[tuple[int, int], tuple]:
    """The stacks' outcomes from ``_train_slot``'s processes, until all are in or every
    process has ended (one that died reports nothing: its stacks are missing here)."""
    import queue

    outcomes: dict[tuple[int, int], tuple] = {}
    while len(outcomes) < expected:
        try:
            slot, k, kind, value = results.get(timeout=0.5)
        except queue.Empty:
            if not any(proc.is_alive() for proc in procs):
                try:
                    while True:
                        slot, k, kind, value = results.get_nowait()
                        outcomes[(slot, k)] = (kind, value)
                except queue.Empty:
                    break
            continue
        outcomes[(slot, k)] = (kind, value)
    return outcomes


def _refuse(message: str) -> None:
    """One line and exit status 2 (Hydra lets SystemExit through without a traceback)."""
    sys.stderr.write(f"error: {message}\n")
    raise SystemExit(2)
