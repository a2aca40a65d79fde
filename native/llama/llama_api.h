// llama_api.h declares the part of llama.h (llama.cpp commit ec98e2002, as
// vendored by github.com/ollama/ollama v0.17.4) that kvgate calls. cgo cannot
// point #include at another module's directory, so the declarations are
// repeated here. Struct layouts must match that commit exactly: abi_test.go
// checks every field of the default parameter structs against the library.
#ifndef KVGATE_LLAMA_API_H
#define KVGATE_LLAMA_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

typedef int32_t llama_pos;
typedef int32_t llama_token;
typedef int32_t llama_seq_id;

struct llama_vocab;
struct llama_model;
struct llama_context;
struct llama_sampler;
typedef struct llama_memory_i * llama_memory_t;

typedef bool (*llama_progress_callback)(float progress, void * user_data);
typedef void (*ggml_log_callback)(int level, const char * text, void * user_data);

enum { KV_GGML_LOG_LEVEL_NONE = 0, KV_GGML_LOG_LEVEL_DEBUG = 1, KV_GGML_LOG_LEVEL_INFO = 2,
       KV_GGML_LOG_LEVEL_WARN = 3, KV_GGML_LOG_LEVEL_ERROR = 4, KV_GGML_LOG_LEVEL_CONT = 5 };

typedef struct llama_token_data {
    llama_token id;
    float logit;
    float p;
} llama_token_data;

typedef struct llama_token_data_array {
    llama_token_data * data;
    size_t size;
    int64_t selected;
    bool sorted;
} llama_token_data_array;

typedef struct llama_batch {
    int32_t n_tokens;
    llama_token  *  token;
    float        *  embd;
    llama_pos    *  pos;
    int32_t      *  n_seq_id;
    llama_seq_id ** seq_id;
    int8_t       *  logits;
} llama_batch;

struct llama_model_params {
    void * devices;
    const void * tensor_buft_overrides;
    int32_t n_gpu_layers;
    int32_t split_mode;              // enum llama_split_mode
    int32_t main_gpu;
    const float * tensor_split;
    llama_progress_callback progress_callback;
    void * progress_callback_user_data;
    const void * kv_overrides;
    bool vocab_only;
    bool use_mmap;
    bool use_mlock;
    bool check_tensors;
    bool use_extra_bufts;
    bool no_host;
    bool no_alloc;
};

struct llama_context_params {
    uint32_t n_ctx;
    uint32_t n_batch;
    uint32_t n_ubatch;
    uint32_t n_seq_max;
    int32_t  n_threads;
    int32_t  n_threads_batch;
    int32_t  rope_scaling_type;      // enum llama_rope_scaling_type
    int32_t  pooling_type;           // enum llama_pooling_type
    int32_t  attention_type;         // enum llama_attention_type
    int32_t  flash_attn_type;        // enum llama_flash_attn_type
    float    rope_freq_base;
    float    rope_freq_scale;
    float    yarn_ext_factor;
    float    yarn_attn_factor;
    float    yarn_beta_fast;
    float    yarn_beta_slow;
    uint32_t yarn_orig_ctx;
    float    defrag_thold;
    void *   cb_eval;
    void *   cb_eval_user_data;
    int32_t  type_k;                 // enum ggml_type
    int32_t  type_v;                 // enum ggml_type
    void *   abort_callback;
    void *   abort_callback_data;
    bool embeddings;
    bool offload_kqv;
    bool no_perf;
    bool op_offload;
    bool swa_full;
    bool kv_unified;
};

typedef struct llama_sampler_chain_params {
    bool no_perf;
} llama_sampler_chain_params;

struct llama_model_params   llama_model_default_params(void);
struct llama_context_params llama_context_default_params(void);
struct llama_sampler_chain_params llama_sampler_chain_default_params(void);

void llama_backend_init(void);
void llama_log_set(ggml_log_callback log_callback, void * user_data);
const char * llama_print_system_info(void);
int64_t llama_time_us(void);
size_t llama_max_parallel_sequences(void);

struct llama_model * llama_model_load_from_file(const char * path_model, struct llama_model_params params);
void llama_model_free(struct llama_model * model);
struct llama_context * llama_init_from_model(struct llama_model * model, struct llama_context_params params);
void llama_free(struct llama_context * ctx);

uint32_t llama_n_ctx(const struct llama_context * ctx);
uint32_t llama_n_ctx_seq(const struct llama_context * ctx);
uint32_t llama_n_batch(const struct llama_context * ctx);
uint32_t llama_n_ubatch(const struct llama_context * ctx);
uint32_t llama_n_seq_max(const struct llama_context * ctx);
llama_memory_t llama_get_memory(const struct llama_context * ctx);

