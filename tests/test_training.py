"""Training utilities on tiny random models: assistant-only labels, the InfoSteer regulariser and
intervention, the context-dependency indicator, TAIA exports, and short SFT runs (full, LoRA,
resumed) whose outputs the server loads."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from steerserve.patches.steers.infosteer import formulas as infosteer
from steerserve.training import checkpoints as ck
from steerserve.training import data as D
from steerserve.training.export import component_of, export_taia, merge_full, split_adapter
from steerserve.training.indicator import apply_indicator, score_conversations, suffixes, threshold_for
from steerserve.training.infosteer_train import InfoSteerTrainConfig, InfoSteerTraining

CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, like grass."}]


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


def hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_labels_cover_exactly_the_assistant_turns(tok):
    ex = D.tokenize_conversation(tok, CONV, 512)
    runs, cur = [], []
    for tid, lab in zip(ex.input_ids, ex.labels):
        if lab == D.IGNORE:
            if cur:
                runs.append(cur)
            cur = []
        else:
            assert lab == tid
            cur.append(tid)
    if cur:
        runs.append(cur)
    assert [tok.decode(r) for r in runs] == ["Blue.<|im_end|>", "Green, like grass.<|im_end|>"]
    cut = D.tokenize_conversation(tok, CONV, 20)
    assert len(cut.input_ids) == 20


def test_conversation_formats_and_errors(tmp_path):
    share = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    assert D.normalise_conversation(share) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": CONV}) + "\n\n" + "{oops\n")
    with pytest.raises(D.DataError, match=r"d.jsonl:3: not JSON"):
        D.load_jsonl(f)
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    with pytest.raises(D.DataError, match="no assistant turn"):
        D.load_jsonl(f)
    f.write_text(json.dumps({"messages": [{"role": "robot", "content": "x"}]}) + "\n")
    with pytest.raises(D.DataError, match="unknown role 'robot'"):
        D.load_jsonl(f)


def test_coefficient_entropy():
    d = 64
    assert infosteer.coefficient_entropy(torch.ones(2, d)).allclose(torch.full((2,), float(torch.log(torch.tensor(d)))))
    one_hot = torch.zeros(d)
    one_hot[3] = -5.0  # a negative coefficient counts by its magnitude
    assert infosteer.coefficient_entropy(one_hot).abs().item() < 1e-6
    mixed = torch.tensor([1.0, -1.0, 1.0, -1.0])
    assert infosteer.coefficient_entropy(mixed).item() == pytest.approx(float(torch.log(torch.tensor(4.0))))


def test_infosteer_training_hooks(tiny_llama):
    model = hf(tiny_llama)
    ids = torch.tensor([[1, 50, 60, 70, 80, 90]])
    cfg = InfoSteerTrainConfig(layers=(1, 2), lam=1.0)
    hooks = InfoSteerTraining(model, cfg)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    entropies = []
    for _ in range(5):  # maximising the regulariser alone raises the FFN memory entropy
        model(ids)
        reg = hooks.regulariser()
        entropies.append(reg.item())
        opt.zero_grad()
        (-reg).backward()
        opt.step()
    assert entropies[-1] > entropies[0]
    hooks.remove()
    # the forward intervention is the serving formula (infosteer.apply_one, mode lift)
    seen = {}
    layer = model.model.layers[1].mlp.down_proj
    handle = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("c", a[0].detach().clone()))
    lift = InfoSteerTraining(model, InfoSteerTrainConfig(layers=(1,), alpha=2.0, p=0.25))
    got = {}
    h2 = layer.register_forward_hook(lambda m, a, out: got.setdefault("in", a[0].detach().clone()))
    with torch.no_grad():
        model(ids)
    m = infosteer.lift_count(0.25, seen["c"].shape[-1])
    assert torch.equal(got["in"], infosteer.apply_one(seen["c"], "lift", 2.0, m=m))
    for h in (handle, h2):
        h.remove()
    lift.remove()
    with pytest.raises(ValueError, match="layers"):
        InfoSteerTraining(model, InfoSteerTrainConfig(layers=(99,), lam=1.0))


def test_indicator_scores_and_marking(tiny_llama, tok):
    model = hf(tiny_llama)
    convs = [CONV, [{"role": "user", "content": "x " * 30}, {"role": "assistant", "content": "y"}]]
    scores = score_conversations(model, tok, convs, 256)
    assert len(scores) == 2 and all(0.0 < s <= 1.0 for s in scores)
    thr = threshold_for(scores, 0.5)
    marks = suffixes(scores, thr, " [ctx]")
    assert sorted(marks) == ["", " [ctx]"] or marks == [" [ctx]", " [ctx]"]
    out = apply_indicator([{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                           {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
                          " [ctx]")
    assert out[0]["content"] == "s" and out[1]["content"] == "q [ctx]" and out[2]["content"][1]["text"] == "b [ctx]"
    ex = D.tokenize_conversation(tok, CONV, 512, suffix_for_user=" [ctx]")
    assert tok.decode(ex.input_ids).count(" [ctx]") == 2


def test_components():
    assert component_of("model.layers.3.mlp.down_proj.weight") == "ffn"
    assert component_of("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight") == "ffn"
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                 "model.layers.2.post_attention_layernorm.weight", "lm_head.weight"):
        assert component_of(name) == "attention"


def test_lora_taia_export_keeps_attention_deltas_only(tiny_llama, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"])
    get_peft_model(hf(tiny_llama), cfg).save_pretrained(tmp_path / "a")
    ck.write_metadata(tmp_path / "a", "lora", tiny_llama, ck.base_digest(tiny_llama), context_indicator=" [c]")
    out = export_taia(tmp_path / "a", tmp_path / "taia")
    acfg = json.loads((out / "adapter_config.json").read_text())
    assert sorted(acfg["target_modules"]) == ["o_proj", "q_proj", "v_proj"]
    meta = ck.read_metadata(out)
    assert meta["kind"] == "taia-lora" and meta["base"]["digest"] == ck.base_digest(tiny_llama)
    assert meta["context_indicator"] == " [c]"
    base = hf(tiny_llama).state_dict()
    full = PeftModel.from_pretrained(hf(tiny_llama), tmp_path / "a").merge_and_unload().state_dict()
    taia = PeftModel.from_pretrained(hf(tiny_llama), out).merge_and_unload().state_dict()
    for name, t in taia.items():
        want = base[name] if component_of(name) == "ffn" else full[name]
        assert torch.equal(t, want), name
    assert not torch.equal(full["model.layers.0.mlp.down_proj.weight"], base["model.layers.0.mlp.down_proj.weight"])
    ffn_only = split_adapter(tmp_path / "a", tmp_path / "ffn", keep="ffn")
    assert sorted(json.loads((ffn_only / "adapter_config.json").read_text())["target_modules"]) == ["down_proj", "gate_proj"]


def test_full_merge_takes_each_component_from_its_source(tiny_llama, tmp_path):
    from engine_checks import perturbed_copy

    tuned = perturbed_copy(tiny_llama, tmp_path / "tuned")
    out = merge_full(tuned, tiny_llama, tmp_path / "m", attention="tuned", ffn="base")
    b, t, m = (hf(p).state_dict() for p in (tiny_llama, tuned, out))
    for name, x in m.items():
        assert torch.equal(x, b[name] if component_of(name) == "ffn" else t[name]), name
    with pytest.raises(SystemExit, match="steerserve.json"):
        export_taia(tuned, tmp_path / "no-meta")  # no metadata and no --base


def sft_args(tiny_llama, data, out, **kw):
    from steerserve.training.sft import add_sft_args

    p = argparse.ArgumentParser()
    add_sft_args(p)
    argv = ["--base", str(tiny_llama), "--data", str(data), "--out", str(out), "--eval-size", "2",
            "--limit", "8", "--batch-size", "2", "--micro-batch", "2", "--max-len", "64", "--eval-steps", "1",
            "--save-steps", "1"]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return p.parse_args(argv)


@pytest.fixture(scope="module")
def chat_jsonl(tmp_path_factory):
    f = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(str(j) for j in range(1, i + 2))}]}
            for i in range(12)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


def test_sft_lora_with_infosteer_and_indicator(tiny_llama, chat_jsonl, tmp_path):
    from steerserve.training.sft import run_sft

    res = run_sft(sft_args(tiny_llama, chat_jsonl, tmp_path / "lora", max_steps=2, infosteer_lambda=0.01,
                           infosteer_layers="1-2", context_indicator=True))
    assert res.steps == 2 and res.eval_loss is not None
    out = tmp_path / "lora"
    assert (out / "adapter_model.safetensors").exists() and (out / "tokenizer.json").exists()
    meta = ck.read_metadata(out)
    assert meta["kind"] == "lora" and meta["context_indicator"] == " [ctx]"
    assert meta["infosteer"]["layers"] == [1, 2] and meta["indicator"]["marked"] >= 1
    history = json.loads((out / "train_metrics.json").read_text())["log_history"]
    assert any("ffn_entropy_sum" in h for h in history)
    assert any("eval_loss" in h for h in history)


def test_sft_full_resumes_and_loads(tiny_llama, chat_jsonl, tmp_path):
    from transformers import AutoModelForCausalLM

    from steerserve.training.sft import run_sft

    out = tmp_path / "full"
    first = run_sft(sft_args(tiny_llama, chat_jsonl, out, method="full", max_steps=2, lr=1e-3))
    assert first.steps == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    again = run_sft(sft_args(tiny_llama, chat_jsonl, out, method="full", max_steps=3, lr=1e-3, resume=True))
    assert again.steps == 3
    tuned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    base = hf(tiny_llama)
    assert not torch.equal(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert ck.read_metadata(out)["base"]["digest"] == ck.base_digest(tiny_llama)
    with pytest.raises(SystemExit, match="not empty"):
        run_sft(sft_args(tiny_llama, chat_jsonl, tmp_path / "full" / "checkpoints", method="full", max_steps=1))


def test_mc_scoring_matches_one_at_a_time(tiny_llama, tok):
    from steerserve.clients.datasets import MCItem
    from steerserve.training.evaluate import report, score_mc

    model = hf(tiny_llama).eval()
    items = [MCItem("a", "Question: What colour is the sky?\nAnswer:", ("blue", "green", "a very long answer"), 0),
             MCItem("b", "Question: Two plus two?\nAnswer:", ("four", "five"), 1)]

    def loglik(query, choice):
        ctx = tok(query, add_special_tokens=False)["input_ids"]
        full = tok(query + " " + choice, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([full])).logits[0].float(), -1)
        return sum(lp[t - 1, full[t]].item() for t in range(len(ctx), len(full)))

    expected = 0
    for item in items:
        per_char = [loglik(item.query, c) / len(" " + c) for c in item.choices]
        expected += int(max(range(len(per_char)), key=per_char.__getitem__) == item.gold)
    got = score_mc(model, tok, items, batch_size=3, desc="test")
    assert got["acc_per_char"] == expected / 2 and got["n"] == 2
    table = report({"tasks": ["t"], "n": 2, "configs": {"base": {"scores": {"t": got, "mean": got["acc_per_char"]}}}})
    assert table.startswith("| configuration | t | mean |")


def test_proxy_eval_scores_match_one_at_a_time(tiny_llama, tok, tmp_path):
    """The batched, left-padded proxy scoring equals scoring each (prompt, choice) alone with the
    three models; base and expert scores are each model's own."""
    from tiny_models import build_tiny

    from steerserve.clients.datasets import MCItem
    from steerserve.patches.steers.proxy.reference import proxy_combine
    from steerserve.training.proxy_eval import add_summary, choice_scores, report, score_items

    anti = hf(build_tiny("llama", tmp_path / "anti", seed=3, num_layers=2))
    expert = hf(build_tiny("llama", tmp_path / "expert", seed=4, num_layers=2))
    base = hf(tiny_llama)
    items = [MCItem("a", "Is the sky blue?\nAnswer:", ("yes", "no"), 0),
             MCItem("b", "Question: Two plus two?\nAnswer:", ("four", "five hundred and six"), 1),
             MCItem("c", "Pick one.", ("red", "green", "a blue one"), 2)]

    def loglik(model_logits, item, choice):
        prompt = tok.apply_chat_template([{"role": "user", "content": item.query}], add_generation_prompt=True,
                                         tokenize=True)
        prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
        cont = tok(choice, add_special_tokens=False)["input_ids"]
        lp = torch.log_softmax(model_logits(torch.tensor([prompt + cont])), -1)
        return sum(lp[len(prompt) - 1 + k, t].item() for k, t in enumerate(cont))

    with torch.no_grad():
        runs = {"base": lambda ids: base(ids).logits[0].float(),
                "expert": lambda ids: expert(ids).logits[0].float(),
                "proxy a=2": lambda ids: proxy_combine(base(ids).logits[0], expert(ids).logits[0],
                                                       anti(ids).logits[0], 2.0)}
        expected = {}
        accuracy = {}
        for name, fn in runs.items():
            right = 0
            for i, it in enumerate(items):
                raw = [loglik(fn, it, c) for c in it.choices]
                expected.update({(name, i, j): s for j, s in enumerate(raw)})
                per_char = [s / len(c) for s, c in zip(raw, it.choices)]
                right += int(max(range(len(per_char)), key=per_char.__getitem__) == it.gold)
            accuracy[name] = right / len(items)
    models = {"base": base, "expert": expert, "anti_expert": anti}
    got = choice_scores(models, items, tok, [2.0], batch_size=4)
    assert set(got) == set(runs)
    for (name, i, j), value in expected.items():
        assert abs(got[name][(i, j)] - value) < 1e-3, (name, i, j)
    acc = score_items(models, items, tok, [2.0], batch_size=4)
    assert {k: v["acc_per_char"] for k, v in acc.items()} == accuracy
    acc["tuned"] = {"acc": 1.0, "acc_per_char": 1.0, "n": 3}
    add_summary(acc, items)
    base = acc["base"]["acc"]
    expected_gap = (acc["proxy a=2"]["acc"] - base) / (1.0 - base) if base < 1 else None
    assert acc["proxy a=2"]["gap_closed_acc"] == expected_gap
    assert acc["majority class (reference)"]["acc"] == 1 / 3
    assert "| proxy a=2 |" in report({"task": "t", "n": 3, "results": acc})
