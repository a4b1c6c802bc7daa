"""Every Together recording against the public OpenAPI spec (vendored: tests/specs/together/openapi.yaml).

Where the spec lags SDK 3.1.1 the problem must match a documented divergence (tests/conftest_together.py);
every divergence must still occur, so a fixed spec or SDK retires its allowance.
"""

from __future__ import annotations

import pytest

from tests.conftest_together import DIVERGENCES, TOGETHER, recording, unexplained
from tests.replay.spec_check import check_recording, load_provider_spec

REQUEST_SIDE = r"^POST /fine-tunes request body\['early_stopping_enabled'\]: key not in the spec schema$"
NAMES = sorted(p.stem for p in TOGETHER.glob("*.json"))


@pytest.fixture(scope="module")
def spec():
    return load_provider_spec("together")


@pytest.mark.parametrize("name", NAMES)
def test_recording_matches_spec_or_a_documented_divergence(spec, name):
    left, _ = unexplained(check_recording(spec, TOGETHER / f"{name}.json", error_schema="ErrorData"))
    assert left == []
    assert recording(name)["notes"], "every recording says where the spec and SDK are unsure"


def test_every_divergence_still_occurs(spec):
    used: set[str] = set()
    for name in NAMES:
        used |= unexplained(check_recording(spec, TOGETHER / f"{name}.json", error_schema="ErrorData"))[1]
    assert used == set(DIVERGENCES) - {REQUEST_SIDE}
    # the request-side one: the SDK still sends the key, and the spec still lacks it
    pytest.importorskip("together")
    from together.lib.resources.fine_tuning import create_finetune_request
    from together.types.finetune_model_limits import FinetuneModelLimits

    limits = FinetuneModelLimits.construct(supports_vision=False)
    request, _, _ = create_finetune_request(limits, training_file="f", model="m", train_on_inputs=False)
    body = request.model_dump(exclude_none=True)
    assert "early_stopping_enabled" in body
    problems = spec.request_problems("POST", "/v1/fine-tunes", json=body)
    assert "POST /fine-tunes request body['early_stopping_enabled']: key not in the spec schema" in problems
    assert unexplained(problems)[0] == []


def test_status_map_covers_the_spec_enum(spec):
    from tunekit.backends.together.mapping import STATUS_MAP

    enum = spec.doc["components"]["schemas"]["FinetuneJobStatus"]["enum"]
    assert set(enum) <= set(STATUS_MAP)
    assert set(STATUS_MAP) - set(enum) == {"user_error"}  # SDK 3.1.1 only
