"""The OpenAPI 3.1 document of every endpoint, generated from the marshmallow schemas by apispec."""

from __future__ import annotations

from typing import Any

from flask import Flask


def build_document(app: Flask) -> dict[str, Any]:
    return {}
