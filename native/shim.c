#include "llama_api.h"

#include <stdio.h>
#include <string.h>

// ---- logging ----------------------------------------------------------------
// llama.cpp logs through one global callback. kvgate prints messages at or
// above a threshold to stderr and remembers the first error line since the
// last kv_log_clear_error (the one that names the cause), so that a
// failed model load can be reported as one clear line.

static volatile int kv_min_level = KV_GGML_LOG_LEVEL_ERROR;
static char kv_last_error[512];
static int kv_last_level = KV_GGML_LOG_LEVEL_NONE;

static void kv_log_cb(int level, const char * text, void * user_data) {
    (void) user_data;
    int eff = level == KV_GGML_LOG_LEVEL_CONT ? kv_last_level : level;
    if (level != KV_GGML_LOG_LEVEL_CONT) {
        kv_last_level = level;
    }
    if (eff == KV_GGML_LOG_LEVEL_ERROR && text != NULL && level != KV_GGML_LOG_LEVEL_CONT && kv_last_error[0] == 0) {
        size_t n = strlen(text);
        while (n > 0 && (text[n - 1] == '\n' || text[n - 1] == '\r')) {
            n--;
        }
        if (n > 0) {
            if (n >= sizeof(kv_last_error)) {
                n = sizeof(kv_last_error) - 1;
            }
            memcpy(kv_last_error, text, n);
            kv_last_error[n] = 0;
        }
    }
    if (eff >= kv_min_level && kv_min_level != KV_GGML_LOG_LEVEL_NONE) {
        fputs(text, stderr);
    }
}

void kv_log_install(int min_level) {
    kv_min_level = min_level;
    llama_log_set(kv_log_cb, NULL);
}

void kv_log_set_level(int min_level) { kv_min_level = min_level; }

int kv_log_last_error(char * buf, int len) {
    int n = (int) strlen(kv_last_error);
    if (n >= len) {
        n = len - 1;
    }
    memcpy(buf, kv_last_error, n);
    buf[n] = 0;
    return n;
}

void kv_log_clear_error(void) { kv_last_error[0] = 0; }

// ---- model-load progress ----------------------------------------------------

extern _Bool kvgoProgress(float progress, uintptr_t handle);

static bool kv_progress_cb(float progress, void * user_data) {
    return kvgoProgress(progress, (uintptr_t) user_data);
}

void kv_model_params_set_progress(struct llama_model_params * p, uintptr_t handle) {
    p->progress_callback = kv_progress_cb;
    p->progress_callback_user_data = (void *) handle;
}

// ---- sampling -----------------------------------------------------------------
// kv_sample is llama_sampler_sample without its per-call allocation: the
// candidate array lives in a buffer the decode worker owns.

llama_token kv_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx,
                      llama_token_data * buf, int32_t n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == NULL) {
        return -1;
    }
    for (int32_t t = 0; t < n_vocab; t++) {
        buf[t].id = t;
        buf[t].logit = logits[t];
        buf[t].p = 0.0f;
    }
    llama_token_data_array cur = { buf, (size_t) n_vocab, -1, false };
    llama_sampler_apply(smpl, &cur);
    if (cur.selected < 0 || cur.selected >= (int64_t) cur.size) {
        return -1;
    }
    llama_token tok = cur.data[cur.selected].id;
    llama_sampler_accept(smpl, tok);
    return tok;
}

// ---- batches ----------------------------------------------------------------

void kv_batch_set(struct llama_batch * b, int32_t i, llama_token tok, llama_pos pos,
                  llama_seq_id seq, int8_t logits) {
    b->token[i] = tok;
    b->pos[i] = pos;
    b->n_seq_id[i] = 1;
    b->seq_id[i][0] = seq;
    b->logits[i] = logits;
}
