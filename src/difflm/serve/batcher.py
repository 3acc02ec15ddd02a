"""Continuous batching of generation requests into the one unmasking engine.

Jobs that arrive together for the same model with the same sampling settings (everything but
prompt and seed, `GenRequest.batch_key`) form a cohort: one `generate_steps` batch with left-padded
prompts and one generator per row, run on its own worker thread. The workers' model calls go
through one `fuse.Fuser` per model, which runs the calls of every cohort in flight as a single
forward pass: a request that arrives mid-run joins the next pass whatever its settings, and a
finished or abandoned cohort simply stops calling. The batcher's own thread admits jobs and runs
the fused passes; autoregressive cohorts run `generate_ar` on their worker and replay its trace.

A row draws its noise only from its own generator, seeded by the request, and the engine freezes
rows whose block is done without touching their generators, so a request with a seed gives the
same tokens alone or batched (up to floating-point rounding of the padded batch, which float64
serving makes irrelevant).

The engine's state after a step is read here to stream text: in keep mode a revealed token never
changes, so the revealed prefix of a row (up to its first mask) is final and is sent as a delta.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import torch
from torch import nn

from difflm.sampling.autoregressive import NOT_YET, generate_ar
from difflm.sampling.unmask import SampleResult, Step, generate_steps
from difflm.serve.fuse import FusedModel, Fuser
from difflm.serve.protocol import GenRequest

Event = dict  # {"type": "denoise" | "text" | "done" | "error", ...}


class QueueFull(Exception):
    """More jobs are waiting or running than the server's cap."""


@dataclass
class Job:
    """One request in flight. `emit` is called from the batcher thread with each event."""

    req: GenRequest
    emit: Callable[[Event], None]
    cancelled: bool = False  # the client went away: stop sending, drop its cohort when all have
    finished: bool = False
    text: str = ""  # text sent so far
    n_tokens: int = 0

    def observe(self, gen: list[int], hidden: int, changed: list[int] | None, where: tuple[int, int]) -> None:
        """Read the row's generation `gen` after a step: send the step (when asked) and new text."""
        if self.finished or self.cancelled:
            return
        if changed is not None and self.req.stream_denoise:
            tok = self.req.model.tokenizer
            revealed = [[p, gen[p], tok.decode([gen[p]])] for p in changed if gen[p] != hidden]
            self.emit(
                {
                    "type": "denoise",
                    "block": where[0],
                    "step": where[1],
                    "length": len(gen),
                    "revealed": revealed,
                }
            )
        prefix = gen[: gen.index(hidden)] if hidden in gen else gen
        self._advance_text(prefix, final=hidden not in gen)

    def _advance_text(self, prefix: list[int], final: bool) -> None:
        eos = self.req.model.tokenizer.eos_token_id
        ended = eos is not None and self.req.model.ends_with_eos and eos in prefix
        ids = prefix[: prefix.index(eos)] if ended else prefix
        text = self.req.model.tokenizer.decode(ids, skip_special_tokens=True)
        cut = min((text.find(s) for s in self.req.stop if s in text), default=-1)
        if cut >= 0:
            text, ended = text[:cut], True
        done = ended or final
        hold = 0 if done else max((len(s) - 1 for s in self.req.stop), default=0)  # a stop may be starting
        ready = text[: len(text) - hold] if hold else text
        while ready.endswith("\ufffd") and not done:  # half a multi-byte character
            ready = ready[:-1]
        if len(ready) > len(self.text) and ready.startswith(self.text):
            self.emit({"type": "text", "text": ready[len(self.text) :]})
            self.text = ready
        self.n_tokens = len(ids)
        if done:
            self.finish("stop" if ended else "length")

    def finish(self, reason: str) -> None:
        self.finished = True
        self.emit({"type": "done", "finish": reason, "text": self.text, "completion_tokens": self.n_tokens})


def _ar_steps(req: GenRequest, ids, mask, generators) -> Generator[Step, None, SampleResult]:
    """An autoregressive cohort as steps: decode all at once, then replay the trace."""
    model, tok = req.model.pre.model, req.model.tokenizer
    result = generate_ar(
        model,
        ids,
        max_new_tokens=req.cfg.gen_length,
        temperature=req.cfg.temperature,
        top_p=req.cfg.top_p,
        eos_token_id=tok.eos_token_id if req.model.ends_with_eos else None,
        generator=generators,
        attention_mask=mask,
        trace=True,
        suppress_tokens=req.cfg.suppress_tokens,
    )
    for s in result.trace.steps:
        yield Step(s.tokens, s.revealed, s.block, s.step)
    return result


