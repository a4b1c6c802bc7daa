"""How a local run spreads over several GPUs (and nodes): DDP or FSDP2, chosen from the memory estimate.

Pure arithmetic (no torch at import). DDP keeps a whole (quantized) model per GPU and is the fastest when it
fits; FSDP2 shards the frozen weights, the adapter and its optimizer state over the ranks (QLoRA with
bitsandbytes' ``bnb_4bit_quant_storage`` set to the compute dtype, so the 4-bit weights shard like any bf16
tensor; bf16 LoRA sharded as it is). The per-GPU memory is memory.py's estimate with its sharding term.

The global batch stays the spec's: micro-batch per rank x ranks x accumulation = batch_size, so the learning
rate and the examples of each optimizer step are those of one GPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

from ..._exceptions import ConfigError
from . import memory as _memory
from . import hostload as _hostload

LAYOUTS = ("auto", "ddp", "fsdp2")
MAX_GPUS = 1024  # the search for the smallest fitting layout stops here
HINT = "set provider_options.local.gpus / nnodes / layout (docs/multi-gpu.md)"


@dataclass
class Layout:
    kind: str  # "single" | "ddp" | "fsdp2"
    gpus: int  # ranks per node
    nnodes: int
    micro_batch: int  # per rank
    grad_accum: int
    per_gpu_bytes: int
    reason: str
    quant_storage: str | None = None  # FSDP2 QLoRA: bnb_4bit_quant_storage (the compute dtype)
    host_bytes: int = 0  # host memory this node's ranks hold while loading, what must fit (hostload.host_loading)
    host_memory_bytes: int | None = None  # the node's memory it was checked against (None: not checked)
    host_note: str = ""
    estimate: _memory.MemoryEstimate | None = field(default=None, repr=False, compare=False)

    @property
    def world_size(self) -> int:
        return self.gpus * self.nnodes

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Layout":
        return cls(**{k: v for k, v in d.items() if k not in ("world_size", "estimate")})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        del out["estimate"]
        return {**out, "world_size": self.world_size}

    def summary(self) -> str:
        where = f"{self.gpus} GPU(s)" + (f" x {self.nnodes} nodes" if self.nnodes > 1 else "")
        return (f"{self.kind} on {where}: micro-batch {self.micro_batch} per rank x {self.world_size} ranks x "
                f"{self.grad_accum} accumulation, ~{_memory.human_bytes(self.per_gpu_bytes)} per GPU ({self.reason})"
                + (f"; host memory while loading {self.host_note}" if self.host_note else ""))


def estimate_kwargs(spec: Any, run: Any) -> dict[str, Any]:
    """memory.estimate's arguments for one GPU of ``run`` (resolve.RunPlan), but the micro-batch and memory."""
    a = spec.adapter
    return dict(quantization=run.quant.mode, r=a.r, target_modules=a.target_modules, use_dora=a.use_dora,
                max_length=spec.hyperparameters.max_length, gradient_checkpointing=run.gradient_checkpointing,
                dtype="bf16" if run.quant.quantized else run.compute_dtype, method=spec.method,
                device_type=run.device.type, **run.estimate_kwargs)


def for_run(spec: Any, run: Any, *, gpus: int, nnodes: int = 1, layout: str = "auto") -> Layout:
    """The layout of a resolved run (resolve.RunPlan) over ``gpus`` x ``nnodes``. Without the model's config
    (a hub model not downloaded yet) memory cannot be checked: DDP unless FSDP2 is asked for."""
    if run.model_config is None:
        micro, accum = split_batch(spec.hyperparameters.batch_size, run.micro_batch, gpus * nnodes)
        return Layout(kind="fsdp2" if layout == "fsdp2" else "ddp", gpus=gpus, nnodes=nnodes, micro_batch=micro,
                      grad_accum=accum, per_gpu_bytes=0, reason=f"memory not checked: {run.estimate_skipped}",
                      quant_storage="bf16" if layout == "fsdp2" and run.quant.quantized else None)
    return choose(run.model_config, gpus=gpus, nnodes=nnodes, gpu_memory_bytes=run.budget_bytes,
                  batch_size=spec.hyperparameters.batch_size, micro_batch=run.micro_batch,
                  estimate_kwargs=estimate_kwargs(spec, run), layout=layout)


