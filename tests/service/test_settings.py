"""Settings: the environment as an operator writes it, and the mistakes they make."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from deepvit.service.config import Settings, parse_version_policy, unknown_environment


def test_defaults_are_the_documented_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("DEEPVIT_")]:
        monkeypatch.delenv(var)
    s = Settings()
    assert s.providers == ["cuda", "cpu"]
    assert s.max_batch_size == 32
    assert s.max_queue_delay_s == pytest.approx(0.005)
    assert s.repository_control is False
    assert s.ort_providers()[0] == (
        "CUDAExecutionProvider",
        {"device_id": "0", "cudnn_conv_algo_search": "HEURISTIC", "arena_extend_strategy": "kSameAsRequested"},
    )
    assert s.ort_providers()[1] == "CPUExecutionProvider"


def test_environment_values_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPVIT_PROVIDERS", "CPU")
    monkeypatch.setenv("DEEPVIT_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("DEEPVIT_GPU_MEM_LIMIT_BYTES", "1000")
    monkeypatch.setenv("DEEPVIT_REQUIRE_GPU", "false")
    s = Settings()
    assert s.providers == ["cpu"]
    assert s.max_batch_size == 8
    assert s.ort_providers() == ["CPUExecutionProvider"]


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"DEEPVIT_PROVIDERS": "tpu"}, "providers"),
        ({"DEEPVIT_PROVIDERS": "cpu,cpu"}, "twice"),
        ({"DEEPVIT_PROVIDERS": ""}, "at least one provider"),
        ({"DEEPVIT_MAX_BATCH_SIZE": "0"}, "max_batch_size"),
        ({"DEEPVIT_MAX_BATCH_SIZE": "zero"}, "max_batch_size"),
        ({"DEEPVIT_PORT": "70000"}, "port"),
        ({"DEEPVIT_REQUEST_TIMEOUT_S": "0"}, "request_timeout_s"),
        ({"DEEPVIT_LOG_FORMAT": "xml"}, "log_format"),
        ({"DEEPVIT_VERSION_POLICY": "newest"}, "latest:N"),
        ({"DEEPVIT_REQUIRE_GPU": "true", "DEEPVIT_PROVIDERS": "cpu"}, "require_gpu"),
        ({"DEEPVIT_MAX_QUEUE_SIZE": "16"}, "max_queue_size"),  # under one batch of 32
        ({"DEEPVIT_MAX_ASPECT_RATIO": "0.5"}, "max_aspect_ratio"),
    ],
)
def test_bad_values_are_refused_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str
) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValidationError, match=words):
        Settings()


@pytest.mark.parametrize(
    ("policy", "parsed"),
    [
        ("latest:1", ("latest", 1)),
        ("latest:3", ("latest", 3)),
        ("all", ("all", None)),
        ("specific:1,3", ("specific", (1, 3))),
    ],
)
def test_version_policies(policy: str, parsed: object) -> None:
    assert parse_version_policy(policy) == parsed


def test_a_misspelt_variable_is_reported_with_the_setting_it_resembles() -> None:
    problems = unknown_environment({"DEEPVIT_MAX_BATCHSIZE": "8", "DEEPVIT_PORT": "1", "HOME": "/"})
    assert problems == ["DEEPVIT_MAX_BATCHSIZE is not a setting (did you mean DEEPVIT_MAX_BATCH_SIZE?)"]
    assert unknown_environment({"DEEPVIT_FOO": "x"}) == ["DEEPVIT_FOO is not a setting"]
