// Reference data for tests/engine/test_ik_types.py: ik_llama.cpp's own quantizer and dequantizer.
//
// For each type and shape below: seeded random float rows are quantized with ggml_quantize_chunk (no
// importance matrix) and dequantized with the type traits' to_float, one row (or one group of 4/8/16
// interleaved rows) per call, exactly as ik_llama.cpp's CPU backend converts a tensor. Writes, per case,
// <TYPE>-<rows>x<cols>.q (the encoded bytes, rows * ggml_row_size) and <TYPE>-<rows>x<cols>.f32 (the decoded
// float32 values, row-major) into the directory given as argv[1]. Built and run by make_refs.sh; never by tests.
#include "ggml.h"

#include <ctype.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct ref_type {
    enum ggml_type type;
    int group;  // rows interleaved in one group (1: plain rows)
};

static const struct ref_type TYPES[] = {
    {GGML_TYPE_Q6_0, 1},     {GGML_TYPE_IQ2_K, 1},     {GGML_TYPE_IQ3_K, 1},     {GGML_TYPE_IQ4_K, 1},
    {GGML_TYPE_IQ5_K, 1},    {GGML_TYPE_IQ6_K, 1},     {GGML_TYPE_IQ4_KS, 1},    {GGML_TYPE_IQ2_KS, 1},
    {GGML_TYPE_IQ4_KSS, 1},  {GGML_TYPE_IQ5_KS, 1},    {GGML_TYPE_IQ3_KS, 1},    {GGML_TYPE_IQ2_KL, 1},
    {GGML_TYPE_IQ1_KT, 1},   {GGML_TYPE_IQ2_KT, 1},    {GGML_TYPE_IQ3_KT, 1},    {GGML_TYPE_IQ4_KT, 1},
    {GGML_TYPE_Q8_KV, 1},    {GGML_TYPE_Q8_0_R8, 8},   {GGML_TYPE_Q4_0_R8, 8},   {GGML_TYPE_Q5_0_R4, 4},
    {GGML_TYPE_Q6_0_R4, 4},  {GGML_TYPE_IQ4_NL_R4, 4}, {GGML_TYPE_Q2_K_R4, 4},   {GGML_TYPE_Q3_K_R4, 4},
    {GGML_TYPE_Q4_K_R4, 4},  {GGML_TYPE_Q5_K_R4, 4},   {GGML_TYPE_Q6_K_R4, 4},   {GGML_TYPE_IQ4_XS_R8, 8},
    {GGML_TYPE_IQ2_K_R4, 4}, {GGML_TYPE_IQ3_K_R4, 4},  {GGML_TYPE_IQ4_K_R4, 4},  {GGML_TYPE_IQ5_K_R4, 4},
    {GGML_TYPE_IQ4_KS_R4, 4}, {GGML_TYPE_IQ5_KS_R4, 4},
    // added later, at the end so that the random values (one generator for the whole list) of the types above
    // stay the same
    {GGML_TYPE_IQ2_XXS_R4, 4}, {GGML_TYPE_IQ2_XS_R4, 4}, {GGML_TYPE_IQ2_S_R4, 4}, {GGML_TYPE_IQ3_XXS_R4, 4},
    {GGML_TYPE_IQ3_S_R4, 4},   {GGML_TYPE_IQ1_S_R4, 4},  {GGML_TYPE_IQ1_M_R4, 4}, {GGML_TYPE_Q8_KV_R8, 8},
    {GGML_TYPE_BF16_R16, 16},
};

// Shapes (rows x columns) per type: plain types 3 x 256 (one super-block) and 2 x 768 (three: several blocks
// behind one row header); interleaved types one group x 256 and two groups x 512 (two super-blocks).
static void shape(int c, int group, int * rows, int * cols) {
    if (group == 1) {
        *rows = c == 0 ? 3 : 2;
        *cols = c == 0 ? 256 : 768;
    } else {
        *rows = c == 0 ? group : 2 * group;
        *cols = c == 0 ? 256 : 512;
    }
}

static uint64_t rng_state = 0x1234567887654321ull;

static double uniform(void) {  // xorshift64*: the same values on every machine
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return (double)((rng_state * 2685821657736338717ull) >> 11) / 9007199254740992.0;
}

static float gaussian(void) {
    double u = uniform(), v = uniform();
    return (float)(sqrt(-2.0 * log(u + 1e-300)) * cos(6.283185307179586 * v));
}

static void write_file(const char * dir, const char * name, const char * ext, const void * data, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s%s", dir, name, ext);
    FILE * f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(1);
    }
    fclose(f);
}

int main(int argc, char ** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR\n", argv[0]);
        return 2;
    }
    struct ggml_init_params params = {16 * 1024 * 1024, NULL, false};
    struct ggml_context * ctx = ggml_init(params);  // fills the fp16 tables the quantizers use
    for (size_t t = 0; t < sizeof TYPES / sizeof TYPES[0]; ++t) {
        const enum ggml_type type = TYPES[t].type;
        ggml_type_traits_t traits = ggml_internal_get_type_traits(type);
        for (int c = 0; c < 2; ++c) {
            int rows, cols;
            shape(c, TYPES[t].group, &rows, &cols);
            const size_t row_size = ggml_row_size(type, cols);
            float * x = malloc(sizeof(float) * rows * cols);
            float * y = malloc(sizeof(float) * rows * cols);
            uint8_t * q = calloc(rows, row_size);
            for (int i = 0; i < rows * cols; ++i) {
                // mostly gaussian, a few outliers so scales and the extreme codes are exercised
                x[i] = gaussian() * (uniform() < 0.02 ? 8.0f : 1.0f);
            }
            size_t n = ggml_quantize_chunk(type, x, q, 0, rows, cols, NULL, NULL);
            if (n != rows * row_size) {
                fprintf(stderr, "%s: quantize wrote %zu bytes, expected %zu\n", traits.type_name, n, rows * row_size);
                return 1;
            }
            const int g = TYPES[t].group;
            if (traits.to_float) {
                for (int r = 0; r < rows; r += g) {
                    traits.to_float(q + r * row_size, y + (size_t)r * cols, (int64_t)g * cols);
                }
            } else {
                // BF16_R16 has no to_float (ik_llama.cpp only multiplies it); its quantizer stores each value
                // truncated to bf16, so the decoded value is the input with its low 16 bits cleared
                for (int i = 0; i < rows * cols; ++i) {
                    uint32_t u;
                    memcpy(&u, x + i, 4);
                    u &= 0xffff0000u;
                    memcpy(y + i, &u, 4);
                }
            }
            char type_name[64], name[256];
            snprintf(type_name, sizeof type_name, "%s", traits.type_name);
            for (char * p = type_name; *p; ++p) *p = (char)toupper((unsigned char)*p);  // GGML_TYPE_ spelling
            snprintf(name, sizeof name, "%s-%dx%d", type_name, rows, cols);
            write_file(argv[1], name, ".q", q, rows * row_size);
            write_file(argv[1], name, ".f32", y, sizeof(float) * rows * cols);
            printf("%s type=%d group=%d row_size=%zu\n", name, (int)type, g, row_size);
            free(x);
            free(y);
            free(q);
        }
    }
    ggml_free(ctx);
    return 0;
}
