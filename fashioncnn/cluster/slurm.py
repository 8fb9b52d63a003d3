"""A single-node SLURM cluster on 127.0.0.1, to try the cluster path (`hydra/launcher=submitit_slurm`) on one machine.

    python -m fashioncnn.slurm --dir slurm        (what `make slurm` runs)

installs Debian's `slurmctld`, `slurmd` and `munge` when missing (as root, or with sudo), writes a
minimal slurm.conf into DIR (one node, `localhost`, with this machine's CPUs and memory, in a partition
`debug`; no accounting, no cgroups), makes a munge key there, starts munged, slurmctld and slurmd in the
foreground on loopback ports of their own, waits until `sinfo` shows the node idle and prints the
`export SLURM_CONF=...` that sbatch, squeue, scancel and submitit need. Ctrl-C or SIGTERM cancels the
cluster's jobs and stops all three. The test suite starts the same cluster (tests/conftest.py).
"""

from __future__ import annotations

import argparse
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PARTITION = "debug"
NODE = "localhost"
PACKAGES = ("slurmctld", "slurmd", "munge")
# The programs each package brings; any one missing means installing.
PROGRAMS = ("slurmctld", "slurmd", "munged", "mungekey", "sbatch", "sinfo", "squeue", "scancel")
UNIX_SOCKET_MAX = 100  # sun_path holds 108 bytes


class ClusterError(RuntimeError):
    """The cluster cannot be installed or started; one line saying why."""


def _program(name: str) -> str | None:
    return shutil.which(name) or next((str(p) for d in ("/usr/sbin", "/sbin") if (p := Path(d) / name).exists()), None)


def missing_programs() -> list[str]:
    return [name for name in PROGRAMS if _program(name) is None]


def install_packages() -> None:
    """apt-get install Debian's SLURM and munge packages when missing; ClusterError where that is impossible."""
    if not missing_programs():
        return
    if shutil.which("apt-get") is None:
        raise ClusterError(f"SLURM is not installed ({', '.join(missing_programs())} missing) and there is no apt-get "
                           f"to install it: install {' '.join(PACKAGES)} with your package manager")
    if os.geteuid() == 0:
        runner: list[str] = []
    elif shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        runner = ["sudo", "-n"]
    else:
        raise ClusterError(f"SLURM is not installed and installing it needs root: sudo apt-get install {' '.join(PACKAGES)}")
    print(f"Installing SLURM (Debian packages {' '.join(PACKAGES)})", flush=True)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.PIPE, "text": True}
    for step in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES]):
        done = subprocess.run([*runner, *step], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}, **quiet)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ClusterError(f"{' '.join(step)} failed (exit {done.returncode}): {last}")
    if missing_programs():
        raise ClusterError(f"installed {' '.join(PACKAGES)} but still missing: {', '.join(missing_programs())}")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    raise ClusterError("cannot read this machine's memory from /proc/meminfo")


