#!/usr/bin/env python3
"""Real launch of ``clusters/onprem.yaml`` on two hosts made of network namespaces.

Why: a cluster file that parses is not a cluster file that launches. This harness runs the same
``make cluster-up / cluster-sweep / cluster-tensorboard / cluster-down`` a user runs, with
``ray up`` speaking SSH to two "machines" that exist only on this one:

* two network namespaces joined by a veth pair, 10.250.0.1/24 (head) and 10.250.0.2/24
  (worker). The addresses exist only inside the namespaces, which have no default route, so
  every packet of the launch stays between them (plus each namespace's own loopback);
* an OpenSSH server in each, started as PID 1 of its own PID namespace (``unshare --pid``): the
  ``ray stop`` in the start commands then sees only that node's processes (never another Ray on
  this machine), and stopping the server ends every process of that node;
* a private mount namespace per node in which a folder of the run is bind-mounted over the SSH
  user's home (so ``~`` is per node, as on real machines), ``RAY_TMPDIR`` per node (sshd
  ``SetEnv``), and keys generated for the run. Otherwise the nodes share the host filesystem:
  they use this project's virtual environment (onprem.yaml's installs become a version check)
  and the run's folder is their "shared mount" for results;
* the ``ray up`` client runs inside the head namespace, the only place that reaches both
  addresses, exactly like a laptop on the cluster's network.

Then a job checks that both nodes run tasks under token authentication, the sweep
(``ffc-ray sweep sweeps/demo.yaml --address auto``) runs when that command exists (otherwise only
the job check: ``LaunchResult.mode`` says which), TensorBoard and the dashboard are reached
through SSH forwards only, ``ray down`` stops the head, and everything created is removed, also on
failure. A step this machine cannot do raises :class:`LaunchSkip` naming the step and the cause.

Usage: ``python clusters/netns_launch.py launch [--mode auto|sweep|check] [--logs DIR]``
(root), or ``make cluster-launch-test``. ``job-check`` is the entry point of the cluster job.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import pwd
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ONPREM_YAML = REPO / "clusters" / "onprem.yaml"
HEAD_IP = "10.250.0.1"
WORKER_IP = "10.250.0.2"
PREFIX_LEN = 24
#: Placeholders of onprem.yaml that a user (or this harness) fills in.
PLACEHOLDERS = ("HEAD_IP", "WORKER_IP_1", "SSH_USER")
TOKEN_MOUNT = "~/.ray/auth_token"
VENV_LINK = "~/ffc-venv"
DASHBOARD_REMOTE_PORT = 8265
TB_REMOTE_PORT = 6006
# Local ends of the forwards; the client shares the head's namespace, so they differ from the
# remote ports (a probe of the local port can only succeed through SSH).
DASHBOARD_LOCAL_PORTS = (18265, 18266)
TB_LOCAL_PORT = 16006
# Per node; Ray's default (30 % of RAM each) is needless for two nodes on one machine.
OBJECT_STORE_BYTES = 300 * 1024**2
# Ray's raylet aborts when its dashboard agent has not registered within 30 s (C++ default of
# agent_register_timeout_ms); on a loaded 2-core machine two nodes' agents took longer (the
# worker's raylet crashed in WaitForDashboardAgentPorts), so the launch copy allows 5 minutes.
AGENT_REGISTER_TIMEOUT_MS = 300_000
# A worker node without --temp-dir uses the head's temp dir path; on hosts sharing one filesystem
# both nodes then share one session folder, runtime_resources included, and the sweep driver
# died at its end with a bare "[Errno 2] No such file or directory" (its working dir most likely
# removed by the other node's runtime-env agent); with a temp dir per node the same sweep
# passed. Each node's sshd sets its own RAY_TMPDIR, expanded on the node.
NODE_TEMP_DIR_FLAG = "--temp-dir=$RAY_TMPDIR/ray"
SSHD = "/usr/sbin/sshd"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

log = logging.getLogger("ffc_ray.netns_launch")


class LaunchSkip(RuntimeError):
    """This machine cannot run a step of the launch; the message names the step and why."""

    def __init__(self, step: str, reason: str) -> None:
        super().__init__(f"step '{step}' cannot run here: {reason}")
        self.step = step
        self.reason = reason
        self.result: LaunchResult | None = None


class LaunchError(RuntimeError):
    """A step of the launch ran and failed (the message carries the tail of its log)."""

    result: LaunchResult | None = None


@dataclasses.dataclass
class LaunchResult:
    """What the launch measured; ``leftovers`` is filled by the cleanup (empty = all removed)."""

    mode: str = ""  # "sweep" (ffc-ray sweep ran) or "job-check" (the sweep command is absent)
    cluster_name: str = ""
    job_check: dict[str, Any] = dataclasses.field(default_factory=dict)
    sweep_name: str = ""
    sweep_results: str = ""  # where results.csv was found (inside the removed work dir if so)
    sweep_rows: list[dict[str, str]] = dataclasses.field(default_factory=list)
    checks: dict[str, Any] = dataclasses.field(default_factory=dict)
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    logs: str = ""


# --------------------------------------------------------------------------------------------
# Pure helpers (unit-tested without root)


def pinned_ray_version(pyproject: Path = REPO / "pyproject.toml") -> str:
    """The X.Y.Z of ``ray[...]==X.Y.Z`` in pyproject.toml: the one version every node runs."""
    match = re.search(r'"ray\[[^\]]*\]==([0-9][0-9.]*)"', pyproject.read_text())
    if not match:
        raise ValueError(f"{pyproject}: no pinned ray[...]==X.Y.Z dependency")
    return match.group(1)


def sweep_available(repo: Path = REPO) -> bool:
    """True once ``ffc-ray sweep`` (issue 5) and the tiny synthetic sweep exist."""
    return (repo / "ffc_ray" / "ray" / "sweep" / "cli.py").is_file() and (
        repo / "sweeps" / "demo.yaml"
    ).is_file()


def _placeholder_hits(text: str) -> list[str]:
    # RAY_HEAD_IP (set by the autoscaler) contains HEAD_IP: match whole identifiers only.
    return [p for p in PLACEHOLDERS if re.search(rf"(?<![A-Za-z0-9_]){p}(?![A-Za-z0-9_])", text)]


def _replace_once(commands: list[str], old: str, new: str, what: str) -> list[str]:
    hits = sum(c.count(old) for c in commands)
    if hits != 1:
        raise ValueError(f"onprem.yaml {what}: expected '{old}' exactly once, found {hits}")
    return [c.replace(old, new) for c in commands]


def fill_onprem(
    template: dict[str, Any],
    *,
    cluster_name: str,
    head_ip: str,
    worker_ips: list[str],
    ssh_user: str,
    ssh_private_key: str,
    token_path: str,
    venv: str,
    storage: str,
    ray_version: str,
    object_store_bytes: int = OBJECT_STORE_BYTES,
) -> dict[str, Any]:
    """The launch copy of onprem.yaml: placeholders filled, installs replaced by checks.

    Kept from the template: the provider type, file mounts (project and token), the
    ``~/.bashrc`` lines of the setup and every start command (token auth, 127.0.0.1 dashboard).
    Changed: the pip installs become a link of ``~/ffc-venv`` to this project's venv plus a
    version check (the namespaces share this filesystem and have no network); the head gets
    ``--node-ip-address`` (with no default route Ray cannot find its address); both get a small
    object store, a longer dashboard-agent registration timeout (a loaded 2-core machine) and
    their own Ray temp dir (``$RAY_TMPDIR``, set per node by the harness's sshd: the hosts share
    one filesystem); FFC_RAY_STORAGE points into the run's folder (the "shared mount").
    """
    cfg = copy.deepcopy(template)
    if cfg.get("provider", {}).get("type") != "local":
        raise ValueError("onprem.yaml: provider.type must be 'local'")
    cfg["cluster_name"] = cluster_name
    cfg["provider"]["head_ip"] = head_ip
    cfg["provider"]["worker_ips"] = list(worker_ips)
    cfg.setdefault("auth", {})
    cfg["auth"]["ssh_user"] = ssh_user
    cfg["auth"]["ssh_private_key"] = ssh_private_key

    mounts = cfg.get("file_mounts") or {}
    if TOKEN_MOUNT not in mounts:
        raise ValueError(f"onprem.yaml file_mounts: no '{TOKEN_MOUNT}' entry (the Ray token)")
    mounts[TOKEN_MOUNT] = token_path
    cfg["file_mounts"] = mounts

    bashrc = [c for c in cfg.get("setup_commands", []) if "~/.bashrc" in c]
    if not any(f"{VENV_LINK}/bin/activate" in c for c in bashrc):
        raise ValueError(f"onprem.yaml setup_commands: no line sourcing {VENV_LINK}/bin/activate")
    check = (
        f'{VENV_LINK}/bin/python -c "import ray, torch, ffc_ray; '
        f"assert ray.__version__ == '{ray_version}', ray.__version__\""
    )
    cfg["setup_commands"] = [f"ln -sfn {venv} {VENV_LINK}", *bashrc, check]

    head = [
        re.sub(r"FFC_RAY_STORAGE=\S+", f"FFC_RAY_STORAGE={storage}", c)
        for c in cfg["head_start_ray_commands"]
    ]
    head = _replace_once(
        head,
        "ray start --head",
        f"RAY_agent_register_timeout_ms={AGENT_REGISTER_TIMEOUT_MS} ray start --head "
        f"--node-ip-address={head_ip} --object-store-memory={object_store_bytes} "
        f"{NODE_TEMP_DIR_FLAG}",
        "head_start_ray_commands",
    )
    worker = [
        re.sub(r"FFC_RAY_STORAGE=\S+", f"FFC_RAY_STORAGE={storage}", c)
        for c in cfg["worker_start_ray_commands"]
    ]
    worker = _replace_once(
        worker,
        "ray start --address=",
        f"RAY_agent_register_timeout_ms={AGENT_REGISTER_TIMEOUT_MS} ray start "
        f"--object-store-memory={object_store_bytes} {NODE_TEMP_DIR_FLAG} --address=",
        "worker_start_ray_commands",
    )
    cfg["head_start_ray_commands"] = head
    cfg["worker_start_ray_commands"] = worker

    left = _placeholder_hits(yaml.safe_dump(cfg))
    if left:
        raise ValueError(f"onprem.yaml: placeholders left unfilled: {left}")
    return cfg


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def sum_of_squares(n: int) -> int:
    """sum_{i<n} i^2 in closed form, (n-1) n (2n-1) / 6: the reference for the job's tasks."""
    return (n - 1) * n * (2 * n - 1) // 6


