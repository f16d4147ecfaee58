"""What deploy/ says, read the way its tools would: commands through the real CLI parser,
settings through the real config, Dockerfile instructions whole."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

from lmcache_mesh.engines.cli import build_parser
from lmcache_mesh.node.config import ENV_PREFIX, SETTINGS, NodeConfig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` as ``lmcache-node`` reads it; a flag it does not know fails the test."""
    try:
        return build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"lmcache-node does not accept {argv}") from exc


def run_config(args: argparse.Namespace, env: dict[str, str]) -> NodeConfig:
    """The NodeConfig ``lmcache-node run`` would build from these flags and environment."""
    overrides = SETTINGS.flag_values(args)
    return NodeConfig.load(args.config or env.get(ENV_PREFIX + "CONFIG"), env=env, overrides=overrides)


def lmcache_node(argv: list[str]) -> str:
    """Run the real ``lmcache-node`` with ``argv``; its standard output."""
    out = subprocess.run(
        [sys.executable, "-m", "lmcache_mesh.engines.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def dockerfile() -> str:
    return (DEPLOY / "docker" / "Dockerfile").read_text()


def instructions(kind: str) -> list[str]:
    """The Dockerfile's ``kind`` instructions (RUN, ENV, ...), continuation lines joined,
    comment lines inside them dropped."""
    found, current = [], None
    for line in dockerfile().splitlines():
        if current is None:
            if line.startswith(kind + " "):
                current = line[len(kind) + 1 :]
            else:
                continue
        elif line.lstrip().startswith("#"):
            continue  # a comment inside an instruction does not end it
        else:
            current += " " + line.strip()
        if current.endswith("\\"):
            current = current[:-1]
        else:
            found.append(current)
            current = None
    return found


def image_env(tmp_path: Path) -> dict[str, str]:
    """The image's LMCACHE_MESH_* environment, its config file written here by running the
    Dockerfile's own ``lmcache-node sample-config`` command."""
    env = dict(re.findall(r"(LMCACHE_MESH_[A-Z_]+)=(\S+)", " ".join(instructions("ENV"))))
    (run,) = [r for r in instructions("RUN") if "sample-config" in r]
    command, redirect = run.split("lmcache-node ", 1)[1].split(">", 1)
    assert redirect.split() == [env[ENV_PREFIX + "CONFIG"]], "the image's config file is where it points"
    argv = shlex.split(command)
    assert parse(argv).command == "sample-config"
    local = tmp_path / "image-lmcache-node.toml"
    local.write_text(lmcache_node(argv))
    return {**env, ENV_PREFIX + "CONFIG": str(local)}


def image_user() -> tuple[str, int]:
    """The image's USER and its uid (from its ``useradd``)."""
    (user,) = instructions("USER")
    (useradd,) = [r for r in instructions("RUN") if "useradd" in r]
    uid = re.search(r"useradd [^&]*--uid (\d+)[^&]* " + re.escape(user) + r"\b", useradd)
    assert uid is not None, useradd
    return user, int(uid.group(1))
