"""schemathesis against our own OpenAPI schema (/openapi.json), every operation, through a real server.

Schema-valid (positive) and schema-violating (negative) requests, a bounded number of each; every response must
be a non-5xx that conforms to the schema: a documented status code, a documented content type, a body that
validates against the documented model (the one error shape included). Run once with a valid API key (the model
really runs) and once without one (every /v1 operation must answer its documented 401).

Left out on purpose: schemathesis' `positive_data_acceptance` check ("a schema-valid request must get a 2xx").
The schema cannot say "a decodable PNG" or "mask indices below the number of patches", so schema-valid requests
do get 400 / 413 / 415 / 422, all documented. `test_valid_images_are_accepted` sends real images instead.

(schemathesis' pytest plugin does not work with pytest 9 here, hence plain hypothesis `@given` loops.)
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error, positive_data_acceptance

from app.settings import Settings
from tests.serving import image_bytes, live_server, make_weights

pytestmark = pytest.mark.integration

KEY = "schemathesis-key"
EXAMPLES = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 40}
STATUSES: Counter = Counter()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    w = make_weights(tmp_path_factory.mktemp("w"))
    s = Settings(weights=str(w), api_keys=KEY, max_wait_ms=0, max_images_per_request=4, log_level="critical")
    with live_server(s) as (url, _):
        yield url
    print(f"\nschemathesis: {sum(STATUSES.values())} requests, statuses {dict(sorted(STATUSES.items()))}")


# Schema-violating requests must be refused with a 4xx; 413 is one too (e.g. more images than the limit).
CONFIG = {"checks": {"negative_data_rejection": {"expected-statuses": [400, 401, 404, 405, 413, 415, 422]}}}


@pytest.fixture(scope="module")
def schema(server):
    return schemathesis.openapi.from_url(server + "/openapi.json", config=schemathesis.Config.from_dict(CONFIG))


def operations(schema) -> list:
    ops = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in ops} >= {
        "POST /v1/reconstruct", "POST /v1/embed", "GET /v1/models", "GET /healthz", "GET /readyz", "GET /metrics"
    }  # fmt: skip
    return ops


def run(op, strategy, examples: int, session: requests.Session, headers: dict[str, str]) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,  # the same requests on every run: a failure here is reproducible, not luck
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case) -> None:
        excluded = [positive_data_acceptance, not_a_server_error]  # the second one: replaced by the assert below
        response = case.call_and_validate(session=session, headers=headers, excluded_checks=excluded, timeout=20)
        STATUSES[response.status_code] += 1
        # No 5xx, except the documented 504 the client asked for with a tiny X-MAE-Deadline-Ms (e.g. 5e-324)
        deadline = response.status_code == 504 and response.json()["error"]["code"] == "deadline_exceeded"
        assert response.status_code < 500 or deadline, response.text[:300]

    with contextlib.suppress(Unsatisfiable):  # e.g. no way to violate the schema of GET /healthz: it takes nothing
        check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_conforms_with_a_key(schema, mode):
    t = time.monotonic()
    with requests.Session() as session:
        for op in operations(schema):
            run(op, op.as_strategy(generation_mode=mode), EXAMPLES[mode], session, {"Authorization": f"Bearer {KEY}"})
    assert time.monotonic() - t < 60


def test_every_operation_conforms_without_a_key(schema):
    with requests.Session() as session:
        for op in operations(schema):
            run(op, op.as_strategy(), 5, session, {})


def test_valid_images_are_accepted(schema):
    """Schema-valid parameters with a real image: 2xx, and the 2xx body conforms (PNG, JSON or npy/npz)."""
    png = image_bytes(40, 32)
    before = STATUSES[200]
    with requests.Session() as session:
        for op in operations(schema):
            if op.method.upper() != "POST":
                continue
            strategy = op.as_strategy(media_type="image/png", body=png)
            run(op, strategy, 25, session, {"Authorization": f"Bearer {KEY}"})
    assert STATUSES[200] > before
