"""provider_options.local: the local backend's options, declared once as a pydantic model.

The plan validates each key the user set through this model (``Backend._rule_for``) and reads the whole of
it with ``LocalBackend.provider_options(spec)``. Strict: ``"yes"`` is not a boolean and ``5.0`` is not a step
count, so a typo in a spec file is refused rather than guessed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from ...eval.during_training import GenerateEvalOptions
from .memory import GiB

MAX_STEPS = 10**9        # step counts above this are typos (a billion optimizer steps)
MAX_BUDGET_GB = 2.0**20  # 1 PiB
MAX_GPUS = 1024  # GPUs per node, nodes

Steps = Annotated[int, Field(ge=1, le=MAX_STEPS)]
# one per optimisation of speed.OPTIMISATIONS (a test keeps the two in step)
SpeedupOff = Literal["-liger", "-bf16_kbit", "-fast_lora", "-fast_dora", "-checkpointing", "-fp32_adapters",
                     "-offload", "-tiled_mlp", "-varlen_attention", "-recompute_norms",
                     "-recompute_mlp", "-offload_mlp"]


def _absolute(path: str) -> str:  # absolute: the worker runs in the job directory
    return str(Path(path).expanduser().resolve())


class LocalOptions(BaseModel):
    """``provider_options={"local": {...}}``; every option is optional (None: decided per run, see docs/local.md)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    output_dir: Optional[Annotated[str, Field(min_length=1), AfterValidator(_absolute)]] = Field(
        None, description="a directory for checkpoints and the final adapter (default $TUNEKIT_HOME/jobs/<id>/output)")
    checkpoint_steps: Optional[Steps] = Field(
        None, description="checkpoint every N optimizer steps, N in 1..1e9 (default: about 10 checkpoints per run)")
    keep_checkpoints: Steps = Field(
        3, description="how many of the newest checkpoints stay on disk, an integer >= 1 (default 3)")
    max_steps: Optional[Steps] = Field(
        None, description="stop after N optimizer steps, N in 1..1e9 (default: from epochs)")
    eval_steps: Optional[Union[Steps, Annotated[float, Field(gt=0, lt=1)]]] = Field(
        None, description="validation loss every N steps (an integer >= 1) or a fraction of the run in (0, 1) "
                          "(default: checkpoint_steps)")
    device: Optional[Annotated[str, Field(pattern=r"^(cpu|cuda(:\d+)?)$")]] = Field(
        None, description="'cpu', 'cuda' or 'cuda:N' (default: cuda when visible, else cpu)")
    gradient_checkpointing: Optional[bool] = Field(
        None, description="true (every layer) or false (default: on GPU as few layers as the budget needs, "
                          "off on CPU)")
    memory_budget_gb: Optional[Annotated[float, Field(gt=0, le=MAX_BUDGET_GB)]] = Field(
        None, description=f"GB of memory the fit check may assume, in (0, {MAX_BUDGET_GB:.0f}] (default: the device's)")
    logging_steps: Steps = Field(1, description="step metrics every N steps, an integer >= 1 (default 1)")
    eval_generate: Optional[GenerateEvalOptions] = Field(
        None, description="greedy answers to the first validation rows, scored every N steps into the eval metrics: "
                          "{steps, rows (8), max_tokens (64), metrics (exact_match, contains)} (default off; "
                          "docs/evaluation.md)")
    speedups: Union[Literal["auto", "off"], Annotated[list[SpeedupOff], Field(min_length=1)]] = Field(
        "auto", description="'auto' (every speed-up the run can use), 'off', or the ones to leave out, e.g. "
                            "['-liger', '-fast_dora'] (default 'auto'; for diagnosis and benchmarks)")
    # off by default: packing changes how many rows a step holds, hence the step count and the schedule, so
    # it is the user's choice, not a silent change of what an existing spec trains
    packing: Union[Literal["auto"], bool] = Field(
        False, description="SFT rows packed into sequences of max_length tokens, each row attending only to itself: "
                           "true, false or 'auto' (on when the tokenized rows' mean length is at most half of "
                           "max_length; never for DPO) (default false)")

    # several GPUs / nodes (docs/multi-gpu.md)
    gpus: Union[Literal["all"], Annotated[int, Field(ge=1, le=MAX_GPUS)]] = Field(
        1, description=f"ranks on this node: a number of GPUs in 1..{MAX_GPUS} or 'all' (the visible ones); "
                       "without a GPU, that many CPU processes (default 1)")
    layout: Literal["auto", "ddp", "fsdp2"] = Field(
        "auto", description="'auto' (DDP when a whole model fits one GPU, else FSDP2), 'ddp' or 'fsdp2'")
    nnodes: Annotated[int, Field(ge=1, le=MAX_GPUS)] = Field(1, description="machines taking part (default 1)")
    node_rank: Annotated[int, Field(ge=0, lt=MAX_GPUS)] = Field(
        0, description="this machine's rank, 0..nnodes-1 (default 0)")
    rdzv_endpoint: Optional[Annotated[str, Field(pattern=r"^[\w.\-\[\]:]+:\d{1,5}$")]] = Field(
        None, description="'host:port' of node 0, where torchrun's rendezvous meets (needed when nnodes > 1)")

    @property
    def memory_budget_bytes(self) -> int | None:
        return int(self.memory_budget_gb * GiB) if self.memory_budget_gb else None
