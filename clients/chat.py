"""`steerserve chat`: talk to a running steerserve with the official OpenAI SDK, steering by flags.

    steerserve chat "What is the capital of France?" --infosteer-alpha 1.5 --infosteer-layers 0,1,2
    steerserve chat "Passage: ... Question: ..." --context-alpha 0.5 --context-heads default
    steerserve chat "Hello" --steer '{"mixing": "taia", "proxy": {"alpha": 0.5}}'
    steerserve chat "Tell me about your day" --vector joy:0.8 --vector calm:-0.5
    steerserve chat            # interactive: one prompt per line, empty line or Ctrl-D to quit
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from steerserve.patches.steers import STEERS

from .steer import Steer


def _steer_help() -> str:
    """The `--steer` help, from the steer registry: every steer's wire name and summary."""
    lines = [f"{s.name}: {s.summary}" for s in STEERS]
    return ("the whole steer object as JSON, e.g. '{\"mixing\": \"taia\", \"proxy\": {\"alpha\": 0.5}}' "
            "(the flags below set their steer on top); steers: " + "; ".join(lines) + "; profile: a server-side "
            "profile name; experiment: an A/B experiment name")


def add_chat_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="user message (omit for an interactive session)")
    p.add_argument("--base-url", default=os.environ.get("STEERSERVE_URL", "http://127.0.0.1:8000/v1"),
                   help="server URL (default $STEERSERVE_URL or http://127.0.0.1:8000/v1)")
    p.add_argument("--api-key", default=os.environ.get("STEERSERVE_API_KEY", "none"),
                   help="API key (default $STEERSERVE_API_KEY)")
    p.add_argument("--model", default=None, help="model name (default: the server's first model)")
    p.add_argument("--system", default=None, help="system prompt")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stream", dest="stream", action="store_false", help="wait for the whole answer")
    p.add_argument("--show-steer", action="store_true", help="print the server's steering echo")
    p.add_argument("--steer", default=None, metavar="JSON", help=_steer_help())
    g = p.add_argument_group("InfoSteer (FFN memory amplification)")
    g.add_argument("--infosteer-alpha", type=float, default=None, help="enable InfoSteer with this alpha [0, 10]")
    g.add_argument("--infosteer-mode", choices=["scale", "topk", "lift"], default="scale")
    g.add_argument("--infosteer-layers", default="all", help='"all" or comma-separated layer indices')
    g.add_argument("--infosteer-k", type=int, default=None, help="topk: coefficients per token")
    g.add_argument("--infosteer-p", type=float, default=None, help="lift: fraction per token (default 0.01)")
    p.add_argument("--vector", action="append", default=[], metavar="NAME:SCALE[:LAYERS[:POSITIONS]]",
                   help="add a residual steering vector the server loaded (repeatable; terms add up): scale in "
                        "[-100, 100], LAYERS 'all' or comma-separated indices, POSITIONS all|prompt|generated, "
                        "e.g. joy:0.8 or joy:-1.5:10,11,12:generated (GET /v1/steer/vectors lists the names)")
    c = p.add_argument_group("context attention (PASTA-style emphasis of the user's text)")
    c.add_argument("--context-attention", action="store_true",
                   help="enable it with the server's defaults (implied by any flag below)")
    c.add_argument("--context-alpha", type=float, default=None,
                   help="(0, 1]: attention off the emphasised tokens is scaled by this (default: the server's)")
    c.add_argument("--context-layers", default="all", help='"all" or comma-separated layer indices')
    c.add_argument("--context-heads", default=None,
                   help='"all", a head set name, or layer:head pairs like 12:0,14:3 (default: the server\'s)')
    c.add_argument("--emphasis", choices=["user", "last_user", "marked"], default=None,
                   help="what to emphasise (default user; marked: text in <emphasis>...</emphasis>)")


def _layers(text: str):
    return "all" if text == "all" else [int(x) for x in text.split(",") if x]


