"""A model family: the served base with its tuned variants and proxy pairs, and per request
`steer.mixing` (TAIA) and `steer.proxy` (proxy tuning: pairs are declared with
`--proxy NAME=EXPERT,ANTI_EXPERT` or the config's `proxies:`, checked against the base at start-up by
`prepare_proxies`, resolved per request by `Family.resolve_proxy`).

Variants are declared with `steerserve serve --variant NAME=PATH` (repeatable) or the config file's
`variants: {NAME: PATH}`. PATH is either
- a LoRA adapter folder (peft layout): served with vLLM's multi-LoRA. At start-up the server splits
  it into an attention-only adapter (TAIA) and an FFN-only adapter (cached under
  `$STEERSERVE_HOME/variants/`), registered as `NAME:taia` and `NAME:ffn-only` next to `NAME`;
  a request's mixing picks the adapter;
- a full checkpoint folder (a fully fine-tuned model of the same base): the engine holds the
  variant's weights and routes the rows of requests that use them (`patches/steers/mixing/engine.py`).
Either kind is refused at start-up when its `steerserve.json` names a base with another content
digest than the served model, or (without metadata) when its shape differs.

`steer.mixing` is `"taia"` (tuned attention, base FFN), `"tuned"`, `"base"`, `"ffn-only"`, or
`{"variant": NAME, "attention": "tuned"|"base", "ffn": "tuned"|"base"}`; the variant defaults to
the request's `model` when that names a variant, or to the only variant when there is one.
Requests whose `model` names a variant (or an alias) without `steer.mixing` get the full tuned
variant. The family travels from the CLI to the API server and the engine in environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from steerserve.patches.architectures import FULL_VARIANTS, PROXY_PAIRS, architecture, unsupported
from steerserve.patches.plan import MixingPlan, ProxyPlan
from steerserve.patches.steers.base import SteerError
from steerserve.patches.steers.mixing import VARIANTS_SETTING
from steerserve.patches.steers.proxy import PAIRS_SETTING
from steerserve.patches.steers.vectors import NAME_RE as VECTOR_NAME_RE
from steerserve.patches.steers.vectors import VECTORS_SETTING
from steerserve.patches.steers.vectors.files import VectorFileError, VectorInfo

from .limits import shown

FAMILY_ENV = "STEERSERVE_FAMILY"
LABELS = {"taia": ("tuned", "base"), "tuned": ("tuned", "tuned"), "base": ("base", "base"),
          "ffn-only": ("base", "tuned")}
ALIAS_SUFFIXES = {"taia": ":taia", "ffn-only": ":ffn-only"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_PAIR_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")  # a module name inside the engine: no '.'
FIELD = "steer.mixing"
# the expert classes proxy tuning builds (patches/adapter/submodels.py)
PROXY_EXPERT_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM")
PROXY_FIELD = "steer.proxy"


class FamilyError(ValueError):
    """A variant declaration the server cannot start with."""


class MixingError(SteerError):
    """A `steer.mixing` or `steer.proxy` value the family cannot serve (a 400 naming `field`)."""


@dataclass
class Variant:
    name: str
    kind: str  # "lora" | "full"
    path: str
    index: int = -1  # full: position in the engine's variant list
    adapters: dict[str, str | None] = field(default_factory=dict)  # lora: label -> served name (None = base)
    adapter_paths: dict[str, str] = field(default_factory=dict)  # lora: served name -> folder
    rank: int = 0
    context_indicator: str | None = None


@dataclass
class ProxyPair:
    """A proxy-tuning pair (arXiv 2401.08565): a small tuned expert and its untuned anti-expert."""

    name: str
    expert: str
    anti_expert: str


@dataclass
class Family:
    base_name: str = ""
    base_indicator: str | None = None
    variants: dict[str, Variant] = field(default_factory=dict)
    proxies: dict[str, ProxyPair] = field(default_factory=dict)
    vectors: dict[str, VectorInfo] = field(default_factory=dict)  # steering vectors (`--vector`)

    # --- lookups ----------------------------------------------------------------------------
    def variant_for_model(self, model: str | None) -> tuple[Variant | None, str | None]:
        """(variant, label) a request `model` names: a variant ("tuned"), an alias ("taia",
        "ffn-only"), or (None, None)."""
        if not model:
            return None, None
        if model in self.variants:
            return self.variants[model], None
        for v in self.variants.values():
            for label, served in v.adapters.items():
                if served == model and label != "tuned":
                    return v, label
            for label, suffix in ALIAS_SUFFIXES.items():
                if v.kind == "full" and model == v.name + suffix:
                    return v, label
        return None, None

    def serves(self, model: str) -> bool:
        """Whether `model` is the base's served name or one of its variants' names."""
        return model == self.base_name or self.variant_for_model(model)[0] is not None

    def needs_plan(self, model: str | None) -> bool:
        """Whether a request for `model` needs steerserve's handling even without `steer`
        (a fully fine-tuned variant or its alias: vLLM itself does not know these names)."""
        v, _ = self.variant_for_model(model)
        return v is not None and v.kind == "full"

    def indicator_for(self, model: str | None) -> str | None:
        v, _ = self.variant_for_model(model)
        if v is not None:
            return v.context_indicator
        return self.base_indicator

    # --- requests ---------------------------------------------------------------------------
    def resolve(self, raw, model: str | None) -> tuple[MixingPlan | None, str | None]:
        """`steer.mixing` (its value after the wire schema: a shorthand or an object's fields; or
        None) and the request's `model` -> (plan, the model name to hand to vLLM, or None to keep
        the request's). Raises MixingError naming the field."""
        named, implied = self.variant_for_model(model)
        if raw is None and named is None:
            return None, None
        if raw is None:
            label = implied or "tuned"
            variant = named
        else:
            variant, label = self._parse(raw, named, implied)
        attention, ffn = LABELS[label]
        if variant.kind == "lora":
            plan = MixingPlan(variant.name, attention, ffn, via="lora", adapter=variant.adapters.get(label))
        else:
            plan = MixingPlan(variant.name, attention, ffn, via="weights", index=variant.index)
        return plan, self.served_name(plan)

    def served_name(self, plan: MixingPlan) -> str:
        """The model name vLLM serves a mix under: its LoRA adapter, else the base (full variants'
        mixes are routed inside the base's engine; a LoRA "base" mix has no adapter)."""
        return plan.adapter if plan.via == "lora" and plan.adapter else self.base_name

    def _parse(self, raw, named: Variant | None, implied: str | None) -> tuple[Variant, str]:
        if implied is not None:
            raise MixingError(FIELD, f"the request's model already selects the {implied!r} mix of "
                                     f"{named.name!r}; name the variant itself ({named.name!r}) to mix")
        # `raw` passed the wire schema (patches/steers/mixing: MixingValue): a shorthand or an object
        if isinstance(raw, str):
            name, attention, ffn = None, *LABELS[raw]
        else:
            name, attention, ffn = raw.get("variant"), raw.get("attention", "tuned"), raw.get("ffn", "tuned")
        label = next(k for k, v in LABELS.items() if v == (attention, ffn))
        if not self.variants:
            who = f"model {self.base_name!r}" if self.base_name else "the served model"
            raise MixingError(FIELD, f"{who} has no tuned variant loaded (start the server with --variant NAME=PATH)")
        if name is not None:
            if name not in self.variants:
                raise MixingError(f"{FIELD}.variant", f"unknown variant {shown(name)}; loaded: "
                                                      f"{', '.join(sorted(self.variants))}")
            if named is not None and named.name != name:
                raise MixingError(f"{FIELD}.variant", f"the request's model is variant {named.name!r}, "
                                                      f"not {shown(name)}")
            return self.variants[name], label
        if named is not None:
            return named, label
        if len(self.variants) == 1:
            return next(iter(self.variants.values())), label
        raise MixingError(f"{FIELD}.variant", f"model {self.base_name!r} has several tuned variants; name one "
                                              f"({', '.join(sorted(self.variants))}) as `model` or "
                                              "steer.mixing.variant")

    def resolve_proxy(self, raw) -> ProxyPlan | None:
        """`steer.proxy` (its value after the wire schema, patches/steers/proxy: ProxySpec; or None)
        -> the plan. Raises MixingError naming the field."""
        if raw is None:
            return None
        if not self.proxies:
            who = f"model {self.base_name!r}" if self.base_name else "the served model"
            raise MixingError(PROXY_FIELD, f"{who} has no proxy pairs loaded (start the server with "
                                           "--proxy NAME=EXPERT,ANTI_EXPERT)")
        name = raw.get("pair")
        if name is None:
            if len(self.proxies) > 1:
                raise MixingError(f"{PROXY_FIELD}.pair", "several proxy pairs are loaded; name one of "
                                                         f"{', '.join(sorted(self.proxies))}")
            name = next(iter(self.proxies))
        if name not in self.proxies:
            raise MixingError(f"{PROXY_FIELD}.pair", f"unknown proxy pair {shown(name)}; loaded: "
                                                     f"{', '.join(sorted(self.proxies))}")
        return ProxyPlan(name, float(raw.get("alpha", 1.0)))

    # --- serialisation ----------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({"base_name": self.base_name, "base_indicator": self.base_indicator,
                           "variants": [asdict(v) for v in self.variants.values()],
                           "proxies": [asdict(p) for p in self.proxies.values()],
                           "vectors": [v.to_json() for v in self.vectors.values()]})

    @classmethod
    def from_json(cls, text: str) -> Family:
        body = json.loads(text)
        return cls(body["base_name"], body.get("base_indicator"),
                   {v["name"]: Variant(**v) for v in body["variants"]},
                   {p["name"]: ProxyPair(**p) for p in body.get("proxies", [])},
                   {v["name"]: VectorInfo.from_json(v) for v in body.get("vectors", [])})

    def models_listing(self) -> list[dict]:
        """Extra `/v1/models` entries: fully fine-tuned variants and their mixes (LoRA variants and
        their adapters are listed by vLLM itself)."""
        out = []
        for v in self.variants.values():
            if v.kind != "full":
                continue
            for label, suffix in (("tuned", ""), *ALIAS_SUFFIXES.items()):
                out.append({"id": v.name + suffix, "object": "model", "owned_by": "steerserve", "root": v.path,
                            "parent": self.base_name,
                            "steerserve": {"variant": v.name, "mixing": label, "kind": "full"}})
        return out


