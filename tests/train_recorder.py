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
