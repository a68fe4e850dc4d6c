"""`convert_weight.py`: VisualGLM-6B, MiniGPT-4, MiniGPT4Qwen and CogVLM weights to MindSpore, and back.

VisualGLM-6B (--model_type visualglm, the default; the source format is detected):
    python convert_weight.py --torch_path visualglm-6b/ --output_dir visualglm-6b-ms/
        SAT release: the folder with `latest` and model_config.json, or its mp_rank_00_model_states.pt
        (LoRA checkpoints of VisualGLM's finetune script too: merged, or kept with --lora keep).
        HF-format release: the folder with config.json and pytorch_model-*.bin / *.safetensors (+ index).
    Writes visualglm_vit / visualglm_qformer / visualglm_glm / visualglm_glm_embedding checkpoints,
    manifest.json and run_visualglm.yaml: python run_infer.py --config <output_dir>/run_visualglm.yaml ...
    Back to the HF-format release (e.g. after finetuning):
    python convert_weight.py --mindspore_config visualglm-6b-ms/run_visualglm.yaml --output_dir visualglm-6b-hf/

MiniGPT-4 (Vicuna) and MiniGPT4Qwen (Qwen-7B-Chat), from the files their releases ship:
    python convert_weight.py --model_type minigpt4 --eva_vit_path eva_vit_g.pth \\
        --qformer_path blip2_pretrained_flant5xxl.pth --proj_path pretrained_minigpt4.pth \\
        --llm_path vicuna-7b/ --output_dir minigpt4-ms/
    python convert_weight.py --model_type minigpt4qwen --eva_vit_path eva_vit_g.pth \\
        --qformer_path blip2_pretrained_flant5xxl.pth --proj_path model.pth --llm_path Qwen-7B-Chat/ \\
        --output_dir minigpt4qwen-ms/
    --llm_path is the HF folder (config.json, .bin or .safetensors shards + index, and the tokenizer:
    tokenizer.model / qwen.tiktoken, copied to the output). Writes <family>_vit / _qformer / _llama or
    _qwen (+ _embedding) checkpoints, manifest.json, run_minigpt4.yaml / run_minigpt4qwen.yaml, and keeps the
    LLM folder's config.json (+ generation_config.json, special_tokens_map.json) for the way back.
    Back to the release files (e.g. after finetuning):
    python convert_weight.py --model_type minigpt4 --mindspore_config minigpt4-ms/run_minigpt4.yaml \\
        --output_dir minigpt4-release/
        eva_vit_g.pth, blip2_pretrained_flant5xxl.pth, pretrained_minigpt4.pth (MiniGPT4Qwen: model.pth) and
        the LLM folder vicuna/ (Qwen7B-chat/) with the kept config.json (or --llm_path's); the ViT file gets
        one all-zero block past the model's (a no-op block, where the release has its unused 40th), so
        converting the files again needs no --vit_num_layers. The command to do so is printed.

CogVLM (cogvlm-chat-hf; the release ships no tokenizer: --tokenizer names the vicuna-7b-v1.5 folder):
    python convert_weight.py --model_type cogvlm --torch_path cogvlm-chat-hf/ --tokenizer vicuna-7b-v1.5/ \
        --output_dir cogvlm-ms/
    Writes cogvlm_vit (EVA2-CLIP) / cogvlm_adapter (GLU adapter, boi, eoi) / cogvlm_llm (+ _embedding)
    checkpoints, manifest.json, run_cogvlm.yaml, the tokenizer files and the release's config.json /
    generation_config.json (as release_*.json, for the way back). Back to the release layout:
    python convert_weight.py --model_type cogvlm --mindspore_config cogvlm-ms/run_cogvlm.yaml --output_dir cogvlm-hf/
"""
import argparse
import os
import signal
import sys

from .common import fail_cleanly, parse_command_line

PART_FLAGS = {"vit": "vit_mindspore_path", "qformer": "qformer_mindspore_path", "llm": "glm_mindspore_path",
              "llm_embedding": "glm_embedding_mindspore_path"}
# the four sources of a "lavis" conversion job (MiniGPT-4, MiniGPT4Qwen)
SOURCE_FLAGS = ("eva_vit_path", "qformer_path", "proj_path", "llm_path")
# what is in no file of those releases
OPTION_FLAGS = ("vit_num_layers", "vit_num_heads", "qformer_num_heads", "seq_length")
DEFAULT_SHARD_SIZE = "4GB"
VISUALGLM_FLAGS = ("torch_path", "tokenizer", "lora", "lora_alpha", *PART_FLAGS.values())


