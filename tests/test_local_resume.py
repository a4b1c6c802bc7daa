"""A resume trains what its checkpoint was trained with, or fails saying why; a hub fetch error is said.

The worker re-resolves a stored run when a fact moved (run.check_facts). On a resume from a checkpoint the
decisions the checkpoint depends on are kept from the stored run (a fresh start re-plans freely); where this
machine cannot keep them the job fails naming the field, both values and the next step. GPUs are stood in for
by the one function that reads the device (resolve.device_info) and the one that counts GPUs
(layout._visible_gpus): nothing here needs one, and nothing contacts the Hugging Face Hub.
"""

from __future__ import annotations

import json
import signal
import sys

import pytest

pytest.importorskip("trl")

import tunekit  # noqa: E402
import tunekit.backends.local.layout as layout_mod  # noqa: E402
import tunekit.backends.local.resolve as resolve_mod  # noqa: E402
from tunekit._exceptions import ConfigError  # noqa: E402
from tunekit.backends.local.backend import LocalBackend  # noqa: E402
from tunekit.backends.local.peft_config import DeviceInfo  # noqa: E402
from tunekit.backends.local.process import job_dir  # noqa: E402
from tunekit.backends.local.run import LocalRun, check_facts, run_for_files  # noqa: E402
from tunekit.schemas.job import JobStatus  # noqa: E402
from tunekit.schemas.spec import TrainingSpec  # noqa: E402
from tunekit.store import default_store  # noqa: E402

GiB = 2**30
CKPT = "/jobs/tk-1/output/checkpoints/checkpoint-4"


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i} plus 1?", "response": f"{i + 1}"}) + "\n" for i in range(16)))
    return path


def _spec(model, **fields) -> TrainingSpec:
    return TrainingSpec.model_validate({"base_model": str(model), "adapter": {"r": 8},
                                        "hyperparameters": {"batch_size": 8, "max_length": 64}, **fields})


def _on_gpu(monkeypatch, memory: int, name: str, visible: int = 1) -> None:
    """This process now sees ``visible`` CUDA GPUs named ``name`` of ``memory`` bytes each."""
    monkeypatch.setattr(resolve_mod, "device_info", lambda device=None: DeviceInfo("cuda", memory, name))
    monkeypatch.setattr(layout_mod, "_visible_gpus", lambda: visible)


@pytest.fixture
def small_gpu(tiny_model, monkeypatch) -> int:
    """The smallest GPU memory in which the tiny model's NF4 run fits: its bf16 run, a few hundred KB more (the
    adapter and its optimizer state are the same in both), does not (so 'auto' picks NF4). From the estimates."""
    sizes = {}
    for q in ("none", "nf4"):
        _on_gpu(monkeypatch, 80 * GiB, "big")
        sizes[q] = resolve_mod.resolve_run(_spec(tiny_model, quantization=q),
                                           gradient_checkpointing=True).estimate.total_bytes
    assert sizes["nf4"] < sizes["none"]
    from tunekit.backends.local.memory import HEADROOM

    return int(sizes["nf4"] / HEADROOM) + 1


def test_a_resume_keeps_the_quantization_its_checkpoint_was_trained_with(tiny_model, data, tmp_path, monkeypatch,
                                                                        small_gpu):
    """Started on a small GPU ('auto' -> NF4), resumed on a big one where a fresh plan picks bf16: the adapter was
    trained on the 4-bit base, so the resume keeps NF4; a fresh start re-plans."""
    spec = _spec(tiny_model)
    _on_gpu(monkeypatch, small_gpu, "small")
    started = run_for_files(spec, data, tmp_path / "out")
    assert (started.quantization.mode, started.training.optimizer) == ("nf4", "adamw_torch_fused")

    _on_gpu(monkeypatch, 80 * GiB, "big")
    fresh, changes = check_facts(started, spec)  # no checkpoint yet: plans for this machine, as before
    assert fresh.quantization.mode == "none" and changes["quantization.mode"] == ["nf4", "none"]

    kept, changes = check_facts(started, spec, checkpoint=CKPT)
    assert kept.quantization == started.quantization and kept.training.optimizer == "adamw_torch_fused"
    assert kept.training.dtype == "nf4+bf16" and kept.lora == started.lora and kept.options == started.options
    assert kept.device.name == "big" and kept.memory_estimate.budget_bytes == 80 * GiB  # re-estimated here
    assert changes["facts"]["device"][1]["name"] == "big"
    assert changes["kept"] == {"quantization.mode": ["nf4", "none"]}
    assert "quantization.mode" not in changes  # the run trained has the recorded mode
    assert LocalRun.model_validate(kept.model_dump(mode="json")) == kept  # storable as the job's request


