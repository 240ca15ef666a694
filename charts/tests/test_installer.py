"""The installer script, as rendered into the ConfigMap, against a fake host.

The host is a temp tree (GPUVM_HOST_ROOT); host commands go through a fake `nsenter`
(GPUVM_HOST_EXEC) that plays containerd (--version, and `config dump`, which merges
config.toml with what it imports, like containerd 2.x) and systemctl, and logs every
call. Everything else (bash, cp, cmp, awk, find) is real.
"""

from __future__ import annotations

import os
import subprocess
import textwrap
import tomllib
from pathlib import Path

import pytest

FAKE_HOST_EXEC = r'''#!/usr/bin/env python3
import glob, os, re, sys
root = os.environ["GPUVM_HOST_ROOT"]
log = os.environ["FAKE_LOG"]
args = sys.argv[1:]
with open(log, "a") as f:
    f.write(" ".join(args) + "\n")
if args[:2] == ["containerd", "--version"]:
    print("containerd github.com/containerd/containerd/v2 %s 1234abcd" % os.environ.get("FAKE_CONTAINERD_VERSION", "v2.1.4"))
    sys.exit(0)
if args[0] == "containerd" and args[-2:] == ["config", "dump"]:
    cfg = args[args.index("--config") + 1]
    path = root + cfg
    text = open(path).read() if os.path.exists(path) else ""
    m = re.search(r"^imports\s*=\s*\[(.*?)\]", text, re.M)
    if m:
        imports = re.findall(r'"([^"]+)"', m.group(1))
    elif os.path.exists(path):
        imports = []  # an explicit config.toml without imports imports nothing
    else:
        imports = ["/etc/containerd/conf.d/*.toml"]
    out = [text]
    for pattern in imports:
        for p in sorted(glob.glob(root + pattern)):
            out.append(open(p).read())
    print("\n".join(out))
    sys.exit(0)
if args[0] == "systemctl":
    sys.exit(0)
sys.exit(f"fake host: unexpected command {args}")
'''

CONFIG_TOML = textwrap.dedent("""\
    version = 3
    root = "/var/lib/containerd"

    [plugins."io.containerd.cri.v1.images"]
      snapshotter = "overlayfs"
    """)


@pytest.fixture()
def host(tmp_path, default):
    """A fresh host with containerd's config.toml, the rendered installer files, a dist."""
    root = tmp_path / "host"
    (root / "etc/containerd").mkdir(parents=True)
    (root / "etc/containerd/config.toml").write_text(CONFIG_TOML)
    # What the kubelet creates for the node DaemonSet's hostPath volumes (DirectoryOrCreate).
    (root / "run/gpuvm/health").mkdir(parents=True)
    (root / "run/gpuvm/gpu-check").mkdir()
    (root / "opt").mkdir()
    files = tmp_path / "installer"
    files.mkdir()
    for name, text in default.get("ConfigMap", "gpuvm-installer")["data"].items():
        (files / name).write_text(text)
    (files / "gpuvm-install.sh").chmod(0o755)
    dist = tmp_path / "dist"
    for rel, text in {
        "bin/containerd-shim-gpuvm-v1": "shim",
        "bin/cloud-hypervisor": "ch",
        "bin/virtiofsd": "virtiofsd",
        "bin/vhost-device-vsock": "vsock",
        "share/vmlinux": "kernel",
        "share/initramfs.img": "initramfs",
        "share/initramfs-gpu.img": "initramfs-gpu",
    }.items():
        (dist / rel).parent.mkdir(parents=True, exist_ok=True)
        (dist / rel).write_text(text)
    fake = tmp_path / "fake-nsenter"
    fake.write_text(FAKE_HOST_EXEC)
    fake.chmod(0o755)
    log = tmp_path / "host.log"
    env = {
        "PATH": os.environ["PATH"],
        "GPUVM_HOST_ROOT": str(root),
        "GPUVM_HOST_EXEC": str(fake),
        "GPUVM_DIST": str(dist),
        "GPUVM_INSTALLER_FILES": str(files),
        "FAKE_LOG": str(log),
        "NODE_NAME": "gpu-1",
    }

    class Host:
        pass

    h = Host()
    h.root, h.files, h.dist, h.log, h.env = root, files, dist, log, env

    def run(mode, **extra):
        log.write_text("")
        return subprocess.run([str(files / "gpuvm-install.sh"), mode], env={**env, **extra},
                              capture_output=True, text=True, timeout=60)

    def restarts():
        return [line for line in log.read_text().splitlines() if line.startswith("systemctl restart")]

    def snapshot():
        return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
                for p in sorted(root.rglob("*"))}

    h.run, h.restarts, h.snapshot = run, restarts, snapshot
    return h


