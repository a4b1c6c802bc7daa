"""The SkyPilot task file of docs/multi-gpu.md loads with SkyPilot's own task loader (no cloud credentials
needed), and what it runs on each node is a tunekit command whose options the local backend knows."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.conftest import ROOT
from tunekit.backends.local.options import LocalOptions

sky = pytest.importorskip("sky")  # the [multinode] extra
TASK = ROOT / "examples" / "skypilot-multinode.yaml"


def test_the_task_file_loads_with_skypilot_and_starts_tunekit_on_every_node():
    task = sky.Task.from_yaml(str(TASK))
    assert task.num_nodes == 2
    (res,) = task.resources
    assert res.accelerators == {"H100": 8}
    command = " ".join(shlex.split(task.run.replace("\\\n", " ")))
    assert "tunekit finetune" in command and "--backend local" in command and "--wait" in command
    sets = dict(a.split("=", 1) for a in re.findall(r"--set (\S+)", command))
    local = {k.removeprefix("provider_options.local."): v for k, v in sets.items()
             if k.startswith("provider_options.local.")}
    assert set(local) == {"gpus", "nnodes", "node_rank", "rdzv_endpoint"} and set(local) <= set(LocalOptions.model_fields)
    # each node gives SkyPilot's view of the cluster: its GPUs, the node count, its rank, node 0's address
    assert local["gpus"] == "$SKYPILOT_NUM_GPUS_PER_NODE" and local["node_rank"] == "$SKYPILOT_NODE_RANK"
    assert local["nnodes"] == "$SKYPILOT_NUM_NODES" and local["rdzv_endpoint"] == "$HEAD:29500"
