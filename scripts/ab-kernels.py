#!/usr/bin/env python3
"""A/B of guest kernels: one private vmletd per kernel, starts alternating.

    scripts/ab-kernels.py pool 24 /var/lib/vmlet/kernels/tailored /tmp/other-kernel
    scripts/ab-kernels.py cold 20 KERNEL_DIR KERNEL_DIR...

Each kernel directory is one `vmletd --guest-dir` takes (a `vmlinux` and its
`config`, as scripts/build-kernel.sh installs them). `pool` gives each agent
a warm pool of one busybox guest with a warm-up (`--pool-warmup
busybox=true`) and waits, before every start, until every pool is full, so
no refill boot runs beside a start; `cold` runs the agents with
`--no-prestage`. Each round starts `busybox echo hi` once per agent, the
order reversed every other round, so load on the shared host falls on every
kernel alike. Prints, per kernel, the agent's own phases (`vmlet inspect`,
ms from the start request): first output and process started as p50 / p90,
and for cold starts the guest's root assembly. Build the binaries first
(`PROFILE=release scripts/build.sh`).

Unlike scripts/bench.sh it evicts nothing from the page cache and compares
kernels, not start modes: a tool for deciding what goes into
guest/kernel/vmlet.config.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(REPO, "target/release")
TETHER = os.path.join(REPO, "target/x86_64-unknown-linux-musl/tether/tether")


def pct(xs, p):
    xs = sorted(xs)
    return xs[max(0, -(-len(xs) * p // 100) - 1)] if xs else float("nan")


def main():
    if len(sys.argv) < 4 or sys.argv[1] not in ("pool", "cold"):
        sys.exit(__doc__)
    mode, n, kernels = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    tag = f"vmlet-ab-kernels-{os.getpid()}"
    agents = []

    def vmlet(d, *args):
        return subprocess.run([f"{BIN}/vmlet", "--socket", f"{d}/sock", *args],
                              capture_output=True, text=True, timeout=120)

    def pool_full(d):
        lines = vmlet(d, "pool").stdout.strip().splitlines()
        return len(lines) >= 2 and lines[1].split()[2] == "1"

    results = {k: [] for k in kernels}
    try:
        for i, k in enumerate(kernels):
            d = tempfile.mkdtemp(prefix="vmlet-ab-kernels.", dir="/tmp")
            # QEMU runs as the unprivileged VMM user, which must enter it.
            os.chmod(d, 0o711)
            args = [f"{BIN}/vmletd", "--state-dir", f"{d}/state", "--socket", f"{d}/sock",
                    "--tether", TETHER, "--cgroup-parent", f"{tag}-{i}", "--guest-dir", k]
            if mode == "pool":
                args += ["--pool", "busybox=1", "--pool-warmup", "busybox=true"]
            else:
                args += ["--no-prestage"]
            log = open(f"{d}/agent.log", "w")
            agents.append((k, d, subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for r in range(n):
            for k, d, _ in (agents if r % 2 == 0 else agents[::-1]):
                if mode == "pool":
                    deadline = time.time() + 120
                    while not all(pool_full(dd) for _, dd, _ in agents):
                        if time.time() > deadline:
                            sys.exit("a pool did not fill in 120 s")
                        time.sleep(0.2)
                    time.sleep(0.5)
                vm = vmlet(d, "run", "-d", "busybox", "--", "echo", "hi").stdout.strip()
                vmlet(d, "wait", vm)
                info = json.loads(vmlet(d, "inspect", vm).stdout)
                vmlet(d, "rm", vm)
                phases, root = info["PhasesMs"], info.get("RootMs") or {}
                results[k].append({
                    "first_output": phases["first-output"],
                    "process_started": phases["process-started"],
                    "root": sum(root.values()) if root else None,
                })
    finally:
        for _, d, p in agents:
            p.terminate()
            p.wait()
        # VMs outlive their agent by design: whatever still names one of
        # our directories (a VM a start left running when this was
        # interrupted, its QEMU and vhost-device-vsock) is killed.
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmdline = f.read()
            except OSError:
                continue
            if int(pid) != os.getpid() and any(d.encode() in cmdline for _, d, _ in agents):
                try:
                    os.kill(int(pid), 9)
                except OSError:
                    pass
        time.sleep(0.5)
        for _, d, _ in agents:
            shutil.rmtree(d, ignore_errors=True)
        # The agents' cgroup parents and any VM cgroups left in them, empty
        # by now (rmdir refuses any other), the deepest first.
        for dirpath, dirnames, _ in os.walk("/sys/fs/cgroup", topdown=False):
            for name in dirnames:
                if tag in os.path.join(dirpath, name):
                    try:
                        os.rmdir(os.path.join(dirpath, name))
                    except OSError:
                        pass
    for k, rs in results.items():
        fo = [x["first_output"] for x in rs]
        ps = [x["process_started"] for x in rs]
        root = [x["root"] for x in rs if x["root"] is not None]
        line = (f"{k}: n={len(rs)} first output p50 {pct(fo, 50):.1f} p90 {pct(fo, 90):.1f} ms; "
                f"process started p50 {pct(ps, 50):.1f} ms")
        if root:
            line += f"; root p50 {pct(root, 50):.1f} ms"
        print(line)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
