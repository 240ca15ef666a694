#!/usr/bin/env python3
"""Packs the gpuvm guest image from an unpacked Debian kernel package.

Writes to --out:
  vmlinux              uncompressed kernel (ELF, PVH entry) taken out of vmlinuz
  initramfs.cpio.gz    /init (gpuvm-agent), kernel modules, /etc/gpuvm/modules.list
  busybox-rootfs/      a tiny container rootfs for the VM tests
  manifest.json        kernel release, package, modules, sha256 of the outputs

With --gpu (guest/build.sh --gpu), the initramfs also carries NVIDIA's modules,
firmware and libraries and glibc (see gpu.py), and --out gets probe-rootfs/.

The initramfs is reproducible: entries sorted, fixed owner and mtime
(--epoch), fixed inode numbers, gzip header without name or time.
"""

import argparse
import gzip
import hashlib
import json
import lzma
import os
import shutil
import stat
import sys

import elfinfo
import gpu

XZ_MAGIC = b"\xfd7zXZ\x00"


def die(message):
    print(f"guest/pack.py: {message}", file=sys.stderr)
    sys.exit(1)


def extract_vmlinux(vmlinuz_path):
    """Decompresses the xz payload of a bzImage into the ELF vmlinux."""
    with open(vmlinuz_path, "rb") as f:
        image = f.read()
    start = image.find(XZ_MAGIC)
    if start < 0:
        die(f"{vmlinuz_path} holds no xz stream")
    decompressor = lzma.LZMADecompressor(format=lzma.FORMAT_XZ)
    vmlinux = decompressor.decompress(image[start:])
    if not vmlinux.startswith(b"\x7fELF"):
        die("the xz stream in vmlinuz is not an ELF kernel")
    return vmlinux


def module_name(path):
    base = os.path.basename(path)
    return base.split(".", 1)[0].replace("-", "_")


def read_module_data(path):
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        return lzma.decompress(data)
    if path.endswith(".zst") or path.endswith(".gz"):
        die(f"compressed module {path} is not supported (only .ko and .ko.xz)")
    return data


def stored_name(path):
    """The module's path inside the initramfs: always an uncompressed .ko."""
    for suffix in (".xz",):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    return path


def resolve_modules(moddir, wanted, skip=()):
    """Returns module paths (relative to moddir) in load order, dependencies first,
    leaving out the modules named in `skip` (loaded already).

    Debian's package carries no modules.dep (depmod runs at install time), so the
    dependencies come from each module's own `depends=` modinfo field.
    """
    by_name = {}
    for dirpath, _, files in os.walk(os.path.join(moddir, "kernel")):
        for name in files:
            if ".ko" in name:
                rel = os.path.relpath(os.path.join(dirpath, name), moddir)
                by_name[module_name(rel)] = rel
    builtin = set()
    builtin_file = os.path.join(moddir, "modules.builtin")
    if os.path.exists(builtin_file):
        with open(builtin_file) as f:
            builtin = {module_name(line.strip()) for line in f if line.strip()}

    order, seen = [], set(skip)

    def visit(name):
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in by_name:
            die(f"module {name} is neither built in nor shipped in the kernel package")
        path = by_name[name]
        depends = elfinfo.modinfo(read_module_data(os.path.join(moddir, path))).get("depends", "")
        for dep in sorted(d for d in depends.split(",") if d):
            visit(dep.replace("-", "_"))
        order.append(path)

    for name in wanted:
        visit(name)
    return order