class Cluster:
    """munged, slurmctld and slurmd of one single-node cluster whose files all live in `folder`.

    `kill_wait_s` is SLURM's KillWait: the seconds between the SIGTERM that scancel (or a time limit)
    sends a job's processes and the SIGKILL that follows.
    """

    def __init__(self, folder: Path, kill_wait_s: int = 30, start_timeout_s: float = 60) -> None:
        self.folder = folder.resolve()
        self.kill_wait_s = kill_wait_s
        self.start_timeout_s = start_timeout_s
        self.conf = self.folder / "slurm.conf"
        self.processes: dict[str, subprocess.Popen] = {}
        self._socket_dir: Path | None = None

    @property
    def env(self) -> dict[str, str]:
        """What a process that submits to this cluster (sbatch, squeue, submitit) needs in its environment."""
        return {"SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """Run a SLURM client command (sinfo, squeue, scancel, ...) against this cluster."""
        found = _program(args[0])
        if found is None:
            raise ClusterError(f"{args[0]} not found: install {' '.join(PACKAGES)}")
        return subprocess.run([found, *args[1:]], env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=60)

    def _write_config(self) -> Path:
        """slurm.conf and the munge key; returns the munge socket."""
        for name in ("state", "spool", "log", "munge"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        key_dir = self.folder / "munge-key"
        key_dir.mkdir(mode=0o700, exist_ok=True)
        key = key_dir / "munge.key"
        if not key.exists():
            subprocess.run([_program("mungekey") or "mungekey", "--create", f"--keyfile={key}", "--bits=1024"], check=True,
                           capture_output=True)
        socket_path = self.folder / "munge" / "munge.socket"
        if len(str(socket_path)) > UNIX_SOCKET_MAX:  # too long for a unix socket: a short folder of its own
            self._socket_dir = Path(tempfile.mkdtemp(prefix="fashioncnn-munge-"))
            socket_path = self._socket_dir / "munge.socket"
        socket_path.parent.chmod(0o755)  # clients (any user) must reach the socket
        user = getpass.getuser()
        cpus = os.cpu_count() or 1
        memory = max(_memory_mb() - 1024, 512)  # leave the OS some: slurmd refuses more than it finds
        self.conf.write_text(f"""\
# Written by fashioncnn.cluster.slurm: one node on 127.0.0.1, no accounting, no cgroups.
ClusterName=fashioncnn
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket_path}
StateSaveLocation={self.folder / 'state'}
SlurmdSpoolDir={self.folder / 'spool'}
SlurmctldPidFile={self.folder / 'slurmctld.pid'}
SlurmdPidFile={self.folder / 'slurmd.pid'}
SlurmctldLogFile={self.folder / 'log' / 'slurmctld.log'}
SlurmdLogFile={self.folder / 'log' / 'slurmd.log'}
# Containers and small machines: no cgroups; processes tracked through /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
MailProg=/bin/true
KillWait={self.kill_wait_s}
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName={PARTITION} Nodes={NODE} Default=YES MaxTime=INFINITE State=UP
""")
        return socket_path

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.folder / "log" / f"{name}.out", "ab")
        # A session of its own: Ctrl-C in the terminal reaches this process, which cancels the jobs first.
        self.processes[name] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, **self.env}, start_new_session=True)

    def check_running(self) -> None:
        """ClusterError if a daemon has exited."""
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise ClusterError(f"{name} exited with code {process.returncode}; see {self.folder / 'log'}")

    def start(self) -> "Cluster":
        """Start munged, slurmctld and slurmd; return once the node is idle (ClusterError otherwise, all stopped)."""
        install_packages()
        socket_path = self._write_config()
        try:
            self._spawn("munged", [_program("munged") or "munged", "--foreground", "--force",
                                   f"--key-file={self.folder / 'munge-key' / 'munge.key'}", f"--socket={socket_path}",
                                   f"--pid-file={self.folder / 'munge' / 'munged.pid'}",
                                   f"--seed-file={self.folder / 'munge' / 'munged.seed'}",
                                   f"--log-file={self.folder / 'log' / 'munged.log'}"])
            self._wait(lambda: socket_path.exists(), "munged's socket")
            # -i: a fresh cluster each start, whatever an earlier one left in the state folder.
            self._spawn("slurmctld", [_program("slurmctld") or "slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._spawn("slurmd", [_program("slurmd") or "slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
            self._wait(self._node_idle, f"node {NODE} to be idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def _node_idle(self) -> bool:
        shown = self.command("sinfo", "--noheader", "--nodes", NODE, "--format", "%t", check=False)
        return shown.returncode == 0 and shown.stdout.strip() == "idle"

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not ready():
            self.check_running()
            if time.monotonic() > deadline:
                raise ClusterError(f"timed out after {self.start_timeout_s:.0f} s waiting for {what}; see {self.folder / 'log'}")
            time.sleep(0.2)

    def jobs(self) -> list[str]:
        """Ids of the cluster's jobs, pending or running."""
        shown = self.command("squeue", "--noheader", "--format", "%i", check=False)
        return shown.stdout.split() if shown.returncode == 0 else []

    def stop(self) -> None:
        """Cancel every job (waiting for its processes, up to KillWait and a little more), then stop the daemons."""
        if self.processes.get("slurmctld") and self.processes["slurmctld"].poll() is None:
            jobs = self.jobs()
            if jobs:
                self.command("scancel", *jobs, check=False)
                deadline = time.monotonic() + self.kill_wait_s + 15
                while self.jobs() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fashioncnn.slurm", description=__doc__.split("\n\n")[0],
                                     epilog="example: python -m fashioncnn.slurm --dir slurm   (then, in another shell: "
                                            "export SLURM_CONF=$PWD/slurm/slurm.conf; python -m fashioncnn -m "
                                            "hydra/launcher=submitit_slurm hydra.launcher.partition=debug conv=2,3)")
    parser.add_argument("--dir", type=Path, default=Path("slurm"), help="config, state, logs and munge key (default ./slurm)")
    parser.add_argument("--kill-wait", type=int, default=30, help="seconds between a cancelled job's SIGTERM and SIGKILL")
    args = parser.parse_args(argv)
    cluster = Cluster(args.dir, kill_wait_s=args.kill_wait)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    started = time.monotonic()
    try:
        cluster.start()
        print(f"SLURM cluster up in {time.monotonic() - started:.1f} s: node {NODE}, partition {PARTITION} "
              f"(logs in {cluster.folder / 'log'}). In another shell:\n"
              f"  export SLURM_CONF={cluster.conf}\n"
              f"  sinfo; srun hostname\n"
              f"  python -m fashioncnn -m hydra/launcher=submitit_slurm hydra.launcher.partition={PARTITION} conv=2,3 epochs=1\n"
              "Ctrl-C here cancels its jobs and stops the cluster.", flush=True)
        while True:
            cluster.check_running()
            time.sleep(1)
    except ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
