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
// kv_sample runs kvgate's samplers one by one on a candidate array the decode
// worker owns, where llama.cpp's chain (llama_sampler_chain_apply) would run
// them back to back and llama_sampler_sample would allocate the array. After
// the logits are read and after every sampler, kv_sanitize_candidates makes
// the array safe for the next one, because llama.cpp's samplers assume what
// extreme sampling parameters break:
//   - llama_sampler_dist_apply asserts (assert(found), live: libllama is
//     built without NDEBUG) that its running sum reaches its target, which
//     fails when any probability is NaN: a NaN logit, or +inf - +inf and
//     -inf - -inf when the largest logit is infinite;
//   - it and llama_sampler_softmax_impl take data[0] as the largest logit
//     when the array says it is sorted;
//   - std::sort and std::partial_sort need a strict weak order, which NaN
//     breaks.
// For finite logits sanitizing changes nothing, so ordinary parameters
// sample exactly as the chain did (sampler_test.go checks this against
// llama_sampler_sample).

#include <float.h>
#include <math.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif

// kv_sanitize_candidates replaces every NaN logit with -INFINITY (no
// probability) and +INFINITY with FLT_MAX (the largest finite float, so that
// logit - max is 0 for it, not NaN), clears cur->sorted when the logits are
// not in fact in descending order, and returns how many candidates have a
// finite logit.
size_t kv_sanitize_candidates(llama_token_data_array * cur) {
    size_t finite = 0;
    for (size_t i = 0; i < cur->size; i++) {
        float l = cur->data[i].logit;
        if (isnan(l)) {
            l = -INFINITY;
        } else if (l == INFINITY) {
            l = FLT_MAX;
        }
        cur->data[i].logit = l;
        if (l != -INFINITY) {
            finite++;
        }
    }
    if (cur->sorted) {
        for (size_t i = 1; i < cur->size; i++) {
            if (cur->data[i].logit > cur->data[i - 1].logit) {
                cur->sorted = false;
                break;
            }
        }
    }
    return finite;
}

// kv_sample draws a token from output idx of the last decode: it applies
// stages[0..n_stages) in order, the last of which (dist or greedy) selects,
// and accepts the token on every stage, as llama_sampler_sample does with a
// chain. It returns the token id, or a KV_SAMPLE_* code (< 0), in which case
// nothing was accepted. When no candidate has a finite logit it returns
// KV_SAMPLE_NO_FINITE without running the remaining samplers: no sampler
// turns -inf into a finite logit, and the draw would assert.
// kv_sample_pass fills buf with the logits, applies grammar first when it is
// not NULL, then stages[0..n_stages) in order, and returns the token the last
// stage selected, or a KV_SAMPLE_* code. It accepts nothing.
static llama_token kv_sample_pass(struct llama_sampler * const * stages, int32_t n_stages,
                                  struct llama_sampler * grammar, const float * logits,
                                  llama_token_data * buf, int32_t n_vocab) {
    for (int32_t t = 0; t < n_vocab; t++) {
        buf[t].id = t;
        buf[t].logit = logits[t];
        buf[t].p = 0.0f;
    }
    llama_token_data_array cur = { buf, (size_t) n_vocab, -1, false };
    if (grammar != NULL) {
        if (kv_sanitize_candidates(&cur) == 0) {
            return KV_SAMPLE_NO_FINITE;
        }
        llama_sampler_apply(grammar, &cur);
    }
    for (int32_t i = 0; i < n_stages; i++) {
        if (kv_sanitize_candidates(&cur) == 0) {
            return KV_SAMPLE_NO_FINITE;
        }
        llama_sampler_apply(stages[i], &cur);
    }
    if (cur.selected < 0 || cur.selected >= (int64_t) cur.size) {
        return KV_SAMPLE_NO_SELECTION;
    }
    llama_token tok = cur.data[cur.selected].id;
    if (tok < 0 || tok >= n_vocab) {
        return KV_SAMPLE_NO_SELECTION;
    }
    return tok;
}

// kv_grammar_allows reports whether grammar accepts tok next: it applies the
// grammar to a one-candidate array, as llama.cpp's common_sampler does to
// check a token drawn without the grammar. A token the grammar allows is
// safe to accept: llama_grammar_accept_impl aborts (GGML_ABORT) on an
// end-of-generation token the grammar does not allow, and throws on any
// other token it does not allow.
static bool kv_grammar_allows(struct llama_sampler * grammar, llama_token tok) {
    llama_token_data one = { tok, 1.0f, 0.0f };
    llama_token_data_array cur = { &one, 1, -1, false };
    llama_sampler_apply(grammar, &cur);
    return one.logit != -INFINITY && !isnan(one.logit);
}

