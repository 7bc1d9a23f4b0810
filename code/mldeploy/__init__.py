"""mldeploy — companion library of the chapter "模型部署基础 · Model Deployment Basics".

Every notebook, the demo script (``code/serve_model.py``) and the tests import from here, so the
code a reader sees in a notebook is the code that runs everywhere else. Importing it changes
nothing in the environment: a process that computes stored numbers pins its compute path itself
(``mldeploy.reproducibility.pin_compute_path``), so they are the same on every x86-64 CPU.
"""

__version__ = "0.1.0"
