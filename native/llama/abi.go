package llama

/*
#include "llama_api.h"
*/
import "C"

import "unsafe"

// The Go mirrors below read llama.cpp's default parameter structs through
// kvgate's declarations in llama_api.h, for the ABI test.

type modelParams struct {
	Devices, TensorBuftOverrides       uintptr
	NGPULayers, SplitMode, MainGPU     int32
	TensorSplit                        uintptr
	ProgressCallback, ProgressUserData uintptr
	KVOverrides                        uintptr
	VocabOnly, UseMmap, UseMlock       bool
	CheckTensors, UseExtraBufts        bool
	NoHost, NoAlloc                    bool
}

type contextParams struct {
	NCtx, NBatch, NUbatch, NSeqMax                                uint32
	NThreads, NThreadsBatch                                       int32
	RopeScalingType, PoolingType, AttentionType                   int32
	FlashAttnType                                                 int32
	RopeFreqBase, RopeFreqScale, YarnExtFactor                    float32
	YarnAttnFactor, YarnBetaFast, YarnBetaSlow                    float32
	YarnOrigCtx                                                   uint32
	DefragThold                                                   float32
	CbEval, CbEvalUserData                                        uintptr
	TypeK, TypeV                                                  int32
	AbortCallback, AbortCallbackData                              uintptr
	Embeddings, OffloadKQV, NoPerf, OpOffload, SwaFull, KVUnified bool
}

func modelDefaults() modelParams {
	p := C.llama_model_default_params()
	return modelParams{
		Devices:             uintptr(p.devices),
		TensorBuftOverrides: uintptr(p.tensor_buft_overrides),
		NGPULayers:          int32(p.n_gpu_layers),
		SplitMode:           int32(p.split_mode),
		MainGPU:             int32(p.main_gpu),
		TensorSplit:         uintptr(unsafe.Pointer(p.tensor_split)),
		ProgressCallback:    uintptr(unsafe.Pointer(p.progress_callback)),
		ProgressUserData:    uintptr(p.progress_callback_user_data),
		KVOverrides:         uintptr(p.kv_overrides),
		VocabOnly:           bool(p.vocab_only),
		UseMmap:             bool(p.use_mmap),
		UseMlock:            bool(p.use_mlock),
		CheckTensors:        bool(p.check_tensors),
		UseExtraBufts:       bool(p.use_extra_bufts),
		NoHost:              bool(p.no_host),
		NoAlloc:             bool(p.no_alloc),
	}
}

func contextDefaults() contextParams {
	p := C.llama_context_default_params()
	return contextParams{
		NCtx: uint32(p.n_ctx), NBatch: uint32(p.n_batch), NUbatch: uint32(p.n_ubatch), NSeqMax: uint32(p.n_seq_max),
		NThreads: int32(p.n_threads), NThreadsBatch: int32(p.n_threads_batch),
		RopeScalingType: int32(p.rope_scaling_type), PoolingType: int32(p.pooling_type),
		AttentionType: int32(p.attention_type), FlashAttnType: int32(p.flash_attn_type),
		RopeFreqBase: float32(p.rope_freq_base), RopeFreqScale: float32(p.rope_freq_scale),
		YarnExtFactor: float32(p.yarn_ext_factor), YarnAttnFactor: float32(p.yarn_attn_factor),
		YarnBetaFast: float32(p.yarn_beta_fast), YarnBetaSlow: float32(p.yarn_beta_slow),
		YarnOrigCtx: uint32(p.yarn_orig_ctx), DefragThold: float32(p.defrag_thold),
		CbEval: uintptr(p.cb_eval), CbEvalUserData: uintptr(p.cb_eval_user_data),
		TypeK: int32(p.type_k), TypeV: int32(p.type_v),
		AbortCallback: uintptr(p.abort_callback), AbortCallbackData: uintptr(p.abort_callback_data),
		Embeddings: bool(p.embeddings), OffloadKQV: bool(p.offload_kqv), NoPerf: bool(p.no_perf),
		OpOffload: bool(p.op_offload), SwaFull: bool(p.swa_full), KVUnified: bool(p.kv_unified),
	}
}

func samplerChainDefaults() bool {
	return bool(C.llama_sampler_chain_default_params().no_perf)
}
