"""Two sites for the async benchmarks (root): two network namespaces joined by a veth pair
shaped with `tc tbf`, a daemon per site with the replication link between them, and the
helpers the benchmarks share. A benchmark sets WORK (its folder) and PROG (its name) first."""
import json
import os
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTL = os.path.join(ROOT, ".build", "release", "svsp-ctl")
WORK = os.path.join(ROOT, "benchmarks", ".work", "async")
PROG = "async"
NS = ("svspbenchA", "svspbenchB")
VETH = ("vbencha", "vbenchb")
ADDR = ("10.78.0.1", "10.78.0.2")
SITES = ("site-a", "site-b")


def run(cmd, env=None, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        sys.exit(f"{PROG}: {' '.join(cmd)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def parse_size(text):
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)


def rate_bits(rate):
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    for u, m in units.items():
        if rate.endswith(u):
            return float(rate[: -len(u)]) * m
    sys.exit(f"{PROG}: rate '{rate}': use e.g. 100mbit or 1gbit")


class Link:
    """The two namespaces and the shaped veth pair between them."""

    def __init__(self):
        self.remove()
        for step in (["ip", "netns", "add", NS[0]], ["ip", "netns", "add", NS[1]],
                     ["ip", "link", "add", VETH[0], "type", "veth", "peer", "name", VETH[1]],
                     ["ip", "link", "set", VETH[0], "netns", NS[0]], ["ip", "link", "set", VETH[1], "netns", NS[1]],
                     ["ip", "-n", NS[0], "addr", "add", ADDR[0] + "/24", "dev", VETH[0]],
                     ["ip", "-n", NS[1], "addr", "add", ADDR[1] + "/24", "dev", VETH[1]],
                     ["ip", "-n", NS[0], "link", "set", VETH[0], "up"], ["ip", "-n", NS[1], "link", "set", VETH[1], "up"],
                     ["ip", "-n", NS[0], "link", "set", "lo", "up"], ["ip", "-n", NS[1], "link", "set", "lo", "up"]):
            run(step)

    def shape(self, rate):
        # A burst of 10 ms at the rate (at least 32 KiB): tbf cannot reach 1 Gbit/s with less.
        burst = max(32 << 10, int(rate_bits(rate) / 8 / 100))
        for ns, dev in zip(NS, VETH):
            run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate, "burst", str(burst), "latency", "20ms"])

    def tx_bytes(self):
        """Bytes site A's end of the link has sent (every protocol layer)."""
        out = run(["ip", "netns", "exec", NS[0], "cat", "/sys/class/net/" + VETH[0] + "/statistics/tx_bytes"])
        return int(out.strip())

    def iperf3(self, seconds=10):
        server = subprocess.Popen(["ip", "netns", "exec", NS[1], "iperf3", "-s", "-1", "-B", ADDR[1]], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        out = run(["ip", "netns", "exec", NS[0], "iperf3", "-c", ADDR[1], "-t", str(seconds), "-J"])
        server.wait(timeout=30)
        return json.loads(out)["end"]["sum_received"]["bits_per_second"] / 8

    @staticmethod
    def remove():
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


class Site:
    def __init__(self, i):
        self.i = i
        self.name = SITES[i]
        self.state = os.path.join(WORK, self.name)
        self.env = dict(os.environ, SVSP_DIR=self.state, SVSP_PROFILES=os.path.join(WORK, "profiles"))
        self.proc = None
        self.sock = os.path.join(self.state, "nbd.sock")

    def ctl(self, *args, check=True):
        return run([CTL, *args], self.env, check)

    def start(self):
        log = open(os.path.join(WORK, self.name + ".log"), "a")
        self.proc = subprocess.Popen(["ip", "netns", "exec", NS[self.i], CTL, "serve", "--repl-listen", ADDR[self.i] + ":7790"],
                                     env=self.env, stdout=log, stderr=log)
        for _ in range(300):
            if os.path.exists(os.path.join(self.state, "mgmt.sock")) and self.ctl("status", check=False):
                return
            time.sleep(0.05)
        sys.exit(f"{PROG}: {self.name}'s daemon did not start (see {WORK}/{self.name}.log)")

    def stop(self):
        if self.proc:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
            self.proc = None

    def uri(self, vdisk):
        return f"nbd+unix:///{vdisk}?socket={self.sock}"

    def group(self, name="g"):
        return json.loads(self.ctl("async", "status", name, "--json"))[0]


def link_profile(rate, compression, cycle="10s"):
    bw = f"{int(rate_bits(rate) / 1e6)}Mbit/s"
    text = f"bandwidth: {bw}\nrtt: 1ms\npit_cycle: {cycle}\nbytes_in_flight: 16M\nretention: 64\n"
    if compression:
        text += "compression: 1\n"
    with open(os.path.join(WORK, "profiles", "links", "bench.yaml"), "w") as f:
        f.write(text)


def fio(uri, extra, tag):
    out = os.path.join(WORK, f"fio-{tag}.json")
    run(["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--output-format=json", f"--output={out}"] + extra)
    with open(out) as f:
        return json.load(f)["jobs"][0]["write"]


def wait_cycle(site, after, seconds=3600, group="g"):
    """Waits until group's confirmed cycle passes `after`; returns the group's status."""
    end = time.time() + seconds
    while time.time() < end:
        g = site.group(group)
        if g["cycle"] > after and not g.get("pendingPiTs"):
            return g
        time.sleep(0.1)
    sys.exit(f"{PROG}: no cycle after {after} within {seconds} s: {site.group(group)}")


def wait_idle(site, group, seconds=600):
    """Waits until group's task has nothing to ship (after the initial copy)."""
    end = time.time() + seconds
    while time.time() < end:
        g = site.group(group)
        p = g.get("progress") or {}
        if g["cycle"] > 0 and not g.get("pendingPiTs") and p.get("bytesSent", 0) >= p.get("bytesToSend", 0):
            return
        time.sleep(0.2)
    sys.exit(f"{PROG}: group {group} still busy after {seconds} s: {site.group(group)}")
