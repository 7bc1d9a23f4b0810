"""Chapter 5 demo: train, export, compare formats, run ONNX Runtime, quantize to INT8, serve, check.

Run it with ``make demo`` (or ``python code/serve_model.py --help`` inside the virtual environment).
The steps live in the companion library, ``mldeploy.pipeline``.
"""

import sys

from mldeploy.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
