"""Schemathesis against the server's own OpenAPI schema, in process (ASGI), with a tiny random model.

Every operation of ``/openapi.json`` gets generated requests, valid and invalid; each answer must be a
non-5xx with a documented status, content type and body shape. The one check left out is
``positive_data_acceptance`` (schema-valid input must get a 2xx): the schema cannot say that an ``image``
must decode as a picture or that labels must be distinct, so schema-valid requests get 400 by design.
Inputs found to break the server once are kept as plain regression tests in ``tests/test_server_abuse.py``.
Example counts are bounded so the whole module runs in well under a minute on a 2-core machine.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="the server needs the 'serve' extra")
schemathesis = pytest.importorskip("schemathesis", reason="the API fuzz test needs schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance  # noqa: E402
from test_server import png_bytes  # noqa: E402

from talk2dino import InferenceConfig, Segmenter  # noqa: E402
from talk2dino.server import ServerConfig, create_app  # noqa: E402

# The smallest geometry that still tiles an image into windows: each generated image costs milliseconds.
FAST = InferenceConfig(short_side=28, max_long_side=56, window=28, stride=14, pamr_iterations=1)
# Small limits, so generated inputs actually reach them (413/422 paths) instead of only the happy path.
LIMITS = ServerConfig(max_upload_bytes=200_000, max_pixels=100_000, max_labels=8, max_label_length=40,
                      request_timeout_s=30)
MAX_EXAMPLES = 100
logger = logging.getLogger(__name__)


@pytest.fixture(scope="module")
def api_schema(tiny_model: Any) -> Any:
    """The schema as the app serves it, bound to the in-process app (schemathesis starts its lifespan once)."""
    app = create_app(Segmenter(tiny_model, FAST), LIMITS)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def operations(api_schema: Any) -> dict[str, Any]:
    return {op.ok().label: op.ok() for op in api_schema.get_all_operations()}


def test_schema_lists_every_endpoint(api_schema: Any) -> None:
    assert set(operations(api_schema)) == {"GET /healthz", "GET /v1/models", "GET /v1/models/{name}",
                                           "POST /v1/segment", "POST /v1/embed-text"}


def fuzz(operation: Any, mode: GenerationMode) -> int:
    """Run `operation` on up to MAX_EXAMPLES generated cases of `mode`; return how many ran."""
    ran = 0

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any) -> None:
        nonlocal ran
        ran += 1
        case.call_and_validate(excluded_checks=[positive_data_acceptance])

    try:
        run()
    except Unsatisfiable:
        # An operation without parameters (GET /healthz) has no invalid input to generate.
        assert mode is GenerationMode.NEGATIVE, operation.label
    return ran


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_api_conforms_to_its_schema(api_schema: Any, mode: GenerationMode) -> None:
    """No 5xx, documented statuses, content types and bodies, for valid (positive) and invalid (negative) input."""
    counts = {label: fuzz(operation, mode) for label, operation in sorted(operations(api_schema).items())}
    logger.info("schemathesis %s examples per operation: %s", mode.value, counts)


def test_segment_answers_with_real_images_conform_to_the_schema(api_schema: Any) -> None:
    """Schema-valid option combinations with a decodable image and known labels: the 200 answers (label PNG,
    RLE, heat maps, attention) must match `SegmentResponse` too, not only the error answers."""
    operation = operations(api_schema)["POST /v1/segment"]
    image = png_bytes(40, 52)
    labels = st.lists(st.sampled_from(["cat", "sofa", "sky", "tree", "a red car"]), min_size=1, max_size=4,
                      unique=True)
    statuses: dict[int, int] = {}

    @given(case=operation.as_strategy(), names=labels, as_json=st.booleans())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case: Any, names: list[str], as_json: bool) -> None:
        body = dict(case.body)
        body.pop("model", None)
        body.pop("image_url", None)
        body["image"] = image
        body["labels"] = json.dumps(names) if as_json else ", ".join(names)
        case.body = body
        # The body is edited by hand, so schemathesis's own idea of whether it is valid no longer holds.
        response = case.call_and_validate(excluded_checks=[positive_data_acceptance, negative_data_rejection])
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    run()
    logger.info("schemathesis segment examples with real images, by status: %s", statuses)
    assert statuses.get(200, 0) >= MAX_EXAMPLES // 2, statuses
