"""Several ranks of one job: torchrun (``torch.distributed.run``) under the detached worker.

The worker started by ``LocalBackend`` stays the job's one process of record (its pid, heartbeat and final
status): when the plan chose a layout of more than one rank it runs torchrun's elastic agent in-process,
which starts ``python -m tunekit.backends.local.worker JOB_ID --rank`` once per local rank. Each rank runs
``train()``; the Trainer (accelerate) wraps DDP or FSDP2 itself from torchrun's RANK/WORLD_SIZE environment.

- Reporting: a node's local rank 0 writes progress, metrics, events and checkpoints to its store, and hands
  its TrainOutcome to the worker in ``ranks/outcome.json``; the worker registers the adapter as for one GPU.
- Cancel: every rank polls the store at each step and the ranks agree (all-reduce of the flag), so they all
  stop at the same step boundary after one checkpoint.
- Failure: a rank that raises writes ``ranks/error-<rank>.json``; when torchrun reports failed ranks, the
  job fails with the root cause (a rank killed by a signal, else the earliest error written).
- Several nodes: the same job is started on each node with its ``node_rank``; torchrun's c10d rendezvous at
  ``rdzv_endpoint`` joins them (single node: ``--standalone``, a free local port).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..._exceptions import TrainingError
from .process import WORKER_MODULE, job_dir
from .ranks import local_rank, rank, world_size
from .train import TrainCallbacks, TrainOutcome

RANKS_DIR = "ranks"
# the rendezvous id every node gives (each node's job has its own id; node 0's agent hosts a fresh store per run)
RDZV_ID = "tunekit"
OUTCOME = "outcome.json"
# torchrun checks its ranks this often (seconds): a dead rank is seen, and the others ended, within it
MONITOR_INTERVAL_S = 0.2


def torchrun_argv(job_id: str, layout: dict[str, Any], options: dict[str, Any], resume_from: str | None,
                  log_dir: Path) -> list[str]:
    """torchrun's arguments for this node: its ranks, the rendezvous, and the rank command."""
    nnodes = int(layout.get("nnodes") or 1)
    argv = [f"--nproc-per-node={layout['gpus']}", f"--nnodes={nnodes}", "--max-restarts=0",
            f"--monitor-interval={MONITOR_INTERVAL_S}", f"--log-dir={log_dir}"]
    if nnodes > 1:
        argv += [f"--node-rank={options.get('node_rank') or 0}", "--rdzv-backend=c10d",
                 f"--rdzv-endpoint={options['rdzv_endpoint']}", f"--rdzv-id={RDZV_ID}"]
    else:
        argv.append("--standalone")
    argv += ["-m", WORKER_MODULE, job_id, "--rank"]
    if resume_from:
        argv += ["--resume", resume_from]
    return argv


