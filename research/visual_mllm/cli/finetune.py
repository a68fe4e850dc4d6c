"""`run_finetune.py`: LoRA-finetune a VisualGLM-6B, MiniGPT-4 or MiniGPT4Qwen model from a finetune YAML.

    python run_finetune.py --config configs/visualglm_tiny/lora.yaml            # the tiny demo, minutes on a CPU
    python run_finetune.py --config configs/minigpt4_tiny/lora.yaml             # tiny MiniGPT-4 on cc_sbu_align
    python run_finetune.py --config configs/minigpt4qwen_tiny/lora.yaml         # tiny MiniGPT4Qwen on conversations
    python run_finetune.py --config configs/visualglm_6b/lora.yaml --dataset fewshot-data/dataset.json
    python run_finetune.py --config ... --resume                                # continue from the newest checkpoint
    python run_finetune.py --config ... --merge --lora_checkpoint out/lora.ckpt # fold LoRA into the base weights

The output folder gets lora.ckpt (trainable weights only; run_infer.py --lora_checkpoint loads it),
checkpoints/ (resumable), train_log.csv, loss_curve.png and summary.json; with --merge also merged/
(split checkpoints + run_merged.yaml for run_infer.py --config). Data parallel: every worker runs this
same command and trains its shard of each global batch; on one host start them with
    bash run_singlenode.sh "python run_finetune.py --config ..." <rank_table.json or any name on CPU> "[0,2)" 2
(logs in output/log/rank_<r>/run.log; each rank ends its log with a `timing:` line).
Installed, the same command is `visual-mllm-finetune` (its default, the tiny demo, needs the source checkout).
"""
import argparse
import os

from ..paths import DEMO_LORA_CONFIG as DEFAULT_CONFIG
from .common import add_bool_flag, fail_cleanly, parse_command_line, set_device



def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="finetune YAML (default: the tiny demo's)")
    p.add_argument("--dataset", default=None, help="dataset file or folder (default: finetune.dataset.path)")
    p.add_argument("--output_dir", default=None, help="output folder (default: finetune.runner.output_dir)")
    p.add_argument("--max_steps", type=int, default=None, help="optimizer steps of the whole run")
    p.add_argument("--batch_size", type=int, default=None, help="batch size per device")
    p.add_argument("--learning_rate", type=float, default=None, help="peak learning rate")
    p.add_argument("--save_steps", type=int, default=None, help="checkpoint every N steps")
    p.add_argument("--seed", type=int, default=None, help="LoRA initialisation and data order")
    p.add_argument("--amp_level", default=None, choices=["O0", "O1", "O2"],
                   help="O0 = float32; O1/O2 = float16 mixed precision with dynamic loss scaling")
    p.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint of --output_dir (or from the given folder)")
    p.add_argument("--stop_at_step", type=int, default=None,
                   help="stop after this step as an interruption would (the schedule still follows max_steps)")
    p.add_argument("--merge", action="store_true",
                   help="also fold LoRA into the base weights and write merged/ split checkpoints + YAML")
    p.add_argument("--lora_checkpoint", default=None, help="with --merge: merge this LoRA checkpoint, no training")
    p.add_argument("--validate_only", action="store_true", help="check the dataset, report bad rows and exit")
    add_bool_flag(p, "--progress", default=None, help="progress bar (default: on)")
    p.add_argument("--device_target", default="CPU", choices=["CPU", "Ascend", "GPU"])
    p.add_argument("--device_id", type=int, default=None, help="device (default: $DEVICE_ID or 0)")
    add_bool_flag(p, "--graph_mode", default=True,
                  help="compile the train step (graph mode); False = PyNative, for debugging")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU kernel threads of this process (default: MindSpore's); with several workers on "
                        "one CPU host, e.g. cores / workers")
    return p


def validate_only(args):
    from ..finetune.config import load_finetune_config
    from ..finetune.datasets import load_dataset
    from ..registry import load_processor_from_yaml

    _, cfg = load_finetune_config(args.config)
    if args.dataset:
        cfg.dataset.path = args.dataset
    processor = load_processor_from_yaml(args.config)
    data = load_dataset(cfg.dataset, processor)  # raises DatasetValidationError listing every bad row
    for warning in data.warnings:
        print(f"warning: {warning}")
    print(f"{data.path}: {data.format} format, {data.total_rows} rows, {len(data.samples)} samples, all valid")
    return 0


@fail_cleanly
def main(argv=None):
    args = parse_command_line(build_parser(), argv)
    if args.config == DEFAULT_CONFIG and not os.path.exists(DEFAULT_CONFIG):
        raise FileNotFoundError(f"the demo finetune ({DEFAULT_CONFIG}) and its data are in the source checkout, "
                                "not in the installed package: pass --config, or set VISUAL_MLLM_HOME to a checkout")
    if args.lora_checkpoint and not args.merge:
        raise ValueError("--lora_checkpoint is for --merge (to merge an existing checkpoint); "
                         "run_infer.py --lora_checkpoint uses one for inference")
    if args.validate_only:
        return validate_only(args)
    if args.device_id is None:
        args.device_id = int(os.environ.get("DEVICE_ID", "0") or 0)
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        import mindspore as ms

        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    set_device(args)
    from ..finetune.trainer import RunOptions, finetune

    options = RunOptions(config=args.config, dataset=args.dataset, output_dir=args.output_dir,
                         max_steps=args.max_steps, batch_size=args.batch_size, learning_rate=args.learning_rate,
                         save_steps=args.save_steps, seed=args.seed, amp_level=args.amp_level, resume=args.resume,
                         stop_at_step=args.stop_at_step, graph_mode=args.graph_mode, progress=args.progress,
                         merge=args.merge, lora_checkpoint=args.lora_checkpoint)
    finetune(options)
    return 0
