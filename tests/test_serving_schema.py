"""Schemathesis fuzzes the service through its own OpenAPI schema: valid and invalid requests
alike must get a declared status with a body that matches the schema, and never a 500."""

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import GenerationMode

from mldeploy.serving import BackgroundServer, OnnxPredictor, ServiceSettings, create_app

SETTINGS = ServiceSettings(max_batch_items=16, max_body_bytes=4096)

# The schema comes from the app itself (no server needed to collect the tests); the requests go to
# a real server. (schemathesis.pytest.from_fixture does not work with pytest 9.)
schema = schemathesis.openapi.from_dict(create_app(lambda: None, SETTINGS).openapi())
schema.config.generation.update(
    modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE], deterministic=True
)


@pytest.fixture(scope="module")
def server(exported):
    with BackgroundServer(
        create_app(lambda: OnnxPredictor(exported["ONNX (.onnx)"]), SETTINGS)
    ) as running:
        yield running


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case, server):
    case.call_and_validate(base_url=server.url)