class Cpio:
    """A minimal, deterministic newc archive writer."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.entries = {}

    def add_dir(self, path):
        if not path.strip("/"):
            return
        parts = path.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            self.entries.setdefault("/".join(parts[:i]), (stat.S_IFDIR | 0o755, b"", 0, 0))

    def add_file(self, path, data, mode=0o644):
        self.add_dir(os.path.dirname(path))
        self.entries[path.strip("/")] = (stat.S_IFREG | mode, data, 0, 0)

    def add_char_dev(self, path, major, minor, mode=0o600):
        self.add_dir(os.path.dirname(path))
        self.entries[path.strip("/")] = (stat.S_IFCHR | mode, b"", major, minor)

    def add_symlink(self, path, target):
        self.add_dir(os.path.dirname(path))
        self.entries[path.strip("/")] = (stat.S_IFLNK | 0o777, target.encode(), 0, 0)

    def _header(self, ino, name, mode, size, rmajor, rminor):
        fields = [ino, mode, 0, 0, 1, self.epoch, size, 0, 0, rmajor, rminor, len(name) + 1, 0]
        return b"070701" + b"".join(b"%08X" % v for v in fields)

    @staticmethod
    def _pad(n):
        return b"\0" * ((4 - n % 4) % 4)

    def bytes(self):
        out = bytearray()
        for ino, name in enumerate(sorted(self.entries), start=1):
            mode, data, rmajor, rminor = self.entries[name]
            encoded = name.encode()
            out += self._header(ino, encoded, mode, len(data), rmajor, rminor)
            out += encoded + b"\0"
            out += self._pad(110 + len(encoded) + 1)
            out += data
            out += self._pad(len(data))
        trailer = b"TRAILER!!!"
        out += b"070701" + b"".join(
            b"%08X" % v for v in [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, len(trailer) + 1, 0]
        )
        out += trailer + b"\0" + self._pad(110 + len(trailer) + 1)
        return bytes(out)


def write_busybox_rootfs(busybox_root, out_dir):
    rootfs = os.path.join(out_dir, "busybox-rootfs")
    shutil.rmtree(rootfs, ignore_errors=True)
    for d in ("bin", "proc", "dev", "tmp", "etc"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    shutil.copy2(os.path.join(busybox_root, "bin", "busybox"), os.path.join(rootfs, "bin", "busybox"))
    for applet in ("sh", "echo", "cat", "ls", "sleep", "id", "true", "false", "env", "pwd", "uname", "grep", "ps", "head", "tail", "dd", "wc", "test", "stat", "mount", "kill"):
        os.symlink("busybox", os.path.join(rootfs, "bin", applet))
    with open(os.path.join(rootfs, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")
    return rootfs


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kernel-root", required=True)
    parser.add_argument("--busybox-root", required=True)
    parser.add_argument("--agent", required=True)
    parser.add_argument("--modules", required=True)
    parser.add_argument("--extra-modules-dir", default="")
    parser.add_argument("--epoch", type=int, default=0)
    parser.add_argument("--kernel-package", default="")
    parser.add_argument("--out", required=True)
    group = parser.add_argument_group("GPU flavour (guest/build.sh --gpu)")
    group.add_argument("--gpu", action="store_true", help="pack the GPU flavour")
    group.add_argument("--nvidia-version", help="driver version, e.g. 550.163.01")
    group.add_argument("--nvidia-root", help="the driver's Debian packages, unpacked")
    group.add_argument("--nvidia-modules-dir", help="the built nvidia*.ko")
    group.add_argument("--nvidia-packages", nargs="*", default=[], help=".deb names, for the manifest")
    group.add_argument("--glibc-root", help="bookworm libc6 (+ libgcc-s1), unpacked")
    group.add_argument("--libc-bin-root", help="bookworm libc-bin, unpacked (ldconfig)")
    group.add_argument("--gpu-check", default="", help="the gpuvm-gpu-check binary")
    group.add_argument("--gpu-check-missing", default="", help="why there is no --gpu-check")
    group.add_argument("--probe", help="the built dlopen-probe")
    args = parser.parse_args()
    if args.gpu:
        for name in ("nvidia_version", "nvidia_root", "nvidia_modules_dir", "glibc_root",
                     "libc_bin_root", "probe"):
            if not getattr(args, name):
                parser.error(f"--gpu needs --{name.replace('_', '-')}")
    return args


def add_extra_modules(cpio, extra, release):
    """The hook for out-of-tree modules: every file of the directory goes to
    lib/modules/<release>/extra/; returns its modules.list lines (paths relative to
    the directory, in load order), prefixed for ours."""
    lines = []
    if not extra:
        return lines
    for dirpath, _, files in os.walk(extra):
        for name in sorted(files):
            src = os.path.join(dirpath, name)
            rel = os.path.relpath(src, extra)
            if rel == "modules.list":
                continue
            with open(src, "rb") as f:
                cpio.add_file(f"lib/modules/{release}/extra/{rel}", f.read())
    extra_list = os.path.join(extra, "modules.list")
    if os.path.exists(extra_list):
        with open(extra_list) as f:
            for line in f:
                line = line.split("#")[0].strip()
                if line:
                    lines.append(f"extra/{line}")
    return lines


def base_cpio(args, moddir, release, agent):
    """The small image's entries; returns the archive and the modules.list lines."""
    with open(args.modules) as f:
        wanted = [line.split("#")[0].strip() for line in f]
    order = resolve_modules(moddir, [w for w in wanted if w])

    cpio = Cpio(args.epoch)
    for d in ("dev", "proc", "sys", "tmp", "run", "etc/gpuvm", "root"):
        cpio.add_dir(d)
    cpio.add_char_dev("dev/console", 5, 1)
    cpio.add_char_dev("dev/null", 1, 3, 0o666)
    cpio.add_file("init", agent, 0o755)

    list_lines = []
    for rel in order:
        data = read_module_data(os.path.join(moddir, rel))
        stored = stored_name(rel)
        cpio.add_file(f"lib/modules/{release}/{stored}", data)
        list_lines.append(stored)
    list_lines += add_extra_modules(cpio, args.extra_modules_dir, release)

    modules_list = "# Generated by guest/pack.py: load order, dependencies first.\n"
    modules_list += "".join(f"{line}\n" for line in list_lines)
    cpio.add_file("etc/gpuvm/modules.list", modules_list.encode())
    return cpio, list_lines


