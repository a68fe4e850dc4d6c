"""`run_infer.py`: answer image + prompt requests with a VisualGLM-family model.

With no arguments it runs the built-in demo: the tiny VisualGLM from configs/visualglm_tiny (random
weights from a fixed seed, no download) on an example image, and prints its answer.
"""
import argparse
import os
import sys

from .common import REPO_ROOT, add_device_args, fail_cleanly, set_device, str2bool

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "configs", "visualglm_tiny", "run_visualglm_tiny.yaml")
DEFAULT_IMAGE = os.path.join(REPO_ROOT, "examples", "images", "chelsea.png")
DEFAULT_PROMPT = "描述这张图片。"


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULT_CONFIG, help="model YAML (default: the tiny demo model)")
    p.add_argument("--mode", default="generate", choices=["generate"], help="inference mode")
    p.add_argument("--image_path", action="append", default=None,
                   help="image file; repeat the flag for several requests ('' or 'none' = text-only)")
    p.add_argument("--prompt", action="append", default=None, help="question; repeat for several requests")
    p.add_argument("--english", type=str2bool, default=False, help="English prompt format (Q:/A:)")
    p.add_argument("--batch_size", type=int, default=1, help="requests generated together")
    p.add_argument("--use_past", type=str2bool, default=None, help="KV cache (default: the YAML's use_past)")
    p.add_argument("--seq_length", type=int, default=None, help="context length (default: the YAML's)")
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--do_sample", type=str2bool, default=False,
                   help="sample with the reference demo settings below; False = greedy")
    p.add_argument("--top_k", type=int, default=100)
    p.add_argument("--top_p", type=float, default=0.4)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--repetition_penalty", type=float, default=1.2)
    p.add_argument("--seed", type=int, default=None, help="sampling seed")
    p.add_argument("--stream", type=str2bool, default=None, help="print tokens as they come (default: on a terminal)")
    add_device_args(p)
    return p


def requests_from_args(args):
    from ..inference import ChatRequest

    prompts = args.prompt or [DEFAULT_PROMPT]
    images = args.image_path if args.image_path is not None else [DEFAULT_IMAGE]
    if len(images) == 1 and len(prompts) > 1:
        images = images * len(prompts)
    if len(prompts) == 1 and len(images) > 1:
        prompts = prompts * len(images)
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} --image_path and {len(prompts)} --prompt flags; give one of "
                         "each per request, or one of either to share")
    return [ChatRequest(prompt=q, image=None if img.lower() in ("", "none") else img, english=args.english)
            for q, img in zip(prompts, images)]


def generation_config(args, eos_token_id):
    from ..generation.sampling import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, do_sample=args.do_sample,
                            temperature=args.temperature if args.do_sample else 1.0,
                            top_k=args.top_k if args.do_sample else 0,
                            top_p=args.top_p if args.do_sample else 1.0,
                            repetition_penalty=args.repetition_penalty if args.do_sample else 1.0,
                            eos_token_id=eos_token_id, seed=args.seed)


@fail_cleanly
def main(argv=None):
    args = build_parser().parse_args(argv)
    set_device(args)
    from .. import load_from_yaml
    from ..inference import answer

    overrides = {k: v for k, v in (("use_past", args.use_past), ("seq_length", args.seq_length)) if v is not None}
    model, processor = load_from_yaml(args.config, **overrides)
    requests = requests_from_args(args)
    gen = generation_config(args, model.config.llm_config.eos_token_id)
    stream = sys.stdout.isatty() if args.stream is None else args.stream
    for start in range(0, len(requests), args.batch_size):
        batch = requests[start:start + args.batch_size]
        for req in batch:
            print(f"[{'image: ' + str(req.image) if req.image is not None else 'text-only'}] {req.prompt}")
        streaming = stream and len(batch) == 1
        if streaming:
            print("answer: ", end="", flush=True)
        for result in answer(model, processor, batch, gen, stream=streaming):
            if not streaming:
                print(f"answer: {result.response}")
    return 0
