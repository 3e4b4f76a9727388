# SPDX-License-Identifier: Apache-2.0
"""OTA test kit: real .deb packages made with dpkg-deb, a scratch dpkg root
(dpkg --root), an update key pair, and an agent whose OTA helper runs as a
detached process (Launcher=exec) against that root. The cloud, the agent,
the helper, dpkg and the TLS artifact download are all real; only systemd
is missing here (tests/system covers the units and the agent's own
self-update).
"""

import json
import os
import re
import signal
import subprocess
import time
import urllib.request

from harness import BUILD, PLUGINS, TEST_PLUGINS, Daemon, Failure, seconds, skip, whole_seconds

HELPER = os.path.join(BUILD, "agent", "tether-ota-helper")
PLUGIN_DIR = "usr/lib/tether/plugins"


def require_root_and_dpkg():
    if os.geteuid() != 0:
        skip("OTA tests install packages with dpkg into a scratch root: they need root")
    for tool in ("dpkg", "dpkg-deb", "dpkg-query"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            skip(f"{tool} is not installed")
    if not os.access(HELPER, os.X_OK):
        raise Failure(f"{HELPER} is not built")


def native_arch():
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


def build_deb(out_dir, name, version, files=None, scripts=None, arch=None, filler=0):
    """A real .deb: files maps paths in the root to bytes or to a source
    file name; scripts maps maintainer script names to their text; filler
    adds that many random bytes (uncompressed) to make it big."""
    arch = arch or native_arch()
    tree = os.path.join(out_dir, f"tree-{name}-{version}-{arch}")
    os.makedirs(os.path.join(tree, "DEBIAN"))
    for path, content in (files or {}).items():
        dest = os.path.join(tree, path.lstrip("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        if isinstance(content, bytes):
            with open(dest, "wb") as f:
                f.write(content)
        else:
            with open(content, "rb") as src, open(dest, "wb") as f:
                f.write(src.read())
    if filler:
        dest = os.path.join(tree, "usr/share", name, "filler.bin")
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with open(dest, "wb") as f:
            f.write(os.urandom(filler))
    size_kib = sum(os.path.getsize(os.path.join(d, n)) for d, _, ns in os.walk(tree) for n in ns) // 1024 + 1
    with open(os.path.join(tree, "DEBIAN", "control"), "w") as f:
        f.write(f"Package: {name}\nVersion: {version}\nArchitecture: {arch}\n"
                f"Maintainer: tether tests <tests@example.org>\nInstalled-Size: {size_kib}\n"
                f"Description: tether OTA test package\n test\n")
    for script, text in (scripts or {}).items():
        p = os.path.join(tree, "DEBIAN", script)
        with open(p, "w") as f:
            f.write(text)
        os.chmod(p, 0o755)
    deb = os.path.join(out_dir, f"{name}_{version}_{arch}.deb")
    subprocess.run(["dpkg-deb", "-Znone", "--root-owner-group", "--build", tree, deb], check=True,
                   capture_output=True)
    return deb


def plugin_deb(out_dir, version, so=None, scripts=None, filler=0):
    """tether-plugin-example: the example plugin, or another .so in its place."""
    return build_deb(out_dir, "tether-plugin-example", version,
                     files={f"{PLUGIN_DIR}/example.so": so or os.path.join(PLUGINS, "example.so")},
                     scripts=scripts, filler=filler)


def broken_plugin():
    return os.path.join(TEST_PLUGINS, "failing.so")


class OtaWorld:
    """Adds to a harness World: a scratch root with version 1.0 of the
    plugin package installed (and kept for rollback), keys, and an agent
    whose plugins come from that root."""

    def __init__(self, w, state_dir=None, extra=""):
        require_root_and_dpkg()
        self.w = w
        self.root = w.path("root")
        self.debs = w.path("debs")
        self.keys = w.path("keys")
        self.state = state_dir or w.path("ota-state")
        self.cache = w.path("ota-cache")
        self.artifacts = w.path("artifacts")
        for d in (self.debs, self.keys, self.artifacts, os.path.join(self.root, "var/lib/dpkg/info"),
                  os.path.join(self.root, "var/lib/dpkg/updates"), os.path.join(self.root, "tmp"),
                  os.path.join(self.root, PLUGIN_DIR)):
            os.makedirs(d, exist_ok=True)
        open(os.path.join(self.root, "var/lib/dpkg/status"), "a").close()
        self.key = w.path("update.key")
        self.pub = os.path.join(self.keys, "update.pem")
        r = self.tether("ota", "keygen", self.key, self.pub)
        self.key_id = r.stdout.strip()
        self.extra = extra
        self.agent = None
        self.v1 = plugin_deb(self.debs, "1.0")

    # --- tools --------------------------------------------------------------
    def tether(self, *args, check=True, timeout=120):
        return self.w.tether(*args, check=check, timeout=timeout)

    def dpkg(self, *args, check=True):
        return subprocess.run(["dpkg", f"--root={self.root}", "--force-script-chrootless", *args],
                              capture_output=True, text=True, check=check, stdin=subprocess.DEVNULL)

    def installed(self, package="tether-plugin-example"):
        r = subprocess.run(["dpkg-query", f"--root={self.root}", "--showformat=${Version} ${db:Status-Abbrev}",
                            "--show", package], capture_output=True, text=True)
        return r.stdout.strip() if r.returncode == 0 else None

    def status_digest(self):
        with open(os.path.join(self.root, "var/lib/dpkg/status"), "rb") as f:
            return hash(f.read())

    # --- setup --------------------------------------------------------------
    def start_cloud(self):
        return self.w.start_cloud(extra=f"[OTA]\nArtifactDirectory={self.artifacts}\nPort=0\n")

    def agent_extra(self):
        return f"""[OTA]
Keyring={self.keys}
StateDirectory={self.state}
CacheDirectory={self.cache}
Launcher=exec
Helper={HELPER}
DpkgRoot={self.root}
TrialSec=1
HealthTimeoutSec={whole_seconds(15)}
LockTimeoutSec=2
LowSpeedSec=5
ProgressIntervalSec=0.2
MinFreeMB=1
{self.extra}"""

    def conf_path(self):
        return self.w.path("agent.conf")

    def install_v1(self):
        """Version 1.0 installed by hand and kept as the rollback package."""
        self.dpkg("-i", self.v1)
        if not self.installed().startswith("1.0 ii"):
            raise Failure(f"v1 not installed: {self.installed()}")

    def seed(self, deb):
        r = subprocess.run([HELPER, "seed", deb, "--config", self.conf_path()], capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"tether-ota-helper seed failed: {r.stderr}")

    def start_agent(self, name="agent", device=None, env=None, wait_online=True):
        kw = {}
        if device:
            kw["device"] = device
        plugin_dir = os.path.join(self.root, PLUGIN_DIR)
        if env:
            a = self._start_agent_env(name, device, env, plugin_dir, wait_online)
        else:
            a = self.w.start_agent(name=name, plugin_dir=plugin_dir, extra=self.agent_extra(),
                                   wait_online=wait_online, **kw)
        # every agent of a test shares one configuration file name for the helper
        if not os.path.exists(self.conf_path()):
            os.symlink(a.conf, self.conf_path())
        self.agent = a
        return a

    def _start_agent_env(self, name, device, env, plugin_dir, wait_online):
        w = self.w
        dev_id, cert, key = device or w.new_device()
        conf = w.agent_conf(name, cert, key, plugin_dir=plugin_dir, extra=self.agent_extra())
        mark = w.notify.mark()
        e = w.env()
        e.update(env)
        d = Daemon(name, [os.path.join(BUILD, "agent", "tetherd"), "--config", conf], e, w.dir)
        d.device_id = dev_id
        d.conf = conf
        w.daemons.append(d)
        if wait_online:
            w.wait_online(dev_id, mark)
        return d

    def device(self):
        a = self.agent
        return (a.device_id, self.w.path("pki", "devices", a.device_id + ".crt"),
                self.w.path("pki", "devices", a.device_id + ".key"))

    # --- jobs ----------------------------------------------------------------
    def api(self, method, path, body=None, timeout=40):
        req = urllib.request.Request(self.w.api + path, method=method,
                                     headers={"Authorization": f"Bearer {self.w.token}",
                                              "Content-Type": "application/json"},
                                     data=json.dumps(body).encode() if body is not None else None)
        try:
            with urllib.request.urlopen(req, timeout=seconds(timeout)) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def upload(self, deb):
        return self.tether("ota", "upload", deb).stdout.strip()

    def sign(self, deb, url, *opts, key=None):
        """tether ota sign; the manifest is for this world's agent unless
        opts name other targets (--device, --tag). url None: a manifest
        without url (the device fetches the artifact over its connection)."""
        out = self.w.path(f"manifest-{os.path.basename(deb)}-{time.monotonic_ns()}")
        if "--device" not in opts and "--tag" not in opts:
            opts = ("--device", self.agent.device_id) + tuple(opts)
        url_opts = ("--url", url) if url else ()  # none: over the device's connection
        self.tether("ota", "sign", deb, "--key", key or self.key, *url_opts, "--output", out, *opts)
        with open(out) as f:
            return f.read()

    def start_job(self, manifest, expect=200):
        st, body = self.api("PUT", f"/v1/devices/{self.agent.device_id}", {"manifest": manifest})
        if st != expect:
            raise Failure(f"PUT /v1/devices: HTTP {st} {body}")
        return body.get("job", {}).get("job")

    def job(self, job):
        st, body = self.api("GET", f"/v1/ota/jobs/{job}")
        if st != 200:
            raise Failure(f"GET job {job}: HTTP {st} {body}")
        return body

    def wait_job(self, job, pred=lambda j: j["final"], timeout=60, what="a final state"):
        """Long-poll the cloud until pred(job) holds."""
        deadline = time.monotonic() + seconds(timeout)
        j = self.job(job)
        while not pred(j):
            if time.monotonic() > deadline:
                raise Failure(f"job {job} did not reach {what} in {timeout} s: {j['state']} {j.get('reason')}; "
                              f"history {[h['state'] for h in j['history']]}")
            st, j2 = self.api("GET", f"/v1/ota/jobs/{job}?wait={j['seq']}", timeout=timeout)
            if st == 200:
                j = j2
        return j

    def run_cli(self, deb, *opts, timeout=120):
        """tether ota DEVICE FILE.deb --key KEY: upload, sign, start, follow."""
        return self.tether("ota", self.agent.device_id, deb, "--key", self.key, "--json", *opts, check=False,
                           timeout=timeout)

    def journal(self):
        with open(os.path.join(self.state, "job.json")) as f:
            return json.load(f)

    def helper_pid(self):
        with open(os.path.join(self.state, "helper.pid")) as f:
            return int(f.read())

    def kill_everything(self, agent):
        """A power cut: the agent and the helper's whole process group."""
        try:
            os.killpg(self.helper_pid(), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        agent.kill()

    def fifo(self, name):
        p = os.path.join(self.root, "tmp", name)
        os.mkfifo(p)
        return p

    def wait_fifo(self, path, timeout=30):
        """Read what a maintainer script writes into a FIFO (it blocks until then)."""
        import select
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            p = select.poll()
            p.register(fd, select.POLLIN)
            if not p.poll(int(seconds(timeout) * 1000)):
                raise Failure(f"nothing came through {path} in {timeout} s")
            return os.read(fd, 100).decode().strip()
        finally:
            os.close(fd)


# Every state of a committed update, from the cloud's first.
COMMIT_PATH = ["sent", "accepted", "downloading", "downloaded", "installing", "installed", "trial", "committed"]


def reported_in_order(reported, path):
    """The cloud hears the state the device is in whenever it can send a
    report: states the device passed while a report was in flight are not
    reported one by one (report_state() in agent/ota.c). So what it heard
    is path with some states left out, in path's order, each once."""
    it = iter(path)
    return all(s in it for s in reported)


def device_path(agent, job, final):
    """The states the device itself went through for job, from the
    transitions tetherd and tether-ota-helper log, once one of them logged
    the one to final (the helper may say so after the cloud has it)."""
    path = []
    head = r"^(?:tetherd: OTA job|tether-ota-helper: Job) %s: " % job
    agent.wait_line(head + r"[a-z-]+ -> %s(?!.* \(helper\)$)" % final)
    rx = re.compile(head + r"([a-z-]+) -> ([a-z-]+)(.*)$")
    for line in list(agent.lines):
        m = rx.match(line)
        if not m or m.group(3).endswith(" (helper)"):  # tetherd seeing what the helper wrote
            continue
        if not path:
            path.append(m.group(1))
        path.append(m.group(2))
    return path


def blocking_script(phase_args, signal_fifo, word):
    """A maintainer script that, for the given first arguments, says word
    through a FIFO and then blocks forever (until killed)."""
    cases = "|".join(phase_args)
    return f"""#!/bin/sh
case "$1" in
{cases})
    echo {word} > "$DPKG_ROOT/tmp/{os.path.basename(signal_fifo)}"
    read never < "$DPKG_ROOT/tmp/hold"
    ;;
esac
exit 0
"""


def sign_manifest(w, device, package="tether-test"):
    """A manifest for device, signed with a new update key in World w's
    directory, for a package the cloud only checks the shape of."""
    d = w.path("debs", "signed")
    os.makedirs(d, exist_ok=True)
    debs = [f for f in os.listdir(d) if f.startswith(f"{package}_1.0_") and f.endswith(".deb")]
    deb = os.path.join(d, debs[0]) if debs else build_deb(d, package, "1.0")
    if not os.path.exists(w.path("update.key")):
        w.tether("ota", "keygen", w.path("update.key"), w.path("update.pem"))
    out = w.path(f"manifest-{device}")
    if os.path.exists(out):
        os.unlink(out)
    w.tether("ota", "sign", deb, "--key", w.path("update.key"), "--url", "https://127.0.0.1/x.deb",
             "--device", device, "--output", out)
    with open(out) as f:
        return f.read()


def push_job(w, device, dev_id, manifest, answer):
    """PUT the manifest to fake device dev_id (a fakedev.Device), which
    answers the cloud's POST /o/JOB with code answer; returns the job id."""
    import threading
    from harness import api_json
    from fakedev import POST
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api_json(w, "PUT", f"/v1/devices/{dev_id}",
                                                              {"manifest": manifest})))
    t.start()
    req = device.wait_for(lambda m: m.code == POST and m.path.startswith("o/"), what="POST /o/JOB")
    device.answer(req, answer)
    t.join(seconds(30))
    status, body = out.get("r", (None, None))
    if status != 200:
        raise Failure(f"PUT manifest: {status} {body}")
    return body["job"]["job"]
