"""The `steerserve` command: serve, chat, bench, eval-context, heads profile, ab-eval, train, prepare-model,
loadtest, deploy render."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="steerserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    from steerserve.server.cli import add_serve_args

    p_serve = sub.add_parser("serve", help="start the OpenAI-compatible steering server")
    add_serve_args(p_serve)

    from steerserve.clients.chat import add_chat_args

    p_chat = sub.add_parser("chat", help="chat with a running server, with steering flags")
    add_chat_args(p_chat)

    from steerserve.clients.bench import add_bench_args

    p_bench = sub.add_parser("bench", help="throughput benchmark: plain vs steered vs Hugging Face hooks")
    add_bench_args(p_bench)

    from steerserve.clients.context_eval import add_eval_args, add_profile_args

    p_eval = sub.add_parser("eval-context", help="context-following evaluation of context-attention steering")
    add_eval_args(p_eval)
    p_heads = sub.add_parser("heads", help="head sets for context-attention steering")
    heads_sub = p_heads.add_subparsers(dest="heads_command", required=True)
    add_profile_args(heads_sub.add_parser("profile", help="profile (layer, head) pairs and write a head set"))

    from steerserve.clients.ab_eval import add_ab_eval_args

    p_ab = sub.add_parser("ab-eval", help="offline A/B evaluation of steering arms against a running server")
    add_ab_eval_args(p_ab)

    from steerserve.training.export import add_export_args
    from steerserve.training.sft import add_sft_args

    p_train = sub.add_parser("train", help="training utilities: fine-tune checkpoints the server serves, TAIA exports")
    train_sub = p_train.add_subparsers(dest="train_command", required=True)
    add_sft_args(train_sub.add_parser(
        "sft", help="supervised fine-tuning on chat data (full or LoRA; loss on assistant tokens only)"))
    add_export_args(train_sub.add_parser(
        "export-taia", help="TAIA export: attention-only adapter, or tuned attention + base FFN checkpoint"))
    from steerserve.training.evaluate import add_eval_args as add_train_eval_args

    add_train_eval_args(train_sub.add_parser(
        "eval", help="base vs tuned vs TAIA on offline multiple-choice sets (ARC, SciQ, BoolQ)"))
    from steerserve.training.proxy_demo import add_demo_args

    add_demo_args(train_sub.add_parser(
        "proxy-demo", help="build a proxy-tuning family: derived anti-expert, its tuned expert, a tuned base"))
    from steerserve.training.vectors import add_vector_args

    add_vector_args(train_sub.add_parser(
        "vectors", help="extract a residual steering vector from contrastive pairs (pca_diff or caa; GGUF + safetensors)"))
    from steerserve.training.vector_eval import add_vector_eval_args

    add_vector_eval_args(train_sub.add_parser(
        "eval-vectors", help="effect of a steering vector: offline sentiment of generations over a scale sweep"))
    from steerserve.training.proxy_eval import add_proxy_eval_args

    add_proxy_eval_args(train_sub.add_parser(
        "eval-proxy", help="base vs expert vs proxy-tuned base vs tuned base on an offline task; gap closed"))

    sub.add_parser("prepare-model", help="convert the embedded model once (done by serve when needed)")
    sub.add_parser("build-kernels", help="compile the steers' native kernels for this machine (today the CPU kernel "
                                         "of context attention; g++; done by ./run.sh setup; without it the "
                                         "slower torch pass runs)")

    from steerserve.clients.loadtest import add_loadtest_args

    add_loadtest_args(sub.add_parser(
        "loadtest", help="reliability: concurrent streaming clients with mixed steering, some hanging up"))

    from steerserve.deploy.render import add_render_args

    p_deploy = sub.add_parser("deploy", help="deployment: Kubernetes manifests from deploy/values.yaml")
    deploy_sub = p_deploy.add_subparsers(dest="deploy_command", required=True)
    add_render_args(deploy_sub.add_parser(
        "render", help="render Kubernetes manifests (single-gpu, multi-node or cpu) into a folder"))

    args = parser.parse_args(argv)
    if args.command == "serve":
        from steerserve.server.cli import serve

        serve(args)
    elif args.command == "chat":
        from steerserve.clients.chat import run_chat

        sys.exit(run_chat(args))
    elif args.command == "bench":
        from steerserve.clients.bench import run_bench

        run_bench(args)
    elif args.command == "eval-context":
        from steerserve.clients.context_eval import evaluate

        evaluate(args)
    elif args.command == "heads":
        from steerserve.clients.context_eval import profile_heads

        profile_heads(args)
    elif args.command == "ab-eval":
        import os

        from steerserve.clients.ab_eval import run_ab_eval

        args.api_key = args.api_key or os.environ.get("STEERSERVE_API_KEY")
        run_ab_eval(args)
    elif args.command == "train":
        if args.train_command == "sft":
            from steerserve.training.sft import run_sft

            run_sft(args)
        elif args.train_command == "eval":
            from steerserve.training.evaluate import run_eval

            run_eval(args)
        elif args.train_command == "eval-proxy":
            from steerserve.training.proxy_eval import run_proxy_eval

            run_proxy_eval(args)
        elif args.train_command == "vectors":
            from steerserve.training.vectors import run_train_vectors

            run_train_vectors(args)
        elif args.train_command == "eval-vectors":
            from steerserve.training.vector_eval import run_vector_eval

            run_vector_eval(args)
        elif args.train_command == "proxy-demo":
            from steerserve.training.proxy_demo import run_demo

            run_demo(args)
        else:
            from steerserve.training.export import export_taia

            print(export_taia(args.src, args.out, args.base))
    elif args.command == "prepare-model":
        from steerserve.server.model_store import ensure_embedded_model

        print(ensure_embedded_model())
    elif args.command == "build-kernels":
        from steerserve.patches.steers.engine import StepHandle

        try:
            for engine in StepHandle.for_registry().engines:
                for library in engine.build_kernels():
                    print(library)
        except RuntimeError as err:
            raise SystemExit(f"steerserve build-kernels: {err}") from None
    elif args.command == "loadtest":
        args.func(args)
    elif args.command == "deploy":
        from steerserve.deploy.render import run_render

        run_render(args)


if __name__ == "__main__":
    main()
