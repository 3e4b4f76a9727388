#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
"""The plugin SDK from outside the tree: `make install` puts the header and
tether-plugin.pc into a scratch root; plugins/example/example.c and the
smallest plugin of docs/plugins.md are compiled with nothing but
`pkg-config --cflags tether-plugin` (no -I into this source tree, no
config.h), and the agent loads and serves them. And a plugin that leaves
its sd-event sources behind in fini() cannot crash the agent once it is
unloaded (docs/plugins.md, "Unloading")."""

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import BUILD, PLUGINS, SRC, TEST_PLUGINS, Failure, expect, poll, run, skip  # noqa: E402


def install_sdk(root):
    """The real install rules for the header and the .pc file, into root."""
    env = dict(os.environ)
    # Not the parent make's jobserver or flags: this is a separate run.
    for k in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL"):
        env.pop(k, None)
    r = subprocess.run(["make", "-C", BUILD, "-s", f"DESTDIR={root}", "install-tetherincludeHEADERS",
                        "install-pkgconfigDATA"], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise Failure(f"make install of the SDK failed: {r.stderr.strip()}")
    pcs = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == "tether-plugin.pc"]
    headers = [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if f == "plugin.h"]
    expect(len(pcs) == 1 and len(headers) == 1, f"installed {pcs} {headers}")
    return os.path.dirname(pcs[0]), headers[0]


def pkg_config(pcdir, root, *args):
    # The staged root stands in for /: its .pc file says /usr/local (or
    # whatever --prefix was), the sysroot maps that into the scratch root.
    env = dict(os.environ, PKG_CONFIG_PATH=pcdir, PKG_CONFIG_SYSROOT_DIR=root)
    r = subprocess.run(["pkg-config", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise Failure(f"pkg-config {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout.strip()


def smallest_plugin_from_docs():
    with open(os.path.join(SRC, "docs", "plugins.md")) as f:
        text = f.read()
    m = re.search(r"## The smallest plugin\s+```c\n(.*?)```", text, re.S)
    if not m:
        raise Failure("docs/plugins.md has no C block under 'The smallest plugin'")
    return m.group(1)


def test_out_of_tree_plugins(w):
    root = w.path("root")
    pcdir, header = install_sdk(root)
    cflags = pkg_config(pcdir, root, "--cflags", "tether-plugin")
    expect(root in cflags and SRC not in cflags and BUILD not in cflags,
           f"cflags do not point (only) into the installed root: {cflags}")
    expect(pkg_config(pcdir, root, "--modversion", "tether-plugin"), "no version in tether-plugin.pc")

    out = w.path("plugins")
    os.mkdir(out)
    with open(w.path("doubler.c"), "w") as f:
        f.write(smallest_plugin_from_docs())
    cc = shlex.split(os.environ.get("CC", "cc"))
    # The docs' sample builds warning-free as it stands; the example
    # plugin leaves callback parameters unused.
    for src, so, extra in ((os.path.join(SRC, "plugins", "example", "example.c"), "example.so",
                            ["-Wno-unused-parameter"]),
                           (w.path("doubler.c"), "doubler.so", [])):
        argv = [*cc, "-shared", "-fPIC", "-Wall", "-Wextra", "-Werror", *extra,
                *shlex.split(cflags), "-o", os.path.join(out, so), src]
        r = subprocess.run(argv, capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure(f"building {os.path.basename(src)} out of tree failed:\n{' '.join(argv)}\n{r.stderr}")

    w.start_cloud()
    a = w.start_agent(plugin_dir=out)
    dev = a.device_id
    a.wait_line(r"Loaded plugin 'doubler' 1\.0")
    r = w.tether("call", dev, "add", "40,2")
    expect(r.stdout.strip() == "42", f"example's add returned {r.stdout!r}")
    r = w.tether("call", dev, "double", "21")
    expect(r.stdout.strip() == "42", f"doubler's double returned {r.stdout!r}")
    info = json.loads(w.tether("describe", dev, "--json").stdout)
    expect(info["variables"].get("counter") == "int32", f"example's variables missing: {info['variables']}")


def ticks(path):
    try:
        with open(path) as f:
            return f.read().count("tick ")
    except FileNotFoundError:
        return 0


def wait_ticks(path, at_least, agent, what):
    def ticked():
        if agent.proc.poll() is not None:
            raise Failure(f"tetherd died ({agent.proc.returncode}) {what}")
        return ticks(path) >= at_least

    poll(ticked, 10, f"tick {at_least} in {path} {what}")


def test_sources_left_behind_cannot_crash_the_agent(w):
    """tests/plugins/leaky.c adds a timer and an io source and never removes
    them. A reload that disables it unloads it; its sources keep firing in
    its code, which must still be mapped: with a plain dlclose() the agent
    jumps into unmapped memory and dies of SIGSEGV at the next tick."""
    pdir = w.path("plugins")
    os.mkdir(pdir)
    shutil.copy(os.path.join(TEST_PLUGINS, "leaky.so"), pdir)
    shutil.copy(os.path.join(PLUGINS, "example.so"), pdir)
    out = w.path("ticks")
    w.start_cloud()
    a = w.start_agent(plugin_dir=pdir, extra=f"[Plugin leaky]\nFile={out}\n")
    dev = a.device_id
    a.wait_line(r"plugin leaky: timer and io source added")
    wait_ticks(out, 2, a, "while the plugin was loaded")

    with open(a.conf, "a") as f:
        f.write("[Plugins]\nDisable=leaky\n")
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration", start=mark)
    expect(a.count(r"Loaded plugin 'leaky'", start=mark) == 0, "leaky was loaded again")
    after = ticks(out)
    wait_ticks(out, after + 5, a, "after the plugin was unloaded")
    r = w.tether("call", dev, "echo", "still here", check=False)
    expect(a.proc.poll() is None, f"tetherd exited ({a.proc.returncode}) after unloading leaky")
    expect(r.returncode == 0 and r.stdout.strip() == "10", f"agent not serving after the unload: {r.stderr!r}")

    # Enabled again, it loads into the code that stayed mapped.
    with open(a.conf) as f:
        conf = f.read()
    with open(a.conf, "w") as f:
        f.write(conf.replace("[Plugins]\nDisable=leaky\n", ""))
    mark = a.mark()
    a.signal(signal.SIGHUP)
    a.wait_line(r"Reloaded configuration, 2 plugin\(s\) running", start=mark)
    a.wait_line(r"Loaded plugin 'leaky'", start=mark)
    wait_ticks(out, ticks(out) + 5, a, "after the plugin was loaded again")


if __name__ == "__main__":
    for tool in ("make", "pkg-config"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode != 0:
            skip(f"{tool} is not installed")
    sys.exit(run([test_out_of_tree_plugins, test_sources_left_behind_cannot_crash_the_agent], emulated='builds plugins with the native compiler and pkg-config'))
