#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""OTA end to end in the integration tier: the real cloud hosts the .deb over
HTTPS with client certificates, the real agent verifies, downloads and
reports, the real tether-ota-helper installs with real dpkg into a scratch
root (dpkg --root), and plugin packages prove their health by loading in
the agent. See otakit.py for the setup; tests/system does the agent's own
self-update under systemd."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import Skip, expect, needs_fault_injection, poll, run  # noqa: E402
from otakit import (COMMIT_PATH, OtaWorld, blocking_script, broken_plugin, build_deb, device_path,  # noqa: E402
                    native_arch, plugin_deb, reported_in_order)


def setup(w, **kw):
    o = OtaWorld(w, **kw)
    o.start_cloud()
    o.install_v1()
    o.start_agent()
    o.seed(o.v1)
    return o


def expect_v1_back(o, job, code):
    expect(job["state"] == "rolled-back", f"expected rolled-back, got {job['state']}: {job.get('reason')}")
    expect(job.get("code") == code, f"expected code {code}, got {job.get('code')}: {job.get('reason')}")
    expect(o.installed() == "1.0 ii", f"after the rollback dpkg says {o.installed()}")
    # the old plugin is running again and the agent serves
    r = o.w.tether("call", o.agent.device_id, "add", "2,3")
    expect(r.stdout.strip() == "5", f"agent not serving the example plugin after the rollback: {r.stdout!r}")


def plugin_version(w, dev):
    """tether-plugin-example's version in the device's system, or None."""
    d = json.loads(w.tether("--json", "describe", dev).stdout)
    return ((d.get("system") or {}).get("packages") or {}).get("tether-plugin-example")