_family: Family | None = None


def current() -> Family:
    """The served family (API server process), from $STEERSERVE_FAMILY; empty when not set."""
    global _family
    if _family is None:
        text = os.environ.get(FAMILY_ENV)
        _family = Family.from_json(text) if text else Family()
    return _family


def set_current(family: Family | None) -> None:
    global _family
    _family = family


# --- start-up (CLI process) -------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[steerserve] {msg}", file=sys.stderr, flush=True)


def parse_variant_value(value: str) -> tuple[str, Path]:
    if "=" not in value:
        raise FamilyError(f"{value!r}: expected NAME=PATH")
    name, path = value.split("=", 1)
    return name.strip(), Path(path).expanduser().resolve()


def _check_base(name: str, folder: Path, meta: dict | None, base: Path, base_digest: str) -> None:
    if meta is not None and meta.get("base", {}).get("digest"):
        if meta["base"]["digest"] != base_digest:
            raise FamilyError(f"variant {name!r}: {folder} was trained from another base "
                              f"({meta['base'].get('path')}, digest {meta['base']['digest']}) than the served "
                              f"model {base} (digest {base_digest}): incompatible base")
        return
    if (folder / "config.json").exists():
        keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")
        a = json.loads((folder / "config.json").read_text())
        b = json.loads((base / "config.json").read_text())
        diff = [k for k in keys if a.get(k) != b.get(k)]
        if diff:
            raise FamilyError(f"variant {name!r}: shape differs from the served model ({', '.join(diff)}): "
                              "incompatible base")
    _log(f"WARNING: variant {name!r} has no steerserve.json naming its base; serving it on trust")


