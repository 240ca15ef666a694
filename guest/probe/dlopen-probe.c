/*
 * dlopen-probe: loads each shared library named on the command line the way a
 * CUDA program finds its driver (dlopen by soname, through the dynamic linker's
 * search path and cache), and says what happened.
 *
 *   dlopen-probe libcuda.so.1 libnvidia-ml.so.1
 *
 * Prints "ok <name>" or "fail <name>: <dlerror>" per argument. Exits 0 when all
 * loaded, 1 when any failed, 2 on a usage error. Part of the gpuvm GPU guest
 * image's probe-rootfs (guest/build.sh --gpu).
 */
#include <dlfcn.h>
#include <stdio.h>

int main(int argc, char **argv)
{
    int failed = 0;

    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBRARY...\n", argv[0]);
        return 2;
    }
    for (int i = 1; i < argc; i++) {
        /* RTLD_NOW: resolve every symbol now, so a missing dependency shows here. */
        void *handle = dlopen(argv[i], RTLD_NOW | RTLD_LOCAL);

        if (handle == NULL) {
            const char *error = dlerror();

            printf("fail %s: %s\n", argv[i], error != NULL ? error : "unknown error");
            failed = 1;
            continue;
        }
        printf("ok %s\n", argv[i]);
        dlclose(handle);
    }
    fflush(stdout);
    return failed;
}
