"""The one lifecycle every engine shares: the grader (generation), the heads' trunk (pooling) and the reward model
(classification), in this process or behind a server.

Why one base: whoever holds engines (the service, a command) starts them, asks their health, tells a dead one from
one that may come back, and closes what it opened, the same way for all of them. Two ways of owning the work:

- `AsyncLLMOwner`: a vLLM `AsyncLLM` in this process (its engine core in a child process). Once that child dies
  it never comes back, so the engine is `gone` and only a restart of the process helps.
- `HTTPClientOwner`: an httpx client to a vLLM server. A server that stops answering may come back by itself:
  unhealthy, never `gone`. It closes the client only when it made it.

Nothing here imports vLLM or httpx; lower layers only (no engine module is imported).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any


class EngineLifecycle(ABC):
    """Start, health, gone, close: what every engine answers, whatever it computes."""

    engine_name = "the engine"
    """How messages name it ("the heads engine")."""

    async def start(self) -> None:  # noqa: B027 - most engines are ready once built
        """Finish what building could not do without an event loop (a remote engine asks the server its model)."""

    @abstractmethod
    async def health(self) -> bool:
        """True when the engine can take work now; never raises."""

    async def gone(self) -> bool:
        """True when the engine will never serve again in this process: only a restart helps (liveness).
        Engines that can recover (a server that comes back) are never gone; never raises."""
        return False

    @abstractmethod
    async def close(self) -> None:
        """Release what the engine opened (not what it was handed); later calls raise. Safe to call twice."""

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncLLMOwner(EngineLifecycle):
    """An engine that owns a vLLM `AsyncLLM` (`self._llm`): health, gone and one shutdown, alike for all three
    kinds. Subclasses set `error_type`, their family's error (it takes `retryable=`); they run requests together
    through `rbr_model.aio.gather_or_cancel`."""

    _llm: Any
    _closed: bool
    error_type: type[Exception] = RuntimeError
    engine_name = "the vLLM engine"

    def _check_open(self) -> None:
        if self._closed:
            raise self.error_type(f"{self.engine_name} is closed")
        if self._llm.errored:
            raise self.error_type(f"{self.engine_name} has died", retryable=True)  # type: ignore[call-arg]

    def _failure(self, exc: Exception) -> Exception:
        """A vLLM exception as the family's error; a dead or failing engine core may recover after a restart."""
        retryable = type(exc).__name__ in ("EngineDeadError", "EngineGenerateError")
        return self.error_type(f"vLLM failed: {type(exc).__name__}: {exc}", retryable=retryable)  # type: ignore[call-arg]

    async def health(self) -> bool:
        if self._closed:
            return False
        try:
            await self._llm.check_health()
        except Exception:  # noqa: BLE001 - health answers a yes/no
            return False
        return not self._llm.errored

    async def gone(self) -> bool:
        # vLLM watches its engine-core process and marks the engine dead when it exits: that never comes back.
        return not self._closed and bool(self._llm.errored)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        # Called on the loop thread on purpose: shutdown() cancels vLLM's output handler before the loop can
        # run it again; from another thread the handler would first see the dead engine core and log an error.
        # It blocks for a second or two while the engine-core process exits.
        llm, self._llm = self._llm, None
        llm.shutdown()
        # Dropping the last reference now lets AsyncLLM.__del__ run while the interpreter is still whole
        # (at exit it fails on half-torn-down modules).
        del llm


class HTTPClientOwner(EngineLifecycle):
    """An engine that talks to a server through an httpx client (`self._client`): health is the server's
    `GET /health`; close closes the client only when the engine made it (`_owns_client`)."""

    _client: Any
    _owns_client: bool = True
    _closed: bool

    async def health(self) -> bool:
        if self._closed:
            return False
        try:
            return (await self._client.get("/health")).status_code == 200
        except Exception:  # noqa: BLE001 - health answers a yes/no
            return False

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            await self._client.aclose()
