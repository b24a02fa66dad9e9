"""`steer.mixing` resolution against a model family (no server): shorthands, objects, defaults,
LoRA adapter names, and the 400s."""

from __future__ import annotations

import pytest

from steerserve.server.family import Family, MixingError, Variant


def fam(*variants: Variant) -> Family:
    return Family("base", None, {v.name: v for v in variants})


LORA = Variant("sft", "lora", "/a", adapters={"tuned": "sft", "taia": "sft:taia", "ffn-only": "sft:ffn-only",
                                             "base": None}, context_indicator=" [ctx]")
FULL = Variant("chat", "full", "/c", index=0)


def test_shorthands_and_objects():
    f = fam(FULL)
    plan, served = f.resolve("taia", "base")
    assert (plan.variant, plan.attention, plan.ffn, plan.via, plan.index, plan.label) == \
        ("chat", "tuned", "base", "weights", 0, "taia")
    assert served == "base"
    plan, _ = f.resolve({"ffn": "base"}, "chat")
    assert plan.label == "taia"
    plan, _ = f.resolve({"attention": "base"}, None)
    assert plan.label == "ffn-only" and plan.routes
    assert not f.resolve("base", "chat")[0].routes
    plan, served = f.resolve(None, "chat:ffn-only")  # an alias selects its mix
    assert plan.label == "ffn-only" and served == "base"
    assert f.resolve(None, "base") == (None, None)
    assert f.needs_plan("chat") and f.needs_plan("chat:taia") and not f.needs_plan("base")


def test_lora_mixes_pick_adapters():
    f = fam(LORA)
    assert f.resolve("taia", "sft")[1] == "sft:taia"
    assert f.resolve("ffn-only", "sft")[1] == "sft:ffn-only"
    assert f.resolve("base", "sft")[1] == "base"
    plan, served = f.resolve(None, "sft")
    assert plan.via == "lora" and served == "sft" and plan.adapter == "sft"
    assert not f.needs_plan("sft")  # vLLM serves LoRA names itself
    assert f.indicator_for("sft") == " [ctx]" and f.indicator_for("base") is None


@pytest.mark.parametrize("family,raw,model,field,text", [
    (Family("base"), "taia", "base", "steer.mixing", "no tuned variant"),
    (fam(FULL), "half", "base", "steer.mixing", "unknown shorthand"),
    (fam(FULL), {"variant": "x"}, "base", "steer.mixing.variant", "unknown variant"),
    (fam(FULL), {"variant": 1}, "base", "steer.mixing.variant", "must be a string"),
    (fam(FULL), {"attention": "all"}, "base", "steer.mixing.attention", "tuned"),
    (fam(FULL), {"bogus": 1}, "base", "steer.mixing.bogus", "unknown field"),
    (fam(FULL), ["taia"], "base", "steer.mixing", "string or an object"),
    (fam(FULL, LORA), "taia", "base", "steer.mixing.variant", "several tuned variants"),
    (fam(FULL, LORA), {"variant": "sft"}, "chat", "steer.mixing.variant", "not 'sft'"),
    (fam(FULL), "tuned", "chat:taia", "steer.mixing", "already selects"),
])
def test_mixing_errors(family, raw, model, field, text):
    with pytest.raises(MixingError, match=text) as err:
        family.resolve(raw, model)
    assert err.value.field == field


def test_round_trip_through_the_environment():
    f = fam(FULL, LORA)
    assert Family.from_json(f.to_json()) == f
    ids = [m["id"] for m in f.models_listing()]
    assert ids == ["chat", "chat:taia", "chat:ffn-only"]


def test_config_file_variants(tmp_path):
    from steerserve.server.cli import _config_variants

    (tmp_path / "c.yaml").write_text("variants:\n  sft: adapters/sft\n")
    assert _config_variants(str(tmp_path / "c.yaml")) == {"sft": str((tmp_path / "adapters/sft").resolve())}
    (tmp_path / "bad.yaml").write_text("variants: [a, b]\n")
    with pytest.raises(SystemExit, match="variants"):
        _config_variants(str(tmp_path / "bad.yaml"))
