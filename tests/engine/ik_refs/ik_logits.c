// Logits reference for tests/engine/test_ik_model.py: ik_llama.cpp's own inference of a GGUF model.
//
// usage: ik_logits MODEL.gguf TOKENS.txt OUT.f32
// Reads whitespace-separated token ids, evaluates them as ONE batch (positions 0..n-1, one sequence) on the CPU
// with -mla 0 (ik_llama.cpp's MLA modes need DeepSeek's own attention sizes) and no flash attention, and writes
// the logits of every position as float32 [n, n_vocab], row-major. Built and run by make_model_ref.sh.
#include "llama.h"

#include <stdio.h>
#include <stdlib.h>

int main(int argc, char ** argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s MODEL.gguf TOKENS.txt OUT.f32\n", argv[0]);
        return 2;
    }
    FILE * ft = fopen(argv[2], "r");
    if (!ft) {
        fprintf(stderr, "cannot read %s\n", argv[2]);
        return 1;
    }
    int n = 0, cap = 4096;
    llama_token * tokens = malloc(sizeof(llama_token) * cap);
    while (n < cap && fscanf(ft, "%d", &tokens[n]) == 1) ++n;
    fclose(ft);

    llama_backend_init();
    struct llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;
    struct llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n < 512 ? 512 : n;
    cp.n_batch = cp.n_ctx;
    cp.n_ubatch = cp.n_ctx;
    cp.n_threads = 2;
    cp.n_threads_batch = 2;
    cp.mla_attn = 0;
    cp.flash_attn = false;
    struct llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    struct llama_batch batch = llama_batch_init(n, 0, 1);
    for (int i = 0; i < n; ++i) {
        batch.token[i] = tokens[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;
    }
    batch.n_tokens = n;
    if (llama_decode(ctx, batch) != 0) {
        fprintf(stderr, "llama_decode failed\n");
        return 1;
    }
    const int n_vocab = llama_n_vocab(model);
    FILE * fo = fopen(argv[3], "wb");
    for (int i = 0; i < n; ++i) {
        if (fwrite(llama_get_logits_ith(ctx, i), sizeof(float), n_vocab, fo) != (size_t)n_vocab) {
            fprintf(stderr, "cannot write %s\n", argv[3]);
            return 1;
        }
    }
    fclose(fo);
    printf("%d positions x %d logits\n", n, n_vocab);
    llama_batch_free(batch);
    llama_free(ctx);
    llama_free_model(model);
    free(tokens);
    return 0;
}