// kv_grammar_settle is the lazy grammar step after tok was drawn without
// the grammar: it keeps tok when the grammar allows it, and otherwise draws
// again with the grammar applied first (kv_sample_pass), returning that
// token with KV_SAMPLE_RESAMPLED set (a bit no token id of a vocabulary
// reaches). The grammar accepts the token; the stages do not. It returns a
// KV_SAMPLE_* code when the second draw fails, never a token the grammar
// rejects.
static llama_token kv_grammar_settle(struct llama_sampler * const * stages, int32_t n_stages,
                                     struct llama_sampler * grammar, const float * logits,
                                     llama_token_data * buf, int32_t n_vocab, llama_token tok) {
    llama_token resampled = 0;
    if (!kv_grammar_allows(grammar, tok)) {
        tok = kv_sample_pass(stages, n_stages, grammar, logits, buf, n_vocab);
        if (tok < 0) {
            return tok;
        }
        if (!kv_grammar_allows(grammar, tok)) {
            return KV_SAMPLE_NO_FINITE; // defensive: never accept what it rejects
        }
        resampled = KV_SAMPLE_RESAMPLED;
    }
    llama_sampler_accept(grammar, tok);
    return tok | resampled;
}

// kv_sample draws a token from output idx of the last decode: it applies
// stages[0..n_stages) in order, the last of which (dist or greedy) selects,
// and accepts the token on every stage, as llama_sampler_sample does with a
// chain. It returns the token id, or a KV_SAMPLE_* code (< 0), in which case
// nothing was accepted. When no candidate has a finite logit it returns
// KV_SAMPLE_NO_FINITE without running the remaining samplers: no sampler
// turns -inf into a finite logit, and the draw would assert.
//
// With a grammar (not NULL) the draw is lazy: the token drawn without the
// grammar is checked against it alone, and only when the grammar rejects it
// are the logits masked with the grammar over the whole vocabulary and the
// token drawn again (stages after the grammar; kv_grammar_settle), the
// token returned then having KV_SAMPLE_RESAMPLED set.
llama_token kv_sample(struct llama_sampler * const * stages, int32_t n_stages, struct llama_sampler * grammar,
                      struct llama_context * ctx, int32_t idx, llama_token_data * buf, int32_t n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == NULL || n_stages <= 0 || n_vocab <= 0) {
        return KV_SAMPLE_NO_LOGITS;
    }
    llama_token tok = kv_sample_pass(stages, n_stages, NULL, logits, buf, n_vocab);
    if (tok < 0) {
        return tok;
    }
    if (grammar != NULL) {
        tok = kv_grammar_settle(stages, n_stages, grammar, logits, buf, n_vocab, tok);
        if (tok < 0) {
            return tok;
        }
    }
    kv_sampler_accept(stages, n_stages, tok & ~KV_SAMPLE_RESAMPLED);
    return tok;
}

// kv_greedy_pick returns what kv_sample with the greedy sampler alone picks
// from logits[0..n), without the candidate array: the first index of the
// largest logit once NaN counts as -inf and +inf as FLT_MAX (the sanitized
// order), or KV_SAMPLE_NO_FINITE when no logit is finite. The first pass
// is a max reduction (vmaxps keeps the running max when the logit is NaN,
// as l > m ? l : m does); the second finds the first index holding that
// value. Scalar loops of the same rules took about 70 us for 32000 logits.
static float kv_max_logit(const float * logits, int32_t n, int32_t * t_end) {
    float m = -INFINITY;
    int32_t t = 0;
#if defined(__AVX__)
    __m256 vm = _mm256_set1_ps(-INFINITY);
    for (; t + 8 <= n; t += 8) {
        vm = _mm256_max_ps(_mm256_loadu_ps(logits + t), vm);
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, vm);
    for (int i = 0; i < 8; i++) {
        m = lanes[i] > m ? lanes[i] : m;
    }
#endif
    *t_end = t;
    return m;
}

static int32_t kv_first_equal(const float * logits, int32_t n, float m) {
    int32_t t = 0;
#if defined(__AVX__)
    const __m256 vm = _mm256_set1_ps(m);
    for (; t + 8 <= n; t += 8) {
        const int mask = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(logits + t), vm, _CMP_EQ_OQ));
        if (mask != 0) {
            return t + __builtin_ctz((unsigned) mask);
        }
    }
#endif
    for (; t < n; t++) {
        if (logits[t] == m) {
            return t;
        }
    }
    return -1;
}