# --------------------------------------------------------------------------------------------
# The job that runs on the cluster (entry point: `python clusters/netns_launch.py job-check`)


def job_check(expect_nodes: int, out: Path, timeout: float) -> dict[str, Any]:
    """Wait for ``expect_nodes`` alive nodes, run one pinned task on each, write ``out``."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    ray.init(address="auto")
    deadline = time.monotonic() + timeout
    while True:
        alive = [n for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expect_nodes:
            break
        if time.monotonic() > deadline:
            raise SystemExit(
                f"job-check: {len(alive)} of {expect_nodes} nodes alive after {timeout}s"
            )
        time.sleep(2)

    @ray.remote(num_cpus=0.1)
    def where(n: int) -> dict[str, Any]:
        return {
            "node_ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
            "home": os.environ.get("HOME", ""),
            "node_role": _read(Path.home() / "ffc_node_role"),
            "auth_mode": os.environ.get("RAY_AUTH_MODE", ""),
            "storage": os.environ.get("FFC_RAY_STORAGE", ""),
            "n": n,
            "sum_of_squares": sum(i * i for i in range(n)),
        }

    refs = [
        where.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
        ).remote(1000 + 7 * k)
        for k, node in enumerate(alive)
    ]
    tasks = ray.get(refs, timeout=300)
    report = {
        "ray_version": ray.__version__,
        "driver_auth_mode": os.environ.get("RAY_AUTH_MODE", ""),
        "nodes": [
            {
                "node_id": n["NodeID"],
                "ip": n["NodeManagerAddress"],
                "cpus": n["Resources"].get("CPU"),
            }
            for n in alive
        ],
        "tasks": [dict(t, requested_node_id=n["NodeID"]) for t, n in zip(tasks, alive)],
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(out)
    return report


# --------------------------------------------------------------------------------------------
# Machine plumbing


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _run(
    cmd: list[str],
    *,
    timeout: float,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
    check: bool = True,
    step: str = "",
) -> subprocess.CompletedProcess[str]:
    log.info("$ %s", " ".join(cmd))
    if log_path is None:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        output = (proc.stdout or "") + (proc.stderr or "")
    else:
        with open(log_path, "a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            try:
                proc = subprocess.run(
                    cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True, timeout=timeout
                )
            except subprocess.TimeoutExpired as exc:
                raise LaunchError(
                    f"{step or cmd[0]}: timed out after {timeout:.0f}s; log "
                    f"tail:\n{_tail(log_path)}"
                ) from exc
        output = _tail(log_path)
    if check and proc.returncode != 0:
        raise LaunchError(f"{step or cmd[0]}: exit {proc.returncode}:\n{output[-6000:]}")
    return proc


def _ns(ns: str, cmd: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *cmd]


def _netns_inode(ns: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{ns}").st_ino
    except OSError:
        return None


def _pids_in_netns(ns: str) -> list[int]:
    """Processes whose network namespace is ``ns``: all of them were started by this run."""
    inode = _netns_inode(ns)
    if inode is None:
        return []
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == inode:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _procs_matching(ns: str, needle: str) -> list[int]:
    return [p for p in _pids_in_netns(ns) if needle in _cmdline(p)]


def _kill_pids(pids: list[int], grace: float = 5.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for pid in pids:
            try:
                os.kill(pid, sig)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in alive):
            time.sleep(0.2)
        pids = [p for p in alive if Path(f"/proc/{p}").exists()]


def _probe(ns: str, kind: str, target: str, headers: dict[str, str] | None = None) -> str:
    """From inside ``ns``: 'open'/'refused'/... for tcp, the HTTP status (or error) for http."""
    code = (
        "import json, socket, sys, urllib.error, urllib.request\n"
        "kind, target, headers = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])\n"
        "try:\n"
        "    if kind == 'tcp':\n"
        "        host, port = target.rsplit(':', 1)\n"
        "        socket.create_connection((host, int(port)), timeout=5).close()\n"
        "        print('open')\n"
        "    else:\n"
        "        req = urllib.request.Request(target, headers=headers)\n"
        "        print(urllib.request.urlopen(req, timeout=10).status)\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(e.code)\n"
        "except ConnectionRefusedError:\n"
        "    print('refused')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__)\n"
    )
    proc = subprocess.run(
        _ns(ns, [sys.executable, "-c", code, kind, target, json.dumps(headers or {})]),
        capture_output=True,
        text=True,
        timeout=30,
    )
    return proc.stdout.strip() or proc.stderr.strip()[-200:]


# --------------------------------------------------------------------------------------------
# Preflight: everything this machine must offer, else LaunchSkip with the step and cause


def _venv_dir() -> Path:
    prefix = Path(sys.prefix)
    if (prefix / "bin" / "ray").exists():
        return prefix
    return REPO / ".venv"


def _apt_install(packages: list[str]) -> None:
    """Install Debian packages without starting their services (policy-rc.d guard)."""
    if shutil.which("apt-get") is None:
        raise LaunchSkip("install " + " ".join(packages), "missing and apt-get is not available")
    policy = Path("/usr/sbin/policy-rc.d")
    created = False
    if not policy.exists():
        policy.write_text("#!/bin/sh\n# ffc_ray launch test: do not start services\nexit 101\n")
        policy.chmod(0o755)
        created = True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            raise LaunchSkip(
                "apt-get install " + " ".join(packages),
                f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-800:]}",
            )
    except subprocess.TimeoutExpired as exc:
        raise LaunchSkip("apt-get install " + " ".join(packages), "timed out after 600 s") from exc
    finally:
        if created:
            policy.unlink(missing_ok=True)


def preflight(install: bool = True) -> Path:
    """Check (and, as root, install) what the launch needs; returns the venv the nodes use."""
    if not sys.platform.startswith("linux"):
        raise LaunchSkip(
            "ip netns add", f"network namespaces are Linux only (this is {sys.platform})"
        )
    if os.geteuid() != 0:
        raise LaunchSkip("ip netns add", "creating network namespaces and veth pairs needs root")
    for tool in ("ip", "unshare", "make"):
        if shutil.which(tool) is None:
            raise LaunchSkip(f"find {tool}", f"'{tool}' is not installed")
    need = {
        "openssh-server": Path(SSHD).exists(),
        "openssh-client": shutil.which("ssh") is not None
        and shutil.which("ssh-keygen") is not None,
        "rsync": shutil.which("rsync") is not None,
    }
    missing = [pkg for pkg, ok in need.items() if not ok]
    if missing:
        if not install:
            raise LaunchSkip(
                "find " + " ".join(missing), "not installed and installing is disabled"
            )
        _apt_install(missing)
    venv = _venv_dir()
    ray_cli = venv / "bin" / "ray"
    if not ray_cli.exists():
        raise LaunchSkip("find the ray CLI", f"{ray_cli} does not exist (run `make install`)")
    want = pinned_ray_version()
    got = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import ray; print(ray.__version__)"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    if got != want:
        raise LaunchSkip("check the venv", f"{venv} has ray {got or '?'}, pyproject pins {want}")
    probe = f"ffcl-probe-{os.getpid()}"
    proc = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if proc.returncode != 0:
        raise LaunchSkip("ip netns add", proc.stderr.strip() or f"exit {proc.returncode}")
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return venv


# --------------------------------------------------------------------------------------------
# The launch


class _Launch:
    def __init__(self, venv: Path, mode: str, logs: Path | None) -> None:
        self.venv = venv
        self.user = getpass.getuser()
        self.user_home = pwd.getpwnam(self.user).pw_dir
        # Folders under the user's home the nodes still need (a checkout or venv there, or the
        # interpreter a venv links to, e.g. ~/.pyenv): shared into each node's private home.
        home = Path(self.user_home)
        self.keep_in_home = sorted(
            {
                p.relative_to(home).parts[0]
                for p in (REPO, venv, Path(os.path.realpath(venv / "bin" / "python")))
                if p != home and home in p.parents
            }
        )
        self.mode = mode
        self.work = Path(tempfile.mkdtemp(prefix="ffcl-", dir="/tmp"))  # short: socket paths
        self.work.chmod(0o700)
        tag = self.work.name.split("-", 1)[1][:6].lower().replace("_", "x")
        self.tag = tag
        self.ns = {"head": f"ffcl-{tag}-h", "worker": f"ffcl-{tag}-w"}
        self.veth = {"head": f"ffh{tag}", "worker": f"ffw{tag}"}
        self.ip = {"head": HEAD_IP, "worker": WORKER_IP}
        self.cluster_name = f"ffc-launch-{tag}"
        self.logs_out = logs
        self.log_dir = self.work / "logs"
        self.log_dir.mkdir()
        self.storage = self.work / "storage"
        self.storage.mkdir()
        self.sshd: dict[str, subprocess.Popen[bytes]] = {}
        self.created_ns: list[str] = []
        self.created_run_sshd = False
        self.cluster_yaml = self.work / "cluster.yaml"
        self.token = self.work / "auth_token"
        self.key = self.work / "id_ed25519"
        self.result = LaunchResult(cluster_name=self.cluster_name)
        self.ray_up_attempted = False

    # -- environment of the client (the `ray up` side, inside the head namespace)
    def client_env(self) -> dict[str, str]:
        home = self.work / "client" / "home"
        tmp = self.work / "client" / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": f"{self.venv / 'bin'}:{SYSTEM_PATH}",
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "RAY_TMPDIR": str(tmp),
            "LANG": "C.UTF-8",
            "TERM": "dumb",
            "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1",
        }

    def make(self, target: str, *variables: str, timeout: float, step: str) -> None:
        stamp = self.venv / ".installed"
        cmd = _ns(
            self.ns["head"],
            [
                "make",
                "--no-print-directory",
                "-C",
                str(REPO),
                "-o",
                str(stamp),
                target,
                f"VENV={self.venv}",
                f"CLUSTER={self.cluster_yaml}",
                f"RAY_TOKEN={self.token}",
                *variables,
            ],
        )
        t0 = time.monotonic()
        _run(
            cmd,
            timeout=timeout,
            env=self.client_env(),
            log_path=self.log_dir / f"{step}.log",
            step=step,
        )
        self.result.timings[step] = round(time.monotonic() - t0, 1)

    # -- hosts
    def make_hosts(self) -> None:
        t0 = time.monotonic()
        h, w = self.ns["head"], self.ns["worker"]
        for ns in (h, w):
            proc = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True)
            if proc.returncode != 0:
                raise LaunchSkip("ip netns add", proc.stderr.strip())
            self.created_ns.append(ns)
        proc = subprocess.run(
            [
                "ip",
                "link",
                "add",
                self.veth["head"],
                "netns",
                h,
                "type",
                "veth",
                "peer",
                "name",
                self.veth["worker"],
                "netns",
                w,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise LaunchSkip("ip link add ... type veth", proc.stderr.strip())
        for role in ("head", "worker"):
            ns, dev = self.ns[role], self.veth[role]
            for cmd in (
                ["ip", "-n", ns, "addr", "add", f"{self.ip[role]}/{PREFIX_LEN}", "dev", dev],
                ["ip", "-n", ns, "link", "set", dev, "up"],
                ["ip", "-n", ns, "link", "set", "lo", "up"],
            ):
                _run(cmd, timeout=30, step="configure veth")
        # Isolation: no default route, only lo + the veth in each namespace.
        for role, ns in self.ns.items():
            routes = _run(["ip", "-n", ns, "route", "show", "default"], timeout=30).stdout.strip()
            if routes:
                raise LaunchError(f"namespace {ns} has a default route: {routes}")
            links = _run(["ip", "-n", ns, "-o", "link", "show"], timeout=30).stdout
            names = sorted(re.findall(r"^\d+: ([^:@]+)", links, flags=re.M))
            if names != sorted(["lo", self.veth[role]]):
                raise LaunchError(f"namespace {ns} has unexpected links {names}")
        self.result.checks["default_routes"] = "none"
        self._keys_and_sshd()
        self.result.timings["hosts"] = round(time.monotonic() - t0, 1)

    def _keys_and_sshd(self) -> None:
        home = Path(self.user_home)
        _run(
            [
                "ssh-keygen",
                "-q",
                "-t",
                "ed25519",
                "-N",
                "",
                "-C",
                "ffc-launch",
                "-f",
                str(self.key),
            ],
            timeout=60,
            step="ssh-keygen",
        )
        (self.work / "authorized_keys").write_text((self.key.with_suffix(".pub")).read_text())
        (self.work / "authorized_keys").chmod(0o600)
        self.token.write_text(secrets.token_hex(32))
        self.token.chmod(0o600)
        run_sshd = Path("/run/sshd")  # privilege-separation dir sshd insists on
        if not run_sshd.exists():
            run_sshd.mkdir(mode=0o755, parents=True)
            self.created_run_sshd = True
        for role in ("head", "worker"):
            node = self.work / role
            (node / "home").mkdir(parents=True)
            (node / "tmp").mkdir()
            # Ray runs every remote command as `bash --login -c -i 'source ~/.bashrc; ...'`;
            # the setup commands append to this file. The marker tells the job which home it saw.
            (node / "home" / ".bashrc").write_text("# ffc_ray launch test node\n")
            (node / "home" / "ffc_node_role").write_text(role)
            _run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-f",
                    str(node / "ssh_host_ed25519_key"),
                ],
                timeout=60,
                step="ssh-keygen",
            )
            cfg = node / "sshd_config"
            cfg.write_text(
                "\n".join(
                    [
                        f"ListenAddress {self.ip[role]}",
                        "Port 22",
                        f"HostKey {node / 'ssh_host_ed25519_key'}",
                        f"PidFile {node / 'sshd.pid'}",
                        f"AuthorizedKeysFile {self.work / 'authorized_keys'}",
                        "PermitRootLogin prohibit-password",
                        "PubkeyAuthentication yes",
                        "PasswordAuthentication no",
                        "KbdInteractiveAuthentication no",
                        "UsePAM no",
                        "StrictModes no",  # the run's folder lives under /tmp (mode 1777)
                        "AllowTcpForwarding local",
                        "X11Forwarding no",
                        "PrintMotd no",
                        "MaxStartups 64",
                        "MaxSessions 64",
                        f"SetEnv RAY_TMPDIR={node / 'tmp'}",
                        "",
                    ]
                )
            )
            _run([SSHD, "-t", "-f", str(cfg)], timeout=30, step=f"sshd -t ({role})")
            out = open(self.log_dir / f"sshd-{role}.log", "w")
            # Each node: its own PID namespace with sshd as PID 1 (`ray stop` there sees this
            # node only; ending sshd ends the node) and its own mount namespace in which the
            # node's home folder is bind-mounted over the SSH user's home (OpenSSH expands the
            # `~` of `ssh -i ~/ray_bootstrap_key.pem` from the passwd entry, not from $HOME).
            script = ["set -e"]
            for child in self.keep_in_home:
                (node / "home" / child).mkdir()
                script.append(
                    f"mount --bind {shlex.quote(str(home / child))} "
                    f"{shlex.quote(str(node / 'home' / child))}"
                )
            script.append(
                f"mount --rbind {shlex.quote(str(node / 'home'))} {shlex.quote(str(home))}"
            )
            script.append(f"exec {SSHD} -D -e -f {shlex.quote(str(cfg))}")
            self.sshd[role] = subprocess.Popen(
                _ns(
                    self.ns[role],
                    [
                        "unshare",
                        "--pid",
                        "--fork",
                        "--mount-proc",
                        "--kill-child",
                        "sh",
                        "-c",
                        "\n".join(script),
                    ],
                ),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            out.close()
        deadline = time.monotonic() + 30
        for role in ("head", "worker"):
            while "Server listening" not in (self.log_dir / f"sshd-{role}.log").read_text():
                if self.sshd[role].poll() is not None or time.monotonic() > deadline:
                    raise LaunchError(
                        f"sshd ({role}) did not start:\n{_tail(self.log_dir / f'sshd-{role}.log')}"
                    )
                time.sleep(0.2)
        # Both directions, with the run's key, before Ray tries.
        for src, dst in (("head", "head"), ("head", "worker"), ("worker", "head")):
            _run(
                _ns(
                    self.ns[src],
                    [
                        "ssh",
                        "-i",
                        str(self.key),
                        "-o",
                        "IdentitiesOnly=yes",
                        "-o",
                        "BatchMode=yes",
                        "-o",
                        "StrictHostKeyChecking=no",
                        "-o",
                        "UserKnownHostsFile=/dev/null",
                        "-o",
                        "ConnectTimeout=10",
                        f"{self.user}@{self.ip[dst]}",
                        "true",
                    ],
                ),
                timeout=60,
                step=f"ssh {src} -> {dst}",
            )

    def write_cluster_yaml(self) -> None:
        template = yaml.safe_load(ONPREM_YAML.read_text())
        cfg = fill_onprem(
            template,
            cluster_name=self.cluster_name,
            head_ip=HEAD_IP,
            worker_ips=[WORKER_IP],
            ssh_user=self.user,
            ssh_private_key=str(self.key),
            token_path=str(self.token),
            venv=str(self.venv),
            storage=str(self.storage),
            ray_version=pinned_ray_version(),
        )
        self.cluster_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))

    # -- steps on the cluster
    def launch(self) -> None:
        self.make_hosts()
        self.write_cluster_yaml()
        self.ray_up_attempted = True
        self.make("cluster-up", timeout=600, step="ray-up")

        check_out = self.storage / "job_check.json"
        entry = (
            f"python clusters/netns_launch.py job-check --expect-nodes 2 --timeout 480 "
            f"--out {check_out}"
        )
        self.make(
            "cluster-sweep",
            f"SWEEP_ENTRYPOINT={entry}",
            f"DASHBOARD_PORT={DASHBOARD_LOCAL_PORTS[0]}",
            timeout=900,
            step="job-check",
        )
        self.result.job_check = json.loads(check_out.read_text())
        self.result.mode = "job-check"
        self._exposure_and_auth_checks()

        want_sweep = self.mode == "sweep" or (self.mode == "auto" and sweep_available())
        if want_sweep:
            self._sweep()
        self._tensorboard()
        self.make("cluster-down", timeout=300, step="ray-down")
        self.ray_up_attempted = False
        self._after_down()

    def _exposure_and_auth_checks(self) -> None:
        head, worker = self.ns["head"], self.ns["worker"]
        url = f"http://127.0.0.1:{DASHBOARD_REMOTE_PORT}/api/jobs/"
        token = self.token.read_text().strip()
        self.result.checks.update(
            {
                # bound to 127.0.0.1: not reachable on the node's own address, from either host
                "dashboard_on_head_ip_from_worker": _probe(worker, "tcp", f"{HEAD_IP}:8265"),
                "dashboard_on_head_ip_from_head": _probe(head, "tcp", f"{HEAD_IP}:8265"),
                "dashboard_no_token": _probe(head, "http", url),
                "dashboard_wrong_token": _probe(
                    head, "http", url, {"Authorization": "Bearer nope"}
                ),
                "dashboard_token": _probe(head, "http", url, {"Authorization": f"Bearer {token}"}),
                "gcs_from_worker": _probe(worker, "tcp", f"{HEAD_IP}:6379"),
            }
        )

    def _sweep(self) -> None:
        name = f"launch-{self.tag}"
        self.result.sweep_name = name
        self.make(
            "cluster-sweep",
            "SWEEP=sweeps/demo.yaml",
            f"SWEEP_NAME={name}",
            f"DASHBOARD_PORT={DASHBOARD_LOCAL_PORTS[1]}",
            timeout=2400,
            step="sweep",
        )
        self.result.mode = "sweep"
        found = self._find_results(name)
        if found is None:
            raise LaunchError(
                f"sweep '{name}' finished but no {name}/results.csv was found under "
                f"{self.storage}, {self.work} or {REPO}"
            )
        self.result.sweep_results = str(found)
        with open(found, newline="") as fh:
            self.result.sweep_rows = list(csv.DictReader(fh))
        if self.logs_out is not None:
            for f in found.parent.glob("results.*"):
                shutil.copy(f, self.log_dir / f"sweep-{f.name}")

    def _find_results(self, name: str) -> Path | None:
        direct = self.storage / name / "results.csv"
        if direct.is_file():
            return direct
        for root in (self.work, REPO):
            for hit in root.rglob("results.csv"):
                if hit.parent.name == name and ".venv" not in hit.parts:
                    return hit
        return None

    def _tensorboard(self) -> None:
        t0 = time.monotonic()
        out = open(self.log_dir / "tensorboard.log", "w")
        stamp = self.venv / ".installed"
        proc = subprocess.Popen(
            _ns(
                self.ns["head"],
                [
                    "make",
                    "--no-print-directory",
                    "-C",
                    str(REPO),
                    "-o",
                    str(stamp),
                    "cluster-tensorboard",
                    f"VENV={self.venv}",
                    f"CLUSTER={self.cluster_yaml}",
                    f"CLUSTER_TB_PORT={TB_LOCAL_PORT}",
                    f"CLUSTER_TB_REMOTE_PORT={TB_REMOTE_PORT}",
                    f"TB_LOGDIR={self.storage}",
                ],
            ),
            env=self.client_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        status = ""
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and proc.poll() is None:
                status = _probe(self.ns["head"], "http", f"http://127.0.0.1:{TB_LOCAL_PORT}/")
                if status == "200":
                    break
                time.sleep(2)
            self.result.checks["tensorboard_forwarded"] = status
            self.result.checks["tensorboard_on_head_ip_from_worker"] = _probe(
                self.ns["worker"], "tcp", f"{HEAD_IP}:{TB_REMOTE_PORT}"
            )
        finally:
            # Ctrl-C, as a user would: the target's trap stops the remote TensorBoard.
            try:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=90)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                _kill_pids([proc.pid])
        time.sleep(1)
        self.result.checks["tensorboard_left_running"] = len(
            _procs_matching(self.ns["head"], "tensorboard --logdir")
        )
        self.result.timings["tensorboard"] = round(time.monotonic() - t0, 1)
        if status != "200":
            raise LaunchError(
                f"TensorBoard not reached through the SSH forward (last: {status}):\n"
                f"{_tail(self.log_dir / 'tensorboard.log')}"
            )

    def _after_down(self) -> None:
        def wait_gone(ns: str, seconds: float) -> tuple[int, float]:
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                if not _procs_matching(ns, "raylet"):
                    return 0, round(time.monotonic() - t0, 1)
                time.sleep(1)
            return len(_procs_matching(ns, "raylet")), round(time.monotonic() - t0, 1)

        # `ray down` runs `ray stop` on the head; the local provider leaves workers running
        # until their raylet loses the GCS (Ray's reconnect timeout), so that is only recorded.
        left, _ = wait_gone(self.ns["head"], 30)
        self.result.checks["head_ray_procs_after_down"] = left
        left, waited = wait_gone(self.ns["worker"], 120)
        self.result.checks["worker_ray_procs_after_down"] = left
        self.result.checks["worker_ray_exit_s"] = waited

    def _collect_node_logs(self, dest: Path) -> None:
        """Ray's own logs of each node (autoscaler, raylet, GCS, jobs), last 200 kB of each."""
        patterns = ("monitor*", "raylet.*", "gcs_server.*", "dashboard.log", "job-driver-*")
        for role in ("head", "worker"):
            logs = self.work / role / "tmp" / "ray" / "session_latest" / "logs"
            if not logs.is_dir():
                continue
            for pattern in patterns:
                for f in logs.glob(pattern):
                    data = f.read_bytes()[-200_000:]
                    (dest / f"{role}-{f.name}").write_bytes(data)

    # -- cleanup, whatever happened
    def cleanup(self) -> None:
        t0 = time.monotonic()
        if self.ray_up_attempted:
            try:
                self.make("cluster-down", timeout=180, step="ray-down-cleanup")
            except Exception as exc:  # noqa: BLE001 - cleanup goes on regardless
                log.warning("ray down during cleanup failed: %s", exc)
        if self.logs_out is not None:
            try:
                self.logs_out.mkdir(parents=True, exist_ok=True)
                for f in self.log_dir.glob("*"):
                    shutil.copy(f, self.logs_out / f.name)
                if self.cluster_yaml.exists():
                    shutil.copy(self.cluster_yaml, self.logs_out / "cluster.yaml")
                self._collect_node_logs(self.logs_out)
                self.result.logs = str(self.logs_out)
            except OSError as exc:
                log.warning("could not keep the logs: %s", exc)
        # Every process in the run's namespaces (sshd, Ray, ssh masters, forwards) is ours.
        for ns in self.created_ns:
            _kill_pids(_pids_in_netns(ns))
        for proc in self.sshd.values():
            if proc.poll() is None:
                _kill_pids([proc.pid])
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for ns in self.created_ns:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        ssh_dir = Path("/tmp") / ("ray_ssh_" + hashlib.sha256(self.user.encode()).hexdigest()[:10])
        shutil.rmtree(
            ssh_dir / hashlib.sha256(self.cluster_name.encode()).hexdigest()[:10],
            ignore_errors=True,
        )
        if ssh_dir.is_dir() and not any(ssh_dir.iterdir()):
            ssh_dir.rmdir()
        shutil.rmtree(self.work, ignore_errors=True)
        if self.created_run_sshd:
            try:
                Path("/run/sshd").rmdir()
            except OSError:
                pass
        # What is still there is reported, never silently ignored.
        left = []
        for ns in self.created_ns:
            if _netns_inode(ns) is not None:
                left.append(f"netns {ns}")
        for role, proc in self.sshd.items():
            if proc.poll() is None:
                left.append(f"sshd ({role}) pid {proc.pid}")
        if self.work.exists():
            left.append(f"dir {self.work}")
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
        left += [f"link {v}" for v in self.veth.values() if re.search(rf"\b{v}\b", links)]
        self.result.leftovers = left
        self.result.timings["cleanup"] = round(time.monotonic() - t0, 1)