def build_parser():
    from .. import families

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_type", default=families.FAMILIES[0].name, choices=[f.name for f in families.FAMILIES],
                   help=f"the model family (default: {families.FAMILIES[0].name})")
    source = p.add_argument_group("VisualGLM source (give one)")
    source.add_argument("--torch_path",
                        help="SAT or HF-format VisualGLM release (folder or file): convert to MindSpore")
    source.add_argument("--mindspore_config",
                        help="run YAML naming MindSpore checkpoints: convert them to the release format (VisualGLM: "
                             "the HF-format release; MiniGPT-4 / MiniGPT4Qwen: the LAVIS files and the LLM folder)")
    blip2 = p.add_argument_group("MiniGPT-4 / MiniGPT4Qwen sources (give all four; with --mindspore_config "
                                 "only --llm_path: the folder whose config.json is written back)")
    blip2.add_argument("--eva_vit_path", help="eva_vit_g.pth (EVA ViT-g, a plain state dict)")
    blip2.add_argument("--qformer_path", help="blip2_pretrained_flant5xxl.pth (query tokens, ln_vision, Q-Former)")
    blip2.add_argument("--proj_path", help="the projection: pretrained_minigpt4*.pth (llama_proj) or "
                                           "MiniGPT4Qwen's model.pth (llm_proj)")
    blip2.add_argument("--llm_path", help="the LLM's HF folder: Vicuna (LLaMA) or Qwen-7B-Chat (v1); with "
                                          "--mindspore_config, the folder whose config.json is written back "
                                          "(default: the one the conversion kept beside the YAML's tokenizer)")
    sizes = p.add_argument_group("MiniGPT-4 / MiniGPT4Qwen: what no file holds")
    sizes.add_argument("--vit_num_layers", type=int, default=None,
                       help="ViT blocks to run (default: the blocks in --eva_vit_path but the last; 39 for the "
                            "released 40-block file, as BLIP-2 runs it)")
    sizes.add_argument("--vit_num_heads", type=int, default=None,
                       help="ViT attention heads (default: width / 88, EVA ViT-g's head width: 16)")
    sizes.add_argument("--qformer_num_heads", type=int, default=None,
                       help="Q-Former attention heads (default: width / 64, bert-base's head width: 12)")
    sizes.add_argument("--seq_length", type=int, default=None,
                       help="generation context (prompt + answer) in the run YAML (default: 2048, or the LLM's "
                            "trained length if shorter)")
    p.add_argument("--output_dir",
                   help="folder for the outputs (VisualGLM default: the folder of --glm_mindspore_path)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="dtype of floating tensors written (auto = as in the source)")
    p.add_argument("--quantize", default=None, choices=["int8"],
                   help="int8: write the LLM's Linear weights as weight-only int8 with per-channel scales (about "
                        "half the fp16 size; run_infer.py then needs no --quantize); not with --mindspore_config")
    p.add_argument("--format", default=None, choices=["ckpt", "safetensors", "bin"],
                   help="file format written: ckpt (default) or safetensors to MindSpore; "
                        "bin (default) or safetensors to HF")
    p.add_argument("--tokenizer", help="VisualGLM: ice_text.model (or its folder) when the source folder has none")
    for part, flag in PART_FLAGS.items():
        p.add_argument(f"--{flag}", help=f"VisualGLM: where to write the {part} checkpoint (default: in --output_dir)")
    p.add_argument("--lora", default="merge", choices=["merge", "keep"],
                   help="VisualGLM SAT LoRA checkpoints: merge LoRA into the weights, or keep it as mindpet "
                        "LoRADense weights in visualglm_glm_lora (base weights in visualglm_glm)")
    p.add_argument("--lora_alpha", type=float, default=None,
                   help="LoRA alpha (scaling = alpha / rank); default: model_config.json's, else SAT's 1")
    p.add_argument("--max_shard_size", default=DEFAULT_SHARD_SIZE, help="largest HF shard (with --mindspore_config only)")
    return p


def _terminate(signum, frame):
    sys.exit(128 + signum)  # unwinds like Ctrl-C: temporary outputs are removed


def refuse_flags(parser, args, flags, reason):
    given = [f"--{flag}" for flag in flags if getattr(args, flag) != parser.get_default(flag)]
    if given:
        raise ValueError(f"{', '.join(given)}: {reason}")


def convert_visualglm(args):
    from ..convert import visualglm
    from ..convert.job import parse_size

    if bool(args.torch_path) == bool(args.mindspore_config):
        raise ValueError("give exactly one of --torch_path (to MindSpore) and --mindspore_config (to HF)")
    if args.mindspore_config:
        if not args.output_dir:
            raise ValueError("--output_dir is required with --mindspore_config")
        if args.format == "ckpt":
            raise ValueError("--format ckpt: the HF-format release is written as bin or safetensors")
        visualglm.to_hf(args.mindspore_config, args.output_dir, args.dtype, args.format or "bin",
                        parse_size(args.max_shard_size))
        return
    part_paths = {part: getattr(args, flag) for part, flag in PART_FLAGS.items() if getattr(args, flag)}
    output_dir = args.output_dir or (os.path.dirname(os.path.abspath(part_paths["llm"])) if "llm" in part_paths else None)
    if not output_dir:
        raise ValueError("give --output_dir (or at least --glm_mindspore_path, whose folder is then used)")
    visualglm.to_mindspore(args.torch_path, output_dir, args.dtype, args.format or "ckpt", args.tokenizer,
                           part_paths, keep_lora=args.lora == "keep", lora_alpha=args.lora_alpha, quantize=args.quantize)


def convert_lavis_release(args):
    from ..convert import minigpt4
    from ..convert.job import parse_size

    if args.mindspore_config:
        given = [f"--{flag}" for flag in SOURCE_FLAGS[:3] + OPTION_FLAGS if getattr(args, flag) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: not with --mindspore_config (the release files are written "
                             f"from the model of the YAML)")
        if not args.output_dir:
            raise ValueError("--output_dir is required with --mindspore_config")
        if args.format == "ckpt":
            raise ValueError("--format ckpt: the LLM folder is written as bin or safetensors")
        minigpt4.to_release(args.model_type, args.mindspore_config, args.output_dir, args.dtype, args.format or "bin",
                            parse_size(args.max_shard_size), args.llm_path)
        return
    if args.max_shard_size != DEFAULT_SHARD_SIZE:
        raise ValueError("--max_shard_size: only with --mindspore_config")
    missing = [f"--{flag}" for flag in SOURCE_FLAGS + ("output_dir",) if not getattr(args, flag)]
    if missing:
        raise ValueError(f"--model_type {args.model_type} needs --eva_vit_path, --qformer_path, --proj_path, "
                         f"--llm_path and --output_dir (missing: {', '.join(missing)})")
    options = minigpt4.Options(**{flag: getattr(args, flag) for flag in OPTION_FLAGS})
    minigpt4.to_mindspore(args.model_type, args.eva_vit_path, args.qformer_path, args.proj_path, args.llm_path,
                          args.output_dir, args.dtype, args.format or "ckpt", options, args.quantize)


def convert_cogvlm(args):
    from ..convert import cogvlm
    from ..convert.job import parse_size

    if bool(args.torch_path) == bool(args.mindspore_config):
        raise ValueError("give exactly one of --torch_path (to MindSpore) and --mindspore_config (to the release)")
    if not args.output_dir:
        raise ValueError("--output_dir is required with --model_type cogvlm")
    if args.mindspore_config:
        if args.format == "ckpt":
            raise ValueError("--format ckpt: the cogvlm-chat-hf layout is written as safetensors or bin")
        if args.tokenizer or args.seq_length is not None:
            raise ValueError("--tokenizer / --seq_length: not with --mindspore_config (the YAML's are written back)")
        cogvlm.to_hf(args.mindspore_config, args.output_dir, args.dtype, args.format or "safetensors",
                     parse_size(args.max_shard_size))
        return
    if args.max_shard_size != DEFAULT_SHARD_SIZE:
        raise ValueError("--max_shard_size: only with --mindspore_config")
    cogvlm.to_mindspore(args.torch_path, args.output_dir, args.dtype, args.format or "ckpt", args.tokenizer,
                        args.quantize, args.seq_length)


# a family record's Conversion.job -> (the job, the flags only that job takes)
JOBS = {"visualglm": (convert_visualglm, VISUALGLM_FLAGS),
        "lavis": (convert_lavis_release, SOURCE_FLAGS + OPTION_FLAGS),
        "cogvlm": (convert_cogvlm, ("torch_path", "tokenizer", "seq_length"))}


@fail_cleanly
def main(argv=None):
    from .. import families

    parser = build_parser()
    args = parse_command_line(parser, argv)
    job = families.get(args.model_type).conversion.job
    for other, (_, flags) in JOBS.items():
        if other != job:
            takers = " or ".join(f.name for f in families.with_conversion(other))
            refuse_flags(parser, args, [flag for flag in flags if flag not in JOBS[job][1]],
                         f"only with --model_type {takers}")
    if args.format == "bin" and not args.mindspore_config:
        raise ValueError("--format bin: MindSpore checkpoints are written as ckpt or safetensors")
    if args.quantize and args.mindspore_config:
        raise ValueError(f"--quantize {args.quantize}: only when converting to MindSpore (the release formats "
                         "hold float weights)")
    signal.signal(signal.SIGTERM, _terminate)
    JOBS[job][0](args)
    return 0
