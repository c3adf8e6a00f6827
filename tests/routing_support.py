"""Two fault-injecting upstreams behind a MODELS_FILE: the shared set-up of the routing tests."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_service.config import Settings
from tests.fake_openai import FakeOpenAI

PRIMARY_PRICE = {"input": 1.0, "output": 2.0}
BACKUP_PRICE = {"input": 0.05, "output": 0.08}


@dataclass
class Upstreams:
    """The primary and backup fakes, and a MODELS_FILE routing "main" to the first, "spare" to the second."""

    primary: FakeOpenAI
    backup: FakeOpenAI
    models_file: Path
    # Circuit keys in the shared Redis are per upstream name: a fresh name per test keeps tests apart.
    primary_name: str
    backup_name: str

    def settings(self, **overrides: Any) -> Settings:
        values: dict[str, Any] = dict(
            models_file=str(self.models_file),
            retry_delay_s=0.01,
            retry_max_delay_s=0.02,
            timeout_s=5.0,
            deadline_s=10.0,
            cache_mode="off",
        )
        values.update(overrides)
        return Settings(**values)


def start_upstreams(tmp_path: Path) -> Upstreams:
    """Start two fakes and write a MODELS_FILE for them under `tmp_path` (keys: ROUTING_*_KEY)."""
    primary, backup = FakeOpenAI().start(), FakeOpenAI().start()
    suffix = uuid.uuid4().hex[:8]
    names = (f"primary-{suffix}", f"backup-{suffix}")
    path = tmp_path / "models.json"
    path.write_text(json.dumps(models_document(primary.url, backup.url, names, fallbacks=["spare"])))
    return Upstreams(primary, backup, path, *names)


def models_document(primary: str, backup: str, names: tuple[str, str], **main: Any) -> dict[str, Any]:
    """Return a MODELS_FILE document: "main" on `primary`, falling back to "spare" on `backup` unless told."""
    return {
        "upstreams": {
            names[0]: {"base_url": primary, "api_key_env": "ROUTING_PRIMARY_KEY"},
            names[1]: {"base_url": backup, "api_key_env": "ROUTING_BACKUP_KEY", "timeout_s": 5},
        },
        "models": {
            "main": {"upstream": names[0], "upstream_model": "gpt-4o-mini", "price": PRIMARY_PRICE, **main},
            "spare": {"upstream": names[1], "upstream_model": "meta-llama/Llama-3.1-8B", "price": BACKUP_PRICE},
            "lonely": {"upstream": names[0]},
        },
    }