def _cannot_load(base: Path, what: str) -> str | None:
    """Why the server refuses to load `what` (FULL_VARIANTS, PROXY_PAIRS) next to the checkpoint
    at `base` (patches/architectures.py), or None."""
    arch = (json.loads((base / "config.json").read_text()).get("architectures") or ["?"])[0]
    entry = architecture(arch)
    return unsupported(arch) if entry is None else entry.cannot_load.get(what)


def prepare_family(values: list[str] | dict, base: Path, base_name: str, cache: Path) -> Family:
    """Validate the declared variants against the served base and build what serving them needs
    (LoRA: the split adapters, cached). Raises FamilyError."""
    from steerserve.training import checkpoints as ck
    from steerserve.training.export import split_adapter

    pairs = list(values.items()) if isinstance(values, dict) else [parse_variant_value(v) for v in values]
    family = Family(base_name=base_name, base_indicator=(ck.read_metadata(base) or {}).get("context_indicator"))
    if not pairs:
        return family
    digest = ck.base_digest(base)
    full_index = 0
    for name, path in pairs:
        path = Path(path).expanduser().resolve()
        if not _NAME_RE.match(name or ""):
            raise FamilyError(f"variant name {name!r}: use letters, digits, '.', '_' or '-' (no ':'), 1-64 chars")
        if name == base_name or name in family.variants:
            raise FamilyError(f"variant name {name!r} is already taken")
        try:
            meta = ck.read_metadata(path)
        except ck.CheckpointError as err:
            raise FamilyError(str(err)) from None
        if ck.is_lora_adapter(path):
            _check_base(name, path, meta, base, digest)
            cfg = json.loads((path / "adapter_config.json").read_text())
            stamp = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()[:12] \
                if (path / "adapter_model.safetensors").exists() else "missing"
            variant = Variant(name, "lora", str(path), rank=int(cfg.get("r", 8)),
                              context_indicator=(meta or {}).get("context_indicator"))
            variant.adapters["tuned"] = name
            variant.adapter_paths[name] = str(path)
            variant.adapters["base"] = None
            for label, keep in (("taia", "attention"), ("ffn-only", "ffn")):
                out = cache / f"{name}-{stamp}" / label
                served = name + ALIAS_SUFFIXES[label]
                try:
                    if not (out / "adapter_config.json").exists():
                        split_adapter(path, out, keep=keep)
                except ck.CheckpointError:
                    # no modules of that component: the mix keeps only zero deltas, i.e. it is the base
                    variant.adapters[label] = None
                    continue
                variant.adapters[label] = served
                variant.adapter_paths[served] = str(out)
        elif ck.is_full_checkpoint(path):
            refusal = _cannot_load(base, FULL_VARIANTS)
            if refusal:
                raise FamilyError(f"variant {name!r}: {path} is a fully fine-tuned checkpoint; {refusal}")
            _check_base(name, path, meta, base, digest)
            variant = Variant(name, "full", str(path), index=full_index,
                              context_indicator=(meta or {}).get("context_indicator"))
            full_index += 1
        else:
            raise FamilyError(f"variant {name!r}: {path} is neither a LoRA adapter (adapter_config.json) nor a "
                              "checkpoint (config.json + *.safetensors)")
        family.variants[name] = variant
    kinds = {v.kind for v in family.variants.values()}
    if kinds == {"lora", "full"}:
        raise FamilyError("serve LoRA variants and fully fine-tuned variants from separate servers (vLLM's LoRA "
                          "layers replace the modules full variants are routed through)")
    return family


