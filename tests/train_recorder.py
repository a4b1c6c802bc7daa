"""A TrainCallbacks that records what train() reports (shared by the CPU and GPU training tests)."""

from __future__ import annotations

from tunekit.backends.local.train import TrainCallbacks


class Recorder(TrainCallbacks):
    def __init__(self, stop_at: int | None = None) -> None:
        self.total = None
        self.steps: list[tuple[int, dict]] = []
        self.evals: list[tuple[int, dict]] = []
        self.checkpoints: list[tuple[int, str]] = []
        self.events: list[tuple[str, str]] = []
        self.stop_at = stop_at

    def on_start(self, total_steps):
        self.total = total_steps

    def on_step(self, step, metrics):
        self.steps.append((step, metrics))

    def on_eval(self, step, metrics):
        self.evals.append((step, metrics))

    def on_checkpoint(self, step, path):
        self.checkpoints.append((step, path))

    def on_event(self, level, message):
        self.events.append((level, message))

    def should_stop(self):
        # polled at the end of each step, before that step's metrics arrive: steps seen + 1 is the current step
        return self.stop_at is not None and len(self.steps) + 1 >= self.stop_at

    def losses(self) -> list[float]:
        return [m["loss"] for _, m in self.steps]


def train_files(spec, data, output_dir, *, callbacks=None, resume_from_checkpoint=None, validation_path=None,
                memory_budget_bytes=None, **options):
    """train() on data files outside a job: the run is planned from the spec (run_for_files), then trained."""
    from tunekit.backends.local.run import run_for_files
    from tunekit.backends.local.train import train

    if memory_budget_bytes:
        options["memory_budget_gb"] = memory_budget_bytes / 2**30
    # these tiny rows would be packed by 'auto'; the tests that use this helper check the unpacked batches,
    # packing has its own (tests/test_local_packing.py, which asks for it)
    options.setdefault("packing", False)
    run = run_for_files(spec, data, output_dir, validation_path=validation_path, **options)
    return train(run, callbacks, resume_from_checkpoint=resume_from_checkpoint)