def from_options(spec: Any, run: Any, options: dict[str, Any]) -> Layout | None:
    """The layout provider_options.local asks for (gpus, nnodes, node_rank, rdzv_endpoint, layout); None
    for one process. ``gpus='all'`` counts the visible CUDA GPUs; without a GPU, gpus=N runs N CPU processes
    (gloo: tests and debugging)."""
    gpus, nnodes = options.get("gpus", 1), options.get("nnodes", 1)
    visible = _visible_gpus() if run.device.type == "cuda" and gpus != 1 else None
    if gpus == "all":
        if not visible:
            raise ConfigError("provider_options.local.gpus='all' but no CUDA GPU is visible",
                              field="provider_options.local.gpus", hint="give a number of processes, or " + HINT)
        gpus = visible
    if visible is not None and gpus > visible:
        raise ConfigError(f"provider_options.local.gpus={gpus} but {visible} CUDA GPU(s) are visible",
                          field="provider_options.local.gpus",
                          hint=f"use gpus <= {visible} (or 'all'), or check CUDA_VISIBLE_DEVICES")
    if nnodes > 1 and not options.get("rdzv_endpoint"):
        raise ConfigError(f"provider_options.local.nnodes={nnodes} needs rdzv_endpoint (host:port of node 0)",
                          field="provider_options.local.rdzv_endpoint", hint=HINT)
    if (options.get("node_rank") or 0) >= nnodes:
        raise ConfigError(f"provider_options.local.node_rank={options['node_rank']} must be below nnodes={nnodes}",
                          field="provider_options.local.node_rank", hint=HINT)
    asked = options.get("layout", "auto")
    if gpus * nnodes == 1 and asked != "fsdp2":
        if asked == "ddp":
            raise ConfigError("provider_options.local.layout='ddp' needs more than one GPU",
                              field="provider_options.local.layout", hint=HINT)
        return None  # one process, no torchrun
    if asked == "fsdp2" and run.device.type != "cuda":
        _refuse_fsdp2_on_cpu()
    chosen = for_run(spec, run, gpus=gpus, nnodes=nnodes, layout=asked)
    if chosen.kind == "fsdp2" and run.device.type != "cuda":
        _refuse_fsdp2_on_cpu()
    if run.device.type == "cuda" and run.model_config is not None:
        from .resolve import host_memory_bytes
        from .variants import of

        chosen = with_host(chosen, run.model_config, host_memory_bytes=host_memory_bytes() if nnodes == 1 else None,
                           quantized=run.quant.quantized, r=spec.adapter.r, use_dora=spec.adapter.use_dora,
                           mutates_base=of(spec.adapter).init.mutates_base, target_modules=spec.adapter.target_modules,
                           offload_bytes=run.speed.host_bytes if run.speed is not None else 0)
    return chosen


def with_host(lay: Layout, model_config: dict[str, Any], *, host_memory_bytes: int | None, quantized: bool,
              r: int = 0, use_dora: bool = False, mutates_base: bool = False, target_modules: Any = "all-linear",
              offload_bytes: int = 0) -> Layout:
    """``lay`` with the host memory its ranks on one node need while loading (hostload.host_loading), refused with a
    ConfigError when that exceeds memory.HOST_SHARE of ``host_memory_bytes`` (None: another node's host, not known
    here: the figure is shown, not checked). Each rank loads the model itself: FSDP2 bf16 LoRA loads it whole into
    host memory (accelerate's cpu_ram_efficient_loading stays off: docs/multi-gpu.md), the rest onto the GPU."""
    def need(ranks: int) -> _hostload.HostLoading:
        return _hostload.host_loading(model_config, ranks=ranks, whole_on_host=lay.kind == "fsdp2" and not quantized,
                                    quantized=quantized, r=r, use_dora=use_dora, mutates_base=mutates_base,
                                    target_modules=target_modules,
                                    offload_bytes=offload_bytes, host_memory_bytes=host_memory_bytes)

    host = need(lay.gpus)
    note = host.summary() + ("" if host.fits is not None else
                             "; not checked: the host memory of the nodes is not known here" if lay.nnodes > 1 else
                             "; not checked: this host's memory is unknown")
    if host.fits is False:
        fewer = max((n for n in range(1, lay.gpus) if need(n).fits), default=0)
        hint = (f"fewer ranks per node (provider_options.local.gpus={fewer} loads within this host's memory)"
                if fewer else "not even one rank's loading fits this host")
        if not quantized:
            hint += "; or QLoRA (quantization='nf4': each rank loads onto its GPU, tensor by tensor)"
        hint += ("; or the same ranks over more nodes (provider_options.local.nnodes, fewer gpus each); or a host "
                 f"with more memory ({HINT})")
        raise ConfigError(
            f"{lay.kind} on {lay.gpus} GPU(s) of this node needs ~{_memory.human_bytes(host.private_bytes)} of host "
            f"memory while its ranks load the model, more than {_memory.HOST_SHARE:.0%} of this host's "
            f"{_memory.human_bytes(host_memory_bytes or 0)} (host: {host.summary()}; per GPU: "
            f"~{_memory.human_bytes(lay.per_gpu_bytes)})", field="provider_options.local.gpus", hint=hint)
    return replace(lay, host_bytes=host.private_bytes, host_memory_bytes=host_memory_bytes, host_note=note)


