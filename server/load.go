package server

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	"github.com/kvgate/kvgate/internal/kvmem"
	"github.com/kvgate/kvgate/internal/models"
)

// modelPath returns the model file to load: Config.Model, or the default
// model, fetched into the cache directory on first use. It stops early
// when ctx is done.
func modelPath(ctx context.Context, c *Config, log *slog.Logger) (string, error) {
	if c.Model != "" {
		return c.Model, nil
	}
	dir, err := models.CacheDir()
	if err != nil {
		return "", fmt.Errorf("model cache: %w", err)
	}
	return models.Ensure(ctx, models.Stories260K, dir, func(format string, args ...any) {
		log.Info(fmt.Sprintf(format, args...))
	})
}

// checkMemory estimates, from the model's header, the memory of a context
// of Config.Ctx cells, and refuses one that cannot fit the memory
// available before llama.cpp tries to allocate it. It warns when Ctx is far
// above what MaxSeqs sequences of the training context can use.
func checkMemory(c *Config, path string, log *slog.Logger) error {
	if fi, err := os.Stat(path); err != nil || !fi.Mode().IsRegular() {
		// Only a regular file can be read twice (a pipe's content would
		// be gone): leave anything else to the load, which reports it.
		return nil
	}
	shape, err := kvmem.ReadShape(path)
	if err != nil {
		// An unreadable header is reported by the load itself, with
		// llama.cpp's own words.
		log.Debug("no KV memory estimate", "err", err)
		return nil
	}
	est := shape.Estimate(c.kvCells(), min(c.Batch, 512), c.KVType)
	if pad := (c.Ctx + 255) / 256 * 256; int(est.Cells) > pad {
		log.Warn("--kv-layout streams pads every stream to a multiple of 256 cells: the pool grows past --ctx",
			"ctx", c.Ctx, "cells", est.Cells, "streams", c.streams(), "hint", fmt.Sprintf("--ctx %d", c.Ctx/(minStreamCells*c.streams())*minStreamCells*c.streams()))
	}
	avail, from, err := kvmem.Available()
	if err != nil {
		log.Debug("no memory limit known", "err", err)
	} else if est.Total() > avail {
		return fmt.Errorf("--ctx %d: the KV cache needs at least %s (%d cells × %d layers, %s) plus %s of attention mask, "+
			"more than the %s of memory available (%s); lower --ctx%s",
			c.Ctx, kvmem.Bytes(est.KVBytes), est.Cells, shape.Layers, c.KVType, kvmem.Bytes(est.MaskBytes),
			kvmem.Bytes(avail), from, map[bool]string{true: " or use --kv-type f16"}[c.KVType == "f32"])
	}
	log.Info("KV cache estimate", "cells", est.Cells, "kv_bytes", kvmem.Bytes(est.KVBytes), "available", kvmem.Bytes(avail))
	if shape.TrainingContext > 0 {
		usable := int64(c.MaxSeqs) * int64(shape.TrainingContext)
		if int64(c.Ctx) > 2*usable {
			log.Warn("--ctx is far above what running sequences can use: each is capped at the training context, "+
				"so the cells beyond --max-seqs × ctx_train only hold cached prefixes",
				"ctx", c.Ctx, "max_seqs", c.MaxSeqs, "ctx_train", shape.TrainingContext, "usable", usable)
		}
	}
	return nil
}
