"""Tests of the GPU flavour's packing (guest/gpu.py, guest/elfinfo.py) on small ELF
files compiled here with gcc, standing in for NVIDIA's.

    python3 -m unittest discover -s guest/tests -v
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import types
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import elfinfo  # noqa: E402
import gpu  # noqa: E402
import pack  # noqa: E402

CC = shutil.which("gcc-12") or shutil.which("gcc")
RELEASE = "6.1.0-57-amd64"
VERSION = "550.1.2"


def compile_c(out, source, *flags):
    src = out + ".c"
    with open(src, "w") as f:
        f.write(source)
    subprocess.run([CC, "-o", out, src, *flags], check=True)
    return out


def fake_module(path, vermagic, depends=""):
    """An ELF object with a .modinfo section, like a .ko."""
    return compile_c(
        path,
        '__attribute__((section(".modinfo"), used)) static const char info[] = '
        f'"vermagic={vermagic}\\0depends={depends}";\n',
        "-c",
    )


# Uses libm and libc for real: the linker drops unused libraries (--as-needed).
LIBRARY_SOURCE = """
#include <math.h>
#include <stdio.h>
int f(double x) { return puts("x") + (int)cos(x); }
"""


def fake_library(path, soname, *libs, source=LIBRARY_SOURCE):
    return compile_c(path, source, "-shared", "-fPIC", "-fno-builtin", f"-Wl,-soname,{soname}", *libs)


class Tree:
    """A fake unpacked driver, module cache and glibc in a temp dir."""

    def __init__(self, root):
        self.root = root
        self.nvidia = os.path.join(root, "nvidia")
        self.modules = os.path.join(root, "modules")
        self.glibc = os.path.join(root, "glibc")
        lib_dir = os.path.join(self.nvidia, gpu.DEBIAN_LIB_DIR)
        for d in (lib_dir, os.path.join(self.nvidia, gpu.DEBIAN_BIN_DIR), self.modules,
                  os.path.join(self.nvidia, gpu.DEBIAN_FIRMWARE_DIR, VERSION),
                  os.path.join(self.glibc, gpu.GLIBC_DIR)):
            os.makedirs(d)
        for stem, _ in gpu.LIBRARIES:
            fake_library(os.path.join(lib_dir, f"{stem}.{VERSION}"), f"{stem}.1", "-lm")
        os.symlink("libnvidia-ml.so.1", os.path.join(lib_dir, "libnvidia-ml.so"))
        compile_c(os.path.join(self.nvidia, gpu.DEBIAN_BIN_DIR, "nvidia-smi"), "int main(void) { return 0; }\n")
        for name in ("gsp_ga10x.bin", "gsp_tu10x.bin"):
            with open(os.path.join(self.nvidia, gpu.DEBIAN_FIRMWARE_DIR, VERSION, name), "wb") as f:
                f.write(name.encode())
        for name in gpu.MODULES:
            fake_module(os.path.join(self.modules, f"{name}.ko"), f"{RELEASE} SMP mod_unload modversions ",
                        "" if name == "nvidia" else "nvidia")
        # The build machine's glibc stands in for bookworm's libc6.
        for lib in gpu.GLIBC + ("libgcc_s.so.1",):
            system = os.path.join("/lib/x86_64-linux-gnu", lib)
            if os.path.exists(system):
                shutil.copyfile(system, os.path.join(self.glibc, gpu.GLIBC_DIR, lib))

    def args(self, **overrides):
        values = dict(nvidia_version=VERSION, nvidia_root=self.nvidia, nvidia_modules_dir=self.modules,
                      glibc_root=self.glibc, gpu_check="", gpu_check_missing="MISSING: test",
                      nvidia_packages=["x.deb"])
        values.update(overrides)
        return types.SimpleNamespace(**values)


@unittest.skipUnless(CC, "SKIPPED: no gcc to compile the test ELF files")
class GpuPackTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.tree = Tree(self.tmp)
        self.cpio = pack.Cpio(0)

    def add(self, **overrides):
        return gpu.add_gpu(self.cpio, self.tree.args(**overrides), RELEASE, lambda names: [])

    def entry(self, path):
        return self.cpio.entries[path][1]

    def test_dynamic_section(self):
        lib = fake_library(os.path.join(self.tmp, "libx.so"), "libx.so.7", "-lm")
        with open(lib, "rb") as f:
            needed, soname = elfinfo.dynamic(f.read())
        self.assertEqual(soname, "libx.so.7")
        self.assertIn("libm.so.6", needed)
        self.assertIn("libc.so.6", needed)

    def test_layout_and_driver_json(self):
        manifest = self.add()
        driver = json.loads(self.entry("etc/gpuvm/nvidia/driver.json"))
        self.assertEqual(list(driver), ["version", "libraries", "binaries", "firmware_dir"])
        self.assertEqual(driver["version"], VERSION)
        self.assertEqual(driver["libraries"][0],
                         {"file": f"libcuda.so.{VERSION}", "soname": "libcuda.so.1", "capability": "compute"})
        self.assertIn({"file": f"libnvidia-ml.so.{VERSION}", "soname": "libnvidia-ml.so.1",
                       "capability": "utility"}, driver["libraries"])
        self.assertEqual(driver["binaries"], [{"file": "bin/nvidia-smi", "name": "nvidia-smi",
                                               "capability": "utility"}])
        self.assertEqual(driver["firmware_dir"], f"/lib/firmware/nvidia/{VERSION}")
        self.assertEqual(self.entry("usr/lib/gpuvm/nvidia/libcuda.so.1"), f"libcuda.so.{VERSION}".encode())
        self.assertEqual(self.entry("usr/lib/gpuvm/nvidia/libnvidia-ml.so"), b"libnvidia-ml.so.1")
        self.assertIn(f"lib/firmware/nvidia/{VERSION}/gsp_tu10x.bin", self.cpio.entries)
        self.assertIn("lib/x86_64-linux-gnu/libm.so.6", self.cpio.entries)
        self.assertEqual(self.entry("lib64/ld-linux-x86-64.so.2"), b"/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")
        lines = [l for l in self.entry("etc/gpuvm/nvidia-modules.list").decode().splitlines()
                 if not l.startswith("#")]
        self.assertEqual(lines, ["extra/nvidia/nvidia.ko", "extra/nvidia/nvidia-uvm.ko",
                                 "extra/nvidia/nvidia-modeset.ko"])
        self.assertEqual(manifest["gpu_check"], "MISSING: test")
        self.assertNotIn("usr/bin/gpuvm-gpu-check", self.cpio.entries)

    def test_kernel_dependencies_load_first(self):
        fake_module(os.path.join(self.tree.modules, "nvidia.ko"), f"{RELEASE} SMP ", "drm")
        asked = []

        def resolve(names):
            asked.append(names)
            return [("kernel/drivers/gpu/drm/drm.ko", b"drm")]

        gpu.add_gpu(self.cpio, self.tree.args(), RELEASE, resolve)
        self.assertEqual(asked, [["drm"]])
        lines = self.entry("etc/gpuvm/nvidia-modules.list").decode().splitlines()
        self.assertEqual(lines[2:4], ["kernel/drivers/gpu/drm/drm.ko", "extra/nvidia/nvidia.ko"])

    def test_wrong_kernel_is_refused(self):
        fake_module(os.path.join(self.tree.modules, "nvidia-uvm.ko"), "6.1.0-1-amd64 SMP ", "nvidia")
        with self.assertRaisesRegex(gpu.GpuError, "nvidia-uvm.ko is built for '6.1.0-1-amd64 SMP '"):
            self.add()

    def test_missing_needed_library_fails(self):
        lib_dir = os.path.join(self.tree.nvidia, gpu.DEBIAN_LIB_DIR)
        other = fake_library(os.path.join(self.tmp, "libother.so"), "libother.so.3",
                             source="int other(void) { return 3; }\n")
        fake_library(os.path.join(lib_dir, f"libcuda.so.{VERSION}"), "libcuda.so.1", other,
                     source="int other(void);\nint g(void) { return other(); }\n")
        with self.assertRaisesRegex(gpu.GpuError, r"libother.so.3 \(needed by libcuda.so.1\)"):
            self.add()

    def test_dlopened_library_is_required(self):
        with mock.patch.dict(gpu.DLOPENED, {"libcuda.so.1": ("libnvidia-nvvm.so.4",)}):
            with self.assertRaisesRegex(gpu.GpuError, r"libnvidia-nvvm.so.4 \(needed by libcuda.so.1\)"):
                self.add()

    def test_gpu_check_and_its_libraries_are_packed(self):
        check = compile_c(os.path.join(self.tmp, "check"), "int main(void) { return 0; }\n")
        manifest = self.add(gpu_check=check)
        self.assertEqual(self.cpio.entries["usr/bin/gpuvm-gpu-check"][0] & 0o777, 0o755)
        self.assertEqual(manifest["gpu_check"], "usr/bin/gpuvm-gpu-check")

    def test_missing_firmware_fails(self):
        shutil.rmtree(os.path.join(self.tree.nvidia, gpu.DEBIAN_FIRMWARE_DIR))
        with self.assertRaisesRegex(gpu.GpuError, "no gsp_"):
            self.add()


@unittest.skipUnless(CC, "SKIPPED: no gcc to compile the test ELF files")
class ProbeRootfsTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.base = os.path.join(self.tmp, "busybox-rootfs")
        os.makedirs(os.path.join(self.base, "bin"))
        self.glibc = os.path.join(self.tmp, "glibc")
        os.makedirs(os.path.join(self.glibc, gpu.GLIBC_DIR))
        os.makedirs(os.path.join(self.glibc, "lib64"))
        os.symlink("/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", os.path.join(self.glibc, "lib64", "ld-linux-x86-64.so.2"))
        self.libc_bin = os.path.join(self.tmp, "libc-bin")
        os.makedirs(os.path.join(self.libc_bin, "sbin"))
        with open(os.path.join(self.libc_bin, "sbin", "ldconfig"), "w") as f:
            f.write("ldconfig")
        self.probe = compile_c(os.path.join(self.tmp, "probe"), "int main(void) { return 0; }\n")

    def write(self):
        return gpu.write_probe_rootfs(self.tmp, self.base, self.glibc, self.libc_bin, self.probe)

    def test_rootfs_has_glibc_ldconfig_and_probe(self):
        shutil.copyfile("/lib/x86_64-linux-gnu/libc.so.6", os.path.join(self.glibc, gpu.GLIBC_DIR, "libc.so.6"))
        rootfs = self.write()
        self.assertTrue(os.access(os.path.join(rootfs, "usr", "bin", "dlopen-probe"), os.X_OK))
        self.assertTrue(os.path.isfile(os.path.join(rootfs, "sbin", "ldconfig")))
        self.assertTrue(os.path.islink(os.path.join(rootfs, "lib64", "ld-linux-x86-64.so.2")))
        self.assertTrue(os.path.isdir(os.path.join(rootfs, "usr", "lib", "x86_64-linux-gnu")))

    def test_probe_without_its_libc_fails(self):
        with self.assertRaisesRegex(gpu.GpuError, "dlopen-probe needs libc.so.6"):
            self.write()

    def test_pack_refuses_gpu_without_its_inputs(self):
        run = subprocess.run([sys.executable, os.path.join(os.path.dirname(HERE), "pack.py"), "--kernel-root", "k",
                              "--busybox-root", "b", "--agent", "a", "--modules", "m", "--out", "o", "--gpu"],
                             capture_output=True, text=True)
        self.assertEqual(run.returncode, 2)
        self.assertIn("--gpu needs --nvidia-version", run.stderr)


if __name__ == "__main__":
    unittest.main()
