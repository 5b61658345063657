/*
 * fsync_on_close: make a receiver flush every file it closes, for a like-for-like reference.
 *
 * DCMTK storescp writes each received instance with fopen/fwrite/fclose and answers after
 * fclose; it never calls fsync. Loaded with LD_PRELOAD, this library flushes and fsyncs the
 * file (one opened for writing) inside fclose, so storescp acknowledges an instance only once it is on the device: the
 * same promise the node makes. benchmarks/receive.py builds it with the system C compiler
 * when one is present and reports storescp both ways.
 *
 * When DICOMNODE_FSYNC_COUNT_DIR is set, each process writes the number of files it flushed to
 * <dir>/<pid> when it exits (written aside and renamed into place), so the benchmark can check that every instance was flushed.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int (*real_fclose)(FILE *) = NULL;
static long flushed = 0;

int fclose(FILE *stream)
{
    if (real_fclose == NULL)
        real_fclose = (int (*)(FILE *))dlsym(RTLD_NEXT, "fclose");
    if (stream != NULL && (fcntl(fileno(stream), F_GETFL) & O_ACCMODE) != O_RDONLY
            && fflush(stream) == 0 && fsync(fileno(stream)) == 0)
        flushed++;
    return real_fclose(stream);
}

__attribute__((destructor)) static void report(void)
{
    const char *dir = getenv("DICOMNODE_FSYNC_COUNT_DIR");
    char path[4096], part[4200];
    FILE *out;
    if (dir == NULL || flushed == 0 || real_fclose == NULL)
        return;
    snprintf(path, sizeof path, "%s/%ld", dir, (long)getpid());
    snprintf(part, sizeof part, "%s.part", path);
    out = fopen(part, "w");
    if (out == NULL)
        return;
    fprintf(out, "%ld\n", flushed);
    if (real_fclose(out) == 0)
        rename(part, path); /* the reader sees a whole count or none */
}
