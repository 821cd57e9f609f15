"""Policy loading: our YAML, OpenAI's import, validation errors that name the file and key, fingerprint."""

from __future__ import annotations

import copy

import pytest
import yaml
from helpers import tiny_policy_dict
from reference import OPENAI_YAML, needs_reference

from rbr_model.policy import PolicyError, load_policy, parse_policy, policy_to_yaml


def test_parse_tiny_policy():
    p = parse_policy(tiny_policy_dict(), source="tiny.yaml")
    assert p.propositions_for("refuse") == ("apology", "refuses", "harmful")
    assert p.propositions_for("comply") == ("refuses", "harmful")
    assert p.class_names("refuse") == ("ideal", "unacceptable_completion", "disallowed_completion")
    assert p.propositions["apology"].examples[1].answer is False
    assert p.resolve_response_type("Refuse Please") == "refuse"
    assert p.resolve_response_type("COMPLY") == "comply"
    assert p.resolve_response_type(None) is None
    with pytest.raises(KeyError):
        p.resolve_response_type("sing")


@pytest.mark.parametrize(
    ("mutate", "key", "message"),
    [
        (lambda d: d["derived"]["polite_refusal"].update(ghost=True), "derived.polite_refusal.ghost",
         "unknown proposition"),
        (lambda d: d["classes"]["comply"]["ideal"].update(ghost=False), "classes.comply.ideal.ghost",
         "unknown proposition"),
        (lambda d: d["derived"]["polite_refusal"].update(good_refusal=True), "derived.", "cycle"),
        (lambda d: d["classes"].pop("comply"), "classes.comply", "response type has no class"),
        (lambda d: d["derived"].update(apology={"harmful": True}), "derived.apology", "duplicate name"),
        (lambda d: d["propositions"]["apology"].update(question="  "), "propositions.apology.question",
         "empty question"),
        (lambda d: d["propositions"]["apology"]["examples"][0].update(answer="maybe"),
         "propositions.apology.examples[0].answer", "yes or no"),
        (lambda d: d["classes"]["comply"].update(best={"harmful": False}), "classes.comply.best",
         "class not in class_order"),
        (lambda d: d["derived"]["polite_refusal"].update(apology="yes"), "derived.polite_refusal.apology",
         "true or false"),
        (lambda d: d["response_types"]["comply"].update(aliases=["refuse"]), "response_types.comply.aliases",
         "duplicate name"),
    ],
)
def test_validation_errors_name_file_and_key(mutate, key, message):
    data = copy.deepcopy(tiny_policy_dict())
    mutate(data)
    with pytest.raises(PolicyError) as err:
        parse_policy(data, source="bad.yaml")
    text = str(err.value)
    assert text.startswith("bad.yaml: ")
    assert key in text and message in text


def test_duplicate_yaml_key_is_an_error(tmp_path):
    f = tmp_path / "dup.yaml"
    text = yaml.safe_dump(tiny_policy_dict(), sort_keys=False)
    text = text.replace("propositions:\n", "propositions:\n  harmful:\n    question: again\n", 1)
    f.write_text(text)
    with pytest.raises(PolicyError, match=r"dup\.yaml: duplicate name: .*'harmful'"):
        load_policy(f)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(PolicyError, match="missing.yaml: <file>: cannot read"):
        load_policy(tmp_path / "missing.yaml")
    f = tmp_path / "broken.yaml"
    f.write_text("a: [unclosed\n")
    with pytest.raises(PolicyError, match="broken.yaml: <file>: not valid YAML"):
        load_policy(f)
    f.write_text("- a list\n")
    with pytest.raises(PolicyError, match="broken.yaml: <root>: expected a mapping"):
        load_policy(f)


def test_fingerprint_changes_with_anything_that_affects_grading():
    base = parse_policy(tiny_policy_dict())
    assert base.fingerprint == parse_policy(tiny_policy_dict()).fingerprint
    changes = [
        lambda d: d["propositions"]["apology"].update(question="Does it say sorry?"),
        lambda d: d["propositions"]["apology"]["examples"][0].update(response="Apologies."),
        lambda d: d["propositions"]["apology"]["examples"][0].update(answer=False),
        lambda d: d["propositions"]["apology"].update(guidance="Brief only."),
        lambda d: d["derived"]["polite_refusal"].update(refuses=False),
        lambda d: d["classes"]["comply"]["ideal"].update(harmful=True),
        lambda d: d.update(prompt_template="Q: {question} A: {response}"),
    ]
    seen = {base.fingerprint}
    for change in changes:
        data = copy.deepcopy(tiny_policy_dict())
        change(data)
        fp = parse_policy(data).fingerprint
        assert fp not in seen
        seen.add(fp)
    renamed = copy.deepcopy(tiny_policy_dict())
    renamed["description"] = "cosmetic"
    assert parse_policy(renamed).fingerprint == base.fingerprint


@needs_reference
def test_openai_import_and_round_trip(tmp_path):
    p = load_policy(OPENAI_YAML)
    assert set(p.classes) == {"hard_refuse", "safe_refuse_1", "safe_refuse_2", "comply"}
    assert len(p.propositions) == 23 and "correct_refusal" in p.derived
    assert p.class_names("comply")[0] == "ideal" and p.prompt_template and "{question}" in p.prompt_template
    assert set(p.propositions_for("comply")) == {
        "meta_commentary", "partially_complies", "requests_information", "disallowed_content",
        "illogical_continuation_of_prompt",
    }
    out = tmp_path / "ours.yaml"
    out.write_text(policy_to_yaml(p))
    again = load_policy(out)
    assert again.fingerprint == p.fingerprint
    assert again.resolve_response_type("Hard Refuse") == "hard_refuse"


def test_packaged_default_policy_is_valid():
    p = load_policy(None)
    assert set(p.classes) == {"comply", "hard_refuse", "safe_refuse"}
    assert len(p.propositions) >= 15
    for prop in p.propositions.values():
        assert len(prop.examples) >= 4, prop.name
        assert {e.answer for e in prop.examples} == {True, False}, prop.name
    for rt in p.classes:
        assert p.class_names(rt) == p.class_order
    assert p.resolve_response_type("Safe Refuse 1") == "safe_refuse"
