"""mldeploy — companion library of the chapter "模型部署基础 · Model Deployment Basics".

Every notebook, the demo script (``code/serve_model.py``) and the tests import from here, so the
code a reader sees in a notebook is the code that runs everywhere else. Importing it pins the
compute path (``mldeploy.reproducibility``) so stored numbers are the same on every x86-64 CPU.
"""

from mldeploy.reproducibility import pin_environment

pin_environment()

__version__ = "0.1.0"
