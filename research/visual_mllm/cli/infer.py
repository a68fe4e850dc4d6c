"""`run_infer.py` / `visual-mllm-infer`: answer image + prompt requests with a VisualGLM, MiniGPT-4 or
MiniGPT4Qwen model.

With no arguments it runs the built-in demo, which ships in the package (no download): the tiny VisualGLM
(random base weights from a fixed seed + the small LoRA finetuned on examples/finetune) on an example
image, and prints its answer.

Requests: --image_path/--prompt (repeat the flags for several), or --input_file with one JSON request
per line, or --chat for an interactive session. Modes: generate (the model's generation API),
pipeline (mindformers.pipeline with visual_mllm's image_to_text_generation task) or lite (graphs
written by export_lite_model.py, through MindSpore Lite when installed, else MindSpore's MindIR
runtime); all give the same tokens.
"""
import argparse
import contextlib
import sys
import time

from ..compile_cache import cached_graphs, enable as enable_compile_cache
from ..dtypes import AUTO, DTYPE_NAMES
from ..paths import DEFAULT_CONFIG, DEMO_IMAGE
from .common import (add_bool_flag, add_compile_cache_flag, add_device_args, fail_cleanly, load_yaml_model,
                     parse_command_line, set_device)

DEFAULT_PROMPT = "描述这张图片。"
NO_IMAGE = ("", "none")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model YAML (default: the tiny demo model)")
    p.add_argument("--mode", default="generate", choices=["generate", "pipeline", "lite"],
                   help="generate: the model's generation API; pipeline: mindformers.pipeline; "
                        "lite: exported graphs (--export_dir or --full_model_path)")
    p.add_argument("--export_dir", help="lite mode: a folder written by export_lite_model.py")
    p.add_argument("--full_model_path", help="lite mode: the exported full (prefill) graph; its manifest is "
                   "found in the export folder above it")
    p.add_argument("--inc_model_path", help="lite mode: the exported incremental graph (default: the manifest's)")
    p.add_argument("--ge_config", help="lite mode on Ascend: MindSpore Lite context.cfg")
    p.add_argument("--image_path", action="append", default=None,
                   help="image file; repeat the flag for several requests ('' or 'none' = text-only)")
    p.add_argument("--prompt", action="append", default=None, help="question; repeat for several requests")
    p.add_argument("--input_file", help="JSONL file, one request per line: "
                   '{"image": ..., "prompt": ..., "history": [[q, a], ...], "english": false, "template": ...}')
    p.add_argument("--output_file", help="write one JSONL record per request (request fields + response, "
                   "generated_ids, timings), in input order")
    p.add_argument("--chat", action="store_true", help="interactive multi-turn chat (--image_path: first image)")
    add_bool_flag(p, "--english", default=False,
                  help="English prompt format (Q:/A:); the default of JSONL lines without \"english\"")
    p.add_argument("--template", default=None,
                   help="the family's prompt template (CogVLM: chat, vqa or base; default: the family's, CogVLM "
                        "chat for image conversations and the demo's Vicuna conversation for text-only ones); the "
                        "default of JSONL lines without \"template\"")
    p.add_argument("--batch_size", type=int, default=1, help="requests generated together")
    add_bool_flag(p, "--use_past", default=None, help="KV cache (default: the YAML's use_past)")
    p.add_argument("--seq_length", type=int, default=None, help="context length (default: the YAML's)")
    p.add_argument("--prefill_mode", default=None, choices=["graph", "pynative"],
                   help="run image encoding and the prompt's prefill compiled (graph: fastest on repeated shapes) "
                        "or op by op (pynative: nothing compiled, ~2 GB less peak memory at the real sizes); "
                        "decode steps are compiled either way; default: the YAML's prefill_mode")
    p.add_argument("--dtype", default=None, choices=DTYPE_NAMES,
                   help="hold every tower's Linear and Embedding weights in this dtype (default: the YAML's "
                        "param_dtype, i.e. as converted); float16/bfloat16 halve the memory")
    p.add_argument("--compute_dtype", default=None, choices=DTYPE_NAMES + (AUTO,),
                   help="the towers' matmul dtype (default: the YAML's compute_dtype; auto = float16 on Ascend, "
                        "float32 elsewhere; the CPU has no bfloat16 matmul)")
    p.add_argument("--quantize", default=None, choices=["none", "int8"],
                   help="the LLM's Linear layers: int8 = weight-only int8 (a float checkpoint is quantised as it "
                        "loads; lm_head and the embedding stay as they are); default: the YAML's")
    p.add_argument("--lora_checkpoint", default=None,
                   help="LoRA weights (run_finetune.py) to load on top of the model; the demo config uses the "
                        "packaged demo LoRA unless this is 'none'")
    p.add_argument("--max_new_tokens", type=int, default=64)
    add_bool_flag(p, "--do_sample", default=None,
                  help="sample (True) or decode greedily (False); default: the family's reference demo "
                       "(VisualGLM and MiniGPT-4 sample, MiniGPT4Qwen's cli_demo is greedy)")
    p.add_argument("--top_k", type=int, default=None, help="default: the family's demo (VisualGLM 100)")
    p.add_argument("--top_p", type=float, default=None, help="default: the family's demo (VisualGLM 0.4)")
    p.add_argument("--temperature", type=float, default=None, help="default: the family's demo (VisualGLM 0.8)")
    p.add_argument("--repetition_penalty", type=float, default=None,
                   help="default: the family's demo when sampling (VisualGLM 1.2), 1.0 (off) when greedy")
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    add_bool_flag(p, "--stream", default=None,
                  help="print tokens as they come (default: on a terminal); batches of one request only")
    p.add_argument("--timings", action="store_true",
                   help="print the model's load time, and image encoding time, time to first token and tokens/s "
                        "of every request")
    add_compile_cache_flag(p)
    add_device_args(p)
    return p