const struct llama_vocab * llama_model_get_vocab(const struct llama_model * model);
int32_t llama_model_n_ctx_train(const struct llama_model * model);
int32_t llama_model_n_embd(const struct llama_model * model);
int32_t llama_model_n_layer(const struct llama_model * model);
int32_t llama_model_n_head(const struct llama_model * model);
int32_t llama_model_n_head_kv(const struct llama_model * model);
int32_t llama_model_n_swa(const struct llama_model * model);
int32_t llama_model_meta_val_str(const struct llama_model * model, const char * key, char * buf, size_t buf_size);
int32_t llama_model_desc(const struct llama_model * model, char * buf, size_t buf_size);
uint64_t llama_model_size(const struct llama_model * model);
uint64_t llama_model_n_params(const struct llama_model * model);
const char * llama_model_chat_template(const struct llama_model * model, const char * name);
bool llama_model_has_encoder(const struct llama_model * model);
bool llama_model_has_decoder(const struct llama_model * model);
bool llama_model_is_recurrent(const struct llama_model * model);
bool llama_model_is_hybrid(const struct llama_model * model);
bool llama_model_is_diffusion(const struct llama_model * model);

int32_t llama_vocab_n_tokens(const struct llama_vocab * vocab);
int32_t llama_vocab_type(const struct llama_vocab * vocab);
bool llama_vocab_is_eog(const struct llama_vocab * vocab, llama_token token);
llama_token llama_vocab_bos(const struct llama_vocab * vocab);
llama_token llama_vocab_eos(const struct llama_vocab * vocab);
bool llama_vocab_get_add_bos(const struct llama_vocab * vocab);
bool llama_vocab_get_add_eos(const struct llama_vocab * vocab);
bool llama_vocab_get_add_sep(const struct llama_vocab * vocab);
llama_token llama_vocab_sep(const struct llama_vocab * vocab);
const char * llama_vocab_get_text(const struct llama_vocab * vocab, llama_token token);
int32_t llama_vocab_get_attr(const struct llama_vocab * vocab, llama_token token); // enum llama_token_attr

int32_t llama_tokenize(const struct llama_vocab * vocab, const char * text, int32_t text_len,
                       llama_token * tokens, int32_t n_tokens_max, bool add_special, bool parse_special);
int32_t llama_token_to_piece(const struct llama_vocab * vocab, llama_token token, char * buf,
                             int32_t length, int32_t lstrip, bool special);

struct llama_batch llama_batch_init(int32_t n_tokens, int32_t embd, int32_t n_seq_max);
void llama_batch_free(struct llama_batch batch);
int32_t llama_decode(struct llama_context * ctx, struct llama_batch batch);
float * llama_get_logits_ith(struct llama_context * ctx, int32_t i);
void llama_set_n_threads(struct llama_context * ctx, int32_t n_threads, int32_t n_threads_batch);