def add_gpu_flavour(args, cpio, moddir, release, base_lines):
    """Adds the GPU flavour's entries; returns the manifest's "nvidia" object."""
    loaded = {module_name(line) for line in base_lines}

    def kernel_deps(names):
        order = resolve_modules(moddir, names, skip=loaded)
        return [(stored_name(rel), read_module_data(os.path.join(moddir, rel))) for rel in order]

    try:
        return gpu.add_gpu(cpio, args, release, kernel_deps)
    except (gpu.GpuError, ValueError, OSError) as e:
        die(str(e))


def main():
    args = parse_args()
    boot = os.path.join(args.kernel_root, "boot")
    vmlinuz = sorted(f for f in os.listdir(boot) if f.startswith("vmlinuz-"))
    if not vmlinuz:
        die(f"no vmlinuz in {boot}")
    release = vmlinuz[-1][len("vmlinuz-"):]
    moddir = os.path.join(args.kernel_root, "lib", "modules", release)

    vmlinux = extract_vmlinux(os.path.join(boot, vmlinuz[-1]))
    with open(args.agent, "rb") as f:
        agent = f.read()
    cpio, list_lines = base_cpio(args, moddir, release, agent)
    nvidia = add_gpu_flavour(args, cpio, moddir, release, list_lines) if args.gpu else None

    archive = cpio.bytes()
    os.makedirs(args.out, exist_ok=True)
    initramfs_path = os.path.join(args.out, "initramfs.cpio.gz")
    with open(initramfs_path, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz:
            gz.write(archive)
    with open(os.path.join(args.out, "vmlinux"), "wb") as f:
        f.write(vmlinux)
    rootfs = write_busybox_rootfs(args.busybox_root, args.out)

    with open(initramfs_path, "rb") as f:
        initramfs = f.read()
    manifest = {
        "kernel_release": release,
        "kernel_package": args.kernel_package,
        "modules": list_lines,
        "source_date_epoch": args.epoch,
        "sha256": {
            "vmlinux": sha256(vmlinux),
            "initramfs.cpio.gz": sha256(initramfs),
            "init": sha256(agent),
        },
        "busybox_rootfs": os.path.basename(rootfs),
    }
    if nvidia is not None:
        try:
            probe = gpu.write_probe_rootfs(args.out, rootfs, args.glibc_root, args.libc_bin_root, args.probe)
        except (gpu.GpuError, ValueError, OSError) as e:
            die(str(e))
        manifest.update(flavour="gpu", nvidia=nvidia, probe_rootfs=os.path.basename(probe),
                        initramfs_unpacked_bytes=len(archive))
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=2, sort_keys=True)
        f.write("\n")
    print(f"guest image for {release} in {args.out}: vmlinux {len(vmlinux) >> 20} MiB, "
          f"initramfs {len(initramfs) >> 10} KiB ({len(archive) >> 10} KiB unpacked), "
          f"{len(list_lines)} modules" + (f", NVIDIA {args.nvidia_version}" if args.gpu else ""))


if __name__ == "__main__":
    main()