def engine_settings(family: Family) -> dict:
    """The engine settings the family needs (`patches/steers/base.SETTINGS_KEY`): the fully
    fine-tuned variants the engine loads, the proxy pairs it builds and the steering vectors."""
    settings: dict = {}
    full = [{"name": v.name, "path": v.path} for v in family.variants.values() if v.kind == "full"]
    if full:
        settings[VARIANTS_SETTING] = full
    if family.proxies:
        settings[PAIRS_SETTING] = [asdict(p) for p in family.proxies.values()]
    if family.vectors:
        settings[VECTORS_SETTING] = [{"name": v.name, "path": v.path} for v in family.vectors.values()]
    return settings


def vllm_args(family: Family) -> list[str]:
    """vLLM server arguments for the family's LoRA variants (the engine settings for full variants
    and proxy pairs are `engine_settings`); publishes the family to this (API server) process."""
    os.environ[FAMILY_ENV] = family.to_json()
    lora = [v for v in family.variants.values() if v.kind == "lora"]
    if not lora:
        return []
    modules = [json.dumps({"name": n, "path": p, "base_model_name": family.base_name})
               for v in lora for n, p in v.adapter_paths.items()]
    rank = max(v.rank for v in lora)
    rank = next(r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank)
    return ["--enable-lora", "--max-lora-rank", str(rank), "--max-loras", str(max(2, len(modules))),
            "--lora-modules", *modules]


