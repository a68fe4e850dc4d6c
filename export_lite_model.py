"""Export a model's graphs for MindSpore Lite / the MindIR runtime (see --help)."""
import sys

from visual_mllm.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