void llama_memory_clear(llama_memory_t mem, bool data);
bool llama_memory_seq_rm(llama_memory_t mem, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_memory_seq_cp(llama_memory_t mem, llama_seq_id src, llama_seq_id dst, llama_pos p0, llama_pos p1);
void llama_memory_seq_keep(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_min(llama_memory_t mem, llama_seq_id seq_id);
llama_pos llama_memory_seq_pos_max(llama_memory_t mem, llama_seq_id seq_id);

// State of one sequence (used by tests to read back llama.cpp's cell order).
size_t llama_state_seq_get_size(struct llama_context * ctx, llama_seq_id seq_id);
size_t llama_state_seq_get_data(struct llama_context * ctx, uint8_t * dst, size_t size, llama_seq_id seq_id);

struct llama_sampler * llama_sampler_chain_init(struct llama_sampler_chain_params params);
void llama_sampler_chain_add(struct llama_sampler * chain, struct llama_sampler * smpl);
int  llama_sampler_chain_n(const struct llama_sampler * chain);
struct llama_sampler * llama_sampler_init_greedy(void);
struct llama_sampler * llama_sampler_init_dist(uint32_t seed);
struct llama_sampler * llama_sampler_init_top_k(int32_t k);
struct llama_sampler * llama_sampler_init_top_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_min_p(float p, size_t min_keep);
struct llama_sampler * llama_sampler_init_temp(float t);
struct llama_sampler * llama_sampler_init_penalties(int32_t penalty_last_n, float penalty_repeat,
                                                    float penalty_freq, float penalty_present);
typedef struct llama_logit_bias {
    llama_token token;
    float bias;
} llama_logit_bias;
struct llama_sampler * llama_sampler_init_logit_bias(int32_t n_vocab, int32_t n_logit_bias,
                                                     const llama_logit_bias * logit_bias);
// llama_sampler_init_grammar returns NULL when grammar_str does not parse
// (the reason goes to the log), and aborts on what the parser does not check
// (see internal/grammar, which refuses those first).
struct llama_sampler * llama_sampler_init_grammar(const struct llama_vocab * vocab, const char * grammar_str,
                                                  const char * grammar_root);
void llama_sampler_accept(struct llama_sampler * smpl, llama_token token);
void llama_sampler_apply(struct llama_sampler * smpl, llama_token_data_array * cur_p);
void llama_sampler_free(struct llama_sampler * smpl);
// llama_sampler_sample is llama.cpp's own apply-select-accept of a chain. kvgate
// does not use it to serve (it aborts when nothing is selected); the tests
// compare kv_sample with it.
llama_token llama_sampler_sample(struct llama_sampler * smpl, struct llama_context * ctx, int32_t idx);

// Chat templates (issue 14): see chat.go.
typedef struct llama_chat_message {
    const char * role;
    const char * content;
} llama_chat_message;
int32_t llama_chat_apply_template(const char * tmpl, const struct llama_chat_message * chat, size_t n_msg,
                                  bool add_ass, char * buf, int32_t length);
int32_t llama_chat_builtin_templates(const char ** output, size_t len);

// kvgate's own helpers, defined in shim.c.
void kv_log_install(int min_level);
void kv_log_set_level(int min_level);
int  kv_log_last_error(char * buf, int len);
void kv_log_clear_error(void);
void kv_model_params_set_progress(struct llama_model_params * p, uintptr_t handle);

// kv_sample's failures; a token id (>= 0) is success.
enum {
    KV_SAMPLE_NO_LOGITS    = -1, // llama_get_logits_ith returned NULL
    KV_SAMPLE_NO_FINITE    = -2, // no candidate with a finite logit was left
    KV_SAMPLE_NO_SELECTION = -3, // the last sampler selected no candidate
};
// KV_SAMPLE_RESAMPLED is set in a token kv_sample returns when the grammar
// rejected the first draw and the token was drawn again under its mask.
#define KV_SAMPLE_RESAMPLED 0x40000000
llama_token kv_sample(struct llama_sampler * const * stages, int32_t n_stages, struct llama_sampler * grammar,
                      struct llama_context * ctx, int32_t idx, llama_token_data * buf, int32_t n_vocab);
llama_token kv_sample_greedy_grammar(struct llama_sampler * stage, struct llama_sampler * grammar,
                                     struct llama_context * ctx, int32_t idx, llama_token_data * buf,
                                     int32_t n_vocab);
int32_t kv_logprobs(struct llama_context * ctx, int32_t idx, int32_t n_vocab, llama_token tok, int32_t n_top,
                    int32_t * top_ids, float * top_lps, float * tok_lp);
void kv_sampler_accept(struct llama_sampler * const * stages, int32_t n_stages, llama_token tok);
size_t kv_sanitize_candidates(llama_token_data_array * cur);
int32_t kv_greedy_pick(const float * logits, int32_t n);
llama_token kv_sample_greedy(struct llama_context * ctx, int32_t idx, int32_t n_vocab);
void kv_batch_set(struct llama_batch * b, int32_t i, llama_token tok, llama_pos pos,
                  llama_seq_id seq, int8_t logits);

// ---- embeddings (issue 14) -------------------------------------------------
// The embedding context (embed.go): an encoder without KV memory, whose
// llama_decode runs encode() and pools each sequence's output.
enum { KV_LLAMA_POOLING_TYPE_UNSPECIFIED = -1, KV_LLAMA_POOLING_TYPE_NONE = 0, KV_LLAMA_POOLING_TYPE_MEAN = 1,
       KV_LLAMA_POOLING_TYPE_CLS = 2, KV_LLAMA_POOLING_TYPE_LAST = 3, KV_LLAMA_POOLING_TYPE_RANK = 4 };
int32_t llama_pooling_type(const struct llama_context * ctx); // enum llama_pooling_type
float * llama_get_embeddings_seq(struct llama_context * ctx, llama_seq_id seq_id);
int32_t llama_model_n_embd_inp(const struct llama_model * model);
// ---- end of embeddings -------------------------------------------------------

#endif