int32_t kv_greedy_pick(const float * logits, int32_t n) {
    int32_t t;
    float m = kv_max_logit(logits, n, &t);
    for (; t < n; t++) {
        const float l = logits[t];
        m = l > m ? l : m;
    }
    if (m == -INFINITY) {
        return KV_SAMPLE_NO_FINITE;
    }
    if (m == INFINITY || m == FLT_MAX) {
        // +inf and FLT_MAX are equal once sanitized: the first of either.
        const int32_t a = kv_first_equal(logits, n, INFINITY), b = kv_first_equal(logits, n, FLT_MAX);
        return a < 0 ? b : (b < 0 || a < b ? a : b);
    }
    const int32_t i = kv_first_equal(logits, n, m);
    return i >= 0 ? i : KV_SAMPLE_NO_SELECTION;
}

// kv_sample_greedy is kv_sample for a greedy sampler alone (no penalties):
// the same token, read straight from the logits of output idx. Copying the
// vocabulary into the candidate array and sanitizing it twice cost about
// 140 us a token on a 32000-token vocabulary, 9% of a 32-stream step of a
// 15M-parameter model.
llama_token kv_sample_greedy(struct llama_context * ctx, int32_t idx, int32_t n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == NULL || n_vocab <= 0) {
        return KV_SAMPLE_NO_LOGITS;
    }
    return kv_greedy_pick(logits, n_vocab);
}

// kv_sample_greedy_grammar is kv_sample for a grammar and a greedy sampler
// alone (stage, without penalties or bias): the largest logit, read straight
// from the logits, when the grammar allows it; otherwise the greedy stage's
// pick among the candidates the grammar allows. The grammar accepts the
// token.
llama_token kv_sample_greedy_grammar(struct llama_sampler * stage, struct llama_sampler * grammar,
                                     struct llama_context * ctx, int32_t idx, llama_token_data * buf,
                                     int32_t n_vocab) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == NULL || n_vocab <= 0) {
        return KV_SAMPLE_NO_LOGITS;
    }
    llama_token tok = kv_greedy_pick(logits, n_vocab);
    if (tok < 0) {
        return tok;
    }
    struct llama_sampler * stages[1] = { stage };
    return kv_grammar_settle(stages, 1, grammar, logits, buf, n_vocab, tok);
}

// kv_logprobs computes the log-softmax of output idx's logits (NaN counting
// as -inf): the log-probability of tok into *tok_lp, and the n_top most
// likely tokens, most likely first and ties by id, into top_ids and top_lps.
// It returns how many it wrote (fewer than n_top when fewer tokens have a
// finite logit), or KV_SAMPLE_NO_LOGITS / KV_SAMPLE_NO_FINITE. The sum of
// exponentials is taken in double precision.
int32_t kv_logprobs(struct llama_context * ctx, int32_t idx, int32_t n_vocab, llama_token tok, int32_t n_top,
                    int32_t * top_ids, float * top_lps, float * tok_lp) {
    const float * logits = llama_get_logits_ith(ctx, idx);
    if (logits == NULL || n_vocab <= 0 || tok < 0 || tok >= n_vocab) {
        return KV_SAMPLE_NO_LOGITS;
    }
    if (n_top < 0) {
        n_top = 0;
    }
    float m = -INFINITY;
    int32_t count = 0;
    for (int32_t t = 0; t < n_vocab; t++) {
        const float l = logits[t];
        if (l > m) { // false for NaN
            m = l;
        }
        if (n_top > 0 && l > -INFINITY && (count < n_top || l > top_lps[count - 1])) {
            // Insert after every kept logit >= l: equal logits keep id order.
            int32_t at = count < n_top ? count : n_top - 1;
            while (at > 0 && top_lps[at - 1] < l) {
                top_lps[at] = top_lps[at - 1];
                top_ids[at] = top_ids[at - 1];
                at--;
            }
            top_lps[at] = l;
            top_ids[at] = t;
            if (count < n_top) {
                count++;
            }
        }
    }
    if (!(m > -INFINITY) || m == INFINITY) {
        return KV_SAMPLE_NO_FINITE;
    }
    double sum = 0.0;
    for (int32_t t = 0; t < n_vocab; t++) {
        const float l = logits[t];
        if (l > -INFINITY) {
            sum += exp((double) l - (double) m);
        }
    }
    const double lse = (double) m + log(sum);
    const float lt = logits[tok];
    *tok_lp = lt > -INFINITY ? (float) ((double) lt - lse) : -INFINITY;
    for (int32_t i = 0; i < count; i++) {
        top_lps[i] = (float) ((double) top_lps[i] - lse);
    }
    return count;
}

// kv_sampler_accept records tok in the history of every stage that keeps
// one (the penalties; the others have no accept), as the chain's accept did.
void kv_sampler_accept(struct llama_sampler * const * stages, int32_t n_stages, llama_token tok) {
    for (int32_t i = 0; i < n_stages; i++) {
        llama_sampler_accept(stages[i], tok);
    }
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
