"""`convert_weight.py`: VisualGLM-6B weights between the released PyTorch formats and MindSpore.

To MindSpore (the source format is detected):
    python convert_weight.py --torch_path visualglm-6b/ --output_dir visualglm-6b-ms/
        SAT release: the folder with `latest` and model_config.json, or its mp_rank_00_model_states.pt
        (LoRA checkpoints of VisualGLM's finetune script too: merged, or kept with --lora keep).
        HF-format release: the folder with config.json and pytorch_model-*.bin / *.safetensors (+ index).
    Writes visualglm_vit / visualglm_qformer / visualglm_glm / visualglm_glm_embedding checkpoints,
    manifest.json and run_visualglm.yaml: python run_infer.py --config <output_dir>/run_visualglm.yaml ...

Back to the HF-format release (e.g. after finetuning):
    python convert_weight.py --mindspore_config visualglm-6b-ms/run_visualglm.yaml --output_dir visualglm-6b-hf/
"""
import argparse
import os
import signal
import sys

from .common import fail_cleanly

PART_FLAGS = {"vit": "vit_mindspore_path", "qformer": "qformer_mindspore_path", "llm": "glm_mindspore_path",
              "llm_embedding": "glm_embedding_mindspore_path"}


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = p.add_argument_group("source (give one)")
    source.add_argument("--torch_path", help="SAT or HF-format VisualGLM release (folder or file): convert to MindSpore")
    source.add_argument("--mindspore_config",
                        help="run YAML naming MindSpore checkpoints: convert them to the HF-format release")
    p.add_argument("--output_dir", help="folder for the outputs (default: the folder of --glm_mindspore_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="dtype of floating tensors written (auto = as in the source)")
    p.add_argument("--format", default=None, choices=["ckpt", "safetensors", "bin"],
                   help="file format written: ckpt (default) or safetensors to MindSpore; "
                        "bin (default) or safetensors to HF")
    p.add_argument("--tokenizer", help="ice_text.model (or its folder) when the source folder has none")
    for part, flag in PART_FLAGS.items():
        p.add_argument(f"--{flag}", help=f"where to write the {part} checkpoint (default: in --output_dir)")
    p.add_argument("--lora", default="merge", choices=["merge", "keep"],
                   help="SAT LoRA checkpoints: merge LoRA into the weights, or keep it as mindpet LoRADense "
                        "weights in visualglm_glm_lora (base weights in visualglm_glm)")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha (scaling = alpha / rank); default: model_config.json's, else SAT's 1")
    p.add_argument("--max_shard_size", default="4GB", help="largest HF shard (to HF only)")
    return p


def _terminate(signum, frame):
    sys.exit(128 + signum)  # unwinds like Ctrl-C: temporary outputs are removed


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    if bool(args.torch_path) == bool(args.mindspore_config):
        raise ValueError("give exactly one of --torch_path (to MindSpore) and --mindspore_config (to HF)")
    signal.signal(signal.SIGTERM, _terminate)
    from ..convert import visualglm
    from ..convert.job import parse_size

    if args.mindspore_config:
        if not args.output_dir:
            raise ValueError("--output_dir is required with --mindspore_config")
        if args.format == "ckpt":
            raise ValueError("--format ckpt: the HF-format release is written as bin or safetensors")
        visualglm.to_hf(args.mindspore_config, args.output_dir, args.dtype, args.format or "bin",
                        parse_size(args.max_shard_size))
        return 0
    if args.format == "bin":
        raise ValueError("--format bin: MindSpore checkpoints are written as ckpt or safetensors")
    part_paths = {part: getattr(args, flag) for part, flag in PART_FLAGS.items() if getattr(args, flag)}
    output_dir = args.output_dir or (os.path.dirname(os.path.abspath(part_paths["llm"])) if "llm" in part_paths else None)
    if not output_dir:
        raise ValueError("give --output_dir (or at least --glm_mindspore_path, whose folder is then used)")
    visualglm.to_mindspore(args.torch_path, output_dir, args.dtype, args.format or "ckpt", args.tokenizer,
                           part_paths, keep_lora=args.lora == "keep", lora_alpha=args.lora_alpha)
    return 0
