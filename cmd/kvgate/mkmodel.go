package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"strings"
	"time"

	mk "github.com/kvgate/kvgate/internal/mkmodel"
)

// mkmodel writes a llama-architecture GGUF model with random weights, for
// measuring throughput at a real model's compute cost without downloading
// one.
func mkmodel(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("kvgate mkmodel", flag.ContinueOnError)
	preset := fs.String("preset", "tiny", "model shape: "+strings.Join(mk.Presets(), ", "))
	typ := fs.String("type", "f16", "weight matrix type: f32, f16 or q8_0 (norms stay f32)")
	tokenizer := fs.String("tokenizer", "spm", "built-in tokenizer: spm (SentencePiece, as Llama 2's, with byte fallback) or bpe (byte-level BPE, as GPT-2's)")
	vocab := fs.String("vocab", "", "copy the tokenizer from this GGUF file (a model or a vocabulary-only file such as ggml-vocab-*.gguf) instead of a built-in one")
	vocabSize := fs.Int("vocab-size", 0, "size of the built-in vocabulary (0: the preset's)")
	embd := fs.Int("embd", 0, "embedding width, n_embd (0: the preset's)")
	layers := fs.Int("layers", 0, "number of layers (0: the preset's)")
	heads := fs.Int("heads", 0, "attention heads (0: the preset's)")
	kvHeads := fs.Int("kv-heads", 0, "key/value heads, for grouped-query attention (0: as many as heads)")
	ffn := fs.Int("ffn", 0, "feed-forward width (0: the preset's)")
	ctxTrain := fs.Int("ctx-train", 0, "training context length, llama.context_length (0: the preset's)")
	tied := fs.Bool("tied", true, "tie the output matrix to the token embeddings, as llama2.c's models do")
	seed := fs.Uint64("seed", 0, "random seed of the weights")
	name := fs.String("name", "", "general.name (default: kvgate-random-PRESET)")
	chatTemplate := fs.String("chat-template", "", "write this Hugging Face chat template as tokenizer.chat_template and add its marker tokens as control tokens, the end marker as EOT: "+strings.Join(mk.ChatTemplates(), ", "))
	out := fs.String("o", "", "output file (default: PRESET-TYPE.gguf)")
	fs.Usage = func() {
		w := fs.Output()
		fmt.Fprintf(w, "Usage: kvgate mkmodel [flags]\n\n"+
			"Writes a llama-architecture GGUF model with random weights, which llama.cpp\n"+
			"loads and runs at the cost of a real model of that shape. The tokenizer is\n"+
			"built in (--tokenizer spm or bpe; common English words are single tokens,\n"+
			"made-up words fill the rest of the vocabulary) or copied from a file (--vocab).\n\nFlags:\n")
		fs.PrintDefaults()
		fmt.Fprintf(w, "\nPresets (f16 file sizes with the built-in vocabulary):\n")
		for _, p := range mk.Presets() {
			s, _ := mk.Preset(p)
			size, _ := s.FileSize()
			fmt.Fprintf(w, "  %-5s %s\n        %s parameters, %s\n", p, s, mkCount(s.ParameterCount()), mkSize(size))
		}
	}
	if err := parseFlags(fs, args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(fs.Output(), "kvgate mkmodel: unexpected arguments %q\n", fs.Args())
		return errUsage
	}

	spec, err := mk.Preset(*preset)
	if err != nil {
		return err
	}
	if spec.Type, err = mk.ParseType(*typ); err != nil {
		return err
	}
	for _, o := range []struct {
		v   int
		dst *int
	}{
		{*embd, &spec.Embedding}, {*layers, &spec.Layers}, {*heads, &spec.Heads}, {*kvHeads, &spec.HeadsKV},
		{*ffn, &spec.FeedForward}, {*ctxTrain, &spec.ContextLength}, {*vocabSize, &spec.VocabSize},
	} {
		if o.v < 0 {
			return fmt.Errorf("sizes must not be negative (got %d)", o.v)
		}
		if o.v > 0 {
			*o.dst = o.v
		}
	}
	if *heads > 0 && *kvHeads == 0 {
		spec.HeadsKV = 0 // as many as the new head count
	}
	spec.TiedEmbeddings = *tied
	spec.Seed = *seed
	spec.Name = *name
	if spec.Name == "" {
		spec.Name = "kvgate-random-" + *preset
	}
	tokenizerSet := false
	fs.Visit(func(f *flag.Flag) { tokenizerSet = tokenizerSet || f.Name == "tokenizer" })
	switch {
	case *vocab != "":
		if *vocabSize > 0 {
			return fmt.Errorf("--vocab-size sets the built-in vocabulary's size; %s has its own", *vocab)
		}
		if tokenizerSet {
			return fmt.Errorf("--tokenizer picks a built-in vocabulary; --vocab copies %s's", *vocab)
		}
		if spec.Vocab, err = mk.LoadVocab(*vocab); err != nil {
			return err
		}
	case *tokenizer == "spm":
		// The spec's built-in vocabulary, of spec.VocabSize tokens.
	case *tokenizer == "bpe":
		if spec.Vocab, err = mk.BuiltinBPEVocab(spec.VocabSize); err != nil {
			return err
		}
	default:
		return fmt.Errorf("unknown --tokenizer %q (want spm or bpe)", *tokenizer)
	}
	if *chatTemplate != "" {
		v := spec.Vocab
		if v == nil {
			if v, err = mk.BuiltinVocab(spec.VocabSize); err != nil {
				return err
			}
		}
		if spec.Vocab, err = mk.WithChatTemplate(v, *chatTemplate); err != nil {
			return err
		}
	}
	if err := spec.Validate(); err != nil {
		return err
	}
	path := *out
	if path == "" {
		path = fmt.Sprintf("%s-%s.gguf", *preset, spec.Type)
	}

	start := time.Now()
	n, err := mk.WriteFile(ctx, path, spec)
	if err != nil {
		return err
	}
	about := "built-in SentencePiece (llama) with byte fallback"
	switch {
	case *vocab != "":
		about = fmt.Sprintf("%s from %s", spec.Vocab.Model(), spec.Vocab.Source())
	case *tokenizer == "bpe":
		about = "built-in byte-level BPE (gpt2)"
	}
	if *chatTemplate != "" {
		about += ", chat template " + *chatTemplate
	}
	fmt.Fprintf(os.Stdout, "wrote %s in %s\n  %s\n  tokenizer: %s\n  %s parameters (%d), %s (%d bytes)\n",
		path, time.Since(start).Round(time.Millisecond), spec, about,
		mkCount(spec.ParameterCount()), spec.ParameterCount(), mkSize(n), n)
	return nil
}

// mkCount formats a parameter count, such as "15.2M".
func mkCount(n int64) string {
	switch {
	case n >= 1e9:
		return fmt.Sprintf("%.2fB", float64(n)/1e9)
	case n >= 1e6:
		return fmt.Sprintf("%.1fM", float64(n)/1e6)
	case n >= 1e3:
		return fmt.Sprintf("%.1fK", float64(n)/1e3)
	}
	return fmt.Sprint(n)
}

// mkSize formats a byte count in binary units, such as "29.7 MiB".
func mkSize(n int64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	case n >= 1<<10:
		return fmt.Sprintf("%.1f KiB", float64(n)/(1<<10))
	}
	return fmt.Sprintf("%d B", n)
}
