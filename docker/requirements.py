"""Print the requirements the image's dependency layer installs (Dockerfile, deps stage), one a line:
pyproject.toml's dependencies, plus the `gpu` extra (tensorflow[and-cuda]) for VARIANT=gpu. For VARIANT=cpu
tensorflow becomes tensorflow-cpu, the same release without CUDA kernels (a 274 MB wheel instead of 572 MB,
about 1 GB less in the image). Versions come from requirements/constraints.txt, passed to pip with -c.
Usage: python docker/requirements.py gpu|cpu [pyproject.toml]"""

import re
import sys
import tomllib

variant = sys.argv[1] if len(sys.argv) > 1 else ""
if variant not in ("gpu", "cpu"):
    sys.exit(f"VARIANT={variant!r}: use gpu or cpu")
with open(sys.argv[2] if len(sys.argv) > 2 else "pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
requirements = list(project["dependencies"])
if variant == "gpu":
    requirements += project["optional-dependencies"]["gpu"]
else:
    requirements = [re.sub(r"^tensorflow(?=\s*(?:[<>=!~;]|$))", "tensorflow-cpu", r) for r in requirements]
print("\n".join(requirements))
