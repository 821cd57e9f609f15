"""Schemathesis hooks for fuzzing rbr-serve (`SCHEMATHESIS_HOOKS=scripts.fuzz_hooks`, see benchmarks/RESULTS.md).

One rule of `POST /get_reward` cannot be written in JSON Schema: `prompts` and `labels` hold exactly as many
entries as `query` (its description says so; the route answers 422 naming the field). Generated bodies are cut or
padded to that length, so a schema-valid request the fuzzer sends is one the service must accept; every other
part of the body stays as generated, invalid ones included.
"""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    operation = getattr(context, "operation", None)
    if getattr(operation, "path", None) != "/get_reward" or not isinstance(body, dict):
        return body
    query = body.get("query")
    if not isinstance(query, list):
        return body
    for name in ("prompts", "labels"):
        values = body.get(name)
        if isinstance(values, list) and len(values) != len(query):
            filler = values[-1] if values else ("" if name == "prompts" else None)
            body[name] = (values + [filler] * len(query))[:len(query)]
    return body
