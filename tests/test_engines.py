"""docker-compose.yml run for real: podman containers, driven by docker-compose.

Select with `pytest tests/test_engines.py`. The engine, the base image and the
project's image are set up once (tests/engine.py) and shared; the tests skip,
saying why, where podman cannot run containers. Every container's traffic stays
inside a network namespace of the test's own.

The example's camera is not paced: in containers its 300 frames pass in about
a second and a half. Where a test must act while frames flow (stop, kill), the
camera's container may send only 4 Mbit/s (about 25 frames a second, so some
twelve seconds in all): a token bucket (tc) on its interface, set before the
supervisor starts the run. Nothing else is changed: the committed file runs as is.
"""

from __future__ import annotations

import itertools
import json
import re
import shutil
import tomllib

import pytest
from conftest import wait_until

pytest.register_assert_rewrite("engine")
from engine import IMAGE, ROOT, ULIMITS, Build, Compose, Podman, tail

pytest_plugins = ["engine"]  # its fixtures: podman, base_image, image_build, engine, compose

pytestmark = pytest.mark.timeout(900)  # the first test builds the base image and the image

PIPELINE = tomllib.loads((ROOT / "services" / "pipeline.toml").read_text())
STAGES = [stage["name"] for stage in PIPELINE["stages"]]
REPLICAS = [f"{stage['name']}-{i}" for stage in PIPELINE["stages"]
            for i in range(stage.get("replicas", 1))]
FRAMES = PIPELINE["stages"][0]["params"]["count"]
SOURCE, SINK = REPLICAS[0], REPLICAS[-1]
# Where the store writes (params.path is relative to pipeline.toml's folder, /app/services).
OUTPUT = "/app/services/" + PIPELINE["stages"][-1]["params"]["path"]
SOURCE_RATE = "4mbit"  # a frame is some 19 kB
FINISHED = re.compile(r"stage '([^']+)' finished: (\d+) in, (\d+) out")
JOINED = re.compile(r"replica (\S+) joined from (\S+) \(pid (\d+)\)")


def stored(project: Compose) -> list[int]:
    """The frame numbers in the store's output, in the order written."""
    return [json.loads(line)["frame"] for line in project.read(SINK, OUTPUT).splitlines()
            if line.endswith("}")]  # a line being written is not yet one


def finished(log: str) -> list[tuple[str, int, int]]:
    return [(name, int(received), int(sent)) for name, received, sent in FINISHED.findall(log)]


def start_slowly(project: Compose, frames: int = 20) -> None:
    """Start the example with the camera's output limited to SOURCE_RATE; return once
    ``frames`` frames are at the store."""
    project.up(*REPLICAS)  # the stages only: without the supervisor, no frame is sent
    project.shape(SOURCE, SOURCE_RATE)
    project.up()

    def flowing() -> bool:
        if len(stored(project)) >= frames:
            return True
        if not project.running("supervisor"):
            raise AssertionError(f"the supervisor ended before {frames} frames were stored; "
                                 f"its log:\n{tail(project.logs('supervisor'))}\n"
                                 f"exit statuses: {project.exit_codes()}")
        return False

    wait_until(flowing, timeout=90, interval=0.2, what=f"{frames} frames at the store")


def test_image_builds_offline_on_the_test_base(image_build: Build, podman: Podman) -> None:
    # Built with --network none: nothing can have been downloaded.
    assert image_build.result.returncode == 0, tail(image_build.output)
    config = json.loads(podman("image", "inspect", IMAGE, check=True).stdout)[0]["Config"]
    assert config["User"] == "10001", config
    script = (
        "id -u && stat -c '%u %n' services services/out && zpipe --version "
        # Installed by name from the wheelhouse (`pip install .` would record its folder).
        "&& python3 -c 'import importlib.metadata as m; "
        "print(m.distribution(\"zpipe\").read_text(\"direct_url.json\"))' "
        "&& test ! -e /src && test ! -e wheelhouse "
        "&& zpipe validate services/pipeline.toml")
    done = podman("run", "--rm", "--network", "none", *ULIMITS, IMAGE, "sh", "-c", script)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[:3] == ["10001", "10001 services", "10001 services/out"], done.stdout
    assert lines[3].startswith("zpipe, version"), done.stdout
    assert lines[4] == "None", done.stdout
    assert lines[-1] == "ok", done.stdout


def test_example_completes_in_containers_with_every_frame(compose: Compose) -> None:
    compose.up()
    assert not compose.engine.new_host_links()  # compose's network is not on the host
    status = compose.wait("supervisor", timeout=120)
    codes = {service: compose.wait(service, timeout=30) for service in compose.services}
    log = compose.logs("supervisor")
    assert status == 0, tail(log)
    assert codes == dict.fromkeys(compose.services, 0), codes
    # Every replica is PID 1 of a container of its own, on a host of its own.
    joined = {name: (host, pid) for name, host, pid in JOINED.findall(log)}
    assert sorted(joined) == sorted(REPLICAS), log
    assert len({host for host, _ in joined.values()}) == len(REPLICAS), joined
    assert {pid for _, pid in joined.values()} == {"1"}, joined
    assert "replica detector-1 joined from" in log
    # The store's output is in the volume the file names (when it names one).
    for volume, folder in compose.volume_mounts(SINK).items():
        mounts = {m["Destination"]: m.get("Name", "") for m in compose.inspect(SINK)["Mounts"]}
        assert mounts.get(folder, "").endswith(volume), mounts
    assert stored(compose) == list(range(FRAMES))
    assert f"stage 'store' finished: {FRAMES} in, 0 out" in log
    assert not compose.engine.new_host_links()