def check_args(args):
    if args.batch_size < 1:
        raise ValueError(f"--batch_size must be at least 1, got {args.batch_size}")
    lite_flags = [f for f in ("export_dir", "full_model_path", "inc_model_path", "ge_config") if getattr(args, f)]
    if args.mode == "lite":
        if not (args.export_dir or args.full_model_path):
            raise ValueError("--mode lite needs --export_dir DIR or --full_model_path FILE")
        if args.lora_checkpoint and args.lora_checkpoint.lower() != "none":
            raise ValueError("--mode lite runs exported graphs: export with export_lite_model.py "
                             "--lora_checkpoint to include LoRA weights")
        if args.prefill_mode:
            raise ValueError("--prefill_mode belongs to the eager modes: lite mode runs the exported graphs")
    elif lite_flags:
        raise ValueError(f"--{lite_flags[0]} belongs to --mode lite")
    if args.input_file and (args.prompt or args.image_path):
        raise ValueError("give requests either with --input_file or with --image_path/--prompt, not both")
    if args.chat:
        if args.input_file or args.prompt:
            raise ValueError("--chat reads the questions from the terminal: drop --input_file/--prompt")
        if args.image_path and len(args.image_path) > 1:
            raise ValueError("--chat takes at most one --image_path (the first conversation's image)")


def requests_from_args(args):
    """[(fields, ChatRequest)] from --input_file or the repeated --image_path/--prompt flags."""
    from ..request_file import read_requests, request_from_fields

    if args.input_file:
        return read_requests(args.input_file, default_english=args.english, default_template=args.template)
    prompts = args.prompt or [DEFAULT_PROMPT]
    images = args.image_path if args.image_path is not None else [DEMO_IMAGE]
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} --image_path and {len(prompts)} --prompt flags; give one of "
                         "each per request, or one of either to share")
    out = []
    for number, (prompt, image) in enumerate(zip(prompts, images), 1):
        fields = {"image": None if image.lower() in NO_IMAGE else image, "prompt": prompt, "history": [],
                  "english": args.english}
        if args.template is not None:
            fields["template"] = args.template
        out.append((fields, request_from_fields(fields, origin=f"request {number} (--image_path/--prompt)")))
    return out


def generation_config(args, family, eos_token_id):
    """The GenerationConfig of the flags, defaulting to the family's reference demo settings. Greedy
    (--do_sample False) is plain greedy: the sampling flags only apply when given."""
    from ..generation.sampling import SAMPLING_FIELDS, demo_generation_config

    return demo_generation_config(family.sampling, args.max_new_tokens, eos_token_id, args.do_sample, args.seed,
                                  **{name: getattr(args, name) for name in SAMPLING_FIELDS})


def load_model(args):
    """(model, processor) for the chosen mode: an eager model from YAML, or exported graphs."""
    if args.mode == "lite":
        from ..export.runtime import ExportedModel, pick_backend

        exported = ExportedModel.locate(args.export_dir, args.full_model_path, args.inc_model_path,
                                        pick_backend(args.ge_config, args.device_target, args.device_id))
        exported.check_request(args.batch_size, args.seq_length, args.use_past)
        return exported, exported.load_processor()
    overrides = {k: v for k, v in (("use_past", args.use_past), ("seq_length", args.seq_length),
                                   ("prefill_mode", args.prefill_mode)) if v is not None}
    from ..registry import precision_overrides

    overrides.update(precision_overrides(args.dtype, args.compute_dtype, args.quantize))
    return load_yaml_model(args.config, args.lora_checkpoint, **overrides)


