// Dumps llama.cpp's logits for a list of token ids, for the side-by-side logits check
// (scripts/bench/peer/peer.py logits). Two modes, like `flashmoe logits`:
//   prefill: one batch of all ids, logits for every position;
//   decode:  one id per llama_decode call through the KV cache.
// Output: JSON {"logits": [[...], ...]} on stdout. Built against the libllama of peer.py build.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void print_row(const float * row, int n_vocab, bool last) {
    std::printf("[");
    for (int j = 0; j < n_vocab; j++) {
        std::printf(j ? ",%.9g" : "%.9g", row[j]);
    }
    std::printf(last ? "]" : "],");
}

int main(int argc, char ** argv) {
    if (argc != 4 || (std::strcmp(argv[2], "prefill") && std::strcmp(argv[2], "decode"))) {
        std::fprintf(stderr, "usage: %s MODEL.gguf prefill|decode ID,ID,...\n", argv[0]);
        return 2;
    }
    std::vector<llama_token> ids;
    for (const char * p = argv[3]; *p;) {
        char * end = nullptr;
        long v = std::strtol(p, &end, 10);
        if (end == p) {
            std::fprintf(stderr, "bad id list: %s\n", argv[3]);
            return 2;
        }
        ids.push_back((llama_token) v);
        p = *end == ',' ? end + 1 : end;
    }
    const bool decode = !std::strcmp(argv[2], "decode");

    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = 0;  // the CPU backend in f32: the reference side of the check
    llama_model * model = llama_model_load_from_file(argv[1], mp);
    if (!model) {
        std::fprintf(stderr, "cannot load %s\n", argv[1]);
        return 1;
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 512;
    cp.n_batch = 512;
    cp.n_ubatch = 512;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) {
        std::fprintf(stderr, "cannot create a context\n");
        return 1;
    }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    const int n = (int) ids.size();
    std::vector<std::vector<float>> rows;
    llama_batch batch = llama_batch_init(n, 0, 1);
    int pos = 0;
    while (pos < n) {
        const int len = decode ? 1 : n;
        batch.n_tokens = len;
        for (int i = 0; i < len; i++) {
            batch.token[i] = ids[pos + i];
            batch.pos[i] = pos + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = 1;
        }
        if (llama_decode(ctx, batch) != 0) {
            std::fprintf(stderr, "llama_decode failed at position %d\n", pos);
            return 1;
        }
        for (int i = 0; i < len; i++) {
            const float * row = llama_get_logits_ith(ctx, i);
            rows.emplace_back(row, row + n_vocab);
        }
        pos += len;
    }
    std::printf("{\"logits\":[");
    for (size_t r = 0; r < rows.size(); r++) {
        print_row(rows[r].data(), n_vocab, r + 1 == rows.size());
    }
    std::printf("]}\n");
    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
