"""docker-compose with ``driver: pyvol`` and ``driver_opts``, through pytest-docker.

pytest-docker's ``docker_services`` brings the project up once (``up --exit-code-from app``:
the service writes and exits) and takes it down with its volume (``down -v``) at the end of
the session, before the plugin is removed.
"""

from __future__ import annotations

import json
import shutil

import pytest
from e2e_support import (
    BUSYBOX,
    DRIVER,
    LABEL,
    POLL,
    Installed,
    cannot_run,
    inspect_volume,
    ok,
    pyvol,
    run,
)

from tests.support.waiting import wait_for

pytestmark = pytest.mark.e2e

# `driver: pyvol:latest`, not `driver: pyvol`: docker-compose 1.x compares the file's driver with
# the existing volume's, which dockerd records with the plugin's tag ("pyvol:latest"). With the
# bare name the first `up` creates the volume, and every later `up` or `run` of the project
# fails: "Configuration for volume data specifies driver pyvol, but a volume with the same name
# uses a different driver (pyvol:latest)".
COMPOSE_FILE = """\
version: "2.4"
services:
  app:
    image: {image}
    network_mode: none
    labels:
      {label}: "{token}"
    command: ["sh", "-c", "echo written-by-compose > /data/greeting && df -k /sized > /data/df"]
    volumes:
      - data:/data
      - sized:/sized
volumes:
  sized:
    driver: pyvol:latest
    driver_opts:
      size: 1G
  data:
    driver: pyvol:latest
    driver_opts:
      uid: "1000"
      gid: "1000"
      mode: "0750"
      snapshot_on_unmount: "true"
"""


@pytest.fixture(scope="session")
def docker_compose_command() -> str:
    # Debian's docker-compose 1.29 (scripts/provision.sh); there is no `docker compose` here.
    if shutil.which("docker-compose") is None:
        cannot_run("docker-compose is missing (Debian package docker-compose; make provision)")
    return "docker-compose"


@pytest.fixture(scope="session")
def docker_compose_project_name(pyvol_plugin: Installed) -> str:
    return f"pyvole2e{pyvol_plugin.token}"


@pytest.fixture(scope="session")
def docker_compose_file(pyvol_plugin: Installed,
                        tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("compose") / "docker-compose.yml"
    path.write_text(COMPOSE_FILE.format(image=BUSYBOX, label=LABEL, token=pyvol_plugin.token))
    return str(path)


@pytest.fixture(scope="session")
def docker_setup(pyvol_plugin: Installed) -> list[str]:
    # Depends on the plugin so that it is installed first and removed last.
    # (docker-compose 1.29 has no `up --wait`, pytest-docker's default.)
    return ["up --exit-code-from app"]


@pytest.fixture(scope="session")
def docker_cleanup() -> list[str]:
    return ["down -v"]


def test_compose_volume_gets_the_driver_opts_and_keeps_its_data(
    docker_services: object, docker_compose_file: str, docker_compose_project_name: str,
    pyvol_plugin: Installed,
) -> None:
    project = docker_compose_project_name
    vol = f"{project}_data"
    volume = inspect_volume(vol)
    assert volume["Driver"] == DRIVER
    assert volume["Options"] == {"uid": "1000", "gid": "1000", "mode": "0750",
                                 "snapshot_on_unmount": "true"}
    assert volume["Labels"]["com.docker.compose.project"] == project
    assert volume["Labels"]["com.docker.compose.volume"] == "data"
    assert volume["Status"]["options"] == {"backend": "local", "uid": "1000", "gid": "1000",
                                           "mode": "0750"}
    assert volume["Status"]["snapshot_policy"]["on_unmount"] is True
    assert (pyvol_plugin.volume_dir(vol) / "greeting").read_text() == "written-by-compose\n"
    sized = inspect_volume(f"{project}_sized")
    assert sized["Options"] == {"size": "1G"}
    assert sized["Status"]["backend"] == "image"
    assert sized["Status"]["size_limit"] == "1 GiB"
    df = (pyvol_plugin.volume_dir(vol) / "df").read_text().splitlines()[-1].split()
    assert 950 * 1024 <= int(df[1]) <= 1024 * 1024  # the app's df saw the 1 GiB limit

    compose = ["docker-compose", "-f", docker_compose_file, "-p", project]
    read = run([*compose, "run", "--rm", "-T", "app", "cat", "/data/greeting"], timeout=120)
    assert ok(read) == "written-by-compose\n"
    owner = run([*compose, "run", "--rm", "-T", "app", "stat", "-c", "%u:%g %a", "/data"],
                timeout=120)
    assert ok(owner) == "1000:1000 750\n"

    # One automatic snapshot per last unmount: the `up`, then the two runs.
    wait_for(lambda: "snapshot_state" not in inspect_volume(vol)["Status"], 30,
             "the snapshots to finish", pause=POLL)
    snaps = json.loads(ok(pyvol("snapshot", "ls", "--json", vol)))
    assert [s["kind"] for s in snaps] == ["automatic"] * 3
    written = len("written-by-compose\n") + (pyvol_plugin.volume_dir(vol) / "df").stat().st_size
    assert [s["size"] for s in snaps] == [written] * 3
