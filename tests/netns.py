"""Emulated hosts for tests: each a Linux network namespace with its own IP on a bridge.

The bridge lives in a namespace of its own, so no test traffic touches the
machine's interfaces; names resolve through /etc/netns/NAME/hosts, which
`ip netns exec` mounts over /etc/hosts. Any other name is asked of a DNS
server on the bridge that never answers (resolv.conf, mounted likewise): a
name taken out of the hosts files (``forget``) takes the resolver its full
timeout, as the name of a container that is gone can where the DNS server
forwards what it does not know to one out of reach. Everything is removed
on exit, also when the test fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

SUBNET = "10.213.{}.{}"
SILENT_DNS = "10.213.255.53"  # on the bridge's subnet, and nobody's


def available() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


class Hosts:
    """``with Hosts(["supervisor", "camera-0", ...]) as hosts: hosts.start(name, argv, env)``"""

    def __init__(self, names: list[str]):
        self.names = names
        tag = f"{os.getpid() % 100000}"
        self.bridge = f"zpbr{tag}"
        self.namespaces = {name: f"zph{tag}-{i}" for i, name in enumerate(names)}
        self.addresses = {name: SUBNET.format(1 + i // 250, 2 + i % 250)
                          for i, name in enumerate(names)}
        self.procs: dict[str, list[subprocess.Popen[str]]] = {name: [] for name in names}

    def __enter__(self) -> "Hosts":
        try:
            ip("netns", "add", self.bridge)
            ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge, "link", "set", "br0", "up")
            for i, name in enumerate(self.names):
                ns = self.namespaces[name]
                ip("netns", "add", ns)
                # The pair is made inside the bridge's namespace, its peer
                # placed straight into the host's: the root namespace never sees it.
                ip("-n", self.bridge, "link", "add", f"v{i}", "type", "veth",
                   "peer", "name", "eth0", "netns", ns)
                ip("-n", self.bridge, "link", "set", f"v{i}", "master", "br0", "up")
                ip("-n", ns, "addr", "add", f"{self.addresses[name]}/16", "dev", "eth0")
                ip("-n", ns, "link", "set", "eth0", "up")
                ip("-n", ns, "link", "set", "lo", "up")
                # The DNS server's MAC is nobody's: what is sent to it is dropped on
                # the bridge, with no ARP failure to cut the resolver's wait short.
                ip("-n", ns, "neigh", "add", SILENT_DNS, "lladdr", "02:00:00:00:00:53",
                   "dev", "eth0", "nud", "permanent")
                folder = Path("/etc/netns") / ns
                folder.mkdir(parents=True, exist_ok=True)
                # The longest wait glibc allows (30 s), once.
                (folder / "resolv.conf").write_text(f"nameserver {SILENT_DNS}\n"
                                                    f"options timeout:30 attempts:1\n")
            self._write_hosts(self.names)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _write_hosts(self, names: list[str]) -> None:
        hosts = "127.0.0.1 localhost\n" + "".join(f"{self.addresses[n]} {n}\n" for n in names)
        for ns in self.namespaces.values():
            (Path("/etc/netns") / ns / "hosts").write_text(hosts)

    def forget(self, name: str) -> None:
        """``name`` stops resolving on every host, slowly (see the module)."""
        self._write_hosts([n for n in self.names if n != name])

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path,
              **popen: object) -> subprocess.Popen[str]:
        proc = subprocess.Popen(["ip", "netns", "exec", self.namespaces[name], *argv], env=env,
                                cwd=cwd, text=True, **popen)  # type: ignore[call-overload]
        self.procs[name].append(proc)
        return proc

    def pids(self, name: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.namespaces[name]], capture_output=True,
                             text=True, timeout=30).stdout
        return [int(p) for p in out.split()]

    def kill_host(self, name: str) -> None:
        """Everything running on one host dies at once, as when a machine is lost."""
        for pid in self.pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def __exit__(self, *exc: object) -> None:
        listed = _listed()
        for name in self.names:
            if self.namespaces[name] in listed:
                self.kill_host(name)
            for proc in self.procs.get(name, []):
                if proc.poll() is None:
                    proc.kill()
                proc.wait(10)
        for ns in [*self.namespaces.values(), self.bridge]:
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)
            shutil.rmtree(Path("/etc/netns") / ns, ignore_errors=True)


def _listed() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}
