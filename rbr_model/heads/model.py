"""A heads file: one logistic head per proposition on the grader's pooled hidden state.

    P(yes) = sigmoid(w · (x - mean) / scale + b)

where x is the grader trunk's hidden states pooled over the completion's tokens (`rbr_model.heads.inputs`:
their mean, or their mean and maximum side by side; `grader.pooling` says which, files without it are the mean).
The file is an `.npz` of four float64 arrays (`mean`, `scale` of shape (D,), `weights` (P, D), `bias` (P,)) and a
JSON `header` (stored as bytes) that says what the numbers mean: the trunk they were fitted on (model id, hash of
its weights and config, layer), the pooling, the policy (name, fingerprint), the proposition of each row and
the cross-validated metrics of each head. Loading checks every part and names the file and the field on error.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from rbr_model.heads.inputs import INPUT_VERSION, MEAN, MEAN_AND_MAX, POOLINGS

FORMAT = "rbr-heads-1"
POOLING = MEAN_AND_MAX  # what `rbr heads fit` writes unless told otherwise
PACKAGED_HEADS = "default_heads.npz"  # in rbr_model/policies/, for the default policy and the embedded grader
ARRAYS = ("mean", "scale", "weights", "bias")


class HeadsError(ValueError):
    """A heads file is unusable, or made for another grader model or policy; the message names file and field."""


@dataclass
class Heads:
    """Fitted heads plus the header that says which trunk and policy they belong to."""

    propositions: list[str]
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray
    bias: np.ndarray
    grader: dict[str, Any]  # model_id, model_hash, layer, pooling, input
    policy: dict[str, Any]  # name, fingerprint
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # per proposition: label, n, C, cv ...
    info: dict[str, Any] = field(default_factory=dict)  # free-form: training data, command, created
    source: str = "<memory>"

    def __post_init__(self) -> None:
        self._index = {name: i for i, name in enumerate(self.propositions)}
        _check(self, self.source)

    # ---- identity ----------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 over everything that decides a probability (arrays, propositions, trunk, pooling, policy)."""
        h = hashlib.sha256()
        h.update(json.dumps({"format": FORMAT, "propositions": self.propositions, "grader": self.grader,
                             "policy": self.policy}, sort_keys=True).encode())
        for name in ARRAYS:
            h.update(np.ascontiguousarray(getattr(self, name), dtype="<f8").tobytes())
        return h.hexdigest()

    @property
    def pooling(self) -> str:
        return str(self.grader.get("pooling", MEAN))

    @property
    def width(self) -> int:
        """Length of a pooled row these heads read."""
        return int(self.mean.shape[0])

    @property
    def hidden_size(self) -> int:
        """The trunk's hidden size (the width divided by the pooling's multiple)."""
        return self.width // POOLINGS[self.pooling]

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def position(self, name: str) -> int:
        """Row of `name` in `weights` (and in a `predict` row over all heads)."""
        return self._index[name]

    # ---- prediction --------------------------------------------------------------------------------------
    def predict(self, pooled: np.ndarray, names: Sequence[str] | None = None) -> np.ndarray:
        """P(yes) for pooled states (n, D): shape (n, len(names)), all heads when `names` is None."""
        x = np.asarray(pooled, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.width:
            raise ValueError(f"pooled states of shape {x.shape}; these heads read width {self.width}")
        rows = [self._index[n] for n in names] if names is not None else list(range(len(self.propositions)))
        z = ((x - self.mean) / self.scale) @ self.weights[rows].T + self.bias[rows]
        return _sigmoid(z)

    # ---- checks against what is loaded -------------------------------------------------------------------
    def check_policy(self, policy: Any) -> None:
        """Refuse heads fitted for another policy (fingerprint) or naming a proposition the policy lacks."""
        unknown = [n for n in self.propositions if n not in policy.propositions]
        if unknown:
            raise HeadsError(f"{self.source}: propositions: {unknown} are not propositions of policy "
                             f"{policy.name!r}")
        if self.policy.get("fingerprint") != policy.fingerprint:
            raise HeadsError(
                f"{self.source}: policy.fingerprint: fitted for policy {self.policy.get('name')!r} "
                f"({str(self.policy.get('fingerprint'))[:12]}), but the loaded policy {policy.name!r} is "
                f"{policy.fingerprint[:12]}; refit with `rbr heads fit`"
            )

    def check_model(self, model_id: str, model_hash: str, hidden_size: int | None = None) -> None:
        """Refuse heads fitted on another trunk (hash of weights and config) or of another width."""
        if self.grader.get("model_hash") != model_hash:
            raise HeadsError(
                f"{self.source}: grader.model_hash: fitted on {self.grader.get('model_id')!r} "
                f"({str(self.grader.get('model_hash'))[:12]}), but the heads engine runs {model_id!r} "
                f"({model_hash[:12]}); refit with `rbr heads fit` or load the matching trunk"
            )
        if hidden_size is not None and hidden_size != self.hidden_size:
            raise HeadsError(f"{self.source}: mean: width {self.width} ({self.pooling}), the model's hidden size "
                             f"is {hidden_size}")

    # ---- files -------------------------------------------------------------------------------------------
    def header(self) -> dict[str, Any]:
        return {"format": FORMAT, "propositions": self.propositions, "grader": self.grader, "policy": self.policy,
                "metrics": self.metrics, "info": self.info}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        blob = json.dumps(self.header(), indent=1, sort_keys=True, default=_json_default).encode()
        buf = io.BytesIO()
        np.savez_compressed(buf, header=np.frombuffer(blob, dtype=np.uint8),
                            **{name: np.asarray(getattr(self, name), dtype=np.float64) for name in ARRAYS})
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(buf.getvalue())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Heads:
        source = str(path)
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {name: npz[name] for name in npz.files}
        except FileNotFoundError:
            raise HeadsError(f"{source}: no such file") from None
        except (OSError, ValueError, EOFError) as exc:
            raise HeadsError(f"{source}: not a heads file (.npz): {exc}") from None
        for name in ("header", *ARRAYS):
            if name not in arrays:
                raise HeadsError(f"{source}: {name}: missing")
        try:
            header = json.loads(arrays["header"].astype(np.uint8).tobytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise HeadsError(f"{source}: header: not JSON: {exc}") from None
        if not isinstance(header, dict):
            raise HeadsError(f"{source}: header: expected a JSON object")
        if header.get("format") != FORMAT:
            raise HeadsError(f"{source}: format: expected {FORMAT!r}, got {header.get('format')!r}")
        for key, kind in (("propositions", list), ("grader", dict), ("policy", dict)):
            if not isinstance(header.get(key), kind):
                raise HeadsError(f"{source}: {key}: expected a JSON {kind.__name__}")
        return cls(
            propositions=[str(n) for n in header["propositions"]],
            mean=arrays["mean"].astype(np.float64),
            scale=arrays["scale"].astype(np.float64),
            weights=arrays["weights"].astype(np.float64),
            bias=arrays["bias"].astype(np.float64),
            grader=header["grader"],
            policy=header["policy"],
            metrics=header.get("metrics") or {},
            info=header.get("info") or {},
            source=source,
        )


def _check(heads: Heads, source: str) -> None:
    names = heads.propositions
    if not names:
        raise HeadsError(f"{source}: propositions: empty")
    if len(set(names)) != len(names):
        raise HeadsError(f"{source}: propositions: duplicate names")
    for name in ARRAYS:
        arr = np.asarray(getattr(heads, name))
        if not np.issubdtype(arr.dtype, np.number):
            raise HeadsError(f"{source}: {name}: expected numbers, got {arr.dtype}")
        if not np.all(np.isfinite(arr)):
            raise HeadsError(f"{source}: {name}: holds NaN or infinite values")
    width = heads.mean.shape[0] if heads.mean.ndim == 1 else -1
    expect = {"mean": (width,), "scale": (width,), "weights": (len(names), width), "bias": (len(names),)}
    if width <= 0:
        raise HeadsError(f"{source}: mean: expected a 1-D array, got shape {heads.mean.shape}")
    for name, shape in expect.items():
        if np.asarray(getattr(heads, name)).shape != shape:
            raise HeadsError(f"{source}: {name}: shape {np.asarray(getattr(heads, name)).shape}, expected {shape} "
                             f"({len(names)} propositions, width {width})")
    if np.any(heads.scale <= 0):
        raise HeadsError(f"{source}: scale: must be positive")
    for key in ("model_id", "model_hash", "layer"):
        if key not in heads.grader:
            raise HeadsError(f"{source}: grader.{key}: missing")
    pooling = heads.grader.get("pooling", MEAN)
    if pooling not in POOLINGS:
        raise HeadsError(f"{source}: grader.pooling: {pooling!r} is not one of {list(POOLINGS)}")
    if width % POOLINGS[pooling]:
        raise HeadsError(f"{source}: mean: width {width} is not a multiple of {POOLINGS[pooling]} ({pooling})")
    if heads.grader.get("input", INPUT_VERSION) != INPUT_VERSION:
        raise HeadsError(f"{source}: grader.input: {heads.grader.get('input')!r} is not {INPUT_VERSION!r}")
    if "fingerprint" not in heads.policy:
        raise HeadsError(f"{source}: policy.fingerprint: missing")


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.where(z >= 0, 1.0 / (1.0 + np.exp(-np.abs(z))), np.exp(-np.abs(z)) / (1.0 + np.exp(-np.abs(z))))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def packaged_heads_path() -> Path:
    from importlib import resources

    return Path(str(resources.files("rbr_model") / "policies" / PACKAGED_HEADS))

