"""`rbr policy ...` commands: output, JSON counts, and one-line errors with exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml
from helpers import tiny_policy_dict
from reference import GOLD, OPENAI_YAML, needs_reference
from typer.testing import CliRunner

from rbr_model.cli import app

runner = CliRunner()


def write_tiny(tmp_path, mutate=None):
    data = tiny_policy_dict()
    if mutate:
        mutate(data)
    f = tmp_path / "tiny.yaml"
    f.write_text(yaml.safe_dump(data, sort_keys=False))
    return f


def test_check_prints_propositions_and_classes(tmp_path):
    res = runner.invoke(app, ["policy", "check", str(write_tiny(tmp_path))])
    assert res.exit_code == 0, res.output
    assert "apology, refuses, harmful" in res.output
    assert "disallowed_completion" in res.output and "NOT good_refusal" in res.output


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "check", "/nonexistent/policy.yaml"],
        ["policy", "classes", "--labels", "/nonexistent/labels.jsonl"],
        ["policy", "import-openai", "/nonexistent/x.yaml", "--out", "/tmp/never.yaml"],
    ],
)
def test_missing_files_exit_2_with_one_line(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in res.output


def test_invalid_policy_names_key(tmp_path):
    bad = write_tiny(tmp_path, lambda d: d["derived"]["polite_refusal"].update(ghost=True))
    res = runner.invoke(app, ["policy", "check", str(bad)])
    assert res.exit_code == 2
    assert "derived.polite_refusal.ghost: unknown proposition" in res.output


def test_classes_bad_rows_exit_2(tmp_path):
    policy = write_tiny(tmp_path)
    labels = tmp_path / "labels.jsonl"
    labels.write_text('{"response_type": "refuse", "propositions": {"apology": true}}\n')
    res = runner.invoke(app, ["policy", "classes", "--policy", str(policy), "--labels", str(labels)])
    assert res.exit_code == 2 and "labels.jsonl:1: propositions: missing labels for refuses, harmful" in res.output
    labels.write_text('{"response_type": "dance", "propositions": {}}\n')
    res = runner.invoke(app, ["policy", "classes", "--policy", str(policy), "--labels", str(labels)])
    assert res.exit_code == 2 and "response_type" in res.output
    labels.write_text("not json\n")
    res = runner.invoke(app, ["policy", "classes", "--policy", str(policy), "--labels", str(labels)])
    assert res.exit_code == 2 and "labels.jsonl:1: not valid JSON" in res.output


def test_classes_json_counts_on_tiny(tmp_path):
    policy = write_tiny(tmp_path)
    labels = tmp_path / "labels.jsonl"
    rows = [
        {"response_type": "Refuse Please", "propositions": {"apology": True, "refuses": True, "harmful": False}},
        {"response_type": "refuse", "propositions": {"apology": False, "refuses": True, "harmful": False}},
        {"response_type": "comply", "propositions": {"refuses": False, "harmful": True}},
        {"response_type": None, "propositions": {}},
    ]
    labels.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = runner.invoke(app, ["policy", "classes", "--policy", str(policy), "--labels", str(labels), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["counts"]["refuse"] == {"ideal": 1, "unacceptable_completion": 1, "disallowed_completion": 0}
    assert out["counts"]["comply"]["disallowed_completion"] == 1
    assert out["unclassified"] == 1 and out["ambiguous"] == 0


@needs_reference
def test_gold_train_classes_with_openai_policy(tmp_path):
    res = runner.invoke(app, ["policy", "classes", "--policy", str(OPENAI_YAML),
                              "--labels", str(GOLD), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["unclassified"] == 0 and out["ambiguous"] == 0
    assert sum(sum(c.values()) for c in out["counts"].values()) == 351
    imported = tmp_path / "openai_as_ours.yaml"
    res = runner.invoke(app, ["policy", "import-openai", str(OPENAI_YAML), "--out", str(imported)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["policy", "check", str(imported)])
    assert res.exit_code == 0 and "safe_refuse_2" in res.output
