"""The OpenAPI document says what the bodies read raw are: the v2 inference request and answer (JSON, or JSON
then binary tensors), and /metrics' Prometheus text rather than JSON; generated clients and schema-driven
testers go by it."""

from __future__ import annotations

from typing import Any

import pytest

from deepvit.service.app import create_app
from deepvit.service.config import Settings
from deepvit.service.metrics import CONTENT_TYPE


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(Settings()).openapi()


def _resolve(document: dict[str, Any], ref: str) -> dict[str, Any]:
    node: Any = document
    for part in ref.removeprefix("#/").split("/"):
        node = node[part]
    assert isinstance(node, dict)
    return node


@pytest.mark.parametrize("path", ["/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"])
def test_the_v2_inference_bodies_are_described(document: dict[str, Any], path: str) -> None:
    post = document["paths"][path]["post"]
    body = post["requestBody"]["content"]
    request = _resolve(document, body["application/json"]["schema"]["$ref"])
    assert request["required"] == ["inputs"]
    tensor = _resolve(document, request["properties"]["inputs"]["items"]["$ref"])
    assert set(tensor["required"]) == {"name", "shape", "datatype"}
    assert {"data", "parameters"} <= set(tensor["properties"])
    assert "Inference-Header-Content-Length" in body["application/octet-stream"]["description"]
    answer = post["responses"]["200"]["content"]
    response = _resolve(document, answer["application/json"]["schema"]["$ref"])
    assert "outputs" in response["required"]
    assert answer["application/octet-stream"]["schema"] == {"type": "string", "format": "binary"}
    # Every reference of the document resolves (the raw bodies' models are in its components).
    refs: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            refs.extend(v for k, v in node.items() if k == "$ref")
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(document)
    for ref in refs:
        _resolve(document, ref)


def test_metrics_is_prometheus_text(document: dict[str, Any]) -> None:
    content = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(content) == [CONTENT_TYPE]
    assert content[CONTENT_TYPE]["schema"] == {"type": "string"}