def test_a_resume_that_cannot_keep_the_quantization_is_refused(tiny_model, data, tmp_path, monkeypatch, small_gpu):
    """Started in bf16 on a big GPU, resumed on one where bf16 does not fit: switching to NF4 would train the
    adapter on another base, so the resume fails naming the field, both values and the next step."""
    spec = _spec(tiny_model)
    _on_gpu(monkeypatch, 80 * GiB, "NVIDIA H200")
    started = run_for_files(spec, data, tmp_path / "out")
    assert started.quantization.mode == "none"

    _on_gpu(monkeypatch, small_gpu, "small")
    assert check_facts(started, spec)[0].quantization.mode == "nf4"  # a fresh start may re-plan
    with pytest.raises(ConfigError) as err:
        check_facts(started, spec, checkpoint=CKPT, job_id="tk-1")
    e = err.value
    assert e.field == "quantization.mode"
    assert e.message.startswith("job tk-1 cannot resume from checkpoint-4 on this machine: "
                                'quantization.mode: recorded "none", here "nf4"')
    assert "the recorded run needs" in e.message and "nothing was trained" in e.message
    assert "NVIDIA H200 with 80.00 GiB" in e.hint and "`tunekit finetune --from tk-1 --backend local`" in e.hint


def test_a_resume_keeps_the_ranks_or_refuses_fewer_gpus(tiny_model, data, tmp_path, monkeypatch):
    """gpus='all' on 2 GPUs: 2 ranks of micro-batch 4 (the data order and each rank's share of a step). Resumed
    where 4 are visible, it keeps 2 ranks; where 1 is, it cannot, and says so."""
    spec = _spec(tiny_model)
    _on_gpu(monkeypatch, 80 * GiB, "big", visible=2)
    started = run_for_files(spec, data, tmp_path / "out", gpus="all")
    assert (started.layout["world_size"], started.layout["micro_batch"]) == (2, 4)

    _on_gpu(monkeypatch, 40 * GiB, "other", visible=4)
    assert check_facts(started, spec)[0].layout["world_size"] == 4
    kept, changes = check_facts(started, spec, checkpoint=CKPT)
    assert (kept.layout["world_size"], kept.layout["micro_batch"], kept.layout["grad_accum"]) == (2, 4, 1)
    assert kept.options.gpus == "all" and changes["kept"]["layout"][1]["world_size"] == 4

    _on_gpu(monkeypatch, 40 * GiB, "other", visible=1)
    with pytest.raises(ConfigError) as err:
        check_facts(started, spec, checkpoint=CKPT, job_id="tk-1")
    assert err.value.field == "layout"
    assert 'layout: recorded {"kind": "ddp", "world_size": 2' in err.value.message and "here null" in err.value.message
    assert "provider_options.local.gpus=2 but 1 CUDA GPU(s) are visible" in err.value.message