# --- proxy pairs --------------------------------------------------------------------------------

def parse_proxy_value(value: str) -> tuple[str, str, str]:
    """`NAME=EXPERT,ANTI_EXPERT` -> (name, expert, anti_expert)."""
    if "=" not in value or "," not in value.split("=", 1)[1]:
        raise FamilyError(f"--proxy {value!r}: expected NAME=EXPERT_PATH,ANTI_EXPERT_PATH")
    name, paths = value.split("=", 1)
    expert, anti = paths.split(",", 1)
    return name.strip(), expert.strip(), anti.strip()


def _attention_shape(config: dict) -> tuple:
    heads = config.get("num_attention_heads")
    head_dim = config.get("head_dim") or (config.get("hidden_size", 0) // heads if heads else None)
    return heads, config.get("num_key_value_heads", heads), head_dim


def check_proxy_checkpoint(pair: str, role: str, folder: Path, base_config: dict, base_vocab: dict[str, int]) -> None:
    """Refuse (FamilyError) an expert / anti-expert the engine cannot combine with the base: not a
    full checkpoint, an unsupported architecture, another vocabulary (ids below the base's vocab
    size must mean the same tokens; a larger padded vocab is fine: it is cut to the base's), or
    another attention layout (the sub-models share the base's per-step attention metadata)."""
    from transformers import AutoTokenizer

    from steerserve.training import checkpoints as ck

    what = f"proxy pair {pair!r}: {role.replace('_', '-')} {folder}"
    if not ck.is_full_checkpoint(folder):
        raise FamilyError(f"{what} is not a model checkpoint (config.json + *.safetensors)")
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    if arch not in PROXY_EXPERT_ARCHITECTURES:
        raise FamilyError(f"{what} is a {arch}; proxy experts must be {' or '.join(PROXY_EXPERT_ARCHITECTURES)}")
    if config.get("vocab_size", 0) < base_config.get("vocab_size", 0):
        raise FamilyError(f"{what} has a smaller vocabulary ({config.get('vocab_size')}) than the base "
                          f"({base_config.get('vocab_size')}): tokenizer mismatch")
    if _attention_shape(config) != _attention_shape(base_config):
        raise FamilyError(f"{what}: attention layout (heads, KV heads, head size) {_attention_shape(config)} differs "
                          f"from the base's {_attention_shape(base_config)}; proxy experts must share the base's "
                          "attention layout (layer count, FFN width and weights may differ)")
    try:
        vocab = AutoTokenizer.from_pretrained(folder).get_vocab()
    except Exception as err:  # noqa: BLE001 - any tokenizer loading failure is a refusal with its reason
        raise FamilyError(f"{what}: its tokenizer cannot be loaded ({type(err).__name__}: {err})") from None
    limit = base_config.get("vocab_size", len(base_vocab))
    by_id = {i: t for t, i in vocab.items() if i < limit}
    for token, index in base_vocab.items():
        if index < limit and by_id.get(index) != token:
            raise FamilyError(f"{what}: tokenizer mismatch: id {index} is {token!r} in the base but "
                              f"{by_id.get(index)!r} here; proxy tuning needs the base's vocabulary")
    base_ids = set(base_vocab.values())
    extra = sorted(i for i in by_id if i not in base_ids)
    if extra:
        raise FamilyError(f"{what}: tokenizer mismatch: ids {extra[:5]} are tokens the base does not have")


def prepare_proxies(values: list[str] | dict, base: Path, family: Family) -> None:
    """Validate the declared proxy pairs against the served base and add them to `family`."""
    from transformers import AutoTokenizer

    if isinstance(values, dict):
        declared = [(name, str(v.get("expert")), str(v.get("anti_expert"))) for name, v in values.items()]
    else:
        declared = [parse_proxy_value(v) for v in values]
    if not declared:
        return
    if family.variants:
        raise FamilyError("serve proxy pairs and tuned variants from separate servers (the variants' routing and "
                          "LoRA layers would also reach the experts)")
    base_config = json.loads((base / "config.json").read_text())
    refusal = _cannot_load(base, PROXY_PAIRS)
    if refusal:
        raise FamilyError(f"proxy pairs cannot be served with this model: {refusal}")
    base_vocab = AutoTokenizer.from_pretrained(base).get_vocab()
    for name, expert, anti in declared:
        if not _PAIR_RE.match(name or ""):
            raise FamilyError(f"proxy pair name {name!r}: start with a letter; letters, digits, '_' or '-', "
                              "1-64 chars")
        if name in family.proxies:
            raise FamilyError(f"proxy pair name {name!r} is declared twice")
        paths = {}
        for role, raw in (("expert", expert), ("anti_expert", anti)):
            folder = Path(raw).expanduser().resolve()
            check_proxy_checkpoint(name, role, folder, base_config, base_vocab)
            paths[role] = str(folder)
        family.proxies[name] = ProxyPair(name, paths["expert"], paths["anti_expert"])
        _log(f"proxy pair {name!r}: expert {paths['expert']}, anti-expert {paths['anti_expert']}")


# --- steering vectors ---------------------------------------------------------------------------

def prepare_vectors(values: list[str] | dict, base: Path, family: Family) -> None:
    """Check the declared steering vectors (`--vector NAME=FILE`, config `vectors: {NAME: FILE}`)
    against the served model (hidden size, layer count, finite values) and add them to `family`.
    Raises FamilyError naming the vector, the file and the field."""
    from steerserve.patches.steers.base import ModelInfo
    from steerserve.patches.steers.vectors import files

    if isinstance(values, dict):
        declared = list(values.items())
    else:
        try:
            declared = [files.parse_cli_value(v) for v in values]
        except VectorFileError as err:
            raise FamilyError(str(err)) from None
    if not declared:
        return
    info = ModelInfo.from_checkpoint(base)
    if not info.ffn_steerable:
        raise FamilyError(f"steering vectors cannot be served: {unsupported(info.architecture)}")
    for name, path in declared:
        if not isinstance(name, str) or not VECTOR_NAME_RE.match(name):
            raise FamilyError(f"vector name {name!r}: start with a letter or digit; letters, digits, '.', '_' or '-', "
                              "1-64 chars")
        if name in family.vectors:
            raise FamilyError(f"vector name {name!r} is declared twice")
        try:
            vector = files.check(name, Path(path).expanduser(), info.hidden_size or None, info.num_layers or None)
        except VectorFileError as err:
            raise FamilyError(f"vector {name!r}: {err}") from None
        family.vectors[name] = vector
        _log(f"vector {name!r}: {vector.format}, layers {len(vector.layers)} of {info.num_layers}, from {vector.path}")
