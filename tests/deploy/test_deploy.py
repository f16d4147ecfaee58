"""deploy/ agrees with the code: every command, flag, setting and metric it names exists.

The container image and compose mesh cannot be built here (no registry for base images in
CI), so their commands are parsed by the real ``lmcache-node`` parser and their settings
loaded by the real config (``tests/e2e/test_image.py`` runs the image's node configuration
for real, in namespaces); the systemd unit goes through ``systemd-analyze verify``; the
dashboard's metrics are read off a real daemon's /metrics.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml

from lmcache_mesh.engines.cli import build_parser
from lmcache_mesh.engines.cli.daemon import refuse_open_mesh
from lmcache_mesh.engines.llamacpp.tinymodel import PRESETS
from lmcache_mesh.node import chunk_keys
from lmcache_mesh.node.config import ENV_PREFIX, SETTINGS, NodeConfig
from lmcache_mesh.node.settings import read_toml

from ..conftest import DaemonFactory
from ..helpers import free_port, payload
from .files import DEPLOY, dockerfile, image_env, lmcache_node, parse, run_config


def test_the_sample_config_documents_every_setting_and_is_what_the_generator_writes(tmp_path: Path) -> None:
    path = DEPLOY / "lmcache-node.toml"
    text = path.read_text()
    values = SETTINGS.file_values(read_toml(path, "sample"), "sample")
    assert text == NodeConfig.sample_toml(values), "regenerate with `lmcache-node sample-config --set ...`"
    # ...and deploy/README.md's command for it writes exactly this file
    readme = (DEPLOY / "README.md").read_text()
    command = re.search(r"^lmcache-node (sample-config .*?) > deploy/lmcache-node.toml$", readme, re.M | re.S)
    assert command is not None, "deploy/README.md shows the command that writes lmcache-node.toml"
    assert lmcache_node(shlex.split(command.group(1).replace("\\\n", " "))) == text
    for s in SETTINGS.settings:
        assert re.search(rf"^#? ?{re.escape(s.key)} = ", text, re.M), f"{s.key} is not in the sample"
    cfg = NodeConfig.load(path, env={})
    assert cfg.storage.data_dir == "/var/lib/lmcache-mesh" and cfg.mesh.profile == "wan"
    # every commented-out default is itself a valid setting
    every = tmp_path / "every.toml"
    every.write_text(re.sub(r"^# ([a-z][a-z-]* = )", r"\1", text, flags=re.M))
    assert set(SETTINGS.file_values(read_toml(every, "sample"), "sample")) == {
        s.key for s in SETTINGS.settings
    }
    NodeConfig.load(every, env={})


def test_the_systemd_unit_runs_the_cli_as_documented_and_verifies(tmp_path: Path) -> None:
    unit = (DEPLOY / "systemd" / "lmcache-node.service").read_text()
    exec_start = re.search(r"^ExecStart=(\S+) (.*)$", unit, re.M)
    assert exec_start is not None
    args = parse(exec_start.group(2).split())
    assert args.command == "run" and args.config == "/etc/lmcache-mesh/lmcache-node.toml"
    assert "Restart=on-failure" in unit and "StateDirectory=lmcache-mesh" in unit
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit  # rereads the allow-list
    # the mesh secret comes from a root-only file the unit's header says how to write
    assert "EnvironmentFile=-/etc/lmcache-mesh/mesh-secret.env" in unit
    assert "LMCACHE_MESH_MESH_SECRET=" in unit
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return  # the parse above still ran; verify where systemd is installed
    local = tmp_path / "lmcache-node.service"
    # verify checks that the binary exists: point it at this environment's entry point
    local.write_text(unit.replace(exec_start.group(1), sys.executable + " -m lmcache_mesh.engines.cli", 1))
    out = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True, timeout=60)
    problems = [ln for ln in (out.stdout + out.stderr).splitlines() if "lmcache-node.service" in ln]
    assert out.returncode == 0 and not problems, out.stdout + out.stderr


def test_the_image_settings_and_health_check_are_real(tmp_path: Path) -> None:
    text = dockerfile()
    env = image_env(tmp_path)
    cfg = NodeConfig.load(env[ENV_PREFIX + "CONFIG"], env=env)
    assert cfg.storage.data_dir == "/var/lib/lmcache-mesh" and cfg.metrics.port == 9109
    assert any(ep.startswith("ipc://") for ep in cfg.listen) and any(
        ep.startswith("tcp://") for ep in cfg.listen
    )
    health = re.search(r"HEALTHCHECK [^\[]*?CMD (\[[^\n]*\])", text, re.S)
    assert health is not None
    argv = json.loads(health.group(1))
    assert argv[0] == "lmcache-node"
    args = parse(argv[1:])
    assert args.command == "status" and args.node in cfg.listen
    assert re.search(r"^USER lmcache$", text, re.M) and re.search(
        r"^VOLUME /var/lib/lmcache-mesh$", text, re.M
    )
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, re.M).group(1))  # type: ignore[union-attr]
    assert parse(cmd).command == "run"
    # it listens on 0.0.0.0: without a mesh secret (or keys) the image's node refuses to start
    with pytest.raises(SystemExit, match="refusing to listen at tcp://0.0.0.0:7700"):
        refuse_open_mesh(run_config(parse(cmd), env), None)
    refuse_open_mesh(run_config(parse(cmd), {**env, ENV_PREFIX + "MESH_SECRET": "s"}), None)
    for path in re.findall(r"^COPY (\S+) ", text, re.M):
        for part in path.split():
            assert (DEPLOY.parent / part).exists(), f"the image copies {part}, which does not exist"


COMPOSE_SECRET = "from-the-shell"


def interpolate(value: str) -> str:
    """Compose's ``${VAR:?message}``: the shell's value (here COMPOSE_SECRET), which must be set."""
    required = re.fullmatch(r"\$\{LMCACHE_MESH_SECRET:\?[^}]+\}", value)
    return COMPOSE_SECRET if required else value


def test_every_compose_service_runs_a_real_command_with_real_settings(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    defaults = image_env(tmp_path)
    services = compose["services"]
    assert {"cloud-a", "cloud-b", "edge-node", "edge-serve"} <= set(services)
    names, joined = set(), []
    for name, svc in services.items():
        if "entrypoint" in svc:  # the model generator
            entry = svc["entrypoint"]
            assert entry[:3] == ["python", "-m", "lmcache_mesh.engines.llamacpp.tinymodel"]
            assert entry[entry.index("--preset") + 1] in PRESETS
            continue
        args = parse(svc["command"])
        env = {**defaults, **{k: interpolate(str(v)) for k, v in (svc.get("environment") or {}).items()}}
        assert all(k.startswith(ENV_PREFIX) for k in env)
        if args.command == "run":
            cfg = run_config(args, env)
            assert cfg.webrtc.mesh_secret == COMPOSE_SECRET  # from the shell, required
            refuse_open_mesh(cfg, None)  # listening on 0.0.0.0 with a mesh secret: it starts
            names.add(cfg.name)
            assert cfg.mesh.advertise == f"tcp://{name}:7700", f"{name} must advertise its service name"
            joined += [(name, j) for j in cfg.mesh.join]
        else:
            assert args.command == "serve" and args.node == "tcp://edge-node:7700"
            assert args.model.startswith("/models/")
    assert names == {"cloud-a", "cloud-b", "edge"}
    assert joined and all(seed == "tcp://cloud-a:7700" for _, seed in joined)


def test_the_dashboard_uses_only_metrics_a_node_exports(daemon_factory: DaemonFactory, ns: bytes) -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "lmcache-mesh.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\b(lmcache_[a-z_]+)\b", e)}
    assert len(used) >= 8
    port = free_port()
    d = daemon_factory("--metrics-port", str(port), "--disk", "0")
    with d.client() as c:
        keys = chunk_keys(ns, list(range(32)), 16)
        c.put(keys[0], payload(0), namespace=ns)
        c.get(keys[:2])
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    # samples, and the declared families (a counter with no samples yet is still exported)
    exported = set(re.findall(r"^(?:# TYPE )?(lmcache_[a-z_]+)[{ ]", body, re.M))
    assert used <= exported, f"the dashboard uses metrics no node exports: {sorted(used - exported)}"
    documented = (DEPLOY.parent / "README.md").read_text()
    for metric in sorted(used):
        base = re.sub(r"_(bucket|total)$", "", metric)
        assert base in documented, f"{base} is not documented in README.md"


@pytest.mark.parametrize("doc", ["README.md"])
def test_deploy_readme_covers_edge_cloud_and_joining(doc: str) -> None:
    text = (DEPLOY / doc).read_text()
    for topic in ("edge", "cloud", "--join", "compose", "systemd", "authorized_keys", "lmcache-node.toml"):
        assert topic in text, f"deploy/{doc} does not mention {topic}"


def test_the_readme_synopsis_lists_every_flag_of_every_command_and_no_other() -> None:
    readme = (DEPLOY.parent / "README.md").read_text()
    block = readme.split("## The `lmcache-node` command", 1)[1].split("```", 2)[1].strip()
    documented: dict[str, set[str]] = {}
    command = ""
    for line in block.splitlines():
        if line.startswith("lmcache-node "):
            command = line.split()[1]
        documented.setdefault(command, set()).update(re.findall(r"(--[a-z][a-z-]*)", line))
    subparsers = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = subparsers.choices
    assert set(documented) == set(commands), "every command has a synopsis line"
    for name, sub in commands.items():
        real = {s for a in sub._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
        assert documented[name] == real, (
            f"{name}: README lacks {real - documented[name]}, has extra {documented[name] - real}"
        )


@pytest.mark.parametrize("doc", ["README.md", "deploy/README.md"])
def test_every_link_within_the_docs_leads_somewhere(doc: str) -> None:
    path = DEPLOY.parent / doc
    text = path.read_text()
    # GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)  # a "# comment" in code is no heading
    anchors = {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(r"^#+ (.*)$", prose, re.M)
    }
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://")):
            continue
        file, _, anchor = target.partition("#")
        if file:
            assert (path.parent / file).exists(), f"{doc} links to {file}, which does not exist"
        elif anchor:
            assert anchor in anchors, f"{doc} links to #{anchor}; headings give {sorted(anchors)}"
