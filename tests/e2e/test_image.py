"""The container image's node, run as the image runs it, without a container runtime.

No registry is reachable here to pull the image's base, so the image cannot be built. What it
adds to Python is its configuration, and that is run for real: the config file the
Dockerfile's own ``sample-config`` command writes, the image's ``/run/lmcache-mesh`` and
``/var/lib/lmcache-mesh`` (a private mount namespace puts fresh directories there, the volume
a host directory), its network (a fresh network namespace: 0.0.0.0:7700 and :9109 clash with
nothing), its user (where this checkout or Python sits under a directory others cannot
enter, e.g. /root, the namespace opens a way to just those paths), its CMD, its HEALTHCHECK
command, its STOPSIGNAL, and a restart on the same volume. The node dies with the test
process (``setpriv --pdeathsig``); every mount lives and dies with the private namespace.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from lmcache_mesh.node.config import ENV_PREFIX

from ..deploy.files import dockerfile, image_env, image_user, instructions
from ..helpers import payload
from ..netns import require_netns

STARTUP_TIMEOUT_S = 60.0
IMAGE_DIRS = (Path("/run"), Path("/var/lib"))
"""fresh tmpfs in the namespace: nothing the test needs may live under them"""
SETUP = r"""
set -e
ip link set lo up
mount -t tmpfs -o mode=755 tmpfs /run
mount -t tmpfs -o mode=755 tmpfs /var/lib
mkdir -p /run/lmcache-mesh /run/image /var/lib/lmcache-mesh
mount --bind "$VOLUME" /var/lib/lmcache-mesh
printf '%s' "$CONFIG_TEXT" > /run/image/lmcache-node.toml
chmod 644 /run/image/lmcache-node.toml
chown "$RUN_AS:$RUN_AS" /run/lmcache-mesh /var/lib/lmcache-mesh
eval "$UNBLOCK"
cd /
exec setpriv --pdeathsig KILL --reuid "$RUN_AS" --regid "$RUN_AS" --clear-groups \
    env -i PATH=/usr/bin:/bin HOME=/var/lib/lmcache-mesh PYTHONUNBUFFERED=1 \
    LMCACHE_MESH_CONFIG=/run/image/lmcache-node.toml ${MESH_SECRET:+LMCACHE_MESH_MESH_SECRET="$MESH_SECRET"} \
    "$PYTHON" -m lmcache_mesh.engines.cli "$@"
"""
MESH_SECRET = "the-mesh-secret"
"""as `docker run -e LMCACHE_MESH_MESH_SECRET=...` passes it"""


def python_paths() -> list[Path]:
    """What running this checkout's ``lmcache-node`` reads: the interpreter, the virtual
    environment, the standard library and the source."""
    import lmcache_mesh.node

    return [
        Path(sys.executable),
        Path(os.path.realpath(sys.executable)),
        Path(sys.prefix),
        Path(sys.base_prefix),
        Path(lmcache_mesh.node.__file__).parent.parent,
    ]


def unblock(paths: list[Path]) -> str:
    """Shell lines (run in the private mount namespace) that let any user reach ``paths``:
    each directory on the way that others cannot enter is covered by an open tmpfs holding
    only the entries on the way, bound back from the original."""
    ways: dict[Path, set[str]] = {}
    for path in paths:
        parts = Path(os.path.realpath(path)).parts
        for i in range(1, len(parts)):
            parent = Path(*parts[:i])
            if not parent.stat().st_mode & 0o001:
                ways.setdefault(parent, set()).add(parts[i])
    q = shlex.quote
    lines = []
    for n, (parent, children) in enumerate(sorted(ways.items(), key=lambda kv: len(kv[0].parts))):
        hidden = f"/run/unblock/{n}"
        lines += [f"mkdir -p {hidden}", f"mount --bind {q(str(parent))} {hidden}"]
        lines += [f"mount -t tmpfs -o mode=755 tmpfs {q(str(parent))}"]
        for child in sorted(children):
            make = "mkdir" if (parent / child).is_dir() else "touch"
            lines += [f"{make} {q(str(parent / child))}"]
            lines += [f"mount --bind {hidden}/{q(child)} {q(str(parent / child))}"]
    return "\n".join(lines)


class ImageNode:
    """One run of the image's node (its CMD) in its own mount and network namespaces."""

    def __init__(
        self, volume: Path, config_text: str, uid: int, cmd: list[str], secret: str = MESH_SECRET
    ) -> None:
        self.uid = uid
        env = {
            **os.environ,
            "VOLUME": str(volume),
            "CONFIG_TEXT": config_text,
            "RUN_AS": str(uid),
            "PYTHON": sys.executable,
            "UNBLOCK": unblock(python_paths()),
            "MESH_SECRET": secret,
        }
        # unshare execs the shell in the new namespaces, which execs the node: one pid
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--net", "sh", "-c", SETUP, "sh", *cmd],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        started = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "serving on" in line:
                    started.set()
            started.set()

        threading.Thread(target=pump, daemon=True).start()
        if not started.wait(STARTUP_TIMEOUT_S) or self.proc.poll() is not None:
            self.kill()
            raise AssertionError("the image's node did not start:\n" + self.output())

    def output(self) -> str:
        return "".join(self.lines)

    def inside(self, argv: list[str], stdin: str = "") -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the node's namespaces as the image's user."""
        user = ["setpriv", "--pdeathsig", "KILL", "--reuid", str(self.uid), "--regid", str(self.uid)]
        return subprocess.run(
            ["nsenter", "-t", str(self.proc.pid), "-m", "-n", *user, "--clear-groups", *argv],
            capture_output=True,
            text=True,
            timeout=60,
            cwd="/",
            input=stdin,
        )

    def python(self, code: str, stdin: str = "") -> str:
        done = self.inside([sys.executable, "-c", code], stdin=stdin)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def stop(self, sig: signal.Signals) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def client_code(body: str) -> str:
    return (
        "import json, sys\nfrom lmcache_mesh.node import Client, chunk_keys, namespace_id\n"
        "ns = namespace_id(b'image-test', {'engine': 'test', 'dtype': 'f16'}, chunk_tokens=16)\n"
        "keys = chunk_keys(ns, list(range(16 * 4)), chunk_tokens=16)\n"
        "with Client('tcp://127.0.0.1:7700') as c:\n" + "".join(f"    {ln}\n" for ln in body.splitlines())
    )


def image_argv(instruction: str) -> list[str]:
    """An exec-form instruction's ``lmcache-node`` arguments (CMD, HEALTHCHECK ... CMD)."""
    (text,) = instructions(instruction)
    argv = json.loads(text[text.index("[") :])
    return [str(a) for a in argv[1 if argv[0] == "lmcache-node" else 0 :]]


