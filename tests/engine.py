"""Real containers for the tests: podman, a base image, the project's image, docker-compose.

What it sets up, as pytest fixtures (used by test_engines.py):

* ``podman`` (session): a containers.conf of the tests' own (runc, cgroupfs,
  file events, fixed ulimits), handed to every podman call as CONTAINERS_CONF.
  The tests are skipped, with the reason, where podman cannot run containers
  (not root, a tool missing, `podman run` fails).
* ``base_image`` (session): Debian bookworm with python3, made by mmdebstrap and
  ``podman import`` once, then reused while the image of that recipe exists.
* ``image_build`` / ``image`` (session): a build context copied from the
  repository (pyproject.toml, README.md, Dockerfile, .dockerignore, zpipe/,
  services/) with a ``wheelhouse/`` of zpipe and all its dependencies (the
  dependencies' wheels are kept in ~/.cache/zpipe-tests/wheels), built with
  ``podman build --network none`` into zpipe-video-analytics:latest.
* ``engine`` (module): a podman API service inside a network namespace the test
  creates, so that what compose makes (netavark bridges, aardvark-dns, iptables
  rules) is made there, never on the host, and containers can reach nothing
  but each other. Everything is removed on the way out, also after a failure,
  and what is left (processes, the host's links) fails the run.
* ``compose`` (each test): docker-compose (v1) with that service as DOCKER_HOST,
  on the committed docker-compose.yml, project zpipetestPID; brought `down`
  afterwards. Its helpers read logs, exit statuses and the store's volume
  through the service, and ``shape`` limits what one container sends (tc).

podman's healthchecks run from systemd timers, which the test machines lack:
a test runs ``podman healthcheck run`` itself instead of waiting for "healthy".
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import processes_mentioning, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGE = "zpipe-video-analytics:latest"   # what docker-compose.yml runs
BASE_SUITE = "bookworm"                  # Python 3.11, as on the test machines: host wheels fit
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip")
BASE_IMAGE = f"zpipe-test-base:{BASE_SUITE}"
BASE_RECIPE = f"mmdebstrap --variant=apt --include={','.join(BASE_PACKAGES)} {BASE_SUITE}"
RECIPE_LABEL = "zpipe.test.recipe"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
ULIMITS = ("--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096")
CONTAINERS_CONF = """\
# The tests' own engine settings (CONTAINERS_CONF), whatever the machine's say.
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"

[network]
network_backend = "netavark"
"""
# The project's files the image is built from (see the Dockerfile).
CONTEXT_FILES = ("pyproject.toml", "README.md", "Dockerfile", ".dockerignore")
CONTEXT_FOLDERS = ("zpipe", "services")
# The same wheel from the same sources, so that podman's layer cache holds.
SOURCE_DATE_EPOCH = "315532800"
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"
TOOLS = ("podman", "runc", "conmon", "nsenter", "ip", "tc", "iptables", "docker-compose")
NETAVARK = ("/usr/lib/podman/netavark", "/usr/libexec/podman/netavark")


def wheel_cache() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "zpipe-tests" / "wheels"


def run(argv: list[str], timeout: float, env: dict[str, str] | None = None,
        check: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
    """``argv`` to completion, output captured; a timeout or (with ``check``) a failure
    is an AssertionError that shows the command and what it said."""
    try:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True,
                              timeout=timeout, env=env, check=False, **kwargs)  # type: ignore[call-overload]
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"timed out after {timeout:g} s: {' '.join(map(str, argv))}\n"
                             f"{_text(exc.stdout)}{_text(exc.stderr)}") from None
    if check and done.returncode != 0:
        raise AssertionError(f"exit {done.returncode}: {' '.join(map(str, argv))}\n"
                             f"{done.stdout}{done.stderr}")
    return done


def _text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else output or ""


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(text.splitlines()[-lines:])


def host_links() -> set[str]:
    """The names of the host's network links (``ip link``)."""
    out = run(["ip", "-o", "link", "show"], 30, check=True).stdout
    return {line.split(":", 2)[1].strip().split("@")[0] for line in out.splitlines()}