def launch(record, cb: TrainCallbacks, run, resume_from: str | None) -> TrainOutcome:
    """Run the ranks of the job's stored ``run`` (run.LocalRun) under torchrun and return the reporting rank's
    outcome; a failed rank raises TrainingError with that rank's error."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as torchrun

    layout = run.layout
    ranks = job_dir(record.id) / RANKS_DIR
    ranks.mkdir(parents=True, exist_ok=True)
    for stale in [*ranks.glob("error-*.json"), ranks / OUTCOME]:  # a resume's ranks report afresh
        stale.unlink(missing_ok=True)
    argv = torchrun_argv(record.id, layout, run.options.model_dump(), resume_from, ranks / "logs")
    print(f"torchrun {' '.join(argv)}", flush=True)
    try:
        torchrun(parse_args(argv))
    except ChildFailedError as exc:
        who, why, hint = root_cause(exc.failures, ranks)
        raise TrainingError(f"rank {who} of {world_size(layout)} failed: {why}",
                            hint=hint or f"its traceback is in {job_dir(record.id) / 'worker.log'}; fix the cause, "
                                         f"then `tunekit jobs resume {record.id}` continues from the last checkpoint"
                            ) from None
    except SignalException as exc:
        raise TrainingError(f"the ranks were ended by {exc.sigval.name}") from None
    path = ranks / OUTCOME
    if not path.is_file() and cb.should_stop():
        from .callbacks import CancelledBeforeStart

        raise CancelledBeforeStart()
    if not path.is_file():
        raise TrainingError(f"the ranks exited without an outcome ({path} is missing)")
    return TrainOutcome(**json.loads(path.read_text()))


def root_cause(failures: dict[int, Any], ranks: Path) -> tuple[int, str, str | None]:
    """(rank, error, its hint) of the failure that ended the run. torchrun ends the other ranks with SIGTERM
    once it sees one fail, and a rank whose peer vanished fails in its next collective; so: a rank killed by
    another signal first, then the error a rank wrote first, then the rest."""
    killed = sorted(r for r, f in failures.items() if f.exitcode < 0 and f.signal_name() != "SIGTERM")
    if killed:
        return killed[0], f"killed by {failures[killed[0]].signal_name()}", None
    written = []
    for path in ranks.glob("error-*.json"):
        try:
            written.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if written:
        first = min(written, key=lambda e: e["time"])
        return int(first["rank"]), first["error"], first.get("hint")
    r = min(failures)
    f = failures[r]
    return r, f"killed by {f.signal_name()}" if f.exitcode < 0 else f"exit code {f.exitcode}", None


# ---------------------------------------------------------------------------------------------------
# inside one rank

class RankCallbacks(TrainCallbacks):
    """A rank's view of the worker's callbacks: only the reporting rank (local rank 0) writes; every rank
    polls for a stop and all agree on it, so no rank is left waiting in a collective."""

    def __init__(self, inner: TrainCallbacks, reporting: bool) -> None:
        self.inner, self.reporting = inner, reporting

    def on_start(self, total_steps: int) -> None:
        from .callbacks import CancelledBeforeStart

        if self.should_stop():  # agreed: every rank leaves before the first step
            raise CancelledBeforeStart()
        if self.reporting:  # without the inner callbacks' own stop check, which the other ranks would not see
            self.inner.should_stop = lambda: False  # type: ignore[method-assign]
            try:
                self.inner.on_start(total_steps)
            finally:
                del self.inner.should_stop

    def on_step(self, step: int, metrics: dict[str, Any]) -> None:
        if self.reporting:
            self.inner.on_step(step, metrics)

    def on_eval(self, step: int, metrics: dict[str, Any]) -> None:
        if self.reporting:
            self.inner.on_eval(step, metrics)

    def on_checkpoint(self, step: int, path: str) -> None:
        if self.reporting:
            self.inner.on_checkpoint(step, path)

    def on_event(self, level: str, message: str) -> None:
        if self.reporting:
            self.inner.on_event(level, message)

    def should_stop(self) -> bool:
        import torch
        import torch.distributed as dist

        flag = torch.tensor([1.0 if self.inner.should_stop() else 0.0])
        if dist.is_available() and dist.is_initialized():
            if dist.get_backend() == "nccl":
                flag = flag.cuda()
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def run_rank(job_id: str, resume_from: str | None) -> int:
    """One rank: train the job's stored run (checked and snapshotted by the worker); the reporting rank writes
    the outcome."""
    from ...store import default_store
    from .run import LocalRun
    from .train import train
    from .callbacks import CancelledBeforeStart, StoreCallbacks, one_line

    _die_with_parent()
    store = default_store()
    record = store.get_job(job_id)
    ranks = job_dir(job_id) / RANKS_DIR
    reporting = local_rank() == 0
    cb = RankCallbacks(StoreCallbacks(store, job_id, record.progress), reporting)
    try:
        outcome = train(LocalRun.model_validate(record.request), cb, resume_from_checkpoint=resume_from)
        if reporting:
            part = ranks / (OUTCOME + ".part")
            part.write_text(json.dumps(asdict(outcome)))
            os.replace(part, ranks / OUTCOME)
    except CancelledBeforeStart:  # every rank agreed; the worker sees no outcome and a cancelling job
        return 0
    except BaseException as exc:
        (ranks / f"error-{rank()}.json").write_text(json.dumps({
            "rank": rank(), "time": time.time(), "error": one_line(exc), "hint": getattr(exc, "hint", None),
            "traceback": traceback.format_exc()[-8000:]}))
        raise
    return 0


def _die_with_parent() -> None:
    """End this rank when the worker above it dies (even by SIGKILL): an orphaned rank would go on writing to
    the job that `refresh` has failed, and race the ranks a resume starts. Linux only (prctl PR_SET_PDEATHSIG)."""
    import ctypes
    import signal

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: ranks end when their collectives fail instead
        return
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)
