"""`export_lite_model.py`: write a model's deployment graphs (see visual_mllm/export/exporter.py).

    python export_lite_model.py --mode export --config MODEL.yaml --use_past True --seq_length 512 \\
        --batch_size 1 --output_dir output/visualglm_lite

S (--seq_length) is the whole context: prompt + answer tokens of a row, and the KV-cache slots.
Run the result with `run_infer.py --mode lite --export_dir DIR` (add `--ge_config context.cfg` on Ascend).
"""
import argparse

from .common import (DEFAULT_CONFIG, add_bool_flag, add_device_args, fail_cleanly, load_yaml_model,
                     parse_command_line, set_device)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", default="export", choices=["export"], help="what to do (export graphs)")
    p.add_argument("--config", default=DEFAULT_CONFIG,
                   help="the model's run YAML, e.g. the one convert_weight.py writes (default: the tiny demo)")
    add_bool_flag(p, "--use_past", default=True,
                  help="also export the incremental (one-token, KV-cache) graph")
    p.add_argument("--seq_length", type=int, default=None, help="context S of the graphs (default: the YAML's)")
    p.add_argument("--batch_size", type=int, default=1, help="rows per call of every graph")
    p.add_argument("--output_dir", default="output", help="folder to write (replaced if it exists)")
    p.add_argument("--lora_checkpoint", default=None,
                   help="LoRA weights (run_finetune.py) merged into the model before export; the demo config "
                        "uses the packaged demo LoRA unless this is 'none'")
    add_device_args(p)
    return p


@fail_cleanly
def main(argv=None):
    args = parse_command_line(build_parser(), argv)
    set_device(args)
    from .. import read_run_config
    from ..export.exporter import export_model
    from ..registry import plain

    overrides = {} if args.seq_length is None else {"seq_length": args.seq_length}
    print(f"loading {args.config} ...", flush=True)
    model, processor = load_yaml_model(args.config, args.lora_checkpoint, **overrides)
    processor_section = plain(read_run_config(args.config).processor)
    export_model(model, processor_section, processor.tokenizer, args.output_dir, args.batch_size,
                 model.config.seq_length, use_past=args.use_past, log=lambda m: print(m, flush=True))
    return 0
