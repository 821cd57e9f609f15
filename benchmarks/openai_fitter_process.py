"""One whole process of OpenAI's released weight fitter on an `rbr fit` data file, for bench_cli_startup.py.

The fitter itself is not part of this project: pass the path of `rbr_weight_fitter.py` from a checkout of
https://github.com/openai/safety-rbr-code-and-data (MIT). It needs torch, numpy and tqdm. Like `rbr fit`, the
process reads the rows and fits one linear model per response type, with the release's defaults (1,000 AdamW
steps, lr 0.01, margin 1, 95% of the pairs for training). The orderings are closed transitively here first, so
both fitters see the same pairs.

    python benchmarks/openai_fitter_process.py --fitter /path/to/rbr_weight_fitter.py \\
        --data rows.jsonl --orderings orderings.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path


def closed(table: dict[str, list[str]]) -> dict[str, list[str]]:
    """Each label mapped to every label it beats directly or through a chain (orderings have no cycles)."""
    beats = {label: set(beaten) for label, beaten in table.items()}
    changed = True
    while changed:
        changed = False
        for label, beaten in beats.items():
            wider = beaten.union(*(beats.get(other, set()) for other in beaten))
            if wider != beaten:
                beats[label], changed = wider, True
    return {label: sorted(beaten) for label, beaten in beats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fitter", type=Path, required=True, help="rbr_weight_fitter.py of OpenAI's release")
    ap.add_argument("--data", type=Path, required=True, help="JSONL rows in `rbr fit`'s format")
    ap.add_argument("--orderings", type=Path, required=True, help="JSON {response_type: {label: [beaten]}}")
    args = ap.parse_args()

    spec = importlib.util.spec_from_file_location("rbr_weight_fitter", args.fitter)
    if spec is None or spec.loader is None:
        sys.exit(f"cannot load {args.fitter}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    orderings = json.loads(args.orderings.read_text())
    by_type: dict[str, list] = defaultdict(list)
    for line in args.data.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        by_type[row["response_type"]].append(
            module.RBR_ExampleWithMetadata(
                convo_prompt=row["prompt_id"], convo_completion="", response_type=row["response_type"],
                completion_label=row["completion_label"], base_reward=float(row["rm_score"]),
                features=dict(row["features"]),
            )
        )
    for response_type, examples in sorted(by_type.items()):
        names = sorted(examples[0].features)
        fitter = module.RBRWeightFitter(names, examples, closed(orderings[response_type]))
        weights, metrics = fitter.fit_weights()
        print(f"{response_type}: {len(examples)} examples, final loss {metrics['loss'][-1]:.4f}", file=sys.stderr)


if __name__ == "__main__":
    main()