def test_install_then_again_then_uninstall_leaves_the_host_as_it_was(host):
    before = host.snapshot()

    r = host.run("install")
    assert r.returncode == 0, r.stderr
    root = host.root
    assert (root / "opt/gpuvm/bin/containerd-shim-gpuvm-v1").read_text() == "shim"
    assert os.access(root / "opt/gpuvm/bin/containerd-shim-gpuvm-v1", os.X_OK)
    assert (root / "opt/gpuvm/share/vmlinux").read_text() == "kernel"
    assert not os.access(root / "opt/gpuvm/share/vmlinux", os.X_OK)
    # Both guest images, where the shim config looks for them.
    shim = tomllib.loads((root / "etc/gpuvm/shim.toml").read_text())
    assert (root / shim["guest"]["initramfs"].lstrip("/")).read_text() == "initramfs"
    assert (root / shim["guest"]["gpu_initramfs"].lstrip("/")).read_text() == "initramfs-gpu"
    assert "warning" not in r.stderr, r.stderr
    assert (root / "etc/gpuvm/shim.toml").read_text() == (host.files / "shim.toml").read_text()
    assert (root / "etc/containerd/conf.d/gpuvm.toml").read_text() == \
        (host.files / "containerd-gpuvm.toml").read_text()
    # config.toml had no imports: one line was added right after `version`.
    cfg = (root / "etc/containerd/config.toml").read_text().splitlines()
    assert cfg[0] == "version = 3"
    assert cfg[1] == 'imports = ["/etc/containerd/conf.d/gpuvm.toml"] # added by the gpuvm installer'
    assert "\n".join(cfg[:1] + cfg[2:]) + "\n" == CONFIG_TOML
    assert host.restarts() == ["systemctl restart containerd"]
    installed = (root / "opt/gpuvm/.installed").read_text().split()
    assert sorted(installed) == sorted(f"/opt/gpuvm/{p.relative_to(host.dist)}"
                                       for p in host.dist.rglob("*") if p.is_file())

    # Idempotent: nothing written, no restart.
    after_first = host.snapshot()
    mtimes = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    r = host.run("install")
    assert r.returncode == 0, r.stderr
    assert host.restarts() == []
    assert "no restart" in r.stderr
    assert host.snapshot() == after_first
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == mtimes

    # A new shim binary is replaced without a containerd restart.
    (host.dist / "bin/containerd-shim-gpuvm-v1").write_text("shim v2")
    r = host.run("install")
    assert r.returncode == 0, r.stderr
    assert (root / "opt/gpuvm/bin/containerd-shim-gpuvm-v1").read_text() == "shim v2"
    assert host.restarts() == []

    # What the shim leaves behind after its VMs ended: released (emptied) lock files.
    (root / "run/gpuvm/devices").mkdir()
    (root / "run/gpuvm/devices/0000:17:00.0.lock").write_text("")

    r = host.run("uninstall")
    assert r.returncode == 0, r.stderr
    assert host.restarts() == ["systemctl restart containerd"]
    after = host.snapshot()
    # conf.d/ stays (it may be the admin's); the shim's empty runtime folders (created
    # by the kubelet and the shim) are gone; run/gpuvm itself is the cleanup's mount.
    assert after.pop("etc/containerd/conf.d") is None
    for d in ("run/gpuvm/health", "run/gpuvm/gpu-check"):
        assert before.pop(d) is None
    assert after == before

    r = host.run("uninstall")
    assert r.returncode == 0, r.stderr
    assert host.restarts() == []



def test_a_node_image_without_the_gpu_image_is_named_in_a_warning(host):
    (host.dist / "share/initramfs-gpu.img").unlink()
    r = host.run("install")
    assert r.returncode == 0, r.stderr
    assert ("warning: the node image has no share/initramfs-gpu.img: Pods with GPUs "
            "(guest.gpu_initramfs; guest/build.sh --gpu builds it) will not start on this node"
            ) in r.stderr
    assert (host.root / "opt/gpuvm/share/initramfs.img").read_text() == "initramfs"
    assert not (host.root / "opt/gpuvm/share/initramfs-gpu.img").exists()

def test_changed_drop_in_restarts_once(host):
    assert host.run("install").returncode == 0
    (host.files / "containerd-gpuvm.toml").write_text(
        (host.files / "containerd-gpuvm.toml").read_text() + "# changed\n")
    r = host.run("install")
    assert r.returncode == 0, r.stderr
    assert host.restarts() == ["systemctl restart containerd"]


def test_default_containerd_config_needs_no_import_line(host):
    (host.root / "etc/containerd/config.toml").unlink()  # containerd 2.x defaults import conf.d
    r = host.run("install")
    assert r.returncode == 0, r.stderr
    assert not (host.root / "etc/containerd/config.toml").exists()
    assert host.restarts() == ["systemctl restart containerd"]


def test_restart_off_writes_but_does_not_restart(host):
    r = host.run("install", GPUVM_CONTAINERD_RESTART="false")
    assert r.returncode == 0, r.stderr
    assert host.restarts() == []
    assert "restart it yourself" in r.stderr


