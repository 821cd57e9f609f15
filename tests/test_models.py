"""Converting a GGUF grader: the chat template a base model lacks (benchmarks/prepare_gemma_grader.py needs it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from rbr_model import models

TURNS = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def embedded_gguf(grader_model_path: Path) -> Path:
    """The embedded wheel's GGUF (installed by the session fixture that prepares the model)."""
    gguf_path = models.find_gguf()
    assert gguf_path is not None
    return gguf_path


@pytest.fixture(scope="module")
def gguf_without_template(embedded_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded GGUF with its chat template removed, as a base model's GGUF comes."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(embedded_gguf)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    out = tmp_path_factory.mktemp("base") / "base.gguf"
    writer = gguf.GGUFWriter(out, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {}, [gguf.Keys.Tokenizer.CHAT_TEMPLATE])
    assert gguf.Keys.Tokenizer.CHAT_TEMPLATE not in gguf.GGUFReader(out).fields
    return out


def saved_template(folder: Path) -> str:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).chat_template


def test_a_gguf_without_chat_template_is_refused_before_dequantising(gguf_without_template, tmp_path):
    with pytest.raises(models.ModelError, match="carries no chat template"):
        models.convert_gguf(gguf_without_template, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_given_chat_template_fills_in_for_a_missing_one(gguf_without_template, tmp_path):
    models.convert_gguf(gguf_without_template, tmp_path, chat_template=TURNS)
    assert saved_template(tmp_path) == TURNS
    assert (tmp_path / "model.safetensors").is_file()


def test_the_ggufs_own_chat_template_wins(embedded_gguf, grader_model_path, tmp_path):
    models.convert_gguf(embedded_gguf, tmp_path, chat_template=TURNS)
    own = saved_template(grader_model_path)
    assert own and own != TURNS
    assert saved_template(tmp_path) == own