class Cohort:
    """Jobs sharing one engine batch (same model and settings); `model` is what the engine calls."""

    def __init__(self, jobs: list[Job], model: nn.Module) -> None:
        self.jobs = jobs
        req = jobs[0].req
        served = req.model
        width = max(len(j.req.prompt_ids) for j in jobs)
        pad = served.tokenizer.pad_token_id or 0
        ids = torch.full((len(jobs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(jobs), width), dtype=torch.long)
        for row, job in enumerate(jobs):
            n = len(job.req.prompt_ids)
            if n:
                ids[row, width - n :] = torch.tensor(job.req.prompt_ids)
                mask[row, width - n :] = 1
        ids, mask = ids.to(served.device), mask.to(served.device)
        gens = [torch.Generator(served.device).manual_seed(j.req.seed) for j in jobs]
        self.width = width
        if served.autoregressive:
            self.hidden, self.steps = NOT_YET, _ar_steps(req, ids, mask, gens)
        else:
            self.hidden = model.mask_token_id
            self.steps = generate_steps(model, ids, req.cfg, attention_mask=mask, generator=gens)

    @property
    def alive(self) -> bool:
        return any(not (j.cancelled or j.finished) for j in self.jobs)

    def advance(self) -> bool:
        """One engine step and its events; False when the cohort is done."""
        try:
            step = next(self.steps)
        except StopIteration as done:
            tokens = done.value.tokens[:, self.width :].tolist()
            for job, gen in zip(self.jobs, tokens, strict=True):
                job.observe(gen, self.hidden, None, (-1, -1))
            return False
        gen = step.tokens[:, self.width :].tolist()
        changed = step.changed[:, self.width :]
        for row, job in enumerate(self.jobs):
            where = changed[row].nonzero().flatten().tolist() if job.req.stream_denoise else None
            job.observe(gen[row], self.hidden, where, (step.block, step.step))
        return True


@dataclass
class Batcher:
    """Admits jobs into cohorts, runs each cohort on a worker thread, and runs the fused forward
    passes (`fuse.Fuser`) on its own thread. `submit` from any thread; `start` / `stop`."""

    max_batch: int = 32
    max_queue: int = 256
    waiting: list[Job] = field(default_factory=list)
    cohorts: list[Cohort] = field(default_factory=list)
    fusers: dict[int, Fuser] = field(default_factory=dict)  # one per diffusion model, by id
    in_flight: int = 0
    steps_run: int = 0  # engine steps summed over cohorts
    _cv: threading.Condition = field(default_factory=threading.Condition)
    _stopping: bool = False
    _thread: threading.Thread | None = None

    def submit(self, job: Job) -> None:
        with self._cv:
            if self.in_flight >= self.max_queue:
                raise QueueFull(f"{self.in_flight} requests in flight (cap {self.max_queue}); retry later")
            self.in_flight += 1
            self.waiting.append(job)
            self._cv.notify_all()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="difflm-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            for fuser in self.fusers.values():  # wake workers still waiting for a forward
                fuser.abandon(RuntimeError("the server is stopping"))
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=10)

    @property
    def forward_passes(self) -> int:
        return sum(f.passes for f in self.fusers.values())

    def _loop(self) -> None:
        with self._cv:
            while True:
                self._cv.wait_for(
                    lambda: self._stopping or self.waiting or any(f.ready() for f in self.fusers.values())
                )
                if self._stopping:
                    return
                self._admit()
                for fuser in list(self.fusers.values()):
                    if fuser.ready():
                        fuser.run_pending()  # releases the lock while the model runs

    def _admit(self) -> None:
        """Under the lock: group waiting jobs by settings into cohorts and start their workers."""
        jobs, self.waiting = self.waiting, []
        groups: dict[tuple, list[Job]] = {}
        for job in jobs:
            if job.cancelled:
                self.in_flight -= 1
            else:
                groups.setdefault(job.req.batch_key(), []).append(job)
        for group in groups.values():
            for i in range(0, len(group), self.max_batch):
                self._start_cohort(group[i : i + self.max_batch])

    def _fuser_for(self, served) -> Fuser | None:
        model = served.pre.model
        if served.autoregressive or not (model.supports_logits_at and model.supports_kv_cache):
            return None  # runs the model directly on its worker thread
        if getattr(model, "lookahead_row", False):
            return None  # its block calls carry position_ids, which the fused forward does not take
        return self.fusers.setdefault(id(model), Fuser(model, self._cv))

    def _start_cohort(self, jobs: list[Job]) -> None:
        fuser = self._fuser_for(jobs[0].req.model)
        try:
            cohort = Cohort(jobs, FusedModel(fuser) if fuser else jobs[0].req.model.pre.model)
        except Exception as err:  # noqa: BLE001 - one bad batch must not stop the server
            self._fail(jobs, err)
            self.in_flight -= len(jobs)
            return
        self.cohorts.append(cohort)
        if fuser is not None:
            fuser.busy += 1
        threading.Thread(target=self._work, args=(cohort, fuser), daemon=True).start()

    def _work(self, cohort: Cohort, fuser: Fuser | None) -> None:
        """A cohort's thread: step it until done or abandoned; its forwards go through the fuser."""
        try:
            while cohort.alive and cohort.advance():
                with self._cv:
                    self.steps_run += 1
        except Exception as err:  # noqa: BLE001
            self._fail(cohort.jobs, err)
        finally:
            with self._cv:
                if fuser is not None:
                    fuser.busy -= 1
                self.cohorts.remove(cohort)
                self.in_flight -= len(cohort.jobs)
                self._cv.notify_all()

    def _fail(self, jobs: list[Job], err: Exception) -> None:
        traceback.print_exception(err)
        for job in jobs:
            if not job.finished:
                job.finished = True
                job.emit({"type": "error", "message": f"generation failed: {err}"})
