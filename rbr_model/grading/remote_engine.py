"""Grader engine backed by a separate vLLM server (OpenAI-compatible `/v1/completions`).

For API pods in front of a vLLM fleet. A judgment is the same request the in-process engine makes: one token at
temperature 0, `allowed_token_ids` = the yes/no ids, and `logprob_token_ids` asking for the log-probability of
each of them (a vLLM extension of the completions API). Token ids come back as `token_id:<n>` keys
(`return_tokens_as_token_ids`), so two tokens that decode alike can't collide. A server that ignores
`logprob_token_ids` (an older vLLM, another product) returns a different set of tokens, and the engine raises
`GradingError` rather than guessing from a partial top-k.

The yes/no ids are discovered from the served tokenizer: a local copy when `tokenizer` is given (a Hugging Face
tokenizer or a path to load one from; `model` itself when it is a local folder), otherwise the server's
`/tokenize` endpoint. The `Grader` also needs the local copy, for the chat template.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from rbr_model.grading.engine import Engine, GradingError, Judgment, judgment_from_logprobs
from rbr_model.grading.prompts import NO_VARIANTS, YES_VARIANTS, discover_yes_no_ids
from rbr_model.lifecycle import HTTPClientOwner

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class RemoteEngine(HTTPClientOwner, Engine):
    """Talks to `python -m vllm.entrypoints.openai.api_server` (or any vLLM-compatible server) over httpx.

    `model` is the served model name; None asks `/v1/models` and takes the only one served. `batch_size`
    prompts go in one completions request (the server batches them with everything else in flight).
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        tokenizer: Any | str | Path | None = None,
        model_id: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        connect_timeout: float = 5.0,
        max_connections: int = 64,
        batch_size: int = 32,
        client: httpx.AsyncClient | None = None,
    ):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._model_id = model_id
        self.batch_size = max(1, batch_size)
        if tokenizer is None and model and Path(model).is_dir():
            tokenizer = model  # served by path: the same folder holds the tokenizer
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.yes_ids: tuple[int, ...] = ()
        self.no_ids: tuple[int, ...] = ()
        self._ready = False
        self._ready_lock = asyncio.Lock()
        self._closed = False

    @property
    def model_id(self) -> str:  # type: ignore[override]
        """The served model name (or the `model_id` given); known after `start()` when `model` was None."""
        if self._model_id:
            return self._model_id
        if self.model:
            return Path(self.model.rstrip("/")).name
        raise GradingError("the remote model is not known yet: call `await engine.start()` first")

    # ---- setup ----------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the model name and the yes/no token ids (done lazily by the first call otherwise)."""
        await self._ensure_ready()

    async def _ensure_ready(self) -> None:
        if self._closed:
            raise GradingError("the remote engine is closed")
        if self._ready:
            return
        async with self._ready_lock:
            if self._ready:
                return
            if self.model is None:
                data = await self._request("GET", "/v1/models")
                names = [m.get("id") for m in data.get("data", []) if isinstance(m, dict)]
                if len(names) != 1:
                    raise GradingError(f"{self.base_url} serves {names}; pass model= to choose one")
                self.model = names[0]
            if self.tokenizer is not None:
                self.yes_ids, self.no_ids = discover_yes_no_ids(
                    lambda text: self.tokenizer.encode(text, add_special_tokens=False)
                )
            else:
                variants = (*YES_VARIANTS, *NO_VARIANTS)
                encoded = await asyncio.gather(*(self._tokenize(v) for v in variants))
                table = dict(zip(variants, encoded, strict=True))
                self.yes_ids, self.no_ids = discover_yes_no_ids(lambda text: table[text])
            self._ready = True

    async def _tokenize(self, text: str) -> list[int]:
        data = await self._request(
            "POST", "/tokenize", json={"model": self.model, "prompt": text, "add_special_tokens": False}
        )
        tokens = data.get("tokens")
        if not isinstance(tokens, list):
            raise GradingError(f"/tokenize returned no tokens: {data!r}"[:300])
        return [int(t) for t in tokens]

    async def _request(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        if self._closed:
            raise GradingError("the remote engine is closed")
        try:
            resp = await self._client.request(method, path, json=json)
        except httpx.TimeoutException as exc:
            raise GradingError(f"{method} {self.base_url}{path} timed out: {exc}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise GradingError(f"{method} {self.base_url}{path} failed: {exc!r}", retryable=True) from exc
        if resp.status_code != 200:
            raise GradingError(
                f"{method} {self.base_url}{path} answered {resp.status_code}: {_error_message(resp)}",
                retryable=resp.status_code in _RETRYABLE_STATUS,
            )
        try:
            data = resp.json()
        except ValueError as exc:
            raise GradingError(f"{method} {self.base_url}{path} returned invalid JSON") from exc
        if not isinstance(data, dict):
            raise GradingError(f"{method} {self.base_url}{path} returned {type(data).__name__}, not an object")
        return data

    async def _completions(self, prompts: Sequence[str], **body: Any) -> list[dict[str, Any]]:
        """One request per `batch_size` prompts, all concurrently; choices come back in prompt order."""
        for p in prompts:
            if not isinstance(p, str):
                raise GradingError(f"a prompt must be a string, got {type(p).__name__}")
        chunks = [list(prompts[i : i + self.batch_size]) for i in range(0, len(prompts), self.batch_size)]

        async def one(chunk: list[str]) -> list[dict[str, Any]]:
            # The prompt text already holds the chat template's special tokens: add none.
            data = await self._request(
                "POST",
                "/v1/completions",
                json={"model": self.model, "prompt": chunk, "add_special_tokens": False, **body},
            )
            choices = data.get("choices")
            if not isinstance(choices, list) or len(choices) != len(chunk):
                raise GradingError(f"expected {len(chunk)} choices, got {data!r}"[:300])
            return sorted(choices, key=lambda c: c.get("index", 0))

        results = await asyncio.gather(*(one(c) for c in chunks))
        return [c for chunk in results for c in chunk]

    # ---- Engine ---------------------------------------------------------------------------------------
    async def grade(self, prompts: Sequence[str]) -> list[Judgment]:
        await self._ensure_ready()
        if not prompts:
            return []
        ids = [*self.yes_ids, *self.no_ids]
        choices = await self._completions(
            prompts,
            max_tokens=1,
            temperature=0.0,
            logprobs=len(ids),
            logprob_token_ids=ids,
            allowed_token_ids=ids,
            return_tokens_as_token_ids=True,
        )
        return [self._judgment(c) for c in choices]

    def _judgment(self, choice: dict[str, Any]) -> Judgment:
        try:
            top = choice["logprobs"]["top_logprobs"][0]
            values = {int(str(k).removeprefix("token_id:")): float(v) for k, v in top.items()}
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            raise GradingError(f"malformed logprobs in the server's answer: {choice!r}"[:300]) from exc
        wanted = {*self.yes_ids, *self.no_ids}
        if set(values) != wanted:
            raise GradingError(
                "the server did not return log-probabilities for exactly the yes/no tokens (it needs vLLM's "
                f"`logprob_token_ids`); asked {sorted(wanted)}, got {sorted(values)}"
            )
        return judgment_from_logprobs(values, self.yes_ids, self.no_ids)

    async def generate(
        self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0, seed: int | None = None
    ) -> list[str]:
        await self._ensure_ready()
        if not prompts:
            return []
        if seed is None:
            choices = await self._completions(prompts, max_tokens=max_tokens, temperature=temperature)
        else:  # one request per prompt, so each gets its own reproducible seed
            per = await asyncio.gather(
                *(
                    self._completions([p], max_tokens=max_tokens, temperature=temperature, seed=seed + i)
                    for i, p in enumerate(prompts)
                )
            )
            choices = [c for cs in per for c in cs]
        try:
            return [str(c["text"]) for c in choices]
        except (KeyError, TypeError) as exc:
            raise GradingError("malformed completion in the server's answer") from exc


def _error_message(resp: httpx.Response) -> str:
    try:
        data = resp.json()
    except ValueError:
        return resp.text[:300]
    err = data.get("error") if isinstance(data, dict) else None
    if isinstance(err, dict) and err.get("message"):
        return str(err["message"])[:300]
    if isinstance(data, dict) and data.get("message"):
        return str(data["message"])[:300]
    return str(data)[:300]