def use_compile_cache(args, model, processor, inputs, gen):
    """Turn on the compile cache for a run that answers `inputs` (its folder, or None: off, --chat, whose
    graphs follow the conversation, lite mode, which compiles nothing of its own, PyNative). The folder is
    that of the graphs the run compiles (inference.graph_shapes), not of the requests' words."""
    if not args.compile_cache or args.chat or args.mode == "lite" or not args.graph_mode:
        return None
    from ..inference import graph_shapes

    try:
        shapes = graph_shapes(model, processor, [request for _, request in inputs], gen, args.batch_size)
    except ValueError:  # a request that cannot be answered: the run reports it; no graph to cache
        return None
    return enable_compile_cache({"mode": args.mode, "model": model.config.to_dict(), "shapes": shapes,
                                 "device": args.device_target})


def report_compile_cache(folder, before):
    after = cached_graphs(folder)
    compiled = sum(after[name] != before.get(name) for name in after)
    print(f"timings: compile cache {folder}: {compiled} graph(s) compiled and saved, {len(before)} found there")


def make_runner(args, model, processor, gen):
    """run(requests, stream) -> ChatResults, through the model's generation API or mindformers.pipeline."""
    if args.mode == "pipeline":
        from mindformers import pipeline

        from ..pipeline import TASK

        pipe = pipeline(task=TASK, model=model, processor=processor, tokenizer=processor.tokenizer,
                        image_processor=processor.image_processor)
        return lambda requests, stream: pipe(list(requests), batch_size=len(requests), generation_config=gen,
                                             stream=stream)
    from ..inference import answer

    return lambda requests, stream: answer(model, processor, requests, gen, stream=stream)


def describe(fields):
    image = f"image: {fields['image']}" if fields.get("image") is not None else "text-only"
    history = f", {len(fields['history'])} earlier turn(s)" if fields.get("history") else ""
    return f"[{image}{history}] {fields['prompt']}"


def format_timings(timings):
    def show(value, unit):  # 3 significant digits: a real-size model on a CPU decodes < 1 token/s
        return "-" if value is None else f"{value:.1f} {unit}" if value >= 100 else f"{value:.3g} {unit}"

    return (f"timings: image encoding {show(timings.image_encode_ms, 'ms')}, first token "
            f"{show(timings.first_token_ms, 'ms')}, {show(timings.decode_tokens_per_s, 'tokens/s')} "
            f"after it ({timings.new_tokens} new tokens, batch of {timings.batch_size})")


def answer_all(args, run, inputs, stream, report):
    """Answer [(fields, request)] in batches of --batch_size, printing as it goes; report(fields, result)."""
    from ..chat import dropped_note

    for start in range(0, len(inputs), args.batch_size):
        batch = inputs[start:start + args.batch_size]
        for fields, _ in batch:
            print(describe(fields))
        streaming = stream and len(batch) == 1
        if streaming:
            print("answer: ", end="", flush=True)
        results = run([request for _, request in batch], streaming)
        for (fields, request), result in zip(batch, results):
            if not streaming:
                print(f"answer: {result.response}")
            note = dropped_note(request.history, result)
            if note:
                print(note)
            report(fields, result)


@fail_cleanly
def main(argv=None):
    args = parse_command_line(build_parser(), argv)
    check_args(args)
    inputs = [] if args.chat else requests_from_args(args)  # before the model: input errors come at once
    with contextlib.ExitStack() as stack:
        output = stack.enter_context(open(args.output_file, "w", encoding="utf-8")) if args.output_file else None
        set_device(args)
        from ..chat import ChatSession
        from ..request_file import result_record, write_record

        start = time.perf_counter()
        model, processor = load_model(args)
        if args.timings:
            print(f"timings: model loaded in {time.perf_counter() - start:.1f} s")
        from ..families import family_of

        gen = generation_config(args, family_of(model.config), model.config.llm_config.eos_token_id)
        run = make_runner(args, model, processor, gen)
        cache_folder = use_compile_cache(args, model, processor, inputs, gen)
        cached_before = cached_graphs(cache_folder) if cache_folder else {}
        stream = sys.stdout.isatty() if args.stream is None else args.stream

        def report(fields, result):
            if args.timings:
                print(format_timings(result.timings))
            if output is not None:
                write_record(output, result_record(fields, result))

        if args.chat:
            image = args.image_path[0] if args.image_path else None
            ChatSession(run, None if image is None or image.lower() in NO_IMAGE else image, args.english,
                        stream, on_turn=report, template=args.template).loop()
        else:
            answer_all(args, run, inputs, stream, report)
            if cache_folder and args.timings:
                report_compile_cache(cache_folder, cached_before)
    return 0