def test_compose_stop_drains_in_order(compose: Compose) -> None:
    start_slowly(compose)
    # While it runs: the healthcheck's command says healthy; the network compose
    # made is a bridge in the engine's namespace, and nothing new is on the host.
    for service in (SOURCE, SINK):
        check = compose.healthcheck(service)
        assert check.returncode == 0, f"{service}: {check.stdout}{check.stderr}"
    assert compose.engine.bridges()
    assert not compose.engine.new_host_links()
    # The supervisor depends on every stage, so `stop` stops it first: SIGTERM,
    # zpipe's ordered drain. The stages then finish and exit by themselves.
    compose("stop", timeout=120)
    log = compose.logs("supervisor")
    codes = compose.exit_codes()
    assert codes.pop("supervisor") == 143, tail(log)  # 128 + SIGTERM: interrupted, drained
    assert codes == dict.fromkeys(codes, 0), codes
    counts = finished(log)
    assert [name for name, _, _ in counts] == STAGES, log  # in flow order
    made = counts[0][2]
    assert 0 < made < FRAMES, log
    frames = stored(compose)
    assert frames == list(range(made)), frames  # a prefix, without a gap
    # Nothing lost: each stage took in what the one before it sent.
    for (_, _, sent), (name, received, _) in itertools.pairwise(counts):
        assert received == sent, f"stage {name!r}: {received} in, {sent} sent to it\n{log}"
    assert "lost" not in log, log


def test_a_killed_stage_container_is_reported(compose: Compose) -> None:
    start_slowly(compose)
    # One of the detector's two replicas: the other one takes over its work.
    compose.kill("detector-1")
    compose.wait_for_log("supervisor", r"replica detector-1 [^\n]*goes on with 1 replica",
                         timeout=30)
    assert compose.running("supervisor") and compose.running("detector-0")
    # The tracker's only replica: nothing can take over, the run fails.
    assert "stage 'tracker' finished" not in compose.logs("supervisor")
    compose.kill("tracker-0")
    status = compose.wait("supervisor", timeout=60)
    log = compose.logs("supervisor")
    assert status == 1, tail(log)
    assert re.search(r"stage 'tracker' replica tracker-0\b[^\n]*(lost its connection|died)",
                     log), log
    # The others were stopped; the two killed ended by SIGKILL.
    codes = {service: compose.wait(service, timeout=30) for service in REPLICAS}
    assert codes["detector-1"] == codes["tracker-0"] == 137, codes


def test_a_users_folder_of_stages_builds_on_the_zpipe_image(image_build: Build, podman: Podman,
                                                            tmp_path) -> None:
    """`zpipe export dockerfile`: a team's own stages and requirements, on the zpipe target."""
    import subprocess
    import sys

    import zpipe
    assert image_build.result.returncode == 0, tail(image_build.output)
    base = f"zpipe:{zpipe.__version__}"
    built = podman("build", "--network", "none", *ULIMITS, "--target", "zpipe", "-t", base,
                   "--build-arg", image_build.argv[image_build.argv.index("--build-arg") + 1],
                   str(image_build.context), timeout=600)
    assert built.returncode == 0, tail(built.stdout + built.stderr)
    shop = tmp_path / "shop"
    shop.mkdir()
    (shop / "pipeline.toml").write_text(
        '[pipeline]\nname = "shop"\n[[stages]]\nname = "fetch"\nrun = "fetchers:fetch"\n'
        '[[stages]]\nname = "save"\nrun = "fetchers:save"\nvolumes = ["out"]\n')
    (shop / "fetchers.py").write_text(
        "import msgpack\n\ndef fetch():\n    yield from range(3)\n\n"
        "def save(item):\n    print(msgpack.packb(item))\n")
    # A requirement the wheelhouse holds: the build is offline (--network none).
    (shop / "requirements.txt").write_text("msgpack\n")
    shutil.copytree(image_build.context / "wheelhouse", tmp_path / "wheelhouse")
    exported = subprocess.run([sys.executable, "-m", "zpipe", "export", "dockerfile",
                               "shop/pipeline.toml", "-o", "Dockerfile"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60)
    assert exported.returncode == 0, exported.stderr
    user_image = "zpipe-shop:test"
    try:
        done = podman("build", "--network", "none", *ULIMITS, "-t", user_image, str(tmp_path),
                      timeout=600)
        assert done.returncode == 0, tail(done.stdout + done.stderr)
        ran = podman("run", "--rm", "--network", "none", *ULIMITS, user_image, "sh", "-c",
                     "id -u && stat -c '%u %n' shop/out && zpipe validate shop/pipeline.toml")
        assert ran.returncode == 0, ran.stdout + ran.stderr
        lines = ran.stdout.splitlines()
        assert lines[:2] == ["10001", "10001 shop/out"] and lines[-1] == "ok", ran.stdout
    finally:
        podman("rmi", "--force", user_image)
