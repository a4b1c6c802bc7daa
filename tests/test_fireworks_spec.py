"""Every recorded Fireworks exchange checked against the fireworks-ai SDK (the only machine-readable
contract Fireworks publishes) and against the SDK's endpoint inventory vendored in tests/specs/fireworks/."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest_fireworks import check_body, check_exchange, check_response, recording_paths, route
from tests.replay.spec_check import spec_path

pytest.importorskip("fireworks")

# Values the SDK 1.2.30 literal lacks but a recording uses on purpose (see the recording's notes).
ALLOWED_STATES = {"states.json": frozenset({"JOB_STATE_DELETED", "JOB_STATE_SOMETHING_NEW"})}


@pytest.mark.parametrize("path", recording_paths(), ids=lambda p: p.stem)
def test_recorded_exchanges_fit_the_sdk(path):
    data = json.loads(path.read_text())
    assert data["provider"] == "fireworks" and data["notes"], "every recording says where it comes from"
    problems = []
    for i, ex in enumerate(data["exchanges"]):
        req, resp = ex["request"], ex["response"]
        if resp.get("drop"):
            route(req["method"], req["path"])
            continue
        problems += [f"#{i} {p}" for p in check_exchange(
            req["method"], req["path"], req.get("query"), req.get("json"), resp.get("status", 200), resp.get("json"),
            ALLOWED_STATES.get(path.name, frozenset()))]
    assert not problems, "\n".join(problems)


def test_recordings_cover_the_scenarios():
    names = {p.stem for p in recording_paths()}
    assert {"sft_lifecycle", "dpo_create", "cancel", "failed", "error_400", "error_401", "error_404", "rate_limit",
            "server_error_create", "drop_create", "quickstart"} <= names


def test_checker_catches_wrong_bodies():
    """The checker itself must fail on what it is meant to catch (else the test above proves nothing)."""
    from fireworks.types import SupervisedFineTuningJob, supervised_fine_tuning_job_create_params as p

    params = p.SupervisedFineTuningJobCreateParams
    assert check_body({"dataset": "d", "loraRank": 8}, params) == []
    assert check_body({"dataset": "d", "lora_rank": 8}, params)          # snake_case is not the wire name
    assert check_body({"dataset": "d", "loraAlpha": 16}, params)         # no such field
    assert check_body({"dataset": "d", "loraRank": "8"}, params)         # wrong type
    assert check_body({"dataset": "d", "region": "MARS_1"}, params)      # enum
    assert check_body({"dataset": "d", "wandbConfig": {"enabled": "yes"}}, params)  # nested type
    assert check_response({"name": "x", "state": "JOB_STATE_RUNNING"}, SupervisedFineTuningJob) == []
    assert check_response({"state": "RUNNING"}, SupervisedFineTuningJob)            # enum
    assert check_response({"jobProgress": {"pct": 1}}, SupervisedFineTuningJob)     # nested key
    assert check_response({"status": {"code": "NOPE"}}, SupervisedFineTuningJob)    # nested enum
    assert check_exchange("POST", "/v1/accounts/a/supervisedFineTuningJobs", None, {"dataset": "d"}, 400,
                          {"error": {"message": "x"}})  # not google.rpc.Status


def _api_md_routes() -> set[tuple[str, str]]:
    text = spec_path("fireworks/python-sdk.api.md").read_text()
    return {(m.upper(), p) for m, p in re.findall(r'<code title="(\w+) (/v1/[^"]+)">', text)}


def _template(path: str) -> str:
    path = re.sub(r"^/v1/accounts/[^/]+", "/v1/accounts/{account_id}", path)
    path = re.sub(r"/datasets/[^/:]+", "/datasets/{dataset_id}", path)
    path = re.sub(r"/supervisedFineTuningJobs/[^/:]+", "/supervisedFineTuningJobs/{supervised_fine_tuning_job_id}",
                  path)
    return re.sub(r"/dpoJobs/[^/:]+", "/dpoJobs/{dpo_job_id}", path)


# In the 1.2.30 wheel (resources/supervised_fine_tuning_jobs.py, dpo_jobs.py) but not in the 1.2.3 api.md.
NEWER_THAN_API_MD = {
    ("POST", "/v1/accounts/{account_id}/supervisedFineTuningJobs/{supervised_fine_tuning_job_id}:cancel"),
    ("POST", "/v1/accounts/{account_id}/dpoJobs/{dpo_job_id}:cancel"),
}


def test_every_recorded_route_is_in_the_sdk_inventory():
    known = _api_md_routes() | NEWER_THAN_API_MD
    used = {(ex["request"]["method"].upper(), _template(ex["request"]["path"]))
            for p in recording_paths() for ex in json.loads(p.read_text())["exchanges"]}
    assert used - known == set()


def test_cancel_routes_exist_in_the_installed_sdk():
    import inspect

    from fireworks.resources import dpo_jobs, supervised_fine_tuning_jobs

    assert ":cancel" in inspect.getsource(supervised_fine_tuning_jobs.SupervisedFineTuningJobsResource.cancel)
    assert ":cancel" in inspect.getsource(dpo_jobs.DpoJobsResource.cancel)
