"""`rbr synth`: write graded, labelled synthetic completions (the input of `rbr fit`)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import typer

from rbr_model.cli.common import chosen_heads, fail, failing, stack_settings
from rbr_model.policy import PolicyError, load_policy
from rbr_model.prompt_set import SynthError, load_expectations, load_labels, load_prompts, policy_response_type
from rbr_model.synth import ROWS_FILE, SynthConfig, Synthesizer

_D = SynthConfig()


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: completions.jsonl (every attempt), "
                                      "rows.jsonl (for `rbr fit`), synth.json. An existing one is resumed.")],
    prompts_path: Annotated[Path | None, typer.Option("--prompts", help="JSONL prompts: prompt_id, response_type, "
                                                      "messages (default: the packaged prompt set).")] = None,
    split: Annotated[str | None, typer.Option("--split", help="Only the `train` or `eval` prompts of the "
                                              "packaged held-out split (rbr_model/data/prompt_split.json): weights "
                                              "fitted on a train run keep the eval prompts unseen, to measure them "
                                              "on (default: all prompts).")] = None,
    policy_path: Annotated[Path | None, typer.Option("--policy", "-p", help="Policy YAML (default: packaged).")] = None,
    labels_path: Annotated[Path | None, typer.Option("--labels", help="YAML {response_type: {label: instruction}} "
                                                     "for the behaviour policy (default: packaged).")] = None,
    model: Annotated[Path | None, typer.Option("--model", "-m", help="Model folder for vLLM, used both to write "
                                               "and to grade (default: the embedded SmolLM2-135M).")] = None,
    samples: Annotated[int, typer.Option("--samples", "-k", help="Completions per (prompt, label).")] = _D.samples,
    max_tokens: Annotated[int, typer.Option("--max-tokens", help="Longest completion, in tokens.")] = _D.max_tokens,
    temperature: Annotated[float, typer.Option("--temperature", help="Sampling temperature.")] = _D.temperature,
    seed: Annotated[int, typer.Option("--seed", help="Base seed; each attempt gets its own.")] = _D.seed,
    seeded: Annotated[bool | None, typer.Option("--seeded/--unseeded", help="Per-attempt sampling seeds (default: "
                                                "on, except on vLLM's CPU backend, which crashes on them).")] = None,
    reject_contradictions: Annotated[bool, typer.Option(
        "--reject-contradictions", help="Reject (and resample) a completion whose most likely class does not "
        "fit its target label.")] = False,
    max_resamples: Annotated[int, typer.Option("--max-resamples", help="Extra attempts per completion after a "
                                               "rejected, duplicate or empty one.")] = _D.max_resamples,
    expectations: Annotated[Path | None, typer.Option("--expectations", help="YAML {response_type: {label: "
                                                      "[classes]}} replacing the built-in table.")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="Only the first N prompts.")] = None,
    response_type: Annotated[list[str] | None, typer.Option("--response-type", "-t", help="Only prompts of this "
                                                            "response type (repeatable).")] = None,
    no_rm: Annotated[bool, typer.Option("--no-rm", help="No reward model: every rm_score is 0.")] = False,
    rm_model: Annotated[str | None, typer.Option("--rm-model", help="Reward model folder (in-process vLLM).")] = None,
    rm_url: Annotated[str | None, typer.Option("--rm-url", help="Reward model server URL (vLLM --runner "
                                               "pooling).")] = None,
    concurrency: Annotated[int, typer.Option("--concurrency", help="Completions in progress at once.")] = (
        _D.concurrency),
    max_model_len: Annotated[int, typer.Option("--max-model-len", help="Engine context length.")] = 4096,
    hash_only: Annotated[bool, typer.Option("--hash-only", help="Keep only a hash of each completion in "
                                            "completions.jsonl, not its text.")] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
    heads_choice: Annotated[str, typer.Option("--heads", help="Grade with learned heads: a heads file, `none` "
                                              "(prompted grader only) or `auto` (the packaged heads when the "
                                              "policy is the packaged default and --model is not given), as "
                                              "`rbr serve` does.")] = "auto",
) -> None:
    """Ask a behaviour policy for completions of every label, grade them, and write rows for `rbr fit`."""
    if sum(map(bool, (no_rm, rm_model, rm_url))) != 1:
        raise fail("choose one of --no-rm, --rm-model PATH or --rm-url URL")
    config = SynthConfig(samples=samples, max_tokens=max_tokens, temperature=temperature, seed=seed,
                         reject_contradictions=reject_contradictions, max_resamples=max_resamples,
                         concurrency=concurrency, store_text=not hash_only, seeded=seeded)
    with failing(PolicyError, SynthError):
        config.check()
        policy = load_policy(policy_path)
        prompts = load_prompts(prompts_path, policy, split=split)
        labels = load_labels(labels_path)
        table = load_expectations(expectations, policy) if expectations is not None else None
    if response_type:
        wanted = {policy_response_type(policy, rt) or rt for rt in response_type}
        prompts = [p for p in prompts if p.response_type in wanted]
    if limit is not None:
        prompts = prompts[: max(limit, 0)]
    if not prompts:
        raise fail("no prompts left to do")

    settings = stack_settings(grader_model=str(model) if model is not None else None, max_model_len=max_model_len,
                              heads=heads_choice, rm_engine="remote" if rm_url else "vllm" if rm_model else "none",
                              rm_model=rm_model, rm_url=rm_url)
    chosen_heads(settings, policy)
    with failing(SynthError):
        result = asyncio.run(_run(settings, policy, prompts, out, config, labels, table, progress))
    typer.echo(
        f"{result.n_keys} completions asked ({result.n_done_before} already done): {result.n_generations} sampled, "
        f"{result.n_judgments} judgments, {result.n_accepted} accepted, {result.n_rejected} rejected, "
        f"{result.n_duplicates} duplicate, {result.n_empty} empty, {result.n_exhausted} gave up; "
        f"{result.seconds:.0f} s"
    )
    typer.echo(f"wrote {out / ROWS_FILE} ({result.n_rows} rows)")


async def _run(settings: Any, policy: Any, prompts: Any, out: Path, config: SynthConfig, labels: Any, table: Any,
               progress: bool) -> Any:
    from rbr_model import models
    from rbr_model.grading.engine import GradingError
    from rbr_model.heads import HeadsError
    from rbr_model.rm import RMError
    from rbr_model.stack import build_stack

    try:
        stack = await build_stack(settings, policy)
    except (GradingError, HeadsError, RMError, models.ModelError, ValueError) as exc:
        raise SynthError(str(exc)) from None
    async with stack:
        synth = Synthesizer(stack.engine, policy, grader=stack.grader, rm_engine=stack.rm_engine, labels=labels,
                            expectations=table, config=config)
        try:
            return await synth.run(prompts, out, progress=progress)
        except (GradingError, RMError) as exc:
            raise SynthError(f"{exc} (the work done so far is saved; run again to resume)") from None
