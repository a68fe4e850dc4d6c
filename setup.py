"""Install the visual_mllm package (sources live in research/visual_mllm)."""
from setuptools import find_packages, setup

RUNTIME = [
    "mindspore==2.9.0",
    "mindformers==1.9.0",
    "mindpet==1.0.4",
    "numpy<2",
    "sentencepiece",
    "tiktoken",
    "Pillow",
    "pyyaml",
    "tqdm",
    # the HTTP server (run_server.py): the convention of this field's OpenAI-compatible servers
    "fastapi",
    "uvicorn",
]
EXTRAS = {
    # Reading PyTorch checkpoints (conversion) needs torch; the CPU build lies on the project machines.
    "convert": ["torch==2.13.0", "safetensors"],
    # The test suite (two pytest-xdist workers) compares against transformers' Blip2/LLaMA classes (mindformers pins 4.57.1).
    "test": ["pytest", "pytest-xdist", "torch==2.13.0", "safetensors", "transformers==4.57.1",
             # the server's tests: the official OpenAI client, raw HTTP, and the web page in the OS's Chromium
             "openai", "httpx", "playwright"],
}

setup(
    name="visual_mllm",
    version="0.1.0",
    description="Vision-language chat models (VisualGLM-6B, MiniGPT-4, MiniGPT4Qwen, CogVLM) on MindSpore",
    package_dir={"": "research"},
    packages=find_packages(where="research"),
    package_data={"visual_mllm": ["assets/*", "assets/**/*", "cpu_kernels/*.cc", "cpu_kernels/*.inc",
                                  "serve/static/*"]},
    # the commands the top-level scripts run (run_infer.py = visual-mllm-infer, ...), on the PATH after install
    entry_points={"console_scripts": [
        "visual-mllm-infer = visual_mllm.cli.infer:main",
        "visual-mllm-convert = visual_mllm.cli.convert:main",
        "visual-mllm-export = visual_mllm.cli.export:main",
        "visual-mllm-finetune = visual_mllm.cli.finetune:main",
        "visual-mllm-server = visual_mllm.cli.serve:main",
    ]},
    python_requires=">=3.9",
    install_requires=RUNTIME,
    extras_require=EXTRAS,
)