def namespaces() -> set[str]:
    """The names `ip netns list` gives."""
    out = run(["ip", "netns", "list"], 30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def unavailable() -> str | None:
    """Why this machine cannot run the tests' containers, or None."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return "needs root on Linux (rootful podman in a network namespace of the test's own)"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not any(Path(path).exists() for path in NETAVARK):
        missing.append("netavark")
    if missing:
        return f"needs {', '.join(missing)} (.ci/run installs them with apt-get)"
    return None


class Podman:
    """The podman command, always with the tests' containers.conf."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}

    def __call__(self, *args: str, timeout: float = 60,
                 check: bool = False, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return run(["podman", *args], timeout, self.env, check, **kwargs)


@pytest.fixture(scope="session")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    return Podman(tmp_path_factory.mktemp("podman"))


# -- the base image ------------------------------------------------------------

def ensure_base(podman: Podman) -> str | None:
    """Make BASE_IMAGE unless an image of this recipe is there; why not, or None."""
    recipe = hashlib.sha256(BASE_RECIPE.encode()).hexdigest()[:16]
    have = podman("image", "inspect", "--format", f'{{{{index .Labels "{RECIPE_LABEL}"}}}}',
                  BASE_IMAGE)
    if have.returncode == 0 and have.stdout.strip() == recipe:
        return None
    if shutil.which("mmdebstrap") is None:
        return f"needs mmdebstrap to make the base image {BASE_IMAGE}"
    argv = [*BASE_RECIPE.split(), "-"]
    errors = podman.folder / "mmdebstrap.log"
    with open(errors, "w") as log:
        debootstrap = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        try:
            imported = podman("import", "--change", f"ENV PATH={PATH}",
                              "--change", f"LABEL {RECIPE_LABEL}={recipe}",
                              "-", BASE_IMAGE, timeout=600, stdin=debootstrap.stdout)
        finally:
            debootstrap.stdout.close()  # type: ignore[union-attr]
            if debootstrap.poll() is None:
                try:
                    debootstrap.wait(60)
                except subprocess.TimeoutExpired:
                    debootstrap.kill()
                    debootstrap.wait()
    if debootstrap.returncode != 0 or imported.returncode != 0:
        podman("rmi", "--force", BASE_IMAGE)
        return (f"could not make the base image ({' '.join(argv)} | podman import): "
                f"{tail(errors.read_text(), 5)} {imported.stderr.strip()}")
    return None


@pytest.fixture(scope="session")
def base_image(podman: Podman) -> str:
    """The base image, made once; skips if podman cannot run a container from it."""
    reason = ensure_base(podman)
    if reason:
        pytest.skip(reason)
    probe = podman("run", "--rm", "--network", "none", *ULIMITS, BASE_IMAGE, "true")
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here (podman run --rm {BASE_IMAGE} true: "
                    f"exit {probe.returncode}): {tail(probe.stderr, 5)}")
    return BASE_IMAGE


# -- the project's image -------------------------------------------------------

def make_context(context: Path) -> Path:
    """Copy what the Dockerfile builds from into ``context``."""
    for name in CONTEXT_FILES:
        shutil.copy2(ROOT / name, context / name)

    def ignore(folder: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == "__pycache__" or n.endswith(".pyc")}
        if Path(folder) == ROOT / "services":
            skip.add("out")  # what an earlier run wrote
        return skip

    for name in CONTEXT_FOLDERS:
        shutil.copytree(ROOT / name, context / name, ignore=ignore)
    return context


def fill_wheelhouse(context: Path) -> str:
    """``pip wheel`` zpipe and its dependencies into context/wheelhouse: offline from
    the wheel cache when it holds them all, otherwise from the index (then the
    cache keeps the new ones). What pip said."""
    wheelhouse, cache = context / "wheelhouse", wheel_cache()
    cache.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SOURCE_DATE_EPOCH": SOURCE_DATE_EPOCH,
           "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    wheel = [*pip, "wheel", "--wheel-dir", wheelhouse, "--find-links", cache, context]
    done = run([*wheel, "--no-index"], 300, env)
    if done.returncode != 0:
        # The build backend too (pyproject's build-system), for the next offline build.
        requires = tomllib.loads((context / "pyproject.toml").read_text())["build-system"]
        run([*pip, "download", "--only-binary", ":all:", "--dest", cache,
             *requires["requires"]], 300, env)
        done = run(wheel, 300, env, check=True)
        for found in wheelhouse.glob("*.whl"):
            if not found.name.startswith("zpipe-"):
                shutil.copy2(found, cache / found.name)
    # pip builds a local folder in place: none of that goes into the image.
    shutil.rmtree(context / "build", ignore_errors=True)
    for egg in context.glob("*.egg-info"):
        shutil.rmtree(egg)
    return done.stdout + done.stderr


@dataclass
class Build:
    context: Path
    argv: list[str]
    result: subprocess.CompletedProcess[str]

    @property
    def output(self) -> str:
        return self.result.stdout + self.result.stderr


@pytest.fixture(scope="session")
def image_build(podman: Podman, base_image: str,
                tmp_path_factory: pytest.TempPathFactory) -> Build:
    """The project's image built offline on the base (the result, passed or not)."""
    context = make_context(tmp_path_factory.mktemp("context"))
    fill_wheelhouse(context)
    old = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    argv = ["build", "--network", "none", *ULIMITS, "--build-arg", f"BASE={base_image}",
            "-t", IMAGE, str(context)]
    result = podman(*argv, timeout=600)
    new = podman("image", "inspect", "--format", "{{.Id}}", IMAGE).stdout.strip()
    if old and new != old:
        podman("rmi", old)  # the previous build's image, now without a name
    if result.returncode == 0:
        prune_earlier_builds(podman, result.stdout)
    return Build(context, argv, result)


def prune_earlier_builds(podman: Podman, output: str) -> None:
    """Remove what earlier builds on the test base left without a name (their build
    stages, a few hundred MB each), but not the images this build made or took
    from the cache (``--> ID`` in its output): those are the next one's cache."""
    used = re.findall(r"^--> (?:Using cache )?([0-9a-f]{11,64})\b", output, re.MULTILINE)
    stale = podman("images", "--quiet", "--filter", "dangling=true",
                   "--filter", f"label={RECIPE_LABEL}").stdout.split()
    for image_id in stale:
        if not any(u.startswith(image_id) or image_id.startswith(u) for u in used):
            podman("rmi", image_id)


@pytest.fixture(scope="session")
def image(image_build: Build) -> str:
    if image_build.result.returncode != 0:
        pytest.fail(f"podman {' '.join(image_build.argv)} failed:\n{tail(image_build.output)}")
    return IMAGE


# -- the engine, in a network namespace of its own --------------------------------

class Engine:
    """``podman system service`` inside network namespace zpeng-PID.

    The service joins only that namespace's network (nsenter --net): `ip netns
    exec` would also mount a fresh /sys over the host's, which hides the cgroup
    hierarchies, and runc then cannot create a container ("no cgroup mount found").
    netavark, run by the service, makes its bridges and rules in that namespace,
    which has nothing but loopback and those bridges: no route leads out.
    """

    def __init__(self, podman: Podman, folder: Path):
        self.podman = podman
        self.namespace = f"zpeng-{os.getpid()}"
        self.socket = folder / "podman.sock"
        self.url = f"unix://{self.socket}"
        self.log = folder / "service.log"
        self.proc: subprocess.Popen[str] | None = None
        self.links = host_links()
        self.projects: list[str] = []

    def remote(self, *args: str, timeout: float = 60,
               check: bool = False) -> subprocess.CompletedProcess[str]:
        """podman, through the service."""
        return self.podman("--remote", "--url", self.url, *args, timeout=timeout, check=check)

    def start(self) -> None:
        run(["ip", "netns", "add", self.namespace], 30, check=True)
        run(["ip", "-n", self.namespace, "link", "set", "lo", "up"], 30, check=True)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{self.namespace}", "podman", "system",
                 "service", "--time=0", self.url],
                env=self.podman.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                start_new_session=True)
        proc = self.proc

        def up() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"podman system service exited {proc.returncode}:\n"
                                     f"{tail(self.log.read_text())}")
            return self.socket.exists() and self.remote("version", timeout=30).returncode == 0

        wait_until(up, timeout=30, interval=0.1, what="the podman service")

    def bridges(self) -> list[str]:
        """The bridges inside the engine's namespace."""
        out = run(["ip", "-n", self.namespace, "-o", "link", "show", "type", "bridge"], 30,
                  check=True).stdout
        return [line.split(":", 2)[1].strip() for line in out.splitlines()]

    def new_host_links(self) -> set[str]:
        return host_links() - self.links

    def stop(self) -> None:
        """Remove what the tests' projects left, stop the service, delete the namespace;
        then fail if anything outlived it."""
        problems = []
        try:
            for project in self.projects:
                problems += self._remove_project(project)
        finally:
            if self.proc is not None and self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(20)
                except subprocess.TimeoutExpired:
                    problems.append("podman system service ignored SIGTERM for 20 s")
                    self.proc.kill()
                    self.proc.wait(10)
            pids = run(["ip", "netns", "pids", self.namespace], 30).stdout.split()
            for pid in pids:  # started by this engine (aardvark-dns, conmon): ours to end
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            if pids:
                problems.append(f"processes left in {self.namespace}: {pids}")
            run(["ip", "netns", "delete", self.namespace], 30)
            shutil.rmtree(Path("/etc/netns") / self.namespace, ignore_errors=True)
        left = processes_mentioning(str(self.socket))
        for project in self.projects:
            left += processes_mentioning(project)
        if left:
            problems.append(f"processes left running: {sorted(set(left))}")
        if self.namespace in namespaces():
            problems.append(f"network namespace {self.namespace} was not deleted")
        if self.new_host_links():
            problems.append(f"new links on the host: {sorted(self.new_host_links())}")
        assert not problems, "; ".join(problems)

    def _remove_project(self, project: str) -> list[str]:
        """Remove the containers, networks and volumes of ``project`` still there (after
        a failed `down`); what there was. Through the service, or without it if it
        is gone (the same storage)."""
        podman = self.remote if self.remote("version", timeout=30).returncode == 0 else \
            self.podman
        left = []
        for kind in ("container", "network", "volume"):
            listing = ["ps", "--all", "--quiet"] if kind == "container" else [kind, "ls", "--quiet"]
            found = podman(*listing, "--filter", f"label={PROJECT_LABEL}={project}", check=True)
            for name in found.stdout.split():
                left.append(f"{kind} {name}")
                if kind == "container":
                    podman("rm", "--force", "--time", "0", name)
                else:
                    podman(kind, "rm", "--force", name)
        return [f"left by project {project}: {', '.join(left)}"] if left else []


