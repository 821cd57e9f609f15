"""`rbr rm`: fit a reward model's score head on your own preference pairs, build it, and measure it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer

from rbr_model.cli.common import fail, failing

rm_app = typer.Typer(help="Reward models: fit a score head on preference pairs, build the checkpoint, measure it.",
                     no_args_is_help=True)

PAIRS_HELP = ('JSONL of preference pairs, TRL\'s format: {"prompt": [messages] or "text", "chosen": "...", '
              '"rejected": "..."} (optional prompt_id for the CV folds, kind for per-kind accuracy).')


def _model(model: str) -> Path:
    from rbr_model import models

    return models.prepare() if model == "embedded" else Path(model)


@rm_app.command("fit")
def fit(
    pairs: Path = typer.Option(..., "--pairs", help=PAIRS_HELP),
    out: Path = typer.Option(Path("rm_head.json"), "--out", help="Head file to write."),
    model: str = typer.Option("embedded", "--model", help="Causal LM whose final hidden state the head reads "
                              "(a folder), or `embedded`."),
    build: Path | None = typer.Option(None, "--build", help="Also build the classification checkpoint here "
                                      "(serve it with RBR_RM_ENGINE=vllm RBR_RM_MODEL=<folder>)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the cross-validation folds."),
    batch_size: int = typer.Option(8, "--batch-size", help="Items per forward pass (--states transformers)."),
    cache: Path | None = typer.Option(None, "--cache", help="Keep the hidden states in this .npz and reuse them "
                                      "while the model and the pairs' texts are the same."),
    states: str = typer.Option("vllm", "--states", help="What computes the hidden states: vllm (its pooling "
                               "runner, fast) or transformers."),
) -> None:
    """Fit a Bradley-Terry score head on the model's last-token states (C by grouped CV); print the summary."""
    from tqdm import tqdm

    from rbr_model import models
    from rbr_model.rm_fit import RMFitError, fit_rm_head, load_pairs, unique_items

    if states not in ("vllm", "transformers"):
        raise fail(f"--states: {states!r} is not vllm or transformers")
    with failing(RMFitError, models.ModelError):
        base = _model(model)
        n = len(unique_items(load_pairs(pairs))[0])
        with tqdm(total=n, desc="hidden states", unit="item") as bar:
            summary = fit_rm_head(pairs, base, out, seed=seed, progress=bar.update, batch_size=batch_size,
                                  states_with=states, cache=cache)
        if build is not None:
            summary["built"] = str(models.prepare_rm(out, base, build, force=True))
    typer.echo(json.dumps(summary, indent=1))


@rm_app.command("build")
def build_cmd(
    head: Path | None = typer.Option(None, "--head", help="Head file (default: the packaged helpful-only head)."),
    model: str = typer.Option("embedded", "--model", help="The causal LM the head was fitted on, or `embedded`."),
    out: Path | None = typer.Option(None, "--out", help="Folder (default: <model>-rm beside the model)."),
    force: bool = typer.Option(False, "--force", help="Build again even if the folder is marked ready."),
) -> None:
    """Build the classification checkpoint from a model and a head (idempotent); print its path."""
    from rbr_model import models

    with failing(models.ModelError):
        typer.echo(str(models.prepare_rm(head, _model(model), out, force=force)))


@rm_app.command("eval")
def eval_cmd(
    pairs: Path = typer.Option(..., "--pairs", help=PAIRS_HELP),
    model: Path | None = typer.Option(None, "--model", help="Classification checkpoint (default: the embedded "
                                      "helpful-only RM, built if needed)."),
    out: Path | None = typer.Option(None, "--out", help="Write the report (and every score) as JSON here."),
    chunk: int = typer.Option(64, "--chunk", help="Items per engine call."),
) -> None:
    """Pair accuracy (overall, per kind) and seconds per completion, through the in-process vLLM RM engine."""
    from tqdm import tqdm

    from rbr_model.rm import RMError, build_rm_engine
    from rbr_model.rm_fit import RMFitError, load_pairs, score_pairs, unique_items

    with failing(RMFitError):
        loaded = load_pairs(pairs)

    async def run() -> dict:
        engine = await asyncio.to_thread(build_rm_engine, "vllm", str(model) if model else None, None,
                                         max_model_len=2048)
        try:
            with tqdm(total=len(unique_items(loaded)[0]), desc="scoring", unit="item") as bar:
                report = await score_pairs(engine, loaded, chunk=chunk, progress=bar.update)
        finally:
            await engine.close()
        return {"model": engine.model_path, "pairs": str(pairs), **report}

    with failing(RMError, what="scoring"):
        report = asyncio.run(run())
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
    for kind, row in report["accuracy"].items():
        typer.echo(f"{kind:<20} n={row['n']:<5} pair accuracy {row['accuracy']:.3f}")
    typer.echo(f"{report['items']} completions in {report['seconds']:.1f} s: "
               f"{report['seconds_per_completion'] * 1000:.1f} ms per completion")
    if not report["items"]:
        raise fail("no completions scored")
