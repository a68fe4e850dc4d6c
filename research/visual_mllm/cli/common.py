"""What the command-line scripts share: device flags, boolean flags and clean failure."""
import functools
import os
import sys
import traceback

from .. import quiet
from ..paths import DEFAULT_CONFIG


def str2bool(value):
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "y", "on"):
        return True
    if text in ("0", "false", "no", "n", "off"):
        return False
    raise ValueError(f"expected True or False, got {value!r}")


def add_bool_flag(parser, flag, **kwargs):
    """A true/false flag read as people type it: `--flag` (true), `--flag True`, `--flag false`, `--flag 0`."""
    parser.add_argument(flag, type=str2bool, nargs="?", const=True, metavar="BOOL", **kwargs)


def add_device_args(parser):
    parser.add_argument("--device_target", default="CPU", choices=["CPU", "Ascend", "GPU"])
    parser.add_argument("--device_id", type=int, default=0)
    add_bool_flag(parser, "--graph_mode", default=True, help="graph mode (compiled); False = PyNative, for debugging")


def add_compile_cache_flag(parser):
    parser.add_argument("--no_compile_cache", dest="compile_cache", action="store_false",
                        help="compile every graph anew instead of loading it from the per-user compile cache "
                             "(where the first run of the same command saves them; see visual_mllm.compile_cache)")


def set_device(args):
    import mindspore as ms

    ms.set_context(mode=ms.GRAPH_MODE if args.graph_mode else ms.PYNATIVE_MODE)
    ms.set_device(args.device_target, args.device_id)


def parse_command_line(parser, argv):
    """parser's arguments plus --verbose, which keeps the frameworks' messages (see visual_mllm.quiet)."""
    parser.add_argument("--verbose", action="store_true",
                        help="keep MindSpore's and mindformers' messages and print the traceback of an error "
                             f"(${quiet.VERBOSE_ENV}=1 also keeps those printed while they are imported)")
    args = parser.parse_args(argv)
    if args.verbose:
        quiet.verbose()
    return args


def fail_cleanly(main):
    """Turn the errors a user can cause into one 'error: ...' line and exit status 2 (after the traceback,
    with --verbose or $VISUAL_MLLM_VERBOSE=1)."""

    @functools.wraps(main)
    def wrapper(argv=None):
        try:
            return main(argv)
        except (ValueError, FileNotFoundError, OSError, KeyError) as err:
            if quiet.verbose_requested():
                traceback.print_exc()
            print(f"error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapper


def lora_checkpoint_for(config, flag):
    """The LoRA file to load: the --lora_checkpoint flag ('none' = no LoRA), or, for the built-in demo
    config, the packaged demo LoRA."""
    if flag is not None:
        return None if flag.lower() == "none" else flag
    if os.path.realpath(config) == os.path.realpath(DEFAULT_CONFIG):
        from ..finetune.demo import demo_lora_checkpoint

        return demo_lora_checkpoint()
    return None


def load_yaml_model(config, lora_flag=None, **overrides):
    """(model, processor) from a run YAML, with LoRA weights merged in when there are any."""
    from .. import load_from_yaml
    from ..finetune.lora import load_lora_checkpoint

    model, processor = load_from_yaml(config, **overrides)
    lora = lora_checkpoint_for(config, lora_flag)
    if lora:
        if not os.path.exists(lora):
            raise FileNotFoundError(f"--lora_checkpoint: not found: {lora}")
        load_lora_checkpoint(model, lora, merge=True)
    return model, processor