def test_plugin_update_commits(w):
    """10 MB plugin package through the CLI: committed, reported, the floor
    is raised; a later manifest below it is refused."""
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0", filler=10 * 1024 * 1024)
    # The agent's inventory (docs/fleet.md) has the plugin package of its
    # dpkg root, and has the new version once the job ended.
    poll(lambda: plugin_version(w, o.agent.device_id) == "1.0", 10, "the inventory to show version 1.0")
    start = time.monotonic()
    r = o.run_cli(v2, "--min-version", "2.0")
    took = time.monotonic() - start
    expect(r.returncode == 0, f"tether ota failed ({r.returncode}): {r.stderr}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect(job["state"] == "committed", f"job ended {job['state']}")
    states = [h["state"] for h in job["history"]]
    expect(reported_in_order(states, COMMIT_PATH) and states[0] == "sent", f"history {states}")
    went = device_path(o.agent, job["job"], "committed")
    expect(went == COMMIT_PATH[1:], f"the device went through {went}")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")
    # the agent learns the cloud has it from the cloud's answer: after the CLI did
    o.agent.wait_line(r"the cloud has the final state 'committed'")
    j = o.journal()
    expect(j["state"] == "committed" and j["delivered"], f"journal: {j['state']} delivered={j['delivered']}")
    # the helper kept v2 as the next rollback package and raised the floor
    expect(os.path.exists(os.path.join(o.cache, "pkgs", os.path.basename(v2))), "v2 not kept for rollback")
    with open(os.path.join(o.cache, "floors.json")) as f:
        expect(json.load(f).get("tether-plugin-example") == "2.0", "floor not raised")
    times = {h["state"]: h["at"] for h in job["history"]}
    print(f"# figure: 10 MB plugin package, tether ota start to committed: {took:.2f} s "
          f"(TrialSec=1); installed at {times.get('installed')}, committed at {times.get('committed')}")
    r = w.tether("call", o.agent.device_id, "add", "40,2")
    expect(r.stdout.strip() == "42", "agent not serving after the update")
    poll(lambda: plugin_version(w, o.agent.device_id) == "2.0", 10, "the inventory to show version 2.0")

    # An old, validly signed manifest for a lower version is refused now.
    v15 = plugin_deb(o.debs, "1.5")
    url = o.upload(v15)
    job = o.start_job(o.sign(v15, url))
    j = o.wait_job(job)
    expect(j["state"] == "rejected" and j["code"] == "below-minimum", f"v1.5 after the floor: {j}")
    expect(o.installed() == "2.0 ii", "the refused job touched dpkg")


def test_postinst_fails_rolls_back(w):
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0", scripts={"postinst": "#!/bin/sh\necho 'postinst: cannot configure' >&2\nexit 1\n"})
    r = o.run_cli(v2)
    expect(r.returncode == 8, f"tether ota should exit 8 on a rollback, got {r.returncode}: {r.stderr}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect_v1_back(o, job, "install-failed")
    expect("post-installation script" in (job.get("reason") or ""),
           f"reason does not name the postinst: {job.get('reason')}")


def test_rollback_package_repacked(w):
    """Nothing seeded and nothing in apt's cache: the helper rebuilds the
    installed version's .deb with dpkg-repack and rolls back to it."""
    if not shutil.which("dpkg-repack"):
        raise Skip("dpkg-repack is not installed (tools/dev deps installs it)")
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    o.start_agent()
    pkgs = os.path.join(o.cache, "pkgs")
    expect(not os.path.isdir(pkgs) or not os.listdir(pkgs), "the rollback cache is not empty before the job")
    v2 = plugin_deb(o.debs, "2.0", scripts={"postinst": "#!/bin/sh\nexit 1\n"})
    r = o.run_cli(v2)
    expect(r.returncode == 8, f"exit {r.returncode}: {r.stderr}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect_v1_back(o, job, "install-failed")
    kept = os.listdir(pkgs)
    expect(len(kept) == 1 and kept[0].startswith("tether-plugin-example_1.0_"), f"cache after the job: {kept}")


def test_plugin_fails_to_load_rolls_back(w):
    o = setup(w)
    v2 = plugin_deb(o.debs, "2.0", so=broken_plugin())
    r = o.run_cli(v2, "--plugin", "example")
    expect(r.returncode == 8, f"exit {r.returncode}: {r.stderr}")
    job = json.loads(r.stdout.strip().splitlines()[-1])
    expect_v1_back(o, job, "plugin")
    states = [h["state"] for h in job["history"]]
    expect(reported_in_order(states, COMMIT_PATH[:-1] + ["rolling-back", "rolled-back"]) and
           states[-1] == "rolled-back", f"history {states}")
    went = device_path(o.agent, job["job"], "rolled-back")
    expect(went[-3:] == ["trial", "rolling-back", "rolled-back"], f"the device went through {went}")


def test_rejected_before_touching_anything(w):
    o = setup(w)
    before = o.status_digest()
    good = plugin_deb(o.debs, "2.0")
    url = o.upload(good)

    def rejected(manifest, code, why):
        job = o.start_job(manifest)
        j = o.wait_job(job)
        expect(j["state"] == "rejected" and j["code"] == code,
               f"{why}: expected rejected/{code}, got {j['state']}/{j.get('code')}: {j.get('reason')}")
        expect(o.status_digest() == before and o.installed() == "1.0 ii", f"{why}: dpkg's database changed")
        return j

    m = o.sign(good, url)
    # bad signature: one byte of the signed body changed
    i = m.index('"version":"2.0"') + len('"version":"')
    rejected(m[:i] + "3" + m[i + 1:], "bad-signature", "bad signature")
    # unknown key
    other = w.path("other.key")
    o.tether("ota", "keygen", other, w.path("other.pub"))
    rejected(o.sign(good, url, key=other), "unknown-key", "unknown key")
    # expired
    rejected(o.sign(good, url, "--expires", str(int(time.time()) - 60)), "expired", "expired manifest")
    # wrong architecture
    arch = "arm64" if native_arch() != "arm64" else "amd64"
    foreign = build_deb(o.debs, "tether-plugin-example", "2.0", arch=arch,
                        files={"usr/lib/tether/plugins/example.so": b"\x7fELF"})
    rejected(o.sign(foreign, o.upload(foreign)), "architecture", "wrong architecture")
    # version below the manifest's own minimum
    rejected(o.sign(good, url, "--min-version", "3.0"), "below-minimum", "below the minimum")
    # one flipped byte in the .deb: the manifest is for the good one, the
    # URL serves a copy with one byte changed (same size)
    with open(good, "rb") as f:
        data = bytearray(f.read())
    data[len(data) // 2] ^= 0x01
    flipped = w.path("flipped.deb")
    with open(flipped, "wb") as f:
        f.write(data)
    j = rejected(o.sign(good, o.upload(flipped)), "checksum", "flipped byte")
    expect("SHA-256" in j["reason"], f"reason: {j['reason']}")
    # a malformed manifest never gets a job going on the device
    st, body = o.api("PUT", f"/v1/devices/{o.agent.device_id}", {"manifest": "not a manifest"})
    expect(st == 400, f"malformed manifest: HTTP {st} {body}")
    # the agent kept serving through all of it, and a good job still works
    r = o.run_cli(good)
    expect(r.returncode == 0, f"a good update after the refusals failed: {r.stderr}")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")


def test_no_space(w):
    """The agent's state directory on a 4 MB tmpfs; a 10 MB package."""
    state = w.path("small")
    os.makedirs(state)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tether-ota-test", state], capture_output=True,
                       text=True)
    if r.returncode != 0:
        # not a pass: say so in the output (the other tests still run)
        print(f"# SKIP test_no_space: cannot mount a tmpfs: {r.stderr.strip()}")
        return
    try:
        o = setup(w, state_dir=state)
        before = o.status_digest()
        big = plugin_deb(o.debs, "2.0", filler=10 * 1024 * 1024)
        job = o.start_job(o.sign(big, o.upload(big)))
        j = o.wait_job(job)
        expect(j["state"] == "rejected" and j["code"] == "no-space", f"got {j['state']}/{j.get('code')}")
        expect("not enough space" in j["reason"], f"reason: {j['reason']}")
        expect(o.status_digest() == before, "dpkg's database changed")
        expect(not os.path.exists(os.path.join(state, "download.part")), "a download was started")
        for d in list(w.daemons):
            d.stop()
        w.daemons.clear()
    finally:
        subprocess.run(["umount", "-l", state], capture_output=True)


def test_dpkg_locked_deferred(w):
    o = setup(w)
    lock = os.path.join(o.root, "var/lib/dpkg/lock-frontend")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o640)
    import fcntl
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what apt does (fcntl F_SETLK)
    try:
        v2 = plugin_deb(o.debs, "2.0")
        mark = o.agent.mark()
        r = o.run_cli(v2)
        expect(r.returncode == 8, f"exit {r.returncode}: {r.stderr}")
        job = json.loads(r.stdout.strip().splitlines()[-1])
        expect(job["state"] == "deferred" and job["code"] == "dpkg-locked", f"got {job['state']}/{job.get('code')}")
        expect(str(os.getpid()) in job["reason"], f"the reason does not name the holder: {job['reason']}")
        o.agent.wait_line(r"dpkg is locked by process", start=mark)
        # the lock was never removed, and it is still ours
        expect(os.path.exists(lock), "the lock file was removed")
        probe = subprocess.run([sys.executable, "-c", f"import fcntl,os\nfd=os.open({lock!r},os.O_RDWR)\n"
                                "try:\n fcntl.lockf(fd,fcntl.LOCK_EX|fcntl.LOCK_NB)\nexcept OSError:\n print('held')"],
                               capture_output=True, text=True)
        expect(probe.stdout.strip() == "held", "our lock was taken away")
        expect(o.installed() == "1.0 ii", "the deferred job touched dpkg")
    finally:
        os.close(fd)
    # with the lock free, the same package goes in
    r = o.run_cli(v2)
    expect(r.returncode == 0, f"after the lock was released: {r.stderr}")


def crash_env(w, point):
    needs_fault_injection()
    flag = w.path(f"crash-once-{point}")
    open(flag, "w").close()
    return {"TETHER_OTA_CRASH_AT": point, "TETHER_OTA_CRASH_ONCE": flag}


def restart(o, old, name):
    old.killed = True
    if old.proc.poll() is None:
        old.kill()
    return o.start_agent(name=name, device=o.device())


def test_killed_during_download_resumes(w):
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    # killed right after the first 4 MiB checkpoint of the download
    a = o.start_agent(env=crash_env(w, "download-checkpoint"))
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0", filler=10 * 1024 * 1024)
    job = o.start_job(o.sign(v2, o.upload(v2)))
    a.proc.wait(60)
    expect(a.proc.returncode == -signal.SIGKILL, f"agent did not die at the crash point: {a.proc.returncode}")
    j = o.journal()
    expect(j["state"] == "downloading" and j["dl_offset"] >= 4 << 20, f"journal after the kill: {j}")
    a2 = restart(o, a, "agent2")
    a2.wait_line(r"downloading .* \(resuming\)")
    job = o.wait_job(job)
    expect(job["state"] == "committed", f"ended {job['state']}: {job.get('reason')}")
    expect(o.installed() == "2.0 ii", f"dpkg says {o.installed()}")


def test_killed_after_download(w):
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    a = o.start_agent(env=crash_env(w, "downloaded"))
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0")
    job = o.start_job(o.sign(v2, o.upload(v2)))
    a.proc.wait(60)
    expect(o.journal()["state"] == "downloaded", f"journal: {o.journal()['state']}")
    restart(o, a, "agent2")
    job = o.wait_job(job)
    expect(job["state"] == "committed", f"ended {job['state']}: {job.get('reason')}")


def killed_in_dpkg(w, script, args, word):
    o = setup(w)
    sig = o.fifo("signal")
    o.fifo("hold")
    v2 = plugin_deb(o.debs, "2.0", scripts={script: blocking_script(args, sig, word)})
    job = o.start_job(o.sign(v2, o.upload(v2)))
    got = o.wait_fifo(sig)
    expect(got == word, f"the {script} said {got!r}")
    expect(o.journal()["state"] == "installing", f"journal: {o.journal()['state']}")
    # power cut: agent, helper, dpkg and the script
    o.kill_everything(o.agent)
    before_restart = o.installed()
    restart(o, o.agent, "agent2")
    j = o.wait_job(job)
    print(f"# dpkg said '{before_restart}' after the kill; the job ended {j['state']}")
    return o, j


def test_killed_during_unpack(w):
    o, j = killed_in_dpkg(w, "preinst", ["install", "upgrade"], "unpacking")
    expect_v1_back(o, j, "interrupted")


def test_killed_during_postinst(w):
    o, j = killed_in_dpkg(w, "postinst", ["configure"], "configuring")
    expect_v1_back(o, j, "interrupted")


def test_killed_during_trial(w):
    """The helper dies in the trial window; it is started again, asks for a
    new verdict, and the update is committed."""
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    o.start_agent(env=crash_env(w, "trial"))
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0")
    mark = o.agent.mark()
    job = o.start_job(o.sign(v2, o.upload(v2)))
    o.agent.wait_line(r"no helper is running: starting one", start=mark, timeout=30)
    j = o.wait_job(job)
    expect(j["state"] == "committed", f"ended {j['state']}: {j.get('reason')}")
    trials = [h for h in o.job(job)["history"] if h["state"] == "trial"]
    expect(len(trials) == 1, f"history: {o.job(job)['history']}")
    expect(o.journal()["seq"] >= 8, f"the restart did not count as a transition: {o.journal()['seq']}")


def test_killed_during_rollback(w):
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    o.start_agent(env=crash_env(w, "rolling-back"))
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0", scripts={"postinst": "#!/bin/sh\nexit 1\n"})
    mark = o.agent.mark()
    job = o.start_job(o.sign(v2, o.upload(v2)))
    o.agent.wait_line(r"no helper is running: starting one", start=mark, timeout=30)
    j = o.wait_job(job)
    expect_v1_back(o, j, "install-failed")


def test_final_report_exactly_once(w):
    """Killed after the cloud acknowledged the final report but before the
    agent journaled that: the restarted agent sends it again, the cloud
    records it once."""
    o = OtaWorld(w)
    o.start_cloud()
    o.install_v1()
    a = o.start_agent(env=crash_env(w, "delivering"))
    o.seed(o.v1)
    v2 = plugin_deb(o.debs, "2.0")
    job = o.start_job(o.sign(v2, o.upload(v2)))
    a.proc.wait(60)
    j = o.job(job)
    expect(j["state"] == "committed", f"the cloud has {j['state']}")
    expect(not o.journal()["delivered"], "the journal says delivered before the crash point")
    seq = j["seq"]
    a2 = restart(o, a, "agent2")
    a2.wait_line(r"the cloud has the final state 'committed'")
    expect(o.journal()["delivered"], "not delivered after the restart")
    j = o.job(job)
    finals = [h for h in j["history"] if h["state"] == "committed"]
    expect(len(finals) == 1 and j["seq"] == seq, f"the resent report changed the job: {j}")


def test_job_busy_and_retry(w):
    """A second job while one is open is refused by the cloud (409, naming
    the open job), never sent; the first ends."""
    o = setup(w)
    sig = o.fifo("signal")
    o.fifo("hold")
    v2 = plugin_deb(o.debs, "2.0", scripts={"postinst": blocking_script(["configure"], sig, "configuring")})
    job = o.start_job(o.sign(v2, o.upload(v2)))
    o.wait_fifo(sig)
    st, body = o.api("PUT", f"/v1/devices/{o.agent.device_id}", {"manifest": o.sign(v2, o.upload(v2))})
    want = f"device {o.agent.device_id} has an open job {job}"
    expect(st == 409 and body.get("error") == want and body.get("job") == job, f"second job: HTTP {st} {body}")
    # unblock: kill the blocked postinst's dpkg run; the job rolls back
    o.kill_everything(o.agent)
    restart(o, o.agent, "agent2")
    j = o.wait_job(job)
    expect(j["final"], f"first job: {j['state']}")


if __name__ == "__main__":
    sys.exit(run([test_plugin_update_commits, test_postinst_fails_rolls_back, test_rollback_package_repacked,
                  test_plugin_fails_to_load_rolls_back,
                  test_rejected_before_touching_anything, test_no_space, test_dpkg_locked_deferred,
                  test_killed_during_download_resumes, test_killed_after_download, test_killed_during_unpack,
                  test_killed_during_postinst, test_killed_during_trial, test_killed_during_rollback,
                  test_final_report_exactly_once, test_job_busy_and_retry],
                 emulated="installs packages with the host's dpkg into a scratch root; its timing "
                 "bounds (trial, lock waits) are set for native speed"))