def test_the_resume_keeps_what_an_earlier_plan_recorded(tiny_model, data, tmp_path, monkeypatch):
    """Every field the checkpoint depends on is the stored run's, whichever resolved it (e.g. a run stored by an
    earlier tunekit that split the batch 2 x 4): seed, max_length, batch split, adapter, packing stay."""
    spec = _spec(tiny_model, provider_options={"local": {"device": "cpu"}})
    started = run_for_files(spec, data, tmp_path / "out", device="cpu")
    hp = started.training.model_copy(update={"micro_batch_size": 2, "gradient_accumulation_steps": 4, "seed": 7})
    earlier = started.model_copy(update={"training": hp, "device": started.device.model_copy(update={"name": "x"})})

    fresh, _ = check_facts(earlier, spec)
    assert (fresh.training.micro_batch_size, fresh.training.seed) == (8, 42)  # the spec's, planned anew
    kept, changes = check_facts(earlier, spec, checkpoint=CKPT)
    assert (kept.training.micro_batch_size, kept.training.gradient_accumulation_steps, kept.training.seed) == (2, 4, 7)
    assert changes["kept"]["training.micro_batch_size"] == [2, 8] and changes["kept"]["training.seed"] == [7, 42]
    assert kept.memory_estimate.breakdown == resolve_mod.resolve_run(
        _spec(tiny_model, hyperparameters={"batch_size": 8, "gradient_accumulation_steps": 4, "max_length": 64}),
        device="cpu").estimate.breakdown  # estimated for the kept micro-batch of 2


# ------------------------------------------------------------------------------------ through the worker

def _submit(train, model, **options):
    """A local job as finetune stores it, its worker not started (the test runs worker.run in this process)."""
    from tunekit.schemas.job import RemoteState

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(LocalBackend, "_spawn", lambda self, job, resume_from: RemoteState(status=JobStatus.QUEUED))
        return tunekit.finetune(train, base_model=str(model), backend="local", adapter={"r": 8},
                                hyperparameters={"batch_size": 8, "max_length": 64},
                                provider_options={"local": {"checkpoint_steps": 2, **options}})


def _run_worker(job, resume_from=None) -> int:
    from tunekit.backends.local import worker

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        return worker.run(job.id, resume_from=resume_from)
    finally:
        signal.signal(signal.SIGTERM, sigterm)


def test_the_worker_fails_a_resume_it_cannot_keep_and_keeps_the_stored_run(tiny_model, data, monkeypatch,
                                                                           small_gpu):
    _on_gpu(monkeypatch, 80 * GiB, "NVIDIA H200")
    job = _submit(data, tiny_model)
    stored = job.record.request
    assert stored["quantization"]["mode"] == "none"

    _on_gpu(monkeypatch, small_gpu, "small")
    ckpt = job_dir(job.id) / "output" / "checkpoints" / "checkpoint-2"
    assert _run_worker(job, resume_from=str(ckpt)) == 1
    job.refresh()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith(f"ConfigError: job {job.id} cannot resume from checkpoint-2 on this machine: "
                                'quantization.mode: recorded "none", here "nf4"')
    assert f"`tunekit finetune --from {job.id} --backend local`" in job.error
    assert job.record.request == stored and job.plan_changes == []  # nothing re-planned, nothing trained


def test_the_worker_trains_the_kept_run_on_resume_and_the_fresh_one_on_a_start(tiny_model, data, monkeypatch,
                                                                               small_gpu):
    import tunekit.backends.local.train as train_mod

    trained = []

    def capture(run, callbacks=None, *, resume_from_checkpoint=None):
        trained.append((run, resume_from_checkpoint))
        raise RuntimeError("stop here: the run is what this test checks")

    monkeypatch.setattr(train_mod, "train", capture)
    _on_gpu(monkeypatch, small_gpu, "small")
    resumed, started = _submit(data, tiny_model), _submit(data, tiny_model)
    assert resumed.record.request["quantization"]["mode"] == "nf4"

    _on_gpu(monkeypatch, 80 * GiB, "big")
    assert _run_worker(resumed, resume_from=CKPT) == 1 and _run_worker(started) == 1
    (kept, ckpt), (fresh, _) = trained
    assert ckpt == CKPT and kept.quantization.mode == "nf4" and fresh.quantization.mode == "none"
    assert LocalRun.model_validate(resumed.refresh().record.request) == kept  # stored: what the ranks would load
    [changed] = resumed.plan_changes
    assert changed.data["changes"]["kept"]["quantization.mode"] == ["nf4", "none"]
    assert 'kept for the checkpoint: quantization.mode: nf4 (a fresh plan: none)' in changed.message
    [changed] = started.refresh().plan_changes
    assert "kept" not in changed.data["changes"] and changed.data["changes"]["quantization.mode"] == ["nf4", "none"]


