/* Run a libFuzzer target over files without libFuzzer: each argument (a
 * file or a directory of files) is fed to LLVMFuzzerTestOneInput once.
 * Without arguments, $top_srcdir/tests/fuzz/corpus/FUZZ_CORPUS (a name
 * given at compile time) is used.
 * Lets "make check" replay the seed corpus (and every crash found and
 * added to it) under the normal compiler and sanitizers. */
#include <dirent.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int run_file(const char *path) {
        FILE *f = fopen(path, "rb");
        uint8_t *buf;
        long n;

        if (!f)
                return -1;
        fseek(f, 0, SEEK_END);
        n = ftell(f);
        rewind(f);
        buf = malloc(n > 0 ? (size_t)n : 1);
        if (!buf || fread(buf, 1, (size_t)n, f) != (size_t)n) {
                fclose(f);
                free(buf);
                return -1;
        }
        fclose(f);
        LLVMFuzzerTestOneInput(buf, (size_t)n);
        free(buf);
        return 0;
}

static int run_path(const char *path, unsigned *count) {
        struct stat st;
        struct dirent *de;
        DIR *d;

        if (stat(path, &st) < 0) {
                fprintf(stderr, "replay: cannot stat %s\n", path);
                return -1;
        }
        if (!S_ISDIR(st.st_mode)) {
                (*count)++;
                return run_file(path);
        }
        d = opendir(path);
        if (!d)
                return -1;
        while ((de = readdir(d))) {
                char p[4096];

                if (de->d_name[0] == '.')
                        continue;
                snprintf(p, sizeof(p), "%s/%s", path, de->d_name);
                if (run_path(p, count) < 0) {
                        closedir(d);
                        return -1;
                }
        }
        closedir(d);
        return 0;
}

int main(int argc, char **argv) {
        unsigned count = 0;
        char def[4096];

        if (argc < 2) {
                const char *top = getenv("top_srcdir");
                snprintf(def, sizeof(def), "%s/tests/fuzz/corpus/%s", top ? top : ".", FUZZ_CORPUS);
                if (run_path(def, &count) < 0)
                        return 1;
        }
        for (int i = 1; i < argc; i++)
                if (run_path(argv[i], &count) < 0)
                        return 1;
        printf("replayed %u inputs\n", count);
        return count > 0 ? 0 : 77;
}