def _heads(text: str | None):
    if text is None or text == "all" or ":" not in text:
        return text
    return [[int(a) for a in pair.split(":")] for pair in text.split(",") if pair]


def parse_vector(text: str) -> dict:
    """`NAME:SCALE[:LAYERS[:POSITIONS]]` -> the keyword arguments of `Steer().vector`."""
    parts = text.split(":")
    if len(parts) < 2 or len(parts) > 4 or not parts[0]:
        raise ValueError(f"--vector {text!r}: expected NAME:SCALE[:LAYERS[:POSITIONS]], e.g. joy:0.8")
    try:
        scale = float(parts[1])
    except ValueError:
        raise ValueError(f"--vector {text!r}: scale {parts[1]!r} is not a number") from None
    out: dict = {"name": parts[0], "scale": scale}
    if len(parts) > 2 and parts[2]:
        out["layers"] = _layers(parts[2])
    if len(parts) > 3 and parts[3]:
        out["positions"] = parts[3]
    return out


def steer_from_args(args: argparse.Namespace) -> Steer | None:
    steer = Steer()
    used = False
    if getattr(args, "steer", None):
        body = json.loads(args.steer)
        if not isinstance(body, dict):
            raise ValueError("--steer takes a JSON object")
        steer, used = Steer.from_dict(body), True
    if args.infosteer_alpha is not None:
        steer = steer.infosteer(alpha=args.infosteer_alpha, mode=args.infosteer_mode,
                                layers=_layers(args.infosteer_layers), k=args.infosteer_k, p=args.infosteer_p)
        used = True
    context_flags = (args.context_alpha is not None or args.context_layers != "all"
                     or args.context_heads is not None or args.emphasis is not None)
    if args.context_attention or context_flags:
        steer = steer.context_attention(alpha=args.context_alpha, layers=_layers(args.context_layers),
                                        heads=_heads(args.context_heads), emphasis=args.emphasis)
        used = True
    for text in getattr(args, "vector", None) or []:
        steer, used = steer.vector(**parse_vector(text)), True
    return steer if used else None


def _ask(client, model: str, messages: list[dict], steer: Steer | None, args) -> str:
    extra = steer.extra_body() if steer else None
    kwargs = dict(model=model, messages=messages, max_tokens=args.max_tokens,
                  temperature=args.temperature, seed=args.seed, extra_body=extra)
    if not args.stream:
        resp = client.chat.completions.create(**kwargs)
        text = resp.choices[0].message.content or ""
        print(text)
        if args.show_steer:
            print(json.dumps((resp.model_extra or {}).get("steer")), file=sys.stderr)
        return text
    parts = []
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        if args.show_steer and (chunk.model_extra or {}).get("steer") is not None:
            print(json.dumps(chunk.model_extra["steer"]), file=sys.stderr)
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()
    return "".join(parts)


def run_chat(args: argparse.Namespace) -> int:
    import openai

    try:
        steer = steer_from_args(args)
    except Exception as err:  # pydantic.ValidationError: report like a CLI, not a traceback
        print(f"steerserve chat: bad steering flag: {err}", file=sys.stderr)
        return 2
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key)
    try:
        model = args.model or client.models.list().data[0].id
        history = [{"role": "system", "content": args.system}] if args.system else []
        if args.prompt is not None:
            _ask(client, model, [*history, {"role": "user", "content": args.prompt}], steer, args)
            return 0
        while True:
            try:
                line = input("> ")
            except EOFError:
                return 0
            if not line.strip():
                return 0
            history.append({"role": "user", "content": line})
            history.append({"role": "assistant", "content": _ask(client, model, history, steer, args)})
    except openai.APIStatusError as err:
        print(f"steerserve chat: server answered {err.status_code}: {err.message}", file=sys.stderr)
        return 1
    except openai.APIConnectionError:
        print(f"steerserve chat: cannot reach {args.base_url} (is `steerserve serve` running?)", file=sys.stderr)
        return 1