# ----------------------------------------------------------------------------------------- hub errors

def _http(cls, status: int, repo: str):
    """``cls`` as huggingface_hub raises it for an HTTP ``status`` on the config.json URL."""
    from huggingface_hub import errors

    http = sys.modules[errors.Response.__module__.split(".")[0]]  # the HTTP client huggingface_hub is built on
    url = f"https://huggingface.co/{repo}/resolve/main/config.json"
    response = http.Response(status, request=http.Request("GET", url))
    return cls(f"{status} Client Error. (Request ID: Root=1-abc)\n\nCannot access {url}.", response=response)


def _hub_errors(repo):
    from huggingface_hub import errors as e

    return {
        "gated": (_http(e.GatedRepoError, 401, repo), "GatedRepoError", ["is gated", "HF_TOKEN", repo]),
        "missing": (_http(e.RepositoryNotFoundError, 404, repo), "RepositoryNotFoundError",
                    ["check the model id", "HF_TOKEN"]),
        "offline": (e.LocalEntryNotFoundError("An error happened while trying to locate the file on the Hub and we "
                                              "cannot find the requested files in the local cache."),
                    "LocalEntryNotFoundError", ["HF_HUB_OFFLINE", f"hf download {repo}"]),
        "no config": (_http(e.RemoteEntryNotFoundError, 404, repo), "RemoteEntryNotFoundError", ["has no config.json"]),
        "server": (_http(e.HfHubHTTPError, 503, repo), "HfHubHTTPError", ["answered 503", "try again later"]),
    }


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache and a hub whose config.json download raises ``hub.error``."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # should any other call try the hub
    state = type("Hub", (), {"error": None, "calls": []})()

    def hf_hub_download(repo_id, filename, **kw):
        state.calls.append((repo_id, filename))
        raise state.error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return state


@pytest.mark.parametrize("case", ["gated", "missing", "offline", "no config", "server"])
def test_a_hub_fetch_error_is_said_with_its_cause_and_a_hint(case, hub, tiny_model, monkeypatch):
    repo = "tunekit-test/tiny-llama"
    hub.error, name, hints = _hub_errors(repo)[case]
    spec = _spec(repo, provider_options={"local": {"device": "cpu"}})
    planned = LocalRun.model_validate(LocalBackend().plan(spec).request)
    warned = []
    with pytest.raises(ConfigError) as err:
        check_facts(planned, spec, warn=lambda message, **data: warned.append((message, data)))
    e = err.value
    assert hub.calls == [(repo, "config.json")] and e.field == "base_model"
    assert e.message.startswith(f"config.json of base_model {repo!r} could not be fetched from the Hugging Face Hub "
                                f"({name}: ")
    assert all(h in e.hint for h in hints), e.hint
    [(message, data)] = warned
    assert data == {"type": "hub_error", "error": e.message.removesuffix("; nothing was trained"), "hint": e.hint}
    assert message == f"{data['error']}; hint: {e.hint}"


def test_the_worker_records_a_hub_error_and_fails_with_it(hub, data, monkeypatch):
    repo = "tunekit-test/gated-llama"
    hub.error = _hub_errors(repo)["gated"][0]
    job = _submit(data, repo, device="cpu")
    assert job.record.request["memory_estimate"] is None and hub.calls == []  # the plan never downloads
    assert _run_worker(job) == 1
    job.refresh()
    assert job.status == JobStatus.FAILED
    assert job.error.startswith(f"ConfigError: config.json of base_model {repo!r} could not be fetched from the "
                                f"Hugging Face Hub (GatedRepoError: 401 Client Error.")
    assert "accept its terms on https://huggingface.co/" + repo in job.error and "HF_TOKEN" in job.error
    events = [e for _, e in default_store().events(job.id)]
    [warning] = [e for e in events if e.type == "hub_error"]
    assert warning.level == "warning" and "GatedRepoError" in warning.data["error"]
    assert "HF_TOKEN" in warning.data["hint"]
    [error] = [e for e in events if e.type == "error"]
    assert error.data["hint"] == warning.data["hint"]
