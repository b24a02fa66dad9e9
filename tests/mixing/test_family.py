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


@pytest.mark.parametrize("raw,field,text", [
    ("half", "steer.mixing", '"taia", "tuned", "base", "ffn-only" or an object'),
    ({"variant": 1}, "steer.mixing.variant", "valid string"),
    ({"attention": "all"}, "steer.mixing.attention", "'tuned' or 'base'"),
    ({"bogus": 1}, "steer.mixing.bogus", "unknown field"),
    (["taia"], "steer.mixing", "or an object"),
])
def test_mixing_shapes_are_the_schemas(raw, field, text):
    """Shapes are checked once, by the wire schema (the steer's Spec), before the family resolves."""
    from steerserve.patches.steers import SteerError
    from steerserve.server.schema import parse_spec

    with pytest.raises(SteerError, match=text) as err:
        parse_spec({"mixing": raw})
    assert err.value.field == field


@pytest.mark.parametrize("family,raw,model,field,text", [
    (Family("base"), "taia", "base", "steer.mixing", "no tuned variant"),
    (fam(FULL), {"variant": "x"}, "base", "steer.mixing.variant", "unknown variant"),
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


# --- proxy pairs ------------------------------------------------------------------------------

def test_proxy_resolution_and_errors():
    from steerserve.patches.plan import ProxyPlan
    from steerserve.server.family import ProxyPair

    one = Family("base", None, {}, {"task": ProxyPair("task", "/e", "/a")})
    two = Family("base", None, {}, {"task": ProxyPair("task", "/e", "/a"), "code": ProxyPair("code", "/e2", "/a2")})
    assert one.resolve_proxy(None) is None
    assert one.resolve_proxy({}) == ProxyPlan("task", 1.0)  # the only pair, the paper's alpha
    assert two.resolve_proxy({"pair": "code", "alpha": -2}) == ProxyPlan("code", -2.0)
    assert one.resolve_proxy({"pair": "task", "alpha": 0}) == ProxyPlan("task", 0.0)
    cases = [
        (Family("base"), {"pair": "task"}, "steer.proxy", "no proxy pairs loaded"),
        (one, {"pair": "nope"}, "steer.proxy.pair", "unknown proxy pair 'nope'; loaded: task"),
        (two, {"alpha": 1}, "steer.proxy.pair", "several proxy pairs"),
    ]
    for family, raw, field, text in cases:
        with pytest.raises(MixingError, match=text) as err:
            family.resolve_proxy(raw)
        assert err.value.field == field
    # shapes and ranges: once, by the wire schema (ProxySpec), before the family resolves
    from steerserve.patches.steers import SteerError
    from steerserve.server.schema import parse_spec

    for raw, field, text in [("task", "steer.proxy", "must be an object"),
                             ({"pair": 3}, "steer.proxy.pair", "valid string"),
                             ({"alpha": 11}, "steer.proxy.alpha", r"\[-10, 10\]"),
                             ({"alpha": float("nan")}, "steer.proxy.alpha", "finite number"),
                             ({"alpha": True}, "steer.proxy.alpha", "valid number"),
                             ({"alpha": "1"}, "steer.proxy.alpha", "valid number"),
                             ({"pair": "task", "beta": 1}, "steer.proxy.beta", "unknown field")]:
        with pytest.raises(SteerError, match=text) as err:
            parse_spec({"proxy": raw})
        assert err.value.field == field, raw
    assert Family.from_json(two.to_json()) == two


def test_proxy_pairs_refused_at_start_up(tiny_llama, tmp_path):
    import json
    import shutil

    from tiny_models import build_tiny

    from steerserve.server.family import FamilyError, prepare_proxies

    anti = build_tiny("llama", tmp_path / "anti", seed=3, num_layers=2)
    family = Family("tiny")
    prepare_proxies([f"task={anti},{anti}"], tiny_llama, family)
    assert set(family.proxies) == {"task"}
    # another vocabulary: two ids swapped in the tokenizer
    swapped = tmp_path / "swapped"
    shutil.copytree(anti, swapped)
    tok = json.loads((swapped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (swapped / "tokenizer.json").write_text(json.dumps(tok))
    # another attention layout
    wide = tmp_path / "wide"
    shutil.copytree(anti, wide)
    cfg = json.loads((wide / "config.json").read_text())
    cfg["num_key_value_heads"] = 4
    (wide / "config.json").write_text(json.dumps(cfg))
    small = tmp_path / "small"
    shutil.copytree(anti, small)
    cfg = json.loads((small / "config.json").read_text())
    cfg["vocab_size"] = 1000
    (small / "config.json").write_text(json.dumps(cfg))
    cases = [
        ([f"x={swapped},{anti}"], "tokenizer mismatch: id"),
        ([f"x={anti},{small}"], "smaller vocabulary"),
        ([f"x={wide},{anti}"], "attention layout"),
        ([f"x={tmp_path},{anti}"], "not a model checkpoint"),
        ([f"1x={anti},{anti}"], "start with a letter"),
        ([f"x={anti}"], "NAME=EXPERT_PATH,ANTI_EXPERT_PATH"),
        ([f"task={anti},{anti}"], "declared twice"),
    ]
    for values, text in cases:
        with pytest.raises(FamilyError, match=text):
            prepare_proxies(values, tiny_llama, family)
    with pytest.raises(FamilyError, match="separate servers"):
        prepare_proxies([f"y={anti},{anti}"], tiny_llama, Family("tiny", None, {"chat": FULL}))
    other = tmp_path / "gpt2-base"
    shutil.copytree(tiny_llama, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FamilyError, match=r"GPT2LMHeadModel\) has no steering support"):
        prepare_proxies([f"y={anti},{anti}"], other, Family("tiny"))


def test_config_file_proxies(tmp_path):
    from steerserve.server.cli import _config_proxies

    (tmp_path / "c.yaml").write_text("proxies:\n  task: {expert: e, anti_expert: a}\n")
    assert _config_proxies(str(tmp_path / "c.yaml")) == {
        "task": {"expert": str((tmp_path / "e").resolve()), "anti_expert": str((tmp_path / "a").resolve())}}
    (tmp_path / "bad.yaml").write_text("proxies:\n  task: {expert: e}\n")
    with pytest.raises(SystemExit, match="proxies"):
        _config_proxies(str(tmp_path / "bad.yaml"))