def run_launch(mode: str = "auto", logs: Path | None = None, install: bool = True) -> LaunchResult:
    """Launch, check, tear down, clean up (always). Raises LaunchSkip when the machine lacks a
    prerequisite and LaunchError when a step fails; both carry ``.result`` (its ``leftovers``
    say what the cleanup could not remove)."""
    if mode not in ("auto", "sweep", "check"):
        raise ValueError(f"mode must be auto, sweep or check, not {mode!r}")
    t0 = time.monotonic()
    venv = preflight(install=install)
    run = _Launch(venv, mode, logs)
    run.result.timings["preflight"] = round(time.monotonic() - t0, 1)
    try:
        run.launch()
    except LaunchSkip as exc:
        exc.result = run.result
        raise
    except LaunchError as exc:
        exc.result = run.result  # leftovers are filled in by the cleanup below
        raise
    except Exception as exc:  # an unexpected failure is still a failed step, with its result
        err = LaunchError(f"launch failed: {type(exc).__name__}: {exc}")
        err.result = run.result
        raise err from exc
    finally:
        run.cleanup()
        run.result.timings["total"] = round(time.monotonic() - t0, 1)
        log.info(
            "launch %s: timings %s leftovers %s",
            run.cluster_name,
            run.result.timings,
            run.result.leftovers,
        )
    return run.result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_launch = sub.add_parser("launch", help="the real launch (root)")
    p_launch.add_argument("--mode", choices=["auto", "sweep", "check"], default="auto")
    p_launch.add_argument("--logs", type=Path, default=None, help="keep step logs here")
    p_launch.add_argument("--no-install", action="store_true", help="never apt-get install")
    p_check = sub.add_parser("job-check", help="(runs on the cluster) nodes + pinned tasks")
    p_check.add_argument("--expect-nodes", type=int, required=True)
    p_check.add_argument("--out", type=Path, required=True)
    p_check.add_argument("--timeout", type=float, default=240.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.cmd == "job-check":
        print(json.dumps(job_check(args.expect_nodes, args.out, args.timeout), indent=1))
        return 0
    try:
        result = run_launch(args.mode, args.logs, install=not args.no_install)
    except LaunchSkip as exc:
        print(f"SKIPPED: {exc}", file=sys.stderr)
        return 77
    print(json.dumps(dataclasses.asdict(result), indent=1))
    return 0 if not result.leftovers else 1


if __name__ == "__main__":
    sys.exit(main())
