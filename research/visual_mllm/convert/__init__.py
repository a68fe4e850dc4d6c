"""Checkpoint conversion: released PyTorch weights <-> MindSpore, streaming, with strict accounting.

The framework (shared by every family):

* readers  - files as {key: SourceTensor} (shape, dtype, lazy data): PyTorch pickles (weights_only,
             mmap), safetensors, MindSpore .ckpt, sharded sets with an index json;
* keymap   - Rule (source keys -> target keys, named Transform), `expand` for literal templates,
             `invert`, and `plan`: every source key used or ignored, every target filled once with
             its shape, checked on data-less tensors before anything is read;
* engine   - runs a plan tensor by tensor (output dtype, byte-weighted progress, background hashes);
* writers  - .ckpt / safetensors written entry by entry, .bin shards, OutputFiles (all-or-nothing);
* job      - split MindSpore outputs, HF shards, the projection check, manifest.json.

One module per source format holds its literal key map and how to read its files and config
(visualglm_sat, visualglm_hf); visualglm runs the VisualGLM jobs behind convert_weight.py.
"""