def test_the_image_configuration_serves_passes_its_health_check_and_keeps_its_volume(tmp_path: Path) -> None:
    require_netns("unshare", "setpriv", "nsenter")
    volume = tmp_path / "volume"
    volume.mkdir()
    for needed in [*python_paths(), volume]:
        real = Path(os.path.realpath(needed))
        assert not any(real.is_relative_to(d) for d in IMAGE_DIRS), (
            f"{real} lies under a directory the image's layout replaces ({', '.join(map(str, IMAGE_DIRS))}): "
            "run the tests from a checkout and temporary directory elsewhere"
        )
    config_text = Path(image_env(tmp_path)[ENV_PREFIX + "CONFIG"]).read_text()
    _, uid = image_user()
    assert uid != 0, "the image runs its node as a user of its own"
    (entrypoint,) = instructions("ENTRYPOINT")
    assert json.loads(entrypoint) == ["lmcache-node"]
    cmd = image_argv("CMD")
    health = [sys.executable, "-m", "lmcache_mesh.engines.cli", *image_argv("HEALTHCHECK")]
    (stop_name,) = instructions("STOPSIGNAL")
    stop_signal = signal.Signals[stop_name]
    assert "HEALTHCHECK" in dockerfile() and cmd == ["run"]

    # without a mesh secret the image's node, listening on 0.0.0.0, refuses to start
    try:
        ImageNode(volume, config_text, uid, cmd, secret="").kill()
        raise AssertionError("the image's node started without a mesh secret")
    except AssertionError as refused:
        assert "refusing to listen at tcp://0.0.0.0:7700" in str(refused), str(refused)
    node = ImageNode(volume, config_text, uid, cmd)
    try:
        started = re.search(
            r"lmcache-node (\S+) .* serving on (tcp://\S+:7700) ipc:///run/lmcache-mesh/node.sock",
            node.output(),
        )
        assert started, node.output()
        check = node.inside(health)
        assert check.returncode == 0, check.stdout + check.stderr
        status = json.loads(check.stdout)
        assert status["node"]["name"] == started.group(1)  # the default name: HOST:PORT
        assert status["tiers"]["disk"]["capacity_bytes"] > 0  # the volume holds a disk tier
        sent = [payload(i, 64 << 10).hex() for i in range(4)]
        node.python(
            client_code(
                "for k, p in zip(keys, json.load(sys.stdin)):\n"
                "    c.put(k, bytes.fromhex(p), namespace=ns, meta={'tokens': 16})\n"
                "assert c.lookup(keys, local=True) == 4"
            ),
            stdin=json.dumps(sent),
        )
        metrics = node.python(
            "import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9109/metrics', timeout=10).read().decode())"
        )
        assert 'lmcache_tenant_requests_total{kind="puts",tenant="default"} 4.0' in metrics, metrics[-3000:]
        assert node.stop(stop_signal) == 0, node.output()
        assert "stopped" in node.output()
    finally:
        node.kill()

    files = [p for p in volume.rglob("*") if p.is_file()]
    assert files, "the node wrote nothing to its volume"
    assert all(p.stat().st_uid == uid for p in files), [(p, p.stat().st_uid) for p in files]

    # a new container on the same volume serves what the last one stored
    # without a mesh secret the image's node, listening on 0.0.0.0, refuses to start
    try:
        ImageNode(volume, config_text, uid, cmd, secret="").kill()
        raise AssertionError("the image's node started without a mesh secret")
    except AssertionError as refused:
        assert "refusing to listen at tcp://0.0.0.0:7700" in str(refused), str(refused)
    node = ImageNode(volume, config_text, uid, cmd)
    try:
        deadline = time.monotonic() + 30
        while node.inside(health).returncode != 0:
            assert time.monotonic() < deadline, node.output()
            time.sleep(0.5)
        got = node.python(client_code("print(json.dumps([bytes(p).hex() for p in c.get(keys)]))"))
        assert json.loads(got) == sent
        assert node.stop(stop_signal) == 0, node.output()
    finally:
        node.kill()