def _refuse_fsdp2_on_cpu() -> None:
    # accelerate applies its FSDP plugin to GPU ranks only: on CPU the Trainer would run plain DDP
    raise ConfigError("FSDP2 needs CUDA GPUs: accelerate shards GPU ranks only (CPU ranks would silently run DDP)",
                      field="provider_options.local.layout",
                      hint="on CPU use layout 'ddp' (a whole model per process), or run on GPUs")


def optimizer_for(spec: Any, layout: "Layout | None", planned: str) -> str:
    """The optimizer of a run in ``layout``. FSDP2 trains DTensor parameters, which bitsandbytes' 8-bit (paged)
    optimizers cannot step (their kernels take plain CUDA tensors: bitsandbytes issue #1633): QLoRA under FSDP2
    uses torch's fused AdamW (LoRA+ torch's AdamW), fp32 state for the (sharded) adapter only."""
    if layout is None or layout.kind != "fsdp2" or "8bit" not in planned:
        return planned
    from .resolve import optimizer_name

    return optimizer_name(spec, quantized=False, on_gpu=True)


def more_gpus(spec: Any, run: Any) -> str | None:
    """For a one-GPU run that does not fit: the smallest multi-GPU layout that does, as a suggestion."""
    if run.model_config is None or run.device.type != "cuda":
        return None
    per_gpu = partial(per_gpu_estimate, run.model_config, batch_size=spec.hyperparameters.batch_size,
                      micro_batch=run.micro_batch, gpu_memory_bytes=run.budget_bytes,
                      estimate_kwargs=estimate_kwargs(spec, run))
    found = smallest_fitting(per_gpu, 1)
    if found is None or found[1] == 1:
        return None
    kind, n = found
    return f"train on {n} GPUs of this size ({kind}): provider_options.local.gpus={n} (docs/multi-gpu.md)"


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def split_batch(batch_size: int, micro_batch: int, world: int) -> tuple[int, int]:
    """(micro-batch per rank, accumulation) with micro x world x accumulation = batch_size and the micro-batch
    as large as possible up to the one-GPU ``micro_batch`` (the same global batch and examples per step)."""
    if batch_size % world:
        raise ConfigError(f"hyperparameters.batch_size={batch_size} cannot be split over {world} ranks",
                          field="hyperparameters.batch_size",
                          hint=f"the global batch is the same as on one GPU, so it must be a multiple of the number "
                               f"of ranks: use a batch_size divisible by {world}, or {HINT}")
    per_rank = batch_size // world
    micro = max(m for m in range(1, min(micro_batch, per_rank) + 1) if per_rank % m == 0)
    return micro, per_rank // micro


def per_gpu_estimate(model_config: dict[str, Any], kind: str, n: int, *, batch_size: int, micro_batch: int,
                     gpu_memory_bytes: int | None, estimate_kwargs: dict[str, Any]):
    """(memory estimate per GPU, micro-batch per rank, accumulation) of ``kind`` over ``n`` ranks."""
    micro, accum = split_batch(batch_size, micro_batch, n)
    kw = dict(estimate_kwargs)
    if kind == "fsdp2":  # uniform compute-dtype storage: no fp32 upcast of the unquantized params; torch's
        kw.update(shards=n, kbit_upcast=False, optimizer_state_bytes=8)  # AdamW (optimizer_for), fp32 state
        kw["recompute_norms"] = False  # kernels.apply leaves it out under FSDP2
        if kw.get("quantization") == "nf4":  # the gathered 4-bit weight has no quant state for nf4.py's fused
            kw["fused_kernels"] = False  # forward: bitsandbytes' own runs, keeping the plain per-layer activations
    est = _memory.estimate(model_config, micro_batch=micro, device_memory_bytes=gpu_memory_bytes, **kw)
    return est, micro, accum


