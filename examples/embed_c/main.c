/* embed_c: classify MNIST images with a graphcnn model compiled to a shared library.
 *
 *   make MODEL=mnist_cnn LIBDIR=/path/to/compiled/model
 *   ./classify [--probs] [--batch N] IMAGES.idx
 *
 * Reads a raw (uncompressed) IDX image file (magic 0x00000803: uint8, N x rows x cols), scales pixels by
 * 1/255, runs MODEL_predict in batches and prints one predicted class per line (with --probs, the
 * class followed by the output row). The model is chosen at build time: the Makefile passes
 * -DGC_MODEL=<name> -DGC_MODEL_HEADER="<name>.h", and the macros below paste the name onto the
 * API symbols, so this file works with any exported model with a 28x28x1-style image input.
 */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef GC_MODEL
#error "build with -DGC_MODEL=<model name> -DGC_MODEL_HEADER='\"<model name>.h\"' (see the Makefile)"
#endif
#include GC_MODEL_HEADER

#define GC_PASTE2(a, b) a##b
#define GC_PASTE(a, b) GC_PASTE2(a, b)
#define M(suffix) GC_PASTE(GC_MODEL, suffix) /* M(_predict) -> mnist_cnn_predict */

static int read_be32(FILE *f, uint32_t *out) {
    unsigned char b[4];
    if (fread(b, 1, 4, f) != 4) return -1;
    *out = ((uint32_t)b[0] << 24) | ((uint32_t)b[1] << 16) | ((uint32_t)b[2] << 8) | b[3];
    return 0;
}

/* Reads the whole IDX file; returns the pixel bytes (count images) or NULL with a message on stderr. */
static unsigned char *read_idx_images(const char *path, uint32_t *count) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "classify: cannot open %s: %s\n", path, strerror(errno));
        return NULL;
    }
    uint32_t magic, n, rows, cols;
    if (read_be32(f, &magic) || read_be32(f, &n) || read_be32(f, &rows) || read_be32(f, &cols)) {
        fprintf(stderr, "classify: %s: truncated IDX header\n", path);
        fclose(f);
        return NULL;
    }
    if (magic != 0x00000803u) {
        fprintf(stderr, "classify: %s: not a raw uint8 3-D IDX file (magic 0x%08x; gzip is not supported)\n",
                path, magic);
        fclose(f);
        return NULL;
    }
    if (rows != M(_INPUT_H) || cols != M(_INPUT_W) || M(_INPUT_C) != 1) {
        fprintf(stderr, "classify: %s: images are %ux%u, the model expects %dx%dx%d\n", path, rows, cols,
                M(_INPUT_H), M(_INPUT_W), M(_INPUT_C));
        fclose(f);
        return NULL;
    }
    size_t bytes = (size_t)n * rows * cols;
    unsigned char *pixels = malloc(bytes ? bytes : 1);
    if (!pixels || fread(pixels, 1, bytes, f) != bytes) {
        fprintf(stderr, "classify: %s: %s\n", path, pixels ? "file shorter than its header says" : "out of memory");
        free(pixels);
        fclose(f);
        return NULL;
    }
    fclose(f);
    *count = n;
    return pixels;
}

int main(int argc, char **argv) {
    int print_probs = 0;
    long batch = 256;
    const char *path = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--probs") == 0) {
            print_probs = 1;
        } else if (strcmp(argv[i], "--batch") == 0 && i + 1 < argc) {
            char *end;
            batch = strtol(argv[++i], &end, 10);
            if (*end || batch <= 0 || batch > 65536) {
                fprintf(stderr, "classify: --batch must be an integer in 1..65536, got %s\n", argv[i]);
                return 2;
            }
        } else if (!path && argv[i][0] != '-') {
            path = argv[i];
        } else {
            fprintf(stderr, "usage: %s [--probs] [--batch N] IMAGES.idx\n", argv[0]);
            return 2;
        }
    }
    if (!path) {
        fprintf(stderr, "usage: %s [--probs] [--batch N] IMAGES.idx\n", argv[0]);
        return 2;
    }
    uint32_t n;
    unsigned char *pixels = read_idx_images(path, &n);
    if (!pixels) return 2;

    const size_t in_size = M(_INPUT_SIZE), out_size = M(_OUTPUT_SIZE);
    size_t ws_bytes = M(_workspace_size)(batch);
    float *input = malloc(sizeof(float) * in_size * (size_t)batch);
    float *output = malloc(sizeof(float) * out_size * (size_t)batch);
    void *workspace = malloc(ws_bytes);
    if (!ws_bytes || !input || !output || !workspace) {
        fprintf(stderr, "classify: out of memory\n");
        return 1;
    }
    int status = 0;
    for (uint32_t start = 0; start < n && status == 0; start += (uint32_t)batch) {
        int64_t b = (n - start < (uint32_t)batch) ? (int64_t)(n - start) : batch;
        for (size_t i = 0; i < (size_t)b * in_size; i++)
            input[i] = pixels[(size_t)start * in_size + i] * (1.0f / 255.0f);
        int rc = M(_predict_checked)(input, b, output, workspace, ws_bytes);
        if (rc != M(_OK)) {
            fprintf(stderr, "classify: predict failed with error code %d\n", rc);
            status = 1;
            break;
        }
        for (int64_t k = 0; k < b; k++) {
            const float *row = output + (size_t)k * out_size;
            size_t best = 0;
            for (size_t j = 1; j < out_size; j++)
                if (row[j] > row[best]) best = j; /* first maximum, like numpy's argmax */
            printf("%zu", best);
            if (print_probs)
                for (size_t j = 0; j < out_size; j++) printf(" %.9g", row[j]);
            putchar('\n');
        }
    }
    free(pixels);
    free(input);
    free(output);
    free(workspace);
    return status;
}
