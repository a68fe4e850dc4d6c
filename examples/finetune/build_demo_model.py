"""Build the learned demo model: LoRA-finetune the tiny VisualGLM on this folder's dataset.json.

    python examples/finetune/build_demo_model.py                # train into output/demo_model and check
    python examples/finetune/build_demo_model.py --install      # ... and replace the packaged demo checkpoint

It trains with configs/visualglm_tiny/lora.yaml (about a minute on 2 CPU cores), then answers every
training question greedily and fails unless each answer equals its label. --install copies the LoRA
checkpoint to visual_mllm/assets/demo/visualglm_tiny_lora.ckpt, the file the demo loads.
"""
import argparse
import os
import sys
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("VISUAL_MLLM_HOME", REPO_ROOT)
os.environ.setdefault("LOCAL_DEFAULT_PATH", os.path.join(tempfile.gettempdir(), "visual_mllm_output"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=os.path.join("output", "demo_model"))
    parser.add_argument("--install", action="store_true", help="replace the packaged demo LoRA checkpoint")
    args = parser.parse_args(argv)
    import mindspore as ms

    ms.set_device("CPU")
    from visual_mllm.finetune.demo import build_demo_model

    try:
        build_demo_model(args.output_dir, install=args.install)
    except RuntimeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
