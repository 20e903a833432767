"""Chunks of optimizer steps: what the fast step (``fast.py``) and a sweep's stack in chunks
(``stack.py``) share.

A step function trains one batch: ``step(index, beta, k)`` gathers the batch by its indices,
computes the loss terms (with the KL weight ``beta``, a 0-dim tensor, when there is one), takes
its backward and Adam step, and returns the batch means. ``ChunkRunner.run`` runs a chunk's
steps and accumulates, on the device, the sums of the terms over the chunk's images, each
step's loss, and the first step whose objective was not finite (per element: a stack's jobs
each have their own): eagerly, or, for a full chunk on CUDA, captured once in a
``torch.cuda.CUDAGraph`` and replayed. The first full chunk runs eagerly on a side stream (its
steps are real training, and they create Adam's state and the autograd buffers), the second is
captured (capturing runs nothing) and replayed, every later one replayed; the graph reads the
batches' indices and the KL weights from static buffers filled before each replay, and the
generators the steps draw from are registered with it (the CUDA generator is by default).

``ChunkOptimizer`` is what Lightning sees: Adam's parameter groups and state, stepped once per
batch after the chunk that took the real steps, so Lightning counts optimizer steps and saves
and restores Adam's state as ever.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

StepFn = Callable[[Tensor, Tensor | None, int], dict[str, Tensor]]


class ChunkOptimizer(torch.optim.Optimizer):
    """Adam as Lightning sees it under a chunked step: its parameter groups and state (so the
    checkpoint holds Adam's, and a scheduler changes Adam's rate), stepped once per batch
    after the chunk that took the real steps. Its ``state_dict`` is the one a plain Adam saves
    (a float learning rate, not capturable), so checkpoints load under either step."""

    def __init__(self, adam: torch.optim.Optimizer) -> None:
        super().__init__([p for g in adam.param_groups for p in g["params"]], adam.defaults)
        self.adam = adam
        self.param_groups, self.state = adam.param_groups, adam.state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        return closure() if closure is not None else None  # the chunk took the real step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing: the chunk zeroes the gradients of each of its steps."""

    def state_dict(self) -> dict[str, Any]:
        state = self.adam.state_dict()  # its per-parameter states are Adam's own: copied
        state["state"] = {i: dict(s) for i, s in state["state"].items()}
        for group in state["param_groups"]:
            group["lr"] = float(group["lr"])
            group["capturable"] = False
        for param_state in state["state"].values():
            if torch.is_tensor(param_state.get("step")):
                param_state["step"] = param_state["step"].detach().float().cpu()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        capturable = self.adam.defaults.get("capturable", False)
        lr = [g["lr"] for g in self.adam.param_groups]
        self.adam.load_state_dict(state_dict)
        for group, old in zip(self.adam.param_groups, lr, strict=True):
            if torch.is_tensor(old):  # a graph reads the rate from its tensor: keep it
                old.fill_(float(group["lr"]))
                group["lr"] = old
            group["capturable"] = capturable
        if capturable:
            for param_state in self.adam.state.values():
                device = next(iter(v for v in param_state.values() if v.dim())).device
                param_state["step"] = param_state["step"].to(device)
        self.param_groups, self.state = self.adam.param_groups, self.adam.state


def adam(params: Sequence[Tensor], lr: float, fused: bool, capturable: bool) -> ChunkOptimizer:
    """Adam for a chunked step (its rate a device tensor when a graph is to read it)."""
    device = params[0].device
    if capturable:
        rate = torch.tensor(float(lr), device=device)
        return ChunkOptimizer(torch.optim.Adam(params, lr=rate, fused=fused or None,
                                               capturable=True))  # fmt: skip
    return ChunkOptimizer(torch.optim.Adam(params, lr=lr, fused=fused or None))


@dataclass
class ChunkResult:
    """What a chunk leaves on the device: the sums of the terms over its images (T, ...) in
    the order of ``keys``, each step's loss (K, ...), the first step whose objective was not
    finite (..., -1: none), and the images it trained on (per job)."""

    keys: tuple[str, ...]
    sums: Tensor
    losses: Tensor
    first_bad: Tensor
    images: int


