"""The copy rows of benchmarks/mirror-vs-fio: how fast `mirror add-leg` fills a new leg, against
fio copying one file into another on the same disk, and what the copy costs a host workload.

  idle add-leg     a thick vdisk of SIZE written in full, then `mirror add-leg` onto a second
                   file pool: SIZE / the time until the leg is in sync, against fio reading one
                   file and writing another at once (1M, QD8 each, the slower of the two).
                   Target >= 0.9.
  host p99         fio 4k randwrite QD4 through NBD on that vdisk for SECONDS while an add-leg
                   copy runs, then again once the new leg is in sync (the same two legs, no
                   copy): p99 with the copy / p99 without. Target <= 2.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time


class Daemon:
    """`svsp-ctl serve` on a fresh domain under `work`, with two file pools of `lun_size`."""

    def __init__(self, ctl, root, work, lun_size):
        self.ctl, self.work = ctl, work
        self.env = dict(os.environ, SVSP_DIR=os.path.join(work, "state"), SVSP_PROFILES=os.path.join(root, "hardware-profiles"))
        subprocess.run(["rm", "-rf", work], check=True)
        os.makedirs(work)
        self.ctl_run("domain", "init", "--dir", self.env["SVSP_DIR"], "--name", "copy")
        self.log = open(os.path.join(work, "serve.log"), "w")
        self.proc = subprocess.Popen([ctl, "serve"], env=self.env, stdout=self.log, stderr=self.log)
        sock = os.path.join(self.env["SVSP_DIR"], "nbd.sock")
        for _ in range(200):
            if os.path.exists(sock):
                try:
                    s = socket.socket(socket.AF_UNIX)
                    s.connect(sock)
                    s.close()
                    break
                except OSError:
                    pass
            time.sleep(0.05)
        else:
            sys.exit("mirror-vs-fio: svsp-ctl serve did not come up")
        self.sock = sock
        for p in ("a", "b"):
            self.ctl_run("pool", "create", f"pool-{p}", "--array-profile", "file-backed", "--lun", os.path.join(work, f"lun-{p}.img"),
                         "--create-size", lun_size)

    def ctl_run(self, *args):
        r = subprocess.run([self.ctl] + list(args), capture_output=True, text=True, env=self.env)
        if r.returncode != 0:
            sys.exit(f"mirror-vs-fio: svsp-ctl {' '.join(args)} failed: {r.stderr.strip()}")
        return r.stdout

    def mirror(self, name):
        status = json.loads(self.ctl_run("mirror", "status", name, "--json"))
        return status[0] if isinstance(status, list) else status

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def fio_json(args):
    r = subprocess.run(["fio", "--output-format=json"] + args, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"mirror-vs-fio: fio {' '.join(args)} failed: {r.stderr.strip()}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def fio_copy_rate(work, size, seconds):
    """fio reading one written file and writing another at once: the slower side's MiB/s."""
    src, dst = os.path.join(work, "copy-src.img"), os.path.join(work, "copy-dst.img")
    for f in (src, dst):
        fio_json(["--name=fill", f"--filename={f}", "--ioengine=libaio", "--direct=1", "--rw=write", "--bs=1M", "--iodepth=8", f"--size={size}"])
    common = ["--ioengine=libaio", "--direct=1", "--bs=1M", "--iodepth=8", f"--size={size}", f"--runtime={seconds}", "--time_based"]
    out = fio_json(common + ["--name=read", f"--filename={src}", "--rw=read", "--name=write", f"--filename={dst}", "--rw=write"])
    rates = {j["jobname"]: j[j["jobname"]]["bw_bytes"] / 1048576 for j in out["jobs"]}
    os.unlink(src)
    os.unlink(dst)
    return min(rates["read"], rates["write"])


def add_leg_seconds(d, vdisk, host_seconds=None):
    """Adds a leg in pool-b and waits until it is in sync; with host_seconds, runs the host
    workload during the copy and returns (copy seconds, host p99 us)."""
    started = time.time()
    d.ctl_run("mirror", "add-leg", vdisk, "--pool", "pool-b")
    p99 = host_p99(d, vdisk, host_seconds) if host_seconds else None
    while True:
        legs = d.mirror(vdisk)["legs"]
        if len(legs) == 2 and all(l["state"] == "in-sync" for l in legs):
            return time.time() - started, p99
        if any(l["state"] == "failed" for l in legs):
            sys.exit(f"mirror-vs-fio: the add-leg copy failed: {d.mirror(vdisk).get('lastBackgroundError')}")
        time.sleep(0.05)


def host_p99(d, vdisk, seconds):
    uri = f"nbd+unix:///{vdisk}?socket={d.sock}"
    out = fio_json(["--name=host", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k", "--iodepth=4", f"--runtime={seconds}",
                    "--time_based", "--norandommap", "--randrepeat=0", "--lat_percentiles=1"])
    return out["jobs"][0]["write"]["lat_ns"]["percentile"]["99.000000"] / 1000


def rows(ctl, root, work, size, seconds, rounds):
    """Both rows, medians of `rounds`; returns dicts for the table and the JSON."""
    size_mib = int(size[:-1]) * (1024 if size.endswith("G") else 1) if size[-1] in "GM" else int(size) >> 20
    d = Daemon(ctl, root, work, f"{size_mib + 64}M")
    try:
        d.ctl_run("vdisk", "create", "v", "--pool", "pool-a", "--size", size)
        d.ctl_run("vdisk", "export", "v")
        fio_json(["--name=fill", "--ioengine=nbd", f"--uri=nbd+unix:///v?socket={d.sock}", "--rw=write", "--bs=1M", "--iodepth=8",
                  f"--size={size}"])
        copy, fio = [], []
        for i in range(rounds):
            fio.append(fio_copy_rate(work, size, seconds))
            t, _ = add_leg_seconds(d, "v")
            copy.append(size_mib / t)
            d.ctl_run("mirror", "remove-leg", "v", "--leg", "1")
            print(f"  idle add-leg round {i + 1}: {copy[-1]:.0f} MiB/s, fio copy {fio[-1]:.0f} MiB/s", file=sys.stderr)
        quiet, loaded = [], []
        for i in range(rounds):
            # The same vdisk with the same two legs, copying and then in sync (a host write goes
            # to both legs either way).
            t, p99 = add_leg_seconds(d, "v", host_seconds=seconds)
            loaded.append(p99)
            quiet.append(host_p99(d, "v", seconds))
            if t < seconds:
                print(f"  note: the copy took {t:.1f}s, less than the host run of {seconds}s: part of that run had no copy",
                      file=sys.stderr)
            d.ctl_run("mirror", "remove-leg", "v", "--leg", "1")
            print(f"  host p99 round {i + 1}: {quiet[-1]:.0f} us alone, {loaded[-1]:.0f} us during add-leg", file=sys.stderr)
    finally:
        d.stop()
    med = lambda xs: sorted(xs)[len(xs) // 2]
    return [
        {"row": "idle add-leg (MiB/s)", "svsp": med(copy), "peer": med(fio), "ratio": med([c / f for c, f in zip(copy, fio)]),
         "target": ">= 0.9", "ok": med([c / f for c, f in zip(copy, fio)]) >= 0.9},
        {"row": "host 4k p99 during add-leg (us)", "svsp": med(loaded), "peer": med(quiet),
         "ratio": med([l / q for l, q in zip(loaded, quiet)]), "target": "<= 2", "ok": med([l / q for l, q in zip(loaded, quiet)]) <= 2},
    ]