def test_old_containerd_is_refused_before_anything_is_written(host):
    before = host.snapshot()
    r = host.run("install", FAKE_CONTAINERD_VERSION="v1.7.24")
    assert r.returncode != 0
    assert "needs containerd >= 2.0" in r.stderr
    assert host.snapshot() == before


def test_foreign_imports_are_not_edited_and_the_drop_in_is_rolled_back(host):
    cfg = host.root / "etc/containerd/config.toml"
    cfg.write_text('version = 3\nimports = ["/etc/containerd/other.toml"]\n')
    r = host.run("install")
    assert r.returncode != 0
    assert "has its own 'imports'" in r.stderr
    assert cfg.read_text() == 'version = 3\nimports = ["/etc/containerd/other.toml"]\n'
    assert not (host.root / "etc/containerd/conf.d/gpuvm.toml").exists()
    assert host.restarts() == []


def test_add_import_off_fails_with_what_to_add(host):
    r = host.run("install", GPUVM_CONTAINERD_ADD_IMPORT="false")
    assert r.returncode != 0
    assert 'add imports = ["/etc/containerd/conf.d/gpuvm.toml"]' in r.stderr
    assert not (host.root / "etc/containerd/conf.d/gpuvm.toml").exists()
    assert (host.root / "etc/containerd/config.toml").read_text() == CONFIG_TOML


def test_uninstall_refuses_while_vms_run_unless_forced(host):
    assert host.run("install").returncode == 0
    (host.root / "run/gpuvm/0123abcd").mkdir()
    r = host.run("uninstall")
    assert r.returncode != 0
    assert "1 gpuvm VM(s) still run here (0123abcd)" in r.stderr
    assert (host.root / "etc/containerd/conf.d/gpuvm.toml").exists()
    r = host.run("uninstall", GPUVM_CLEANUP_FORCE="true")
    assert r.returncode == 0, r.stderr
    assert not (host.root / "opt/gpuvm").exists()
    assert not (host.root / "etc/containerd/conf.d/gpuvm.toml").exists()


def test_empty_dist_is_an_error(host):
    for p in sorted(host.dist.rglob("*"), reverse=True):
        p.unlink() if p.is_file() else p.rmdir()
    r = host.run("install")
    assert r.returncode != 0
    assert "carries no gpuvm runtime" in r.stderr


def test_uninstall_keeps_health_records_and_gpu_check_records(host):
    """A reset-failure record marks a broken device: never deleted silently, named in
    the log. GPU check records are the node agent's to clean. Empty folders go."""
    assert host.run("install").returncode == 0
    run = host.root / "run/gpuvm"
    (run / "health/0000:17:00.0").write_text("flr: Inappropriate ioctl for device\n")
    (run / "gpu-check/team-a_train-0").write_text("ok: 1 x h100-80gb\n")
    (run / "devices").mkdir()
    (run / "devices/0000:17:00.0.lock").write_text("")
    r = host.run("uninstall")
    assert r.returncode == 0, r.stderr
    assert (run / "health/0000:17:00.0").read_text() == "flr: Inappropriate ioctl for device\n"
    assert "warning: kept /run/gpuvm/health: reset-failure records of 0000:17:00.0" in r.stderr
    assert (run / "gpu-check/team-a_train-0").exists()
    assert "kept /run/gpuvm/gpu-check" in r.stderr
    # No VM ran: the released lock files and their folder are gone.
    assert not (run / "devices").exists()
    assert "removed /run/gpuvm/devices" in r.stderr
    # Not counted as VMs, and a second uninstall changes nothing.
    snap = host.snapshot()
    r = host.run("uninstall")
    assert r.returncode == 0, r.stderr
    assert host.snapshot() == snap


def test_shim_folders_are_not_running_vms(host):
    assert host.run("install").returncode == 0
    run = host.root / "run/gpuvm"
    (run / "devices").mkdir()
    (run / "gpu-check/.team-a_x.tmp").write_text("")
    r = host.run("uninstall")
    assert r.returncode == 0, r.stderr
    assert "still run" not in r.stderr
    assert not (run / "health").exists() and not (run / "devices").exists()
    assert (run / "gpu-check").exists()  # a half-written record: not empty


def test_forced_uninstall_keeps_the_locks_of_running_vms(host):
    assert host.run("install").returncode == 0
    run = host.root / "run/gpuvm"
    (run / "0123abcd").mkdir()
    (run / "devices").mkdir()
    (run / "devices/0000:17:00.0.lock").write_text("pid=42 holder=0123abcd\n")
    r = host.run("uninstall", GPUVM_CLEANUP_FORCE="true")
    assert r.returncode == 0, r.stderr
    assert (run / "devices/0000:17:00.0.lock").read_text() == "pid=42 holder=0123abcd\n"
    assert "kept /run/gpuvm/devices" in r.stderr
    assert not (run / "health").exists()