class ChunkRunner:
    """Runs the steps of a chunk of ``chunk`` batches: eagerly, or full chunks in one CUDA
    graph (``graph``), registering ``generators`` with it. See the module's docstring."""

    def __init__(self, chunk: int, graph: bool, generators: Sequence[torch.Generator] = ()):
        self.chunk, self.on_graph, self.generators = chunk, graph, list(generators)
        self.full_chunks = 0  # full chunks run so far (the first warms the graph up)
        self.graph: Any = None
        self.static: dict[str, Tensor] = {}
        self.result: ChunkResult | None = None

    def run(self, step: StepFn, batches: list[Tensor], betas: list[float] | None) -> ChunkResult:
        """The chunk's steps on ``batches`` (each batch's indices: (B,), or (J, B) for a stack),
        with KL weights ``betas`` (None: the steps take none)."""
        size = batches[0].shape[-1]
        full = len(batches) == self.chunk and all(b.shape[-1] == size for b in batches)
        if not (full and self.on_graph):
            return self._eager(step, batches, betas)
        self.full_chunks += 1
        if self.graph is None and self.full_chunks == 1:  # warm-up, on a side stream
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                result = self._eager(step, batches, betas)
            torch.cuda.current_stream().wait_stream(side)
            return result
        return self._replay(step, batches, betas)

    def _eager(self, step: StepFn, batches: list[Tensor], betas: list[float] | None):
        acc: dict[str, Tensor] = {}
        for k, index in enumerate(batches):
            beta = None if betas is None else torch.tensor(betas[k], device=index.device)
            terms = step(index, beta, k)
            _accumulate(acc, terms, k, len(batches), index.shape[-1])
        n = sum(b.shape[-1] for b in batches)
        return ChunkResult(tuple(acc["keys"]), acc["sums"], acc["losses"], acc["first_bad"], n)

    def _replay(self, step: StepFn, batches: list[Tensor], betas: list[float] | None):
        s = self.static
        if self.graph is None:  # static buffers, then the capture (which runs nothing)
            s["index"] = torch.stack(batches)
            s["beta"] = torch.tensor(betas or [0.0] * self.chunk, device=s["index"].device)
        s["index"].copy_(torch.stack(batches))
        if betas is not None:
            s["beta"].copy_(torch.tensor(betas, dtype=s["beta"].dtype))
        for name in ("sums", "losses"):
            if name in s:
                s[name].zero_()
        if "first_bad" in s:
            s["first_bad"].fill_(-1)
        if self.graph is None:
            self._capture(step, betas is not None)
        self.graph.replay()
        images = self.chunk * s["index"].shape[-1]
        return ChunkResult(self.keys, s["sums"].clone(), s["losses"].clone(),
                           s["first_bad"].clone(), images)  # fmt: skip

    def _capture(self, step: StepFn, with_beta: bool) -> None:
        s = self.static
        self.graph = torch.cuda.CUDAGraph()
        for g in self.generators:
            if g.device.type == "cuda" and hasattr(self.graph, "register_generator_state"):
                self.graph.register_generator_state(g)

        def body() -> None:
            for k in range(self.chunk):
                index = s["index"][k]
                terms = step(index, s["beta"][k] if with_beta else None, k)
                _accumulate(s, terms, k, self.chunk, index.shape[-1])

        self.body = body  # what the graph runs (a test on the CPU replays it)
        with torch.cuda.graph(self.graph):
            body()
        self.keys = tuple(s["keys"])


def _accumulate(acc: dict[str, Any], terms: dict[str, Tensor], k: int, n: int, size: int):
    """Add step ``k``'s batch means ``terms`` (of ``size`` images) to ``acc``'s sums, losses
    and first non-finite step, allocating them at the first step (before a capture's)."""
    values = torch.stack([v.detach() for v in terms.values()]) * size  # (T, ...)
    objective = terms.get("objective", terms["loss"]).detach()
    if "sums" not in acc:
        acc["keys"] = tuple(terms)
        acc["sums"] = torch.zeros_like(values)
        acc["losses"] = torch.zeros((n, *objective.shape), device=values.device)
        acc["first_bad"] = torch.full(objective.shape, -1, dtype=torch.long, device=values.device)
    acc["sums"].add_(values)
    acc["losses"][k].copy_(terms["loss"].detach())
    bad = ~torch.isfinite(objective) & (acc["first_bad"] < 0)
    acc["first_bad"].copy_(torch.where(bad, k, acc["first_bad"]))
