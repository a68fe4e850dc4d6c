"""`run_server.py` / `visual-mllm-server`: an OpenAI-compatible chat completions server with request batching
and a web chat page, for a VisualGLM, MiniGPT-4 or MiniGPT4Qwen model.

    python run_server.py                                  the built-in demo model on http://127.0.0.1:8000
    python run_server.py --config MODEL.yaml              a converted model
    python run_server.py --export_dir DIR                 graphs written by export_lite_model.py

Endpoints: POST /v1/chat/completions (streaming with "stream": true), GET /v1/models, GET /health, and the
chat page at /. The API key (--api_key, or $VISUAL_MLLM_API_KEY) is then needed as 'Authorization: Bearer KEY'.
"""
import argparse
import logging
import os

from ..paths import DEFAULT_CONFIG
from .common import add_bool_flag, add_device_args, fail_cleanly, load_yaml_model, parse_command_line, set_device

API_KEY_ENV = "VISUAL_MLLM_API_KEY"
MB = 1 << 20


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="model YAML (default: the tiny demo model)")
    p.add_argument("--export_dir", help="serve the graphs export_lite_model.py wrote in this folder")
    p.add_argument("--lora_checkpoint", default=None,
                   help="LoRA weights to merge (the demo config uses the packaged demo LoRA unless 'none')")
    p.add_argument("--seq_length", type=int, default=None, help="context length (default: the YAML's)")
    add_bool_flag(p, "--use_past", default=None, help="KV cache (default: the YAML's use_past)")
    p.add_argument("--served_model_name", default=None,
                   help="the model id clients send (default: the YAML's name without run_, or the export folder's)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max_batch_size", type=int, default=4, help="requests generated together at most")
    p.add_argument("--max_queue_size", type=int, default=64,
                   help="requests waiting for the model at most; more are answered 429 with Retry-After")
    p.add_argument("--batch_window_ms", type=float, default=10.0,
                   help="how long a free model waits for more requests to join a batch")
    p.add_argument("--max_tokens", type=int, default=64, help="max_tokens of requests that give none")
    p.add_argument("--api_key", default=None, help=f"require this key (default: ${API_KEY_ENV}; unset = no key)")
    p.add_argument("--max_request_mb", type=float, default=20.0, help="request body size limit (413 above)")
    p.add_argument("--max_image_mb", type=float, default=10.0, help="encoded image size limit (413 above)")
    p.add_argument("--max_image_pixels", type=int, default=4096 * 4096,
                   help="decoded image width x height limit (413 above)")
    p.add_argument("--image_dir", default=None,
                   help="local image paths (or file:// URLs) are read from inside this folder only; "
                        "default: refused")
    add_bool_flag(p, "--allow_remote_images", default=False,
                  help="fetch http(s) image URLs (within --max_image_mb and --remote_image_timeout)")
    p.add_argument("--remote_image_timeout", type=float, default=10.0, help="seconds")
    p.add_argument("--quick_start", action="store_true",
                   help="warm up only one-row batches (larger ones compile when first run) instead of every batch "
                        "size up to --max_batch_size")
    p.add_argument("--log_level", default="info", choices=["debug", "info", "warning", "error"])
    add_device_args(p)
    return p


def model_name(args):
    if args.served_model_name:
        return args.served_model_name
    if args.export_dir:
        return os.path.basename(os.path.normpath(args.export_dir))
    stem = os.path.splitext(os.path.basename(args.config or DEFAULT_CONFIG))[0]
    return stem[len("run_"):] if stem.startswith("run_") else stem


def loader(args):
    """load() -> (model, processor) for the eager model of --config or the graphs of --export_dir."""
    def load():
        if args.export_dir:
            from ..export.runtime import ExportedModel, pick_backend

            exported = ExportedModel.locate(args.export_dir, backend=pick_backend(None, args.device_target,
                                                                                  args.device_id))
            exported.check_request(None, args.seq_length, args.use_past)
            return exported, exported.load_processor()
        overrides = {k: v for k, v in (("use_past", args.use_past), ("seq_length", args.seq_length)) if v is not None}
        return load_yaml_model(args.config or DEFAULT_CONFIG, args.lora_checkpoint, **overrides)
    return load


def check_args(args):
    if args.config and args.export_dir:
        raise ValueError("give --config or --export_dir, not both")
    for name in ("config", "export_dir", "image_dir"):
        path = getattr(args, name)
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"--{name}: not found: {path}")
    if args.max_batch_size < 1 or args.max_queue_size < 1 or args.max_tokens < 1:
        raise ValueError("--max_batch_size, --max_queue_size and --max_tokens must be at least 1")


@fail_cleanly
def main(argv=None):
    args = parse_command_line(build_parser(), argv)
    check_args(args)
    import uvicorn

    from ..serve.app import create_app
    from ..serve.messages import ImageLimits
    from ..serve.service import ServerOptions, Service

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    max_batch_size = args.max_batch_size
    if args.export_dir:
        from ..export.runtime import read_manifest

        max_batch_size = min(max_batch_size, read_manifest(args.export_dir)["batch_size"])
    options = ServerOptions(
        model_id=model_name(args), max_batch_size=max_batch_size, max_queue=args.max_queue_size,
        batch_window_ms=args.batch_window_ms, default_max_tokens=args.max_tokens,
        max_request_bytes=int(args.max_request_mb * MB), api_key=api_key, warm_up_all=not args.quick_start,
        images=ImageLimits(int(args.max_image_mb * MB), args.max_image_pixels, args.image_dir,
                           args.allow_remote_images, args.remote_image_timeout))
    set_device(args)
    app = create_app(Service(loader(args), options))
    print(f"serving {options.model_id} on http://{args.host}:{args.port} (max batch {max_batch_size}"
          f"{', API key required' if api_key else ''}); GET /health says when the model is ready", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