@pytest.fixture(scope="module")
def engine(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engine]:
    eng = Engine(podman, tmp_path_factory.mktemp("engine"))
    try:
        eng.start()
        yield eng
    finally:
        eng.stop()


# -- docker-compose ---------------------------------------------------------------

class Compose:
    """docker-compose (v1) with the engine's socket as DOCKER_HOST, project zpipetestPID."""

    def __init__(self, engine: Engine, file: Path, project: str):
        self.engine = engine
        self.file = file
        self.project = project
        self.document = yaml.safe_load(file.read_text())
        self.services = list(self.document["services"])
        self.env = {**engine.podman.env, "DOCKER_HOST": engine.url}
        if project not in engine.projects:
            engine.projects.append(project)
        self._ids: dict[str, str] = {}

    def __call__(self, *args: str, timeout: float = 120,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        return run(["docker-compose", "--ansi", "never", "--project-name", self.project,
                    "--file", self.file, *args], timeout, self.env, check, cwd=self.file.parent)

    def up(self, *services: str) -> None:
        """Start ``services`` (all of them if none are named) and what they depend on."""
        self("up", "--no-build", "--detach", *services)

    def shape(self, service: str, rate: str) -> None:
        """Limit what ``service``'s container sends to ``rate`` (tc's token bucket on
        its eth0, inside the container's own network namespace)."""
        sandbox = self.inspect(service)["NetworkSettings"]["SandboxKey"]
        run(["nsenter", f"--net={sandbox}", "tc", "qdisc", "add", "dev", "eth0", "root",
             "tbf", "rate", rate, "burst", "32kbit", "latency", "100ms"], 30, check=True)

    def down(self) -> subprocess.CompletedProcess[str]:
        return self("down", "--volumes", "--timeout", "5", timeout=120, check=False)

    def container(self, service: str) -> str:
        """The ID of ``service``'s container."""
        if service not in self._ids:
            found = self.engine.remote("ps", "--all", "--quiet", "--no-trunc",
                                       "--filter", f"label={PROJECT_LABEL}={self.project}",
                                       "--filter", f"label={SERVICE_LABEL}={service}",
                                       check=True).stdout.split()
            assert len(found) == 1, f"containers of service {service}: {found}"
            self._ids[service] = found[0]
        return self._ids[service]

    def inspect(self, service: str) -> dict:
        out = self.engine.remote("inspect", self.container(service), check=True).stdout
        return json.loads(out)[0]

    def logs(self, service: str) -> str:
        done = self.engine.remote("logs", self.container(service), check=True)
        return done.stdout + done.stderr

    def wait_for_log(self, service: str, pattern: str, timeout: float) -> re.Match[str]:
        """The first match of ``pattern`` in ``service``'s log, once there."""
        return wait_until(lambda: re.search(pattern, self.logs(service)), timeout=timeout,
                          interval=0.25, what=f"{pattern!r} in the log of {service}")

    def wait(self, service: str, timeout: float) -> int:
        """``service``'s exit status, once its container has stopped (its log in the
        message if it does not stop within ``timeout`` seconds)."""
        try:
            done = self.engine.remote("wait", self.container(service), timeout=timeout,
                                      check=True)
        except AssertionError as exc:
            raise AssertionError(f"{service} did not stop within {timeout:g} s ({exc}); "
                                 f"its log:\n{tail(self.logs(service))}") from None
        return int(done.stdout.split()[-1])

    def exit_codes(self) -> dict[str, int]:
        return {s: self.inspect(s)["State"]["ExitCode"] for s in self.services}

    def running(self, service: str) -> bool:
        return self.inspect(service)["State"]["Status"] == "running"

    def kill(self, service: str) -> None:
        """SIGKILL to ``service``'s container, which must be running."""
        done = self.engine.remote("kill", "--signal", "KILL", self.container(service))
        assert done.returncode == 0, (f"podman kill {service}: {done.stderr.strip()}; the "
                                      f"supervisor's log:\n{tail(self.logs('supervisor'))}")

    def healthcheck(self, service: str) -> subprocess.CompletedProcess[str]:
        """The service's healthcheck, run once now (exit 0: healthy)."""
        return self.engine.remote("healthcheck", "run", self.container(service), timeout=30)

    def read(self, service: str, path: str) -> str:
        """A file in ``service``'s container: from the volume mounted over its folder if
        there is one (readable while the container runs), else copied out."""
        for mount in self.inspect(service)["Mounts"]:
            inside = mount["Destination"].rstrip("/") + "/"
            if mount.get("Type") == "volume" and path.startswith(inside):
                found = Path(mount["Source"]) / path[len(inside):]
                return found.read_text() if found.exists() else ""
        copy = self.engine.podman.folder / f"copy-{self.project}-{service}"
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        done = self.engine.remote("cp", f"{self.container(service)}:{path}", str(copy))
        found = copy / Path(path).name
        return found.read_text() if done.returncode == 0 and found.exists() else ""

    def volume_mounts(self, service: str) -> dict[str, str]:
        """Named volumes of ``service`` in the compose file: name -> folder in the container."""
        mounts = {}
        for entry in self.document["services"][service].get("volumes", []):
            if isinstance(entry, str):
                source, _, target = entry.partition(":")
                target = target.split(":")[0]
            else:
                source, target = entry.get("source", ""), entry.get("target", "")
            if source in (self.document.get("volumes") or {}):
                mounts[source] = target
        return mounts


@pytest.fixture
def compose(engine: Engine, image: str) -> Iterator[Compose]:
    """The committed docker-compose.yml as project zpipetestPID on the engine, brought
    `down` afterwards; whatever `down` did not remove fails the test."""
    project = Compose(engine, COMPOSE_FILE, f"zpipetest{os.getpid()}")
    yield project
    down = project.down()
    problems = engine._remove_project(project.project)
    if down.returncode != 0:
        problems.append(f"docker-compose down: exit {down.returncode}: {tail(down.stderr)}")
    assert not problems, "; ".join(problems)
