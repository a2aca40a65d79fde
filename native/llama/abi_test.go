package llama

import "testing"

// TestABIDefaults checks kvgate's declarations of llama.h against the linked
// library: if a field were missing, added or moved in llama_api.h, the
// defaults read through it would land in the wrong fields.
func TestABIDefaults(t *testing.T) {
	mp := modelDefaults()
	cp := contextDefaults()
	sp := samplerChainDefaults()
	tests := []struct {
		name      string
		got, want any
	}{
		{"model.devices", mp.Devices, uintptr(0)},
		{"model.tensor_buft_overrides", mp.TensorBuftOverrides, uintptr(0)},
		{"model.n_gpu_layers", mp.NGPULayers, int32(999)},
		{"model.split_mode", mp.SplitMode, int32(1)}, // LLAMA_SPLIT_MODE_LAYER
		{"model.main_gpu", mp.MainGPU, int32(0)},
		{"model.tensor_split", mp.TensorSplit, uintptr(0)},
		{"model.progress_callback", mp.ProgressCallback, uintptr(0)},
		{"model.progress_callback_user_data", mp.ProgressUserData, uintptr(0)},
		{"model.kv_overrides", mp.KVOverrides, uintptr(0)},
		{"model.vocab_only", mp.VocabOnly, false},
		{"model.use_mmap", mp.UseMmap, true},
		{"model.use_mlock", mp.UseMlock, false},
		{"model.check_tensors", mp.CheckTensors, false},
		{"model.use_extra_bufts", mp.UseExtraBufts, true},
		{"model.no_host", mp.NoHost, false},
		{"model.no_alloc", mp.NoAlloc, false},

		{"context.n_ctx", cp.NCtx, uint32(512)},
		{"context.n_batch", cp.NBatch, uint32(2048)},
		{"context.n_ubatch", cp.NUbatch, uint32(512)},
		{"context.n_seq_max", cp.NSeqMax, uint32(1)},
		{"context.n_threads", cp.NThreads, int32(4)}, // GGML_DEFAULT_N_THREADS
		{"context.n_threads_batch", cp.NThreadsBatch, int32(4)},
		{"context.rope_scaling_type", cp.RopeScalingType, int32(-1)},
		{"context.pooling_type", cp.PoolingType, int32(-1)},
		{"context.attention_type", cp.AttentionType, int32(-1)},
		{"context.flash_attn_type", cp.FlashAttnType, int32(-1)},
		{"context.rope_freq_base", cp.RopeFreqBase, float32(0)},
		{"context.rope_freq_scale", cp.RopeFreqScale, float32(0)},
		{"context.yarn_ext_factor", cp.YarnExtFactor, float32(-1)},
		{"context.yarn_attn_factor", cp.YarnAttnFactor, float32(-1)},
		{"context.yarn_beta_fast", cp.YarnBetaFast, float32(-1)},
		{"context.yarn_beta_slow", cp.YarnBetaSlow, float32(-1)},
		{"context.yarn_orig_ctx", cp.YarnOrigCtx, uint32(0)},
		{"context.defrag_thold", cp.DefragThold, float32(-1)},
		{"context.cb_eval", cp.CbEval, uintptr(0)},
		{"context.cb_eval_user_data", cp.CbEvalUserData, uintptr(0)},
		{"context.type_k", cp.TypeK, int32(1)}, // GGML_TYPE_F16
		{"context.type_v", cp.TypeV, int32(1)},
		{"context.abort_callback", cp.AbortCallback, uintptr(0)},
		{"context.abort_callback_data", cp.AbortCallbackData, uintptr(0)},
		{"context.embeddings", cp.Embeddings, false},
		{"context.offload_kqv", cp.OffloadKQV, true},
		{"context.no_perf", cp.NoPerf, true},
		{"context.op_offload", cp.OpOffload, true},
		{"context.swa_full", cp.SwaFull, true},
		{"context.kv_unified", cp.KVUnified, false},

		{"sampler_chain.no_perf", sp, true},
	}
	for _, tt := range tests {
		if tt.got != tt.want {
			t.Errorf("%s = %v (%T), want %v (%T)", tt.name, tt.got, tt.got, tt.want, tt.want)
		}
	}
}