def choose(
    model_config: dict[str, Any],
    *,
    gpus: int,
    gpu_memory_bytes: int | None,
    batch_size: int,
    micro_batch: int,
    estimate_kwargs: dict[str, Any],
    nnodes: int = 1,
    layout: str = "auto",
) -> Layout:
    """The layout of a run over ``gpus`` per node x ``nnodes``. ``estimate_kwargs`` are memory.estimate's
    (quantization, r, max_length, gradient_checkpointing, dtype, ...) for one GPU, without the micro-batch.
    Raises ConfigError when the requested layout cannot fit, naming the smallest one that can."""
    if layout not in LAYOUTS:
        raise ConfigError(f"provider_options.local.layout must be one of {', '.join(LAYOUTS)}, not {layout!r}",
                          field="provider_options.local.layout", hint=HINT)
    world = gpus * nnodes
    quantized = estimate_kwargs.get("quantization") == "nf4"

    per_gpu = partial(per_gpu_estimate, model_config, batch_size=batch_size, micro_batch=micro_batch,
                      gpu_memory_bytes=gpu_memory_bytes, estimate_kwargs=estimate_kwargs)

    def make(kind: str, est, micro: int, accum: int, reason: str) -> Layout:
        return Layout(kind="single" if kind == "ddp" and world == 1 else kind, gpus=gpus, nnodes=nnodes,
                      micro_batch=micro, grad_accum=accum, per_gpu_bytes=est.total_bytes, reason=reason, estimate=est,
                      quant_storage="bf16" if kind == "fsdp2" and quantized else None)

    # FSDP2 asked for (on one GPU: to run the sharded path, docs/multi-gpu.md) is never DDP: no DDP estimate then
    if layout != "fsdp2":
        ddp, micro, accum = per_gpu("ddp", world)
        if ddp.fits is not False:
            why = ("one GPU" if world == 1 else "the model and its activations fit one GPU: a whole copy per rank")
            if ddp.fits is None:
                why += "; GPU memory unknown, not checked"
            return make("ddp", ddp, micro, accum, why)
        if layout == "ddp" or world == 1:
            _refuse("ddp" if world > 1 else "single", ddp, world, gpu_memory_bytes, per_gpu)
    fsdp, micro, accum = per_gpu("fsdp2", world)
    if fsdp.fits is False:
        _refuse("fsdp2", fsdp, world, gpu_memory_bytes, per_gpu)
    why = ("forced by provider_options.local.layout" if layout == "fsdp2"
           else "a whole model per GPU does not fit: weights, adapter and optimizer state sharded over the ranks")
    return make("fsdp2", fsdp, micro, accum, why)


def smallest_fitting(per_gpu, world: int) -> tuple[str, int] | None:
    """The fewest ranks (and their kind) whose per-GPU estimate fits, searching past ``world``."""
    for n in range(1, MAX_GPUS + 1):
        for kind in ("ddp", "fsdp2") if n > 1 else ("ddp",):
            try:
                if per_gpu(kind, n)[0].fits:
                    return kind, n
            except ConfigError:  # the batch does not split over n ranks
                break
    return None


def _refuse(kind: str, est: _memory.MemoryEstimate, world: int, gpu_memory_bytes: int | None, per_gpu) -> None:
    found = smallest_fitting(per_gpu, world)
    what = {"single": "one GPU", "ddp": f"DDP on {world} GPUs", "fsdp2": f"FSDP2 on {world} GPUs"}[kind]
    if found is None:
        hint = "; or ".join(est.suggestions) or "use a smaller base model"
        hint += " (no number of these GPUs fits this run as it is)"
    else:
        k, n = found
        hint = (f"the smallest layout that fits is {'one GPU' if n == 1 else f'{k} on {n} GPUs'} of this size: "
                f"set provider_options.local.gpus={n} (layout 'auto' picks {k})")
        if est.suggestions:
            hint += "; or " + "; or ".join(est.suggestions)
    raise ConfigError(
        f"{what} needs ~{_memory.human_bytes(est.total_bytes)} per GPU, more than {_memory.HEADROOM:.0%} of each "
        f"GPU's {_memory.human_bytes(gpu_memory_bytes or 0)} ({est.summary()})",
        field="provider_options.local.gpus", hint=hint)
